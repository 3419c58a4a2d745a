"""`make bench` (head part): scoring paths side by side, and training time per 10k embeddings.

    python -m tests.bench.bench_heads [--dim 256] [--classes 6] [--json PATH]

1. The same 32 / 256 embeddings scored by: the exported head in onnxruntime (in-process, what
   the miner does), scikit-learn's predict_proba on an equivalent fitted pipeline, and the head
   service's Score RPC over loopback gRPC (decisions and reasons included). Each pair runs in
   alternating repeats after a warm-up (tests/bench/timing.py): min / median / max crops/s and
   the ratio of medians. Target: Score RPC >= 0.5x the in-process ONNX call at batch 256.
2. Training time per 10k embeddings for logreg and for the MLP (early stopping on).
Embeddings are Gaussian clusters (timing does not depend on where they come from).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.bench.timing import alternate

REPO = Path(__file__).resolve().parents[2]


def blobs(n, c, d, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    y = rng.integers(0, c, n)
    return (centres[y] + rng.normal(size=(n, d)) * 1.5).astype(np.float32), y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats per comparison (after a warm-up)")
    p.add_argument("--block-seconds", type=float, default=0.3, help="shortest timed repeat (calls run in a loop)")
    p.add_argument("--json", default=str(REPO / "var" / "bench" / "heads.json"))
    a = p.parse_args(argv)

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    from minehead.client.heads import HeadClient
    from minehead.heads.bundle import bundle_from_head
    from head_svc.estimators import LogRegHead, MLPHead, l2_normalise
    from minehead.core.config import ServiceConfig
    from minehead.core.server import start_server

    classes = [f"class_{i}" for i in range(a.classes - 2)] + ["__bg_0", "__bg_1"]
    X, y = blobs(4000, a.classes, a.dim)
    head = LogRegHead().fit(X, y, a.classes)
    bundle = bundle_from_head(head, classes, "bench")
    sk = make_pipeline(FunctionTransformer(l2_normalise), StandardScaler(), LogisticRegression(max_iter=2000)).fit(X, y)

    tmp = Path(tempfile.mkdtemp())
    from head_svc.__main__ import build

    cfg = ServiceConfig(service="head", port=0, data_dir=tmp, models_dir=tmp, allowed_roots=[tmp], extra={"embedder_addr": "127.0.0.1:1"})
    runner, bindings = build(cfg)
    server = start_server(cfg, bindings)
    runner.servicer.registry.put(bundle)
    client = HeadClient(f"127.0.0.1:{server.port}")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(client.channel)
    rows, reports = [], []
    try:
        for n in (32, 256):
            Xn = X[:n]
            kw = dict(repeats=a.repeats, work_a=n, work_b=n, min_block_s=a.block_seconds)
            onnx = lambda: bundle.predict_proba(Xn)  # noqa: E731
            sk_vs = alternate(lambda: sk.predict_proba(Xn), onnx, names=("sklearn predict_proba", "onnx in-process"), **kw)
            rpc_vs = alternate(lambda: client.score_embeddings(bundle.head_id, Xn), onnx,
                               names=("Score RPC", "onnx in-process"), **kw)
            # The floor under any RPC: a health check (no payload, no work) on the same channel,
            # counted as if it had scored n crops. Score RPC / onnx can be at most floor / onnx.
            floor_vs = alternate(lambda: health.Check(health_pb2.HealthCheckRequest(service="")), onnx,
                                 names=("empty RPC (health)", "onnx in-process"), **kw)
            reports.append((n, sk_vs, rpc_vs, floor_vs))
            rows.append({"batch": n, "onnx_in_process_us": n / rpc_vs.b.median * 1e6,
                         "sklearn_predict_proba_us": n / sk_vs.a.median * 1e6, "score_rpc_us": n / rpc_vs.a.median * 1e6,
                         "sklearn_over_onnx_time": sk_vs.b.median / sk_vs.a.median,
                         "score_rpc_crops_per_s": rpc_vs.a.median, "score_rpc_over_onnx": rpc_vs.ratio,
                         "empty_rpc_over_onnx": floor_vs.ratio, "empty_rpc_us": n / floor_vs.a.median * 1e6,
                         "sklearn_vs_onnx": sk_vs.to_dict(), "rpc_vs_onnx": rpc_vs.to_dict(), "empty_rpc_vs_onnx": floor_vs.to_dict()})
    finally:
        client.close()
        server.stop(0.5)
        runner.shutdown()

    train = []
    X10, y10 = blobs(10_000, a.classes, a.dim, seed=1)
    t0 = time.perf_counter()
    LogRegHead().fit(X10, y10, a.classes)
    train.append({"head": "logreg", "seconds_per_10k": time.perf_counter() - t0})
    t0 = time.perf_counter()
    m = MLPHead(hidden_sizes=(256,), max_epochs=200).fit(X10[:8500], y10[:8500], a.classes, X_val=X10[8500:], y_val=y10[8500:])
    train.append({"head": f"mlp (256 hidden, {m.epochs_run_} epochs, early stopping)", "seconds_per_10k": time.perf_counter() - t0})

    print(f"scoring {a.dim}-d embeddings, {a.classes} classes (2 background), crops/s, "
          f"{a.repeats} alternating repeats each after a warm-up")
    for n, sk_vs, rpc_vs, floor_vs in reports:
        print(sk_vs.report(f"batch {n}: scikit-learn vs the exported head", "crops/s", ratio_name="sklearn/onnx"))
        print(rpc_vs.report(f"batch {n}: Score RPC (decisions + reasons) vs the exported head", "crops/s",
                            target=0.5 if n == 256 else None, ratio_name="RPC/onnx"))
        print(floor_vs.report(f"batch {n}: an empty RPC (health check) vs the exported head: the ceiling of RPC/onnx",
                              "crops/s", ratio_name="empty RPC/onnx"))
    print(f"\n{'batch':>5s} {'onnx in-process':>16s} {'sklearn predict_proba':>22s} {'Score RPC':>10s} {'empty RPC':>10s} "
          f"{'RPC crops/s':>12s}  (medians)")
    for r in rows:
        print(f"{r['batch']:5d} {r['onnx_in_process_us']:14.1f}us {r['sklearn_predict_proba_us']:20.1f}us "
              f"{r['score_rpc_us'] / 1000:8.2f}ms {r['empty_rpc_us'] / 1000:8.2f}ms {r['score_rpc_crops_per_s']:12.0f}")
    print("\ntraining time per 10k embeddings")
    for t in train:
        print(f"  {t['head']:45s} {t['seconds_per_10k']:6.2f} s")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"scoring": rows, "training": train, "dim": a.dim, "classes": a.classes}, indent=2))
    print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
