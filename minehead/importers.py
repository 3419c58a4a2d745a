"""Corrections back in: a Label Studio JSON export or a COCO file -> a YOLO dataset folder that
`minehead.datasets.load_dataset` reads (images/, labels/*.txt, labelmap.txt), polygons kept.

The input comes from strangers (an export someone hands over), so, as for uploads
(minehead.core.safezip), the whole file is checked before anything is written or fetched:
    - JSON over MAX_JSON_BYTES, malformed, or with NaN/Infinity tokens;
    - image references with `..`, backslashes, drive letters, absolute paths outside
      images_root, schemes other than http(s), or URLs to any host but labelstudio_url's;
    - coordinates that are not finite numbers or lie far outside the image;
    - label names missing from a given labelmap (or reserved/unwritable names).
Each refusal is InvalidArgument naming the task and the problem, and leaves nothing behind:
the folder is built in a temporary sibling and renamed into place only when complete.

Paths are checked lexically, not through symlinks: the JSON's author chooses strings, not the
links inside images_root, and `minehead draft` itself fills OUT/images/ with links to the
source images, so a draft folder must stay importable. Only URLs on the Label Studio host are
ever fetched (redirects not followed), with `Authorization: Token $MINEHEAD_LABELSTUDIO_TOKEN`.

Problems of one task that are not hostile (image missing or unreadable, no reviewed annotation,
a region without a label) skip that task or region and are counted in the ImportReport.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image

from minehead.core.errors import FailedPrecondition, InvalidArgument
from minehead.datasets import IMAGE_EXTS

MAX_JSON_BYTES = 64 << 20
MAX_IMAGE_BYTES = 64 << 20
SLACK = 0.02  # of the image size: exporters overshoot the edge by rounding or a sloppy drag; more is refused
_DRIVE = re.compile(r"^[A-Za-z]:")
_FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
_LS_LABELLED = ("rectanglelabels", "polygonlabels", "labels")  # result types that carry label names
_LS_SHAPES = ("rectangle", "polygon")  # shape halves of a region whose labels come in a `labels` twin


@dataclasses.dataclass
class ImportReport:
    source: str  # "labelstudio" | "coco"
    out_dir: str
    classes: list[str]
    images: int = 0
    boxes: int = 0
    polygons: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reason -> task ids / images
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> regions left out

    def skip(self, what: str, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(what)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        skipped = "; ".join(f"{len(v)} {r} (e.g. {v[0]})" for r, v in self.skipped.items())
        dropped = "; ".join(f"{v} {r}" for r, v in self.dropped.items())
        return (f"imported {self.images} images ({self.boxes} boxes, {self.polygons} polygons; classes "
                f"{', '.join(self.classes) or 'none'}) from {self.source} into {self.out_dir}"
                + (f"; skipped {sum(map(len, self.skipped.values()))}: {skipped}" if skipped else "")
                + (f"; regions left out: {dropped}" if dropped else ""))


@dataclasses.dataclass
class _Item:
    """One image to write: where its bytes come from and its regions as (label, normalised
    coordinates: cx cy w h for a box, x1 y1 x2 y2 ... for a polygon)."""
    what: str  # for reports: "task 12" / "image 3"
    source: tuple[str, str]  # ("file", path) | ("url", url) | ("missing", reason)
    name: str  # basename to derive the output name from
    regions: list[tuple[str, list[float]]]


class _Skip(Exception):
    """One image cannot be used (not hostile): skip it and say why."""


# -- parsing helpers ---------------------------------------------------------------------------
def _load_json(data: bytes, what: str, max_bytes: int):
    if len(data) > max_bytes:
        raise InvalidArgument(f"{what} is {len(data)} bytes or more; the limit is {max_bytes}")

    def no_constants(tok):  # Python's json accepts NaN/Infinity; they are not coordinates
        raise ValueError(f"{tok} is not a JSON number")
    try:
        return json.loads(data, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None


def _num(v, where: str) -> float:
    try:  # an integer literal of 400 digits is valid JSON and overflows a float
        x = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise InvalidArgument(f"{where}: coordinate {shown} is not a finite number")
    return x


def _coord(v, where: str, size: float) -> float:
    """A coordinate in [0, size] (percent: size 100; pixels: the image side), after the slack."""
    x = _num(v, where)
    if not -SLACK * size <= x <= (1 + SLACK) * size:
        raise InvalidArgument(f"{where}: coordinate {x:g} is far outside 0..{size:g}")
    return x


def _box(x: float, y: float, w: float, h: float, W: float, H: float) -> list[float] | None:
    """Clip to the image and normalise; None when nothing is left."""
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
    if x2 <= x1 or y2 <= y1:
        return None
    return [(x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W, (y2 - y1) / H]


def _poly(pts: list[tuple[float, float]], W: float, H: float) -> list[float] | None:
    flat = [min(max(v / s, 0.0), 1.0) for x, y in pts for v, s in ((x, W), (y, H))]
    xs, ys = flat[0::2], flat[1::2]
    return flat if max(xs) > min(xs) and max(ys) > min(ys) else None


def _sizes_ok(*sizes) -> bool:
    return all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)


def _check_names(names: list[str], where: str) -> None:
    for n in names:
        if not isinstance(n, str) or not n.strip() or n != n.strip() or "\n" in n or n.startswith("__bg_"):
            raise InvalidArgument(f"{where}: label {n!r} cannot be a class name (empty, padded, multi-line or "
                                  "reserved __bg_ prefix)")


# -- image references --------------------------------------------------------------------------
def _resolve(ref, where: str, root: Path | None, ls) -> tuple[tuple[str, str], str]:
    """(source, basename) for an image reference, or InvalidArgument when it points where an
    import must never reach. A file that simply is not there is ("missing", reason)."""
    if not isinstance(ref, str) or not ref or "\x00" in ref:
        raise InvalidArgument(f"{where}: image reference {ref!r} is not a usable string")
    u = urlsplit(ref)
    if u.scheme in ("http", "https"):
        if ls is None or (u.scheme, u.netloc.lower()) != (ls.scheme, ls.netloc.lower()):
            allowed = f"only {ls.scheme}://{ls.netloc} (--labelstudio-url)" if ls else "none without --labelstudio-url"
            raise InvalidArgument(f"{where}: image URL {ref!r} is on host {u.netloc!r}; hosts fetched from: {allowed}")
        rest = ref[len(f"{u.scheme}://{u.netloc}"):]
        if not rest.startswith("/data/"):
            return ("url", ref), PurePosixPath(unquote(u.path)).name
        ref, u = rest, urlsplit(rest)  # Label Studio's file URLs may also be on disk under images_root: read there first
    elif u.scheme and not _DRIVE.match(ref):
        raise InvalidArgument(f"{where}: image {ref!r}: scheme {u.scheme!r} is not read (local paths under "
                              "--images-root and URLs on the Label Studio host only)")
    if ref.startswith("/data/local-files/"):  # local storage: ?d= is relative to Label Studio's document root
        rel = parse_qs(u.query).get("d", [""])[0]
        if not rel:
            raise InvalidArgument(f"{where}: {ref!r} has no ?d= path")
    elif ref.startswith("/data/"):  # uploads, /data/upload/P/F: MEDIA_ROOT/upload/P/F when images_root is it
        rel = unquote(u.path)[len("/data/"):]
    else:
        return _found(_local(ref, where, root, required=True), ref, None), PurePosixPath(ref).name
    return _found(_local(rel, where, root, required=ls is None), ref, ls), PurePosixPath(rel).name


def _local(p: str, where: str, root: Path | None, required: bool) -> Path | None:
    if "\\" in p or _DRIVE.match(p):
        raise InvalidArgument(f"{where}: image path {p!r}: backslashes and drive letters are not allowed")
    if ".." in PurePosixPath(p).parts:
        raise InvalidArgument(f"{where}: image path {p!r}: '..' is not allowed")
    if root is None:
        if required:
            raise InvalidArgument(f"{where}: image path {p!r} is local: give images_root (--images-root)")
        return None
    if p.startswith("/"):
        q = Path(os.path.normpath(p))
        if not any(q == r or r in q.parents for r in (root, Path(os.path.realpath(root)))):
            raise InvalidArgument(f"{where}: image path {p!r} is absolute and outside the images root {root}")
        return q
    return root / p


def _found(local: Path | None, ref: str, ls) -> tuple[str, str]:
    if local is not None and local.is_file():
        return "file", str(local)
    if ls is not None and ref.startswith("/"):
        return "url", f"{ls.scheme}://{ls.netloc}{ref}"
    return "missing", "image not found" + (f" ({local})" if local is not None else "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could lead to another host: never followed
        return None


def _auth(token: str | None) -> str | None:
    """A bare token is a legacy Label Studio token; a full header value ("Bearer …", "Token …",
    what minehead.labelstudio.client makes of a personal access token) is sent as it is."""
    if not token:
        return None
    return token if token.startswith(("Token ", "Bearer ")) else f"Token {token}"


def _materialise(source: tuple[str, str], dst: Path, token: str | None) -> None:
    kind, where = source
    if kind == "missing":
        raise _Skip(where)
    try:
        if kind == "file":
            if os.path.getsize(where) > MAX_IMAGE_BYTES:
                raise _Skip(f"image over {MAX_IMAGE_BYTES} bytes")
            try:
                os.link(os.path.realpath(where), dst)  # same file system: no copy
            except OSError:
                shutil.copyfile(where, dst)
            return
        auth = _auth(token)
        req = urllib.request.Request(where, headers={"Authorization": auth} if auth else {})
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=60) as r, open(dst, "wb") as f:
            while chunk := r.read(1 << 20):
                if f.tell() + len(chunk) > MAX_IMAGE_BYTES:
                    raise _Skip(f"image over {MAX_IMAGE_BYTES} bytes")
                f.write(chunk)
    except urllib.error.HTTPError as e:
        raise _Skip(f"HTTP {e.code} from Label Studio" + (" (redirects are not followed)" if 300 <= e.code < 400 else "")) from None
    except OSError as e:  # URLError included
        raise _Skip(f"could not read the image ({getattr(e, 'reason', None) or e.strerror or e})") from None


def resolve_image(ref, where: str, images_root: Path | str | None, labelstudio_url: str | None) -> tuple[str, str]:
    """A task's image reference checked by the import rules (no traversal, no absolute path
    outside images_root, no host but the Label Studio instance's): ("file", path), ("url", url)
    or ("missing", reason). InvalidArgument for references an import must never follow."""
    _, root, ls = _setup(None, images_root, labelstudio_url)
    return _resolve(ref, where, root, ls)[0]


def fetch_image(source: tuple[str, str], dst: Path, token: str | None) -> None:
    """Write the image of a resolve_image() source to dst (size-capped, redirects not followed);
    InvalidArgument saying why when it cannot be had."""
    try:
        _materialise(source, Path(dst), token)
    except _Skip as e:
        raise InvalidArgument(f"image {source[1]}: {e}") from None


def _safe_stem(name: str, taken: set[str]) -> tuple[str, str]:
    """(stem, suffix) from a basename: safe characters only, unique by lower-cased stem (labels
    are stem.txt, and some file systems ignore case)."""
    p = PurePosixPath(unquote(name))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem).strip("._")[:100] or "image"
    base, k = stem, 2
    while stem.lower() in taken:
        stem, k = f"{base}_{k}", k + 1
    taken.add(stem.lower())
    return stem, p.suffix.lower()


# -- writing -----------------------------------------------------------------------------------
def _setup(out_dir, images_root, labelstudio_url) -> tuple[Path, Path | None, object]:
    """Checks that need no parsing, done first: the output folder, the root, the instance URL."""
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FailedPrecondition(f"{out_dir} exists and is not empty; imports never overwrite: choose a new folder")
    ls = urlsplit(labelstudio_url) if labelstudio_url else None
    if ls is not None and (ls.scheme not in ("http", "https") or not ls.netloc):
        raise InvalidArgument(f"--labelstudio-url {labelstudio_url!r} is not an http(s) URL")
    return out_dir, Path(os.path.abspath(images_root)) if images_root is not None else None, ls


def _write(items: list[_Item], classes: list[str], out_dir: Path, report: ImportReport, token: str | None) -> ImportReport:
    token = token if token is not None else os.environ.get("MINEHEAD_LABELSTUDIO_TOKEN")  # a bare token or a header value
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.import-", dir=out_dir.parent))  # same fs: rename is atomic
    try:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        ids, taken = {c: i for i, c in enumerate(classes)}, set()
        for it in items:
            stem, suffix = _safe_stem(it.name, taken)
            part = tmp / f".part-{stem}"
            try:
                _materialise(it.source, part, token)
                try:
                    with Image.open(part) as im:
                        W, H, fmt = im.width, im.height, im.format
                except Exception:  # noqa: BLE001 - any decoder failure means "not an image we can use"
                    raise _Skip("unreadable image") from None
                suffix = suffix if suffix in IMAGE_EXTS else _FORMAT_EXT.get(fmt or "")
                if not suffix:
                    raise _Skip(f"unsupported image format {fmt}")
            except _Skip as e:
                part.unlink(missing_ok=True)
                report.skip(it.what, str(e))
                continue
            part.rename(tmp / "images" / f"{stem}{suffix}")
            lines = []
            for label, c in it.regions:
                xs, ys = (c[0::2], c[1::2]) if len(c) > 4 else ([c[0] - c[2] / 2, c[0] + c[2] / 2], [c[1] - c[3] / 2, c[1] + c[3] / 2])
                if (max(xs) - min(xs)) * W < 1 or (max(ys) - min(ys)) * H < 1:  # the reader drops these: say so here
                    report.drop("regions under one pixel")
                    continue
                lines.append(f"{ids[label]} " + " ".join(f"{v:.6f}" for v in c))
                report.polygons += len(c) > 4
                report.boxes += len(c) == 4
            (tmp / "labels" / f"{stem}.txt").write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
            report.images += 1
        if not report.images:
            raise InvalidArgument("nothing to import: no usable image (" + "; ".join(
                f"{len(v)} {r}" for r, v in report.skipped.items()) + ")")
        (tmp / "labelmap.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked); rename cannot replace it on every platform
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _classes(used: list[str], labelmap: list[str] | None, where: str, default: list[str] | None = None) -> list[str]:
    """The labelmap as given (every used name must be in it), else `default`, else the names in
    order of first use."""
    if labelmap is None:
        return list(default) if default is not None else list(dict.fromkeys(used))
    labelmap = list(labelmap)
    _check_names(labelmap, "labelmap")
    if len(set(labelmap)) != len(labelmap):
        raise InvalidArgument("labelmap: duplicate class names")
    unknown = sorted(set(used) - set(labelmap))
    if unknown:
        raise InvalidArgument(f"{where}: label(s) {', '.join(map(repr, unknown))} are not in the labelmap "
                              f"({', '.join(labelmap)})")
    return labelmap


# -- Label Studio --------------------------------------------------------------------------------
def _ls_region(r: dict, where: str, report: ImportReport, twins: set) -> list[tuple[str, list[float]]]:
    t, v = r.get("type"), r.get("value")
    if t not in _LS_LABELLED + _LS_SHAPES:
        report.drop(f"{t} results (not boxes or polygons)")
        return []
    if not isinstance(v, dict):
        raise InvalidArgument(f"{where}: result value is not an object")
    if t in _LS_SHAPES:  # its labels come in a `labels` result with the same id, which has the geometry too
        if r.get("id") not in twins:
            report.drop("regions without a label")
        return []
    names = v.get(t)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument(f"{where}: value.{t} is not a list of label names")
    if not names:
        report.drop("regions without a label")
        return []
    _check_names(names, where)
    if isinstance(v.get("points"), list):
        pts = v["points"]
        if len(pts) < 3 or not all(isinstance(p, list) and len(p) == 2 for p in pts):
            raise InvalidArgument(f"{where}: polygon points must be at least 3 [x, y] pairs")
        c = _poly([(_coord(x, where, 100), _coord(y, where, 100)) for x, y in pts], 100, 100)
    elif all(k in v for k in ("x", "y", "width", "height")):
        x, y, w, h = (_coord(v[k], where, 100) for k in ("x", "y", "width", "height"))
        rot = _num(v.get("rotation", 0), where) % 360
        if rot:  # Label Studio turns the box about its top-left corner, in pixels: keep it as its polygon
            ow, oh = r.get("original_width"), r.get("original_height")
            if not _sizes_ok(ow, oh):
                report.drop("rotated boxes without original_width/height")
                return []
            cs, sn = math.cos(math.radians(rot)), math.sin(math.radians(rot))
            px, py, pw, ph = x * ow / 100, y * oh / 100, w * ow / 100, h * oh / 100
            corners = [(px + a * cs - b * sn, py + a * sn + b * cs) for a, b in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
            c = _poly(corners, ow, oh)
        else:
            c = _box(x, y, w, h, 100, 100)
    else:
        report.drop("results without coordinates")
        return []
    if c is None:
        report.drop("zero-size regions")
        return []
    return [(n, c) for n in names]  # a multi-label region gives one line per label


def _latest(anns, what: str) -> dict | None:
    """The latest annotation not cancelled: by updated_at (else created_at), then list order."""
    if not isinstance(anns, list):
        raise InvalidArgument(f"{what}: annotations is not a list")
    ok = [(str(a.get("updated_at") or a.get("created_at") or ""), i, a) for i, a in enumerate(anns)
          if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(ok, key=lambda t: t[:2])[2] if ok else None


def import_labelstudio(data: bytes, out_dir: Path | str, images_root: Path | str | None = None, *,
                       labelstudio_url: str | None = None, labelmap: list[str] | None = None,
                       token: str | None = None, max_json_bytes: int = MAX_JSON_BYTES) -> ImportReport:
    """A Label Studio JSON export (the task list) -> a YOLO dataset at out_dir (new or empty)."""
    out_dir, root, ls = _setup(out_dir, images_root, labelstudio_url)
    tasks = _load_json(data, "the Label Studio export", max_json_bytes)
    if not isinstance(tasks, list):
        raise InvalidArgument("the Label Studio export must be a JSON list of tasks (export as JSON, not JSON-MIN)")
    report, items, used = ImportReport("labelstudio", str(out_dir), []), [], []
    for k, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise InvalidArgument(f"task #{k}: not a Label Studio task (an object with `data`)")
        what = f"task {task.get('id', '#' + str(k))}"
        d = task["data"]
        ref = d.get("image", next(iter(d.values())) if len(d) == 1 else None)
        ann = _latest(task.get("annotations") or [], what)
        if ann is None:
            report.skip(what, "all annotations cancelled" if task.get("annotations") else
                        "predictions only, never reviewed" if task.get("predictions") else "no annotations")
            continue
        if ref is None:
            report.skip(what, "no image in data")
            continue
        results = ann.get("result")
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise InvalidArgument(f"{what}: annotation result is not a list of objects")
        twins = {r["id"] for r in results if r.get("type") in _LS_LABELLED and r.get("id") is not None}
        regions = [reg for j, r in enumerate(results) for reg in _ls_region(r, f"{what} result {j}", report, twins)]
        source, name = _resolve(ref, what, root, ls)
        used += [n for n, _ in regions]
        items.append(_Item(what, source, name, regions))
    report.classes = _classes(used, labelmap, "the Label Studio export")
    return _write(items, report.classes, out_dir, report, token)


# -- COCO ------------------------------------------------------------------------------------------
def import_coco(data: bytes, out_dir: Path | str, images_root: Path | str | None = None, *,
                labelstudio_url: str | None = None, labelmap: list[str] | None = None,
                token: str | None = None, max_json_bytes: int = MAX_JSON_BYTES) -> ImportReport:
    """A COCO file (images, annotations with bbox and optional polygon segmentation, categories)
    -> a YOLO dataset at out_dir. Class order: the categories' order in the file."""
    out_dir, root, ls = _setup(out_dir, images_root, labelstudio_url)
    doc = _load_json(data, "the COCO file", max_json_bytes)
    if not isinstance(doc, dict):
        raise InvalidArgument("the COCO file must be a JSON object with images, annotations, categories")
    cats, images, anns = (doc.get(k) for k in ("categories", "images", "annotations"))
    if not all(isinstance(v, list) and all(isinstance(x, dict) for x in v) for v in (cats, images, anns)):
        raise InvalidArgument("COCO file: categories, images and annotations must be lists of objects")
    names: dict = {}
    for c in cats:
        if not isinstance(c.get("id"), (int, str)) or c["id"] in names or not isinstance(c.get("name"), str):
            raise InvalidArgument(f"COCO category {c!r}: needs a unique id and a name")
        names[c["id"]] = c["name"]
    _check_names(list(names.values()), "COCO categories")
    if len(set(names.values())) != len(names):
        raise InvalidArgument("COCO categories: duplicate names")
    report, by_id = ImportReport("coco", str(out_dir), []), {}
    for im in images:
        what = f"image {im.get('id')!r}"
        W, H = im.get("width"), im.get("height")
        if im.get("id") in by_id or not _sizes_ok(W, H):
            raise InvalidArgument(f"COCO {what}: needs a unique id and positive integer width and height")
        source, name = _resolve(im.get("file_name"), f"COCO {what}", root, ls)
        by_id[im["id"]] = (_Item(what, source, name, []), W, H)
    for a in anns:
        where = f"COCO annotation {a.get('id')!r}"
        if a.get("image_id") not in by_id or a.get("category_id") not in names:
            raise InvalidArgument(f"{where}: unknown image_id {a.get('image_id')!r} or category_id {a.get('category_id')!r}")
        item, W, H = by_id[a["image_id"]]
        if a.get("iscrowd"):
            report.drop("crowd annotations")
            continue
        bb = a.get("bbox")
        if not isinstance(bb, list) or len(bb) != 4:
            raise InvalidArgument(f"{where}: bbox must be [x, y, width, height]")
        x, y, w, h = _coord(bb[0], where, W), _coord(bb[1], where, H), _coord(bb[2], where, W), _coord(bb[3], where, H)
        c = _box(x, y, w, h, W, H)
        seg = a.get("segmentation")
        if isinstance(seg, list) and len(seg) == 1 and isinstance(seg[0], list) and len(seg[0]) >= 6 and len(seg[0]) % 2 == 0:
            pts = [(_coord(seg[0][i], where, W), _coord(seg[0][i + 1], where, H)) for i in range(0, len(seg[0]), 2)]
            # the 4 corners of the bbox itself (what box-only writers, minehead's drafts among them, put there) stay a box
            corners = {(x, y), (x + w, y), (x + w, y + h), (x, y + h)}
            if not (len(pts) == 4 and all(min(math.dist(p, q) for q in corners) < 0.01 for p in pts)):
                c = _poly(pts, W, H)
        elif isinstance(seg, list) and len(seg) > 1:
            report.drop("multi-part segmentations written as their box")  # one YOLO line holds one polygon
        if c is None:
            report.drop("zero-size regions")
            continue
        item.regions.append((names[a["category_id"]], c))
    used = [n for it, _, _ in by_id.values() for n, _ in it.regions]
    report.classes = _classes(used, labelmap, "the COCO file", default=list(names.values()))
    return _write([it for it, _, _ in by_id.values()], report.classes, out_dir, report, token)


def import_export(data: bytes, out_dir: Path | str, images_root: Path | str | None = None, **kw) -> ImportReport:
    """Either format, told apart by the JSON's top level: a list is Label Studio, an object COCO."""
    head = data[:4096].lstrip()
    fn = import_labelstudio if head.startswith(b"[") else import_coco
    return fn(data, out_dir, images_root, **kw)
