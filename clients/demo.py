"""`make demo`: the whole chain against running services (`make run-all`).

synthetic dataset -> head (logreg, 2 background classes) -> mining (background guard,
balanced preset) -> recipe export -> import -> apply to an image, printing each result.
With no SAM3 weights the miner's default detector is sam3-tiny-random, whose detections are
meaningless: the demo then shows the chain working, not detection quality, and says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from google.protobuf import json_format

from minehead.common.v1 import common_pb2
from minehead.head.v1 import head_pb2
from minehead.miner.v1 import miner_pb2
from minehead.recipes.v2 import recipes_pb2

from clients.cli_common import follow
from clients.cli_miner import _print_recipes
from minehead.client.health import check_health
from minehead.client.heads import HeadClient
from minehead.client.miner import MinerClient
from minehead.client.channel import default_address


def main() -> int:
    for svc, full in (("embedder", "minehead.embedder.v1.EmbedderService"), ("head", "minehead.head.v1.HeadService"),
                      ("miner", "minehead.miner.v1.MinerService")):
        if check_health(default_address(svc), full) != "SERVING":
            print(f"demo: the {svc} service is not up at {default_address(svc)}; start `make run-all` first", file=sys.stderr)
            return 1
    from minehead.synth import make_synthetic_dataset

    root = Path(os.environ.get("MINEHEAD_DATA_DIR", "var")) / "demo" / "shapes"
    if not (root / "labelmap.txt").is_file():
        make_synthetic_dataset(root, images=int(os.environ.get("DEMO_IMAGES", "48")), seed=1)
    print(f"1. dataset: {root}")
    with HeadClient() as hc:
        job = hc.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(root.resolve())),
                                                      display_name="demo-shapes", seed=1))
        print(f"2. training a head ({job.name})")
        done = follow(hc, job, quiet=False)
        if done.state != common_pb2.Job.SUCCEEDED:
            print(f"demo: training failed: {done.error}", file=sys.stderr)
            return 1
        tr = head_pb2.TrainingResult()
        done.result.Unpack(tr)
        held = json_format.MessageToDict(tr.report)["held_out"]
        print(f"   head {tr.head.head_id}: held-out accuracy {held['accuracy']:.2f}, macro F1 {held['macro_f1']:.2f}")
    with MinerClient() as mc:
        spec = miner_pb2.MiningSpec(dataset=str(root.resolve()), head=tr.head.head_id, seed=1,
                                    clip_head_background_guard=True, clip_head_background_margin=0.1,
                                    clip_head_background_apply=recipes_pb2.BOTH, clip_head_auto_tune=True)
        job = mc.start_mining(spec)
        print(f"3. mining recipes ({job.name})")
        done = follow(mc, job, quiet=False)
        if done.state != common_pb2.Job.SUCCEEDED:
            print(f"demo: mining failed: {done.error}", file=sys.stderr)
            return 1
        res = miner_pb2.MiningResult()
        done.result.Unpack(res)
        _print_recipes(res.recipes, res.summary)
        r = next((x for x in res.recipes if x.steps), res.recipes[0])
        bundle = mc.export_recipe(r.recipe_id)
        out = Path(os.environ.get("MINEHEAD_DATA_DIR", "var")) / "demo" / f"recipe-{r.class_name}.zip"
        out.write_bytes(bundle)
        back = mc.import_recipe(bundle)
        print(f"4. exported {out} ({len(bundle)} bytes) and imported it back: recipe {back.recipe_id} "
              f"({'same id' if back.recipe_id == r.recipe_id else 'DIFFERENT id'})")
        img = sorted((root / "images").glob("*.jpg"))[0]
        ap = mc.apply(back.recipe_id, [img])
        print(f"5. applied to {img.name}: {len(ap.images[0].detections)} {r.class_name} detection(s)")
        for w in ap.warnings:
            print(f"   warning: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
