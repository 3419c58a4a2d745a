"""Accepted results -> a YOLO dataset that `heads train` and `mine start` read, with no redrawing.

    report = accept(DRAFT, DATASET, images=None)

DRAFT is a draft folder (`minehead find` or `minehead draft`): labelmap.txt, labels/<stem>.txt,
images/<file> (links to the sources). Its label files are read as they are on disk now, so boxes
corrected, added or deleted there during review are what the dataset gets. `images`: the file
names accepted (default: every image the folder holds labels for). DATASET is created or
extended: images/ (copies, not links: a dataset outlives the sources' folder), labels/,
labelmap.txt. Class ids are remapped by name onto DATASET's labelmap (new names go last), and an
image already in DATASET is replaced, so accepting a re-reviewed image twice keeps one copy.
The result passes `minehead.datasets.load_dataset` (what training reads); upload it with
`minehead datasets accept … --upload` to make it a stored `datasets/{id}`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from minehead.core.errors import InvalidArgument
from minehead.datasets import IMAGE_EXTS, load_dataset
from minehead.drafts.folder import _atomic_write  # the draft folder's own writer: one way to write a file


def _labelmap(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _write(path: Path, text: str) -> None:
    _atomic_write(path, text.encode())


def accept(draft: Path | str, dataset: Path | str, images: list[str] | None = None) -> dict:
    """-> {"dataset", "images", "boxes", "class_counts", "classes", "missing"} (missing: names asked
    for that the draft has no labels or image for)."""
    draft, dataset = Path(draft), Path(dataset)
    src_classes = _labelmap(draft / "labelmap.txt")
    if not src_classes or not (draft / "labels").is_dir():
        raise InvalidArgument(f"{draft} is not a draft folder (no labelmap.txt and labels/)")
    pictures = {p.name: p for p in (draft / "images").iterdir()} if (draft / "images").is_dir() else {}
    by_stem = {Path(n).stem: p for n, p in pictures.items() if Path(n).suffix.lower() in IMAGE_EXTS}
    wanted = None if images is None else {Path(n).stem for n in images}
    classes = _labelmap(dataset / "labelmap.txt")
    classes += [c for c in src_classes if c not in classes]
    remap = {i: classes.index(c) for i, c in enumerate(src_classes)}
    counts: dict[str, int] = {}
    done, missing = 0, []
    for label in sorted((draft / "labels").glob("*.txt")):
        if wanted is not None and label.stem not in wanted:
            continue
        src = by_stem.get(label.stem)
        if src is None or not src.exists():
            missing.append(label.stem)
            continue
        lines = []
        for n, line in enumerate(label.read_text().splitlines(), 1):
            v = line.split()
            if not v:
                continue
            if not v[0].isdigit() or int(v[0]) not in remap:
                raise InvalidArgument(f"{label}:{n}: class id {v[0]!r} is not in {draft / 'labelmap.txt'}")
            c = remap[int(v[0])]
            lines.append(" ".join([str(c)] + v[1:]))
            counts[classes[c]] = counts.get(classes[c], 0) + 1
        for old in (dataset / "images").glob(label.stem + ".*") if (dataset / "images").is_dir() else ():
            old.unlink()
        (dataset / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.resolve(), dataset / "images" / src.name)
        _write(dataset / "labels" / label.name, "\n".join(lines) + ("\n" if lines else ""))
        done += 1
    if wanted is not None:
        missing += sorted(wanted - {p.stem for p in (draft / "labels").glob("*.txt")})
    _write(dataset / "labelmap.txt", "\n".join(classes) + "\n")
    ds = load_dataset(dataset)  # what training reads: refuse to hand over a folder it cannot
    return {"dataset": str(dataset), "images": done, "dataset_images": len(ds.images), "boxes": sum(counts.values()),
            "class_counts": counts, "classes": classes, "missing": sorted(set(missing)), "dropped_lines": ds.dropped}
