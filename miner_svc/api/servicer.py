"""minehead.miner.v1.MinerService: the three parts of the edge on the miner's shared state."""

from __future__ import annotations

from minehead.miner.v1 import miner_pb2_grpc

from miner_svc.api.drafting_rpcs import DraftingRPCs
from miner_svc.api.find_rpcs import FindRPCs
from miner_svc.api.mining_rpcs import MiningRPCs
from miner_svc.api.recipe_rpcs import RecipeRPCs
from miner_svc.resources import MinerResources


class MinerServicer(MiningRPCs, RecipeRPCs, DraftingRPCs, FindRPCs, miner_pb2_grpc.MinerServiceServicer):
    def __init__(self, res: MinerResources) -> None:
        self.res = res

    def close(self) -> None:
        self.res.close()
