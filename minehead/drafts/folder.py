"""A draft output folder, written one image at a time (memory stays flat however many images)
and safe to resume: the miner's drafting job and the CLI's streaming mode both write with it.

    OUT/labels/<stem>.txt        YOLO labels, written as each image finishes
    OUT/labelmap.txt             class names, one a line (YOLO ids are line numbers from 0)
    OUT/images/<file>            links to the source images, so the folder opens in YOLO tools
    OUT/coco.json                COCO (images, annotations with score, categories)
    OUT/labelstudio.json         Label Studio tasks with predictions (+ labelstudio_config.xml)
    OUT/review.jsonl             one line per box, most uncertain first, with provenance
    OUT/summary.json             counts, skipped images, merged lines, settings
    OUT/.minehead-draft/         state.json (what is being drafted), records/ (one finished
                                 image each: the exactly-once ledger), originals/ (merge backups)

Existing label files are never overwritten. Without `merge`, a folder whose labels/ holds
files this draft did not write is refused. With `merge`, every existing line is kept and the
drafts are appended; the original is backed up once first, so a resumed image is merged from
the original again rather than appended twice. The per-image record is written last (atomic
rename), so an image is finished exactly when its record exists.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from google.protobuf import json_format

from minehead.core.errors import FailedPrecondition, InvalidArgument
from minehead.drafts import formats
from minehead.miner.v1 import drafting_pb2

FORMATS = ("yolo", "coco", "labelstudio")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
META = ".minehead-draft"


def list_images(folder: Path) -> list[Path]:
    """FOLDER/images/* if it exists, else FOLDER/*: image files by suffix, sorted by name (the
    order fixes each image's index, so a resumed job numbers images as the first run did)."""
    base = folder / "images" if (folder / "images").is_dir() else folder
    return sorted(p for p in base.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def draft_result(summary: dict, output_dir: str | Path) -> drafting_pb2.DraftingResult:
    """The typed result of a draft from the summary `DraftFolder.finish` returned (the dict
    summary.json holds): the folder's totals as the result's fields, the run's account as its
    `summary`. The one conversion, for the miner's job and the CLI's stream mode alike."""
    skipped = list(summary.get("skipped", [])) + list(summary.get("unreadable", []))
    return drafting_pb2.DraftingResult(
        output_dir=str(output_dir), images=summary["images"], images_drafted=summary["images_drafted"],
        boxes=summary["boxes"], class_counts=summary["class_counts"],
        skipped=[drafting_pb2.SkippedImage(image=s["image"], reason=s["reason"]) for s in skipped],
        merged_lines=summary.get("merged_lines", {}), files=summary.get("files", []),
        # The keys beside the totals are DraftingSummary's fields (summary.json keeps a few more).
        summary=json_format.ParseDict(summary, drafting_pb2.DraftingSummary(), ignore_unknown_fields=True))


def tiled_entry(image: drafting_pb2.DraftedImage) -> dict | None:
    """summary.json's `tiled_images` entry for a drafted image, or None when it was drafted whole."""
    t = image.tiling
    return {"tiles": t.tiles, "tile_px": t.tile_px, "overlap_px": t.overlap_px} if t.tiles > 1 else None


def describe(result: drafting_pb2.DraftingResult) -> str:
    """The one-paragraph account of a draft, for the job log and the CLI."""
    s = result.summary
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.class_counts.items())) or "no boxes"
    skipped = list(result.skipped)
    text = (f"Drafted {result.images_drafted} of {result.images} images into {result.output_dir}: {result.boxes} boxes "
            f"({counts}); {s.ambiguous} flagged ambiguous, {s.with_runner_up} with a runner-up of another class; "
            f"{len(skipped)} skipped")
    if skipped:
        text += " (" + "; ".join(f"{k.image}: {k.reason}" for k in skipped[:3]) + (", …" if len(skipped) > 3 else "") + ")"
    text += f". This run: {s.drafted_this_run} images" + (f" at {s.images_per_s:.2f} images/s" if s.images_per_s else "")
    if result.merged_lines:
        text += (f"; appended {sum(result.merged_lines.values())} lines to {len(result.merged_lines)} existing label "
                 "files")
    if s.adapted_head:
        text += f"; drafted with head {s.adapted_head}, adapted to these images (summary.json adapt)"
    text += ". Files: " + ", ".join(result.files) + ". Review the most uncertain boxes first: review.jsonl"
    if s.images_unlike_labelled:
        text += (f", and the {s.images_unlike_labelled} image{'s' if s.images_unlike_labelled > 1 else ''} unlike the "
                 "labelled ones (summary.json unlike_labelled)")
    text += "."
    failed = list(s.failed)
    if failed:  # last, so it is the line's end a user reads
        text += (f" {len(failed)} image{'s' if len(failed) > 1 else ''} failed with an unexpected error "
                 f"({failed[0].image}: {failed[0].reason}{', …' if len(failed) > 1 else ''}; all in summary.json "
                 "`failed`, tracebacks in the miner's log); resuming the draft retries only those.")
    return text


def export_files(root: Path) -> dict[str, bytes]:
    """The files of a draft folder a user downloads (relative path -> bytes): everything but the
    bookkeeping (.minehead-draft/), the image links (images/) and temporary files."""
    files = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root)
        if p.is_symlink() or not p.is_file() or rel.parts[0] in (META, "images") or p.name.startswith(".tmp-"):
            continue
        files[str(rel)] = p.read_bytes()
    return files


def check_formats(formats_: list[str]) -> list[str]:
    fs = [f.strip().lower() for f in formats_ if f.strip()] or list(FORMATS)
    bad = [f for f in fs if f not in FORMATS]
    if bad:
        raise InvalidArgument(f"unknown draft format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    return sorted(set(fs) | {"yolo"}, key=FORMATS.index)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class DraftFolder:
    def __init__(self, root: Path, *, recipe_set: str, classes: list[str], head_classes: list[str],
                 formats_: list[str] = (), polygons: bool = False, merge: bool = False, source: str = "") -> None:
        self.root = Path(root)
        self.meta = self.root / META
        self.recipe_set = recipe_set
        self.formats = check_formats(list(formats_))
        self.polygons = polygons
        self.merge = merge
        self.head_classes = list(head_classes)
        state = {"recipe_set": recipe_set, "classes": list(classes), "polygons": polygons, "merge": merge,
                 "formats": self.formats, "source": source}
        self.resumed = self._claim(state)
        self.classes = self._labelmap(list(classes))
        self.class_ids = {c: i for i, c in enumerate(self.classes)}

    # -- setup ------------------------------------------------------------------------------
    def _claim(self, state: dict) -> bool:
        """Start or resume this folder; refuse one that holds someone else's labels."""
        self.root.mkdir(parents=True, exist_ok=True)
        state_file = self.meta / "state.json"
        if state_file.is_file():
            old = json.loads(state_file.read_text())
            diff = [k for k in ("recipe_set", "polygons", "merge") if old.get(k) != state[k]]
            if diff:
                raise FailedPrecondition(f"{self.root} holds a draft made with other settings ({', '.join(diff)} differ: "
                                         f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use a new output folder")
            return True
        labels = self.root / "labels"
        existing = sorted(p.name for p in labels.glob("*.txt")) if labels.is_dir() else []
        if existing and not self.merge:
            raise FailedPrecondition(f"{labels} already has {len(existing)} label file(s) (e.g. {existing[0]}); drafts never "
                                     "overwrite labels: choose an empty output folder, or pass merge to append to them")
        _atomic_write(state_file, json.dumps(state, indent=2).encode())
        return False

    def _labelmap(self, classes: list[str]) -> list[str]:
        """The folder's class list: an existing labelmap keeps its ids (merge); new classes go last."""
        lm = self.root / "labelmap.txt"
        have = [ln.strip() for ln in lm.read_text().splitlines() if ln.strip()] if lm.is_file() else []
        merged = have + [c for c in classes if c not in have]
        if merged != have:
            _atomic_write(lm, ("\n".join(merged) + "\n").encode())
        return merged

    # -- per image --------------------------------------------------------------------------
    def _record_path(self, img: drafting_pb2.DraftedImage) -> Path:
        return self.meta / "records" / f"{img.index:09d}.pb"

    def finished(self) -> dict[str, int]:
        """Image name -> index for every image already drafted (or skipped) in this folder. An
        image whose drafting failed (`failure`) is not finished: a resumed run tries it again
        and its record is replaced."""
        return {r.image: r.index for r in self.records() if not r.failure}

    def add(self, img: drafting_pb2.DraftedImage, image_path: Path | None = None) -> int:
        """Write one image's labels, then its record. Returns the lines appended to an existing
        label file (merge), else 0."""
        added = 0
        if not (img.error or img.failure):
            stem = Path(img.image).stem
            if image_path is not None:
                self._link_image(Path(image_path))
            lines = formats.yolo_lines(img, self.class_ids, self.polygons)
            label = self.root / "labels" / f"{stem}.txt"
            original = self.meta / "originals" / f"{stem}.txt"
            if self.merge and (original.is_file() or label.is_file()):
                if not original.is_file():
                    _atomic_write(original, label.read_bytes())
                keep = original.read_text().splitlines()
                keep = [ln for ln in keep if ln.strip()]
                _atomic_write(label, ("\n".join(keep + lines) + "\n").encode() if keep + lines else b"")
                added = len(lines)
            else:
                _atomic_write(label, ("\n".join(lines) + "\n").encode() if lines else b"")
        _atomic_write(self._record_path(img), img.SerializeToString())
        return added

    def _link_image(self, src: Path) -> None:
        dst = self.root / "images" / src.name
        try:
            if dst.resolve() == src.resolve() or dst.exists() or dst.is_symlink():
                return
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), dst)
        except OSError:
            pass  # a folder without image links still has every label; the tool can point at the source

    # -- assembling the whole-folder files --------------------------------------------------
    def records(self):
        for p in sorted((self.meta / "records").glob("*.pb")):
            yield drafting_pb2.DraftedImage.FromString(p.read_bytes())

    def totals(self) -> dict:
        """Counts over every finished image of the folder (this run's and earlier ones)."""
        counts: dict[str, int] = {}
        drafted = ambiguous = runner_up = 0
        skipped, failed = [], []
        for r in self.records():
            if r.failure:
                failed.append({"image": r.image, "reason": r.failure})
                continue
            if r.error:
                skipped.append({"image": r.image, "reason": r.error})
                continue
            drafted += 1
            for b in r.boxes:
                counts[b.class_name] = counts.get(b.class_name, 0) + 1
                ambiguous += b.ambiguous
                runner_up += bool(b.runner_up_class)
        return {"images_drafted": drafted, "boxes": sum(counts.values()), "class_counts": counts,
                "ambiguous": ambiguous, "with_runner_up": runner_up, "unreadable": skipped, "failed": failed}

    def finish(self, summary: dict) -> dict:
        """Write coco.json, labelstudio.json, review.jsonl and summary.json from the records,
        streaming (one image in memory at a time, plus one sort key per box for the review
        queue). Returns `summary` with the folder's totals and its files (relative paths)."""
        summary = {**summary, **self.totals()}
        files = ["labelmap.txt", "labels/"]
        cats = {c: i + 1 for i, c in enumerate(self.classes)}
        if "coco" in self.formats:
            self._write_coco(cats)
            files.append("coco.json")
        if "labelstudio" in self.formats:
            self._write_labelstudio()
            files += ["labelstudio.json", "labelstudio_config.xml"]
        self._write_review()
        files += ["review.jsonl", "summary.json"]
        summary["files"] = files
        _atomic_write(self.root / "summary.json", (json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n").encode())
        return summary

    def _stream_json(self, path: Path, head: str, parts, tail: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(head)
            first = True
            for obj in parts:
                f.write(("" if first else ",\n") + json.dumps(obj))
                first = False
            f.write(tail)
        os.replace(tmp, path)

    def _write_coco(self, cats: dict[str, int]) -> None:
        def images():
            for r in self.records():
                if not (r.error or r.failure):
                    yield formats.coco_image(r, r.index + 1, f"images/{r.image}")

        def annotations():
            ann = 1
            for r in self.records():
                for a in formats.coco_annotations(r, r.index + 1, ann, cats, self.polygons):
                    yield a
                ann += len(r.boxes)

        cat_json = json.dumps([{"id": i, "name": c, "supercategory": "object"} for c, i in cats.items()])
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        os.close(fd)
        img_tmp, ann_tmp = Path(tmp + ".i"), Path(tmp + ".a")
        self._stream_json(img_tmp, "", images(), "")
        self._stream_json(ann_tmp, "", annotations(), "")
        with open(tmp, "w") as f:
            f.write('{"info": {"description": "minehead draft", "recipe_set": ' + json.dumps(self.recipe_set) + '},\n"images": [\n')
            f.write(img_tmp.read_text())
            f.write('],\n"annotations": [\n')
            with open(ann_tmp) as a:
                for chunk in iter(lambda: a.read(1 << 20), ""):
                    f.write(chunk)
            f.write('],\n"categories": ' + cat_json + "}\n")
        img_tmp.unlink()
        ann_tmp.unlink()
        os.replace(tmp, self.root / "coco.json")

    def _write_labelstudio(self) -> None:
        def tasks():
            for r in self.records():
                if not (r.error or r.failure):
                    yield formats.labelstudio_task(r, f"/data/local-files/?d=images/{r.image}", self.recipe_set, self.polygons)

        self._stream_json(self.root / "labelstudio.json", "[\n", tasks(), "\n]\n")
        _atomic_write(self.root / "labelstudio_config.xml", formats.labelstudio_config(self.classes, self.polygons).encode())

    def _write_review(self) -> None:
        keys = []
        for r in self.records():
            keys += [(b.uncertainty, r.index, k) for k, b in enumerate(r.boxes)]
        keys.sort()
        cache: tuple[int, drafting_pb2.DraftedImage | None] = (-1, None)

        def lines():
            nonlocal cache
            for _, idx, k in keys:
                if cache[0] != idx:
                    p = self.meta / "records" / f"{idx:09d}.pb"
                    cache = (idx, drafting_pb2.DraftedImage.FromString(p.read_bytes()))
                yield formats.review_line(cache[1], k, self.head_classes)

        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            for line in lines():
                f.write(json.dumps(line) + "\n")
        os.replace(tmp, self.root / "review.jsonl")
