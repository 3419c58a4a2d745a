"""Miner client: mining jobs, recipes, recipe sets, drafting, ApplyRecipe, negatives."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from google.protobuf import struct_pb2

from minehead.common.v1 import common_pb2
from minehead.miner.v1 import drafting_pb2, exemplars_pb2, miner_pb2, miner_pb2_grpc

from minehead.client.channel import ServiceClient
from minehead.client.embedder import image_ref
from minehead.client.heads import chunked
from minehead.client.jobs import JobsClient


def from_struct(value: struct_pb2.Struct | struct_pb2.ListValue | struct_pb2.Value) -> Any:
    """A Struct the miner answers with (MiningResult.summary, BenchmarkResult.report) as plain
    Python: dicts, lists, str, bool, None and numbers. A Struct holds every number as a double;
    whole numbers come back as int (counts stay counts: 3, not 3.0)."""
    if isinstance(value, struct_pb2.Struct):
        return {k: from_struct(v) for k, v in value.fields.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [from_struct(v) for v in value.values]
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return from_struct(value.list_value)
    if kind == "number_value":
        n = value.number_value
        return int(n) if n.is_integer() else n
    return None if kind in (None, "null_value") else getattr(value, kind)


class MinerClient(ServiceClient):
    service = "miner"

    def __init__(self, address: str | None = None, **kw) -> None:
        super().__init__(address, **kw)
        self.stub = miner_pb2_grpc.MinerServiceStub(self.channel)
        self.jobs = JobsClient(self.address, channel=self.channel)

    def start_mining(self, spec: miner_pb2.MiningSpec) -> common_pb2.Job:
        return self.stub.StartMining(miner_pb2.StartMiningRequest(spec=spec), timeout=self.timeout)

    def start_benchmark(self, spec: miner_pb2.MiningSpec, margin: float = 0.0) -> common_pb2.Job:
        return self.stub.StartBenchmark(miner_pb2.StartBenchmarkRequest(spec=spec, margin=margin), timeout=self.timeout)

    def list_recipes(self, class_name: str = ""):
        return list(self.stub.ListRecipes(miner_pb2.ListRecipesRequest(class_name=class_name), timeout=self.timeout).recipes)

    def get_recipe(self, name: str):
        return self.stub.GetRecipe(miner_pb2.GetRecipeRequest(name=name), timeout=self.timeout)

    def export_recipe(self, name: str) -> bytes:
        return b"".join(c.data for c in self.stub.ExportRecipe(miner_pb2.ExportRecipeRequest(name=name), timeout=self.timeout))

    def import_recipe(self, data: bytes):
        return self.stub.ImportRecipe(chunked(None, data, lambda c: miner_pb2.ImportRecipeRequest(chunk=c)), timeout=self.timeout)

    def delete_recipe(self, name: str) -> None:
        self.stub.DeleteRecipe(miner_pb2.DeleteRecipeRequest(name=name), timeout=self.timeout)

    def apply(self, name: str, images=(), mask_format: int = miner_pb2.ApplyRecipeRequest.POLYGON,
              detector: str = "", dataset: str = "") -> miner_pb2.ApplyRecipeResponse:
        req = miner_pb2.ApplyRecipeRequest(recipe=name, images=[image_ref(i) for i in images], mask_format=mask_format,
                                           detector=detector, dataset=dataset)
        return self.stub.ApplyRecipe(req, timeout=self.timeout)

    def export_negatives(self, job: str) -> bytes:
        name = job if job.startswith("jobs/") else f"jobs/{job}"
        return b"".join(c.data for c in self.stub.ExportNegatives(miner_pb2.ExportNegativesRequest(job=name), timeout=self.timeout))

    # -- recipe sets ------------------------------------------------------------------------
    def create_recipe_set(self, recipes: Iterable[str] = (), job: str = "") -> drafting_pb2.RecipeSet:
        """From stored recipes (one head, one detector, one per class) or a mining job."""
        if job:
            req = drafting_pb2.CreateRecipeSetRequest(job=job if job.startswith("jobs/") else f"jobs/{job}")
        else:
            req = drafting_pb2.CreateRecipeSetRequest(recipes=drafting_pb2.RecipeNames(names=list(recipes)))
        return self.stub.CreateRecipeSet(req, timeout=self.timeout)

    def list_recipe_sets(self) -> list[drafting_pb2.RecipeSet]:
        return list(self.stub.ListRecipeSets(drafting_pb2.ListRecipeSetsRequest(), timeout=self.timeout).recipe_sets)

    def get_recipe_set(self, name: str) -> drafting_pb2.RecipeSet:
        return self.stub.GetRecipeSet(drafting_pb2.GetRecipeSetRequest(name=name), timeout=self.timeout)

    def delete_recipe_set(self, name: str) -> None:
        self.stub.DeleteRecipeSet(drafting_pb2.DeleteRecipeSetRequest(name=name), timeout=self.timeout)

    def export_recipe_set(self, name: str) -> bytes:
        req = drafting_pb2.ExportRecipeSetRequest(name=name)
        return b"".join(c.data for c in self.stub.ExportRecipeSet(req, timeout=self.timeout))

    def import_recipe_set(self, data: bytes) -> drafting_pb2.RecipeSet:
        return self.stub.ImportRecipeSet(chunked(None, data, lambda c: drafting_pb2.ImportRecipeSetRequest(chunk=c)),
                                         timeout=self.timeout)

    # -- drafting ---------------------------------------------------------------------------
    def start_drafting(self, spec: drafting_pb2.DraftingSpec | None = None, resume: str = "") -> common_pb2.Job:
        if resume and not resume.startswith("jobs/"):
            resume = f"jobs/{resume}"
        req = drafting_pb2.StartDraftingRequest(spec=spec, resume=resume)
        return self.stub.StartDrafting(req, timeout=self.timeout)

    def export_draft(self, job: str) -> bytes:
        name = job if job.startswith("jobs/") else f"jobs/{job}"
        return b"".join(c.data for c in self.stub.ExportDraft(drafting_pb2.ExportDraftRequest(job=name), timeout=self.timeout))

    def draft_images(self, options: drafting_pb2.DraftOptions, images: Iterable) -> Iterator[drafting_pb2.DraftedImage]:
        """Interactive drafting: `images` (paths, bytes or HxWx3 arrays; read lazily, one at a
        time) -> one DraftedImage per image, in order, as soon as the server has it."""
        def requests():
            yield drafting_pb2.DraftImagesRequest(options=options)
            for im in images:
                yield drafting_pb2.DraftImagesRequest(image=image_ref(im))

        # No overall deadline: a stream of many images takes as long as it takes.
        return self.stub.DraftImages(requests())

    def find_similar(self, image, options: exemplars_pb2.FindOptions, label: str = "") -> exemplars_pb2.FindSimilarResponse:
        """Every object like options.exemplars on `image` (a path, bytes or HxWx3 array)."""
        req = exemplars_pb2.FindSimilarRequest(image=image_ref(image, label), options=options)
        return self.stub.FindSimilar(req, timeout=self.timeout)

    def find_similar_images(self, image, options: exemplars_pb2.FindOptions, images: Iterable,
                            label: str = "") -> Iterator[drafting_pb2.DraftedImage]:
        """The exemplars' image first (index 0), then every image of `images` (read lazily, one
        at a time) searched with the same exemplars: one DraftedImage each, in order."""
        def requests():
            yield exemplars_pb2.FindImagesRequest(exemplars=exemplars_pb2.FindSimilarRequest(
                image=image_ref(image, label), options=options))
            for im in images:
                yield exemplars_pb2.FindImagesRequest(image=image_ref(im))

        return self.stub.FindSimilarImages(requests())
