"""Recipe sets: the recipes of one mining job (or any recipes of one head and one detector),
stored, exported and imported as one resource, `recipeSets/{id}`.

A set is immutable. Its id is a content hash of its recipe ids, so the same recipes make the
same set. The recipes are stored inline (canonical protobuf JSON, one per class) and the head
bundle once, so a set never breaks when a single recipe is deleted from the recipe store.

Bundle (zip): recipe_set.json, head/head.onnx, head/meta.json, head/report.json,
manifest.json ({"files": {name: sha256}}). Import runs the same hostile-input checks as a
recipe bundle (member names, sizes, no links, hashes, strict schema) and checks every recipe
against the embedded head.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from minehead.core.errors import FailedPrecondition, InvalidArgument, NotFound
from minehead.heads.bundle import MAX_ONNX_BYTES, HeadBundle
from minehead.miner.v1 import drafting_pb2
from minehead.recipes.v2 import recipes_pb2

from miner_svc.recipes.store import (assign_id, check_against_head, manifest_zip, parse_strict, read_manifest_zip,
                                     remove_folder, to_json, write_folder)

MAX_RECIPES = 1000


def set_id(recipe_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(recipe_ids)).encode()).hexdigest()[:16]


def from_json(text: str | bytes) -> drafting_pb2.RecipeSet:
    return parse_strict(text, drafting_pb2.RecipeSet(), "recipe_set.json (RecipeSet)")


def make_set(recipes: list[recipes_pb2.Recipe], head: HeadBundle, source_job: str = "") -> drafting_pb2.RecipeSet:
    """Check that the recipes belong together and build the set message (with its id).

    FAILED_PRECONDITION when they mix heads or detectors: a set runs one detector pass and
    one head per image, so mixed recipes cannot share them."""
    if not recipes:
        raise InvalidArgument("a recipe set needs at least one recipe")
    if len(recipes) > MAX_RECIPES:
        raise InvalidArgument(f"a recipe set holds at most {MAX_RECIPES} recipes, got {len(recipes)}")
    heads = sorted({r.head.head_id for r in recipes})
    if len(heads) > 1:
        raise FailedPrecondition(f"the recipes use different heads ({', '.join(heads)}): a set needs one head")
    detectors = sorted({r.detector.model_id for r in recipes})
    if len(detectors) > 1:
        raise FailedPrecondition(f"the recipes were mined with different detectors ({', '.join(detectors)}): "
                                 "a set needs one detector")
    seen: dict[str, str] = {}
    for r in recipes:
        if r.class_name in seen:
            raise FailedPrecondition(f"two recipes for class {r.class_name!r} ({seen[r.class_name]}, {r.recipe_id}): "
                                     "a set holds one recipe per class")
        seen[r.class_name] = r.recipe_id
        check_against_head(r, head)
    order = {c: i for i, c in enumerate(head.classes)}
    recipes = sorted(recipes, key=lambda r: order.get(r.class_name, len(order)))
    sid = set_id([r.recipe_id for r in recipes])
    s = drafting_pb2.RecipeSet(name=f"recipeSets/{sid}", recipe_set_id=sid, recipes=recipes, head_id=head.head_id,
                               detector=detectors[0], classes=[r.class_name for r in recipes], source_job=source_job)
    s.create_time.FromSeconds(int(time.time()))
    return s


class RecipeSetStore:
    """DATA_DIR/miner/recipe_sets/<id>/{recipe_set.json, head.zip}; atomic writes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _folder(self, name: str) -> Path:
        sid = name[len("recipeSets/"):] if name.startswith("recipeSets/") else name
        f = self.root / sid
        if not sid or "/" in sid or sid.startswith(".") or not (f / "recipe_set.json").is_file():
            raise NotFound(f"no recipe set {name!r}; `minehead recipes sets list` shows what there is")
        return f

    def list(self) -> list[drafting_pb2.RecipeSet]:
        out = []
        for f in self.root.glob("*/recipe_set.json"):
            try:
                out.append(from_json(f.read_text()))
            except (InvalidArgument, OSError):
                continue
        out.sort(key=lambda s: (s.create_time.seconds, s.recipe_set_id), reverse=True)
        return out

    def get(self, name: str) -> drafting_pb2.RecipeSet:
        if name.startswith("jobs/"):
            return self.for_job(name)
        return from_json((self._folder(name) / "recipe_set.json").read_text())

    def for_job(self, job: str) -> drafting_pb2.RecipeSet:
        # The newest set a job made; a job's result also names it (MiningResult.recipe_set).
        found = [s for s in self.list() if s.source_job == job]
        if not found:
            raise NotFound(f"{job} made no recipe set (is it a finished mining job of this miner?)")
        return found[0]

    def head(self, name: str) -> HeadBundle:
        folder = self._folder(self.get(name).recipe_set_id)
        return HeadBundle.from_zip((folder / "head.zip").read_bytes())

    def put(self, s: drafting_pb2.RecipeSet, head: HeadBundle) -> drafting_pb2.RecipeSet:
        target = self.root / s.recipe_set_id
        with self._lock:
            if (target / "recipe_set.json").is_file():
                return self.get(s.recipe_set_id)
            write_folder(target, {"recipe_set.json": to_json(s).encode(), "head.zip": head.to_zip()})
        return s

    def delete(self, name: str) -> None:
        remove_folder(self._folder(self.get(name).recipe_set_id))

    def export_zip(self, name: str) -> bytes:
        s = self.get(name)
        return bundle_zip(s, self.head(s.recipe_set_id))

    def import_zip(self, data: bytes) -> drafting_pb2.RecipeSet:
        s, head = read_bundle(data)
        return self.put(s, head)


def bundle_zip(s: drafting_pb2.RecipeSet, head: HeadBundle) -> bytes:
    return manifest_zip({"recipe_set.json": to_json(s).encode()}, head)


def read_bundle(data: bytes) -> tuple[drafting_pb2.RecipeSet, HeadBundle]:
    """Hostile-input safe, like recipe bundles; every recipe is re-identified from its content
    (a tampered recipe cannot keep its old id) and checked against the embedded head."""
    members, head = read_manifest_zip(data, "recipe_set.json", "recipe set bundle", MAX_ONNX_BYTES + (32 << 20))
    given = from_json(members["recipe_set.json"])
    recipes = []
    for r in given.recipes:
        claimed = r.recipe_id
        r = assign_id(r)
        if claimed and claimed != r.recipe_id:
            raise InvalidArgument(f"recipe {claimed} in the set does not match its content (it hashes to {r.recipe_id})")
        recipes.append(r)
    s = make_set(recipes, head, given.source_job)
    if given.recipe_set_id and given.recipe_set_id != s.recipe_set_id:
        raise InvalidArgument(f"recipe set id {given.recipe_set_id} does not match its recipes ({s.recipe_set_id})")
    s.create_time.CopyFrom(given.create_time)
    return s, head
