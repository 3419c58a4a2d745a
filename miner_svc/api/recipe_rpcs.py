"""Recipe and recipe set RPCs (the stores in `miner_svc.recipes`), and ApplyRecipe."""

from __future__ import annotations

from minehead.common.v1 import common_pb2
from minehead.core.errors import FailedPrecondition, InvalidArgument
from minehead.core.file_chunks import file_chunks, gather_chunks
from minehead.core.paths import image_ref_bytes
from minehead.datasets import load_dataset
from minehead.miner.v1 import drafting_pb2, miner_pb2

from miner_svc.recipes.apply import apply_recipe
from miner_svc.recipes.sets import make_set
from miner_svc.recipes.store import read_bundle
from miner_svc.resources import MinerResources

MAX_BUNDLE_BYTES = 128 << 20


class RecipeRPCs:
    res: MinerResources

    # -- recipes ----------------------------------------------------------------------------
    def ListRecipes(self, request, context):
        return miner_pb2.ListRecipesResponse(recipes=self.res.store.list(request.class_name))

    def GetRecipe(self, request, context):
        return self.res.store.get(request.name)

    def ExportRecipe(self, request, context):
        yield from file_chunks(self.res.store.export_zip(request.name))

    def ImportRecipe(self, request_iterator, context):
        data, _ = gather_chunks(request_iterator, MAX_BUNDLE_BYTES, "recipe bundle is over 128 MiB")
        return self.res.store.import_zip(data)

    def DeleteRecipe(self, request, context):
        self.res.store.delete(request.name)
        return miner_pb2.DeleteRecipeResponse()

    def ApplyRecipe(self, request, context):
        res = self.res
        if request.WhichOneof("recipe_source") == "recipe_bundle":
            recipe, head = read_bundle(request.recipe_bundle)
        elif request.recipe:
            recipe, head = res.store.get(request.recipe), res.store.head(request.recipe)
        else:
            raise InvalidArgument("give a stored recipe name or an inline recipe bundle")
        refs = list(request.images)
        if request.dataset:
            ds = load_dataset(res.resolve_dataset(request.dataset))
            refs += [common_pb2.ImageRef(path=str(r.path), label=r.path.name) for r in ds.images]
        if not refs:
            raise InvalidArgument("no images given (images or dataset)")
        mined_with = recipe.detector.model_id or res.default_detector
        if request.detector and request.detector != mined_with:
            raise FailedPrecondition(f"recipe {recipe.recipe_id} was mined with detector {mined_with!r}; it cannot run on "
                                     f"{request.detector!r} (its thresholds mean nothing there): mine a recipe for that detector")
        det = res.detector(mined_with, head=head)

        def images():
            for i, ref in enumerate(refs):
                data, label = image_ref_bytes(ref, res.allowed_roots)
                yield data, label or f"#{i}", ref.label or f"#{i}"

        return apply_recipe(det, res.scorer_for(head, det), recipe, head, images(), request.mask_format)

    # -- recipe sets --------------------------------------------------------------------------
    def CreateRecipeSet(self, request, context):
        res = self.res
        if request.WhichOneof("source") == "job":
            return res.set_for_job(request.job)
        names = list(request.recipes.names)
        if not names:
            raise InvalidArgument("give recipe names or a mining job")
        recipes = [res.store.get(n) for n in names]
        head = res.store.head(recipes[0].recipe_id)
        return res.sets.put(make_set(recipes, head), head)

    def ListRecipeSets(self, request, context):
        return drafting_pb2.ListRecipeSetsResponse(recipe_sets=self.res.sets.list())

    def GetRecipeSet(self, request, context):
        return self.res.recipe_set(request.name)

    def DeleteRecipeSet(self, request, context):
        self.res.sets.delete(request.name)
        return drafting_pb2.DeleteRecipeSetResponse()

    def ExportRecipeSet(self, request, context):
        s = self.res.recipe_set(request.name)
        yield from file_chunks(self.res.sets.export_zip(s.recipe_set_id))

    def ImportRecipeSet(self, request_iterator, context):
        data, _ = gather_chunks(request_iterator, MAX_BUNDLE_BYTES, "recipe set bundle is over 128 MiB")
        return self.res.sets.import_zip(data)
