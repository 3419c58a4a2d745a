"""The miner's gRPC edge: one MinerService servicer made of three thin parts, each turning
requests into calls of the library (`mining`, `recipes`, `drafting`) and answers into
responses, with the shared state in `self.res` (`miner_svc.resources.MinerResources`).

    servicer.py       MinerServicer = MiningRPCs + RecipeRPCs + DraftingRPCs
    mining_rpcs.py    StartMining, StartBenchmark, ExportNegatives, ListDetectors
    recipe_rpcs.py    recipes and recipe sets: list, get, export, import, delete; ApplyRecipe
    drafting_rpcs.py  StartDrafting, ExportDraft, DraftImages
"""
