"""The head registry: immutable bundles in folders named by content id.

    DATA_DIR/head/heads/<head_id>/{head.onnx, meta.json, report.json}

Writes are atomic: a bundle is written to a hidden temporary folder beside the store and
renamed into place, so a crash leaves either the whole head or none of it. Listing re-reads
the folder every time, so heads copied in by hand appear; a folder that fails validation is
listed as a problem, never served. Names: "heads/<id>", "<id>", or a display name (the newest
head with that name; "name@latest" says so explicitly).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from minehead.core.errors import InvalidArgument, NotFound

from minehead.heads.bundle import HeadBundle


class HeadRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, tuple[float, HeadBundle]] = {}
        self._lock = threading.Lock()

    def _load(self, folder: Path) -> HeadBundle:
        """Validated bundle for a folder, cached until its meta.json changes."""
        mtime = (folder / "meta.json").stat().st_mtime_ns
        with self._lock:
            hit = self._cache.get(folder.name)
            if hit and hit[0] == mtime:
                return hit[1]
        b = HeadBundle.load(folder)
        if b.head_id != folder.name:
            raise InvalidArgument(f"folder {folder.name} holds head {b.head_id}: the folder name must be the content id")
        with self._lock:
            self._cache[folder.name] = (mtime, b)
        return b

    def list(self) -> tuple[list[HeadBundle], list[str]]:
        """(valid heads, newest first; one line per folder that failed validation)."""
        heads, problems = [], []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                heads.append(self._load(folder))
            except (InvalidArgument, OSError) as e:
                problems.append(f"{folder.name}: {e}")
        heads.sort(key=lambda b: (b.meta["created_time"], b.head_id), reverse=True)
        return heads, problems

    def get(self, name: str) -> HeadBundle:
        if not name:
            raise InvalidArgument("no head named")
        hid = name[len("heads/"):] if name.startswith("heads/") else name
        folder = self.root / hid
        if "/" not in hid and not hid.startswith(".") and (folder / "meta.json").is_file():
            try:
                return self._load(folder)
            except InvalidArgument as e:
                raise NotFound(f"head {name!r} is in the store but invalid: {e}") from None
        display = hid[:-len("@latest")] if hid.endswith("@latest") else hid
        heads, _ = self.list()
        named = [h for h in heads if h.display_name == display]
        if named:
            return named[0]
        raise NotFound(f"no head {name!r} (by id or display name); `minehead heads list` shows what there is")

    def put(self, bundle: HeadBundle, display_name: str | None = None) -> HeadBundle:
        """Store a validated bundle. Storing an id that exists returns the stored head (heads are
        immutable); a new display name on upload is kept in meta.json, outside the content id."""
        if display_name is not None:
            bundle.meta["display_name"] = display_name
        target = self.root / bundle.head_id
        if (target / "meta.json").is_file():
            return self._load(target)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            for name, body in bundle.files().items():
                (tmp / name).write_bytes(body)
            try:
                tmp.rename(target)
            except OSError:  # a concurrent writer stored the same content first
                if not (target / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._load(target)

    def delete(self, name: str) -> str:
        b = self.get(name)
        folder = self.root / b.head_id
        # Rename first so the head disappears atomically, then remove the files.
        trash = self.root / f".deleted-{b.head_id}"
        shutil.rmtree(trash, ignore_errors=True)
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._cache.pop(b.head_id, None)
        return b.head_id
