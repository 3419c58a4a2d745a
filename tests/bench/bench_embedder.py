"""`make bench` (embedder part): in-process vs gRPC service throughput, side by side, one run.

    python -m tests.bench.bench_embedder [--model ID] [--images N] [--device cpu|cuda] [--json PATH]

Both sides start from the same JPEG bytes (decode + resize + encode + L2-normalise), with the
embedding cache off, so the ratio is the cost of the service: serialisation, transport, thread
hand-offs. The server runs in its own process, as deployed. Default model: ViT-B/32 with random
weights (open_clip's real architecture; speed does not depend on the weights), written to the
models dir on first use. Target: the service reaches >= 0.9x in-process at batch 32.
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


def timed(fn, rows: int, min_s: float = 2.0, max_reps: int = 20) -> float:
    """rows/s of fn(), repeated until min_s seconds have passed (after one warm-up call)."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_s or reps >= max_reps:
            return rows * reps / dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="open_clip:ViT-B-32/random")
    p.add_argument("--models-dir", default=os.environ.get("MINEHEAD_MODELS_DIR", str(REPO / "var" / "models")))
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--min-seconds", type=float, default=2.0)
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
        for b in batches:
            imgs = data[:b]
            in_proc = timed(lambda: local.embed_images([decode_image(x) for x in imgs], a.model), b, a.min_seconds)
            svc = timed(lambda: client.embed_images(imgs, a.model), b, a.min_seconds)
            results.append({"case": f"batch {b}", "in_process_img_s": in_proc, "service_img_s": svc, "ratio": svc / in_proc})

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

        conc = timed(burst, n * per, a.min_seconds)
        in_proc_1 = next(r["in_process_img_s"] for r in results if r["case"] == "batch 1") if 1 in batches else float("nan")
        results.append({"case": f"{n} clients x batch 1", "in_process_img_s": in_proc_1, "service_img_s": conc,
                        "ratio": conc / in_proc_1})
    finally:
        server.terminate()
        server.wait(10)
        local.close()

    print(f"\n{'case':24s} {'in-process img/s':>17s} {'service img/s':>14s} {'service/in-process':>19s}")
    for r in results:
        print(f"{r['case']:24s} {r['in_process_img_s']:17.1f} {r['service_img_s']:14.1f} {r['ratio']:18.2f}x")
    b32 = next((r for r in results if r["case"] == "batch 32"), None)
    if b32:
        verdict = "meets" if b32["ratio"] >= 0.9 else "MISSES"
        print(f"\ntarget: service >= 0.9x in-process at batch 32: {b32['ratio']:.2f}x ({verdict})")
    out = {"model": info.id, "device": info.device, "dtype": info.dtype, "results": results, "unix_time": time.time()}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
