"""Recipes (schema v2) as data: canonical JSON, content ids, the store, and recipe bundles.

The protobuf message `minehead.recipes.v2.Recipe` is the schema; `recipe.json` is its canonical
protobuf JSON, so export -> import round-trips exactly. The recipe id is a content hash of that
JSON (without name/id). What a recipe means to the executor is `codec`'s business.

Bundle (zip): recipe.json, head/head.onnx, head/meta.json, head/report.json, manifest.json
({"files": {name: sha256}}). Import checks everything before anything becomes visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from google.protobuf import json_format

from minehead.core.errors import InvalidArgument, NotFound
from minehead.core.safezip import make_zip, safe_members
from minehead.recipes.v2 import recipes_pb2

from minehead.heads.bundle import MAX_ONNX_BYTES, MEMBERS as HEAD_MEMBERS, HeadBundle

SCHEMA_VERSION = 2
BUNDLE_MEMBERS = {"recipe.json", "manifest.json", *(f"head/{m}" for m in HEAD_MEMBERS)}  # a cross-fitted head's folds too


def to_json(msg) -> str:
    """The canonical protobuf JSON of a recipe (or any message stored beside recipes)."""
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, sort_keys=True, indent=2)


def parse_strict(text: str | bytes, msg, what: str):
    """Parse JSON into `msg`; unknown fields are an error (INVALID_ARGUMENT naming `what`),
    not silently dropped."""
    try:
        json_format.Parse(text, msg, ignore_unknown_fields=False)
    except json_format.ParseError as e:
        raise InvalidArgument(f"{what} does not match its schema: {e}") from None
    return msg


def from_json(text: str | bytes) -> recipes_pb2.Recipe:
    r = parse_strict(text, recipes_pb2.Recipe(), "recipe.json (schema v2)")
    if r.schema_version not in (0, SCHEMA_VERSION):
        raise InvalidArgument(f"recipe schema_version {r.schema_version} is not supported (expected {SCHEMA_VERSION})")
    return r


def assign_id(r: recipes_pb2.Recipe) -> recipes_pb2.Recipe:
    r.schema_version = SCHEMA_VERSION
    r.ClearField("name")
    r.ClearField("recipe_id")
    rid = hashlib.sha256(to_json(r).encode()).hexdigest()[:16]
    r.recipe_id, r.name = rid, f"recipes/{rid}"
    return r


def check_against_head(r: recipes_pb2.Recipe, head: HeadBundle) -> None:
    if r.head.head_id and r.head.head_id != head.head_id:
        raise InvalidArgument(f"recipe names head {r.head.head_id} but the bundle holds head {head.head_id}")
    if list(r.head.classes) and list(r.head.classes) != head.classes:
        raise InvalidArgument(f"recipe's head classes {list(r.head.classes)} do not match the embedded head's {head.classes}")
    if r.class_name not in head.real_classes:
        raise InvalidArgument(f"recipe class {r.class_name!r} is not a real class of its head ({', '.join(head.real_classes)})")
    for i, s in enumerate(r.steps):
        for f in ("seed_threshold", "expand_threshold", "seed_dedupe_iou", "dedupe_iou"):
            v = getattr(s, f)
            if not 0 <= v <= 1:
                raise InvalidArgument(f"recipe step {i}: {f}={v} must be within [0, 1]")
        if s.max_visual_seeds < 0 or s.max_results < 0:
            raise InvalidArgument(f"recipe step {i}: max_visual_seeds and max_results must be >= 0")


class RecipeStore:
    """DATA_DIR/miner/recipes/<id>/{recipe.json, head.zip}, plus index.json (the ids).

    Writes are atomic (temp dir, then rename; the index by os.replace). `list` answers from
    parsed recipes kept in memory and checks only the index's mtime, so listing 1,000 recipes
    costs one stat; a recipe written by another process appears once the index changes. A
    missing or unreadable index is rebuilt from the folders."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index = self.root / "index.json"
        self._index_stamp: int | None = None
        self._parsed: dict[str, recipes_pb2.Recipe] = {}
        self._sorted: list[recipes_pb2.Recipe] = []

    def _read_ids(self) -> list[str]:
        try:
            return list(json.loads(self._index.read_text())["recipes"])
        except (OSError, ValueError, KeyError, TypeError):
            ids = sorted(f.parent.name for f in self.root.glob("*/recipe.json") if not f.parent.name.startswith("."))
            self._write_ids(ids)
            return ids

    def _write_ids(self, ids) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"recipes": sorted(set(ids))}, f)
        os.replace(tmp, self._index)

    def _refresh(self) -> list[recipes_pb2.Recipe]:
        with self._lock:
            try:
                stamp = self._index.stat().st_mtime_ns
            except FileNotFoundError:
                stamp = None
            if stamp is not None and stamp == self._index_stamp:
                return self._sorted
            ids = self._read_ids()
            parsed = {}
            for rid in ids:
                r = self._parsed.get(rid)
                if r is None:
                    try:
                        r = from_json((self.root / rid / "recipe.json").read_text())
                    except (InvalidArgument, OSError):
                        continue
                parsed[rid] = r
            self._parsed = parsed
            self._sorted = sorted(parsed.values(), key=lambda r: (r.create_time.seconds, r.recipe_id), reverse=True)
            # The stamp read before the ids: a write racing with this read shows up next time.
            self._index_stamp = stamp if stamp is not None else self._index.stat().st_mtime_ns
            return self._sorted

    def list(self, class_name: str = "") -> list[recipes_pb2.Recipe]:
        return [r for r in self._refresh() if not class_name or r.class_name == class_name]

    def _folder(self, name: str) -> Path:
        rid = name[len("recipes/"):] if name.startswith("recipes/") else name
        f = self.root / rid
        if not rid or "/" in rid or rid.startswith(".") or not (f / "recipe.json").is_file():
            raise NotFound(f"no recipe {name!r}; `minehead recipes list` shows what there is")
        return f

    def get(self, name: str) -> recipes_pb2.Recipe:
        return from_json((self._folder(name) / "recipe.json").read_text())

    def head(self, name: str) -> HeadBundle:
        return HeadBundle.from_zip((self._folder(name) / "head.zip").read_bytes())

    def put(self, recipe: recipes_pb2.Recipe, head: HeadBundle) -> recipes_pb2.Recipe:
        recipe = assign_id(recipe)
        target = self.root / recipe.recipe_id
        if (target / "recipe.json").is_file():
            return self.get(recipe.recipe_id)
        write_folder(target, {"recipe.json": to_json(recipe).encode(), "head.zip": head.to_zip()})
        with self._lock:
            self._write_ids(self._read_ids() + [recipe.recipe_id])
        return recipe

    def delete(self, name: str) -> None:
        f = self._folder(name)
        remove_folder(f)
        with self._lock:
            self._write_ids([i for i in self._read_ids() if i != f.name])

    def export_zip(self, name: str) -> bytes:
        return bundle_zip(self.get(name), self.head(name))

    def import_zip(self, data: bytes) -> recipes_pb2.Recipe:
        recipe, head = read_bundle(data)
        return self.put(recipe, head)


def write_folder(target: Path, files: dict[str, bytes]) -> None:
    """A stored item's folder, atomically: written in a temp folder beside it, then renamed."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_folder(folder: Path) -> None:
    """A stored item's folder, gone at once (renamed aside, then removed)."""
    trash = folder.parent / f".deleted-{folder.name}"
    shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def manifest_zip(files: dict[str, bytes], head: HeadBundle) -> bytes:
    """A bundle zip: `files`, the head bundle under head/, and manifest.json of their sha256s."""
    files = {**files, **{f"head/{k}": v for k, v in head.files().items()}}
    manifest = {"schema_version": SCHEMA_VERSION, "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}}
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return make_zip(files)


def read_manifest_zip(data: bytes, main: str, what: str, max_total_bytes: int) -> tuple[dict[str, bytes], HeadBundle]:
    """Hostile-input safe: member names, sizes, no links or pickles, every member's sha256
    against manifest.json, and the embedded head bundle validated. -> (members, head)."""
    members = safe_members(data, max_member_bytes=MAX_ONNX_BYTES, max_total_bytes=max_total_bytes,
                           max_members=len(BUNDLE_MEMBERS), allowed=(BUNDLE_MEMBERS - {"recipe.json"}) | {main})
    for need in ("manifest.json", main, "head/head.onnx", "head/meta.json"):
        if need not in members:
            raise InvalidArgument(f"{what} lacks {need} (the manifest and {main} sit at the zip root)")
    try:
        listed = json.loads(members["manifest.json"])["files"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("manifest.json must be JSON with a 'files' map of name -> sha256") from None
    for name, body in members.items():
        if name != "manifest.json" and listed.get(name) != hashlib.sha256(body).hexdigest():
            raise InvalidArgument(f"{name} does not match its sha256 in manifest.json")
    missing = set(listed) - set(members)
    if missing:
        raise InvalidArgument(f"manifest.json lists files the bundle lacks: {', '.join(sorted(missing))}")
    head = HeadBundle.from_files({k[len("head/"):]: v for k, v in members.items() if k.startswith("head/")})
    return members, head


def bundle_zip(recipe: recipes_pb2.Recipe, head: HeadBundle) -> bytes:
    return manifest_zip({"recipe.json": to_json(recipe).encode()}, head)


def read_bundle(data: bytes) -> tuple[recipes_pb2.Recipe, HeadBundle]:
    """A recipe bundle, checked (read_manifest_zip), its recipe parsed strictly and checked
    against the embedded head."""
    members, head = read_manifest_zip(data, "recipe.json", "recipe bundle", MAX_ONNX_BYTES + (16 << 20))
    recipe = from_json(members["recipe.json"])
    check_against_head(recipe, head)
    return recipe, head
