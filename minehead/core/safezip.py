"""Reading zips from strangers (head uploads, dataset uploads, recipe imports).

`safe_members(data, …)` checks the whole archive before a byte is written anywhere:
unique member names; no absolute, `..`, drive-letter, UNC or backslash paths; no symlinks or
other special files; per-member and total uncompressed size caps (checked on the stream, not
trusted from the header, so a zip bomb is stopped while it inflates); optionally only an
allowed set of names, and never pickles. Every refusal is InvalidArgument naming the member.
"""

from __future__ import annotations

import io
import re
import stat
import zipfile
from pathlib import Path, PurePosixPath

from minehead.core.errors import InvalidArgument

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".npy", ".npz", ".bin", ".ckpt")
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20


def check_name(name: str) -> str:
    """The member's normalised POSIX path, or InvalidArgument if it could escape the target."""
    if not name or "\x00" in name:
        raise InvalidArgument(f"zip member {name!r}: empty name or NUL byte")
    if "\\" in name:
        raise InvalidArgument(f"zip member {name!r}: backslashes are not allowed in member names")
    if name.startswith("/") or _DRIVE.match(name) or name.startswith("//"):
        raise InvalidArgument(f"zip member {name!r}: absolute paths are not allowed")
    parts = PurePosixPath(name).parts
    if any(p == ".." for p in parts):
        raise InvalidArgument(f"zip member {name!r}: '..' is not allowed")
    return str(PurePosixPath(*[p for p in parts if p != "."])) if parts else name


def safe_members(data: bytes, *, max_member_bytes: int, max_total_bytes: int, max_members: int = 10_000,
                 allowed: set[str] | None = None, forbid_pickles: bool = True) -> dict[str, bytes]:
    """All regular-file members as {normalised name: bytes}, after every check passed."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise InvalidArgument(f"not a valid zip file: {e}") from None
    infos = zf.infolist()
    if len(infos) > max_members:
        raise InvalidArgument(f"zip has {len(infos)} members; the limit is {max_members}")
    seen: dict[str, str] = {}
    out: dict[str, bytes] = {}
    total = 0
    for info in infos:
        name = check_name(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InvalidArgument(f"zip member {info.filename!r} is a symlink; links are not allowed")
        if info.is_dir():
            continue
        # Many writers store permission bits only (no file type); only a type that is set and
        # is not "regular file" (device, fifo, …) is refused.
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise InvalidArgument(f"zip member {info.filename!r} is not a regular file")
        key = name.lower()
        if key in seen:
            raise InvalidArgument(f"zip member {info.filename!r} duplicates {seen[key]!r}")
        seen[key] = info.filename
        if forbid_pickles and name.lower().endswith(PICKLE_SUFFIXES):
            raise InvalidArgument(f"zip member {name!r}: pickled/binary tensor files are not accepted (bundles are ONNX + JSON)")
        if allowed is not None and name not in allowed:
            raise InvalidArgument(f"zip member {name!r} is not expected here (allowed: {', '.join(sorted(allowed))})")
        if info.file_size > max_member_bytes:
            raise InvalidArgument(f"zip member {name!r} is {info.file_size} bytes; the limit is {max_member_bytes}")
        buf = io.BytesIO()
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                buf.write(chunk)
                if buf.tell() > max_member_bytes:
                    raise InvalidArgument(f"zip member {name!r} inflates past {max_member_bytes} bytes")
                if total + buf.tell() > max_total_bytes:
                    raise InvalidArgument(f"zip contents exceed {max_total_bytes} bytes in total")
        body = buf.getvalue()
        if forbid_pickles and body[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            raise InvalidArgument(f"zip member {name!r} looks like a Python pickle; pickles are never loaded")
        total += len(body)
        out[name] = body
    return out


def write_members(members: dict[str, bytes], target: Path) -> None:
    """Write checked members under `target` (names already passed check_name)."""
    for name, body in members.items():
        p = target / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)


def make_zip(files: dict[str, bytes]) -> bytes:
    """Deterministic zip (fixed timestamps, sorted names): the same files give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, files[name])
    return buf.getvalue()
