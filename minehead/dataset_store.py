"""One dataset store for training, mining and drafting.

The head service owns uploaded datasets: `UploadDataset` unpacks a zip into
`<head data>/datasets/{id}` and names it `datasets/{id}`, where id is the first 16 hex digits of
the zip's sha256, so a name always means the same bytes. Other services read one through
`ExportDataset` (a deterministic zip of the folder) and keep a copy by id; since a name never
changes meaning, a copy never goes stale. Both ends unpack with `unpack`, so a dataset passes the
same hostile-zip checks (no absolute / `..` paths, no links, size caps, no pickles) and the same
"is this a dataset" check wherever it lands.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from minehead.core.errors import InvalidArgument
from minehead.core.safezip import make_zip, safe_members, write_members
from minehead.datasets import load_dataset

PREFIX = "datasets/"
MAX_DATASET_ZIP = 2 << 30
MAX_DATASET_MEMBER = 256 << 20
MAX_DATASET_MEMBERS = 200_000
_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def is_name(ref: str) -> bool:
    """True for "datasets/{id}" (a stored dataset), False for anything else (a folder path)."""
    return ref.startswith(PREFIX)


def dataset_id(ref: str) -> str:
    """"datasets/{id}" (or a bare id) -> id; INVALID_ARGUMENT for ids that could name a path."""
    did = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
    if not _ID.match(did):
        raise InvalidArgument(f"{ref!r} is not a dataset name (datasets/ followed by an id of letters, digits, - or _)")
    return did


def single_root(folder: Path) -> Path:
    """A zip of 'mydata/…' has its dataset one level down; accept both layouts."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not (folder / "images").exists():
        return entries[0]
    return folder


def unpack(data: bytes, parent: Path, did: str) -> Path:
    """Check and unpack a dataset zip to parent/did; return that folder.

    The folder appears only once complete and loadable (unpacked in a temporary sibling, then
    renamed), so a reader never sees half a dataset; when it already exists (same id, same
    bytes) it is kept as is."""
    if len(data) > MAX_DATASET_ZIP:
        raise InvalidArgument(f"dataset zip is over {MAX_DATASET_ZIP} bytes")
    target = parent / dataset_id(did)
    if target.is_dir():
        return target
    members = safe_members(data, max_member_bytes=MAX_DATASET_MEMBER, max_total_bytes=MAX_DATASET_ZIP * 2,
                           max_members=MAX_DATASET_MEMBERS)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        write_members(members, tmp)
        root = single_root(tmp)
        load_dataset(root)  # refuse what is not a dataset before it becomes visible
        try:
            root.rename(target)  # the dataset folder itself, whether it is tmp or one level down
        except OSError:
            if not target.is_dir():  # lost a race to an identical copy: that one is kept
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def folder_zip(folder: Path) -> bytes:
    """A stored dataset folder as a deterministic zip (sorted names, fixed times): regular
    files only, hidden ones left out, as the CLI zips a folder for upload."""
    return make_zip({p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                     if p.is_file() and not p.is_symlink() and not any(x.startswith(".") for x in p.relative_to(folder).parts)})
