"""Miner client: mining jobs, recipes, ApplyRecipe, negatives."""

from __future__ import annotations

from minehead.common.v1 import common_pb2
from minehead.miner.v1 import miner_pb2, miner_pb2_grpc

from minehead.client.channel import ServiceClient
from minehead.client.embedder import image_ref
from minehead.client.heads import chunked
from minehead.client.jobs import JobsClient


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
