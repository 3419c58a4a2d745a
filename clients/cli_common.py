"""What every `minehead` command module shares: printing (aligned tables for people, JSON on
request), argument parsing helpers, and following a job's events."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from google.protobuf import json_format

from minehead.client.jobs import FINAL
from minehead.common.v1 import common_pb2
from minehead.core.safezip import make_zip

SERVICES = {
    "embedder": "minehead.embedder.v1.EmbedderService",
    "head": "minehead.head.v1.HeadService",
    "miner": "minehead.miner.v1.MinerService",
}


def to_jsonable(msg) -> Any:
    """A protobuf message -> dict with the proto field names, defaults included."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def parse_box(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"box {text!r}: expected X1,Y1,X2,Y2 numbers in pixels") from None
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r}: expected 4 numbers X1,Y1,X2,Y2, got {len(vals)}")
    return vals


class ProgressBar:
    """`[#####.....] 40/100 images  2.31 images/s  ETA 0:26` on stderr, redrawn in place. The
    rate counts only units done while watching, so a resumed job's ETA is not flattered."""

    def __init__(self, width: int = 30) -> None:
        self.width = width
        self.start: tuple[float, int, str] | None = None

    def update(self, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if self.start is None or self.start[2] != unit or done < self.start[1]:
            self.start = (now, done, unit)
        t0, d0, _ = self.start
        frac = done / total if total else 0.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        tail = ""
        if rate > 0:
            eta = int((total - done) / rate)
            tail = f"  {rate:.2f} {unit}/s  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        print(f"\r  [{bar}] {done}/{total} {unit}{tail}   ", end="", file=sys.stderr, flush=True)
        if total and done >= total:
            print(file=sys.stderr)


def follow(client, job: common_pb2.Job, quiet: bool) -> common_pb2.Job:
    """Stream the job's events to stderr (progress bar, log lines) until it ends."""
    bar = ProgressBar()
    for ev in client.jobs.watch(job.name):
        if quiet:
            continue
        kind = ev.WhichOneof("payload")
        if kind == "progress" and ev.progress.total:
            bar.update(ev.progress.done, ev.progress.total, ev.progress.unit)
        elif kind == "phase":
            bar.start = None  # a new phase counts its own rate (two adapt rounds both count images)
            print(f"{ev.phase} …", file=sys.stderr)
        elif kind == "log":
            tag = {common_pb2.LogLine.WARNING: "warning: ", common_pb2.LogLine.ERROR: "error: "}.get(ev.log.level, "")
            print(f"  {tag}{ev.log.message}", file=sys.stderr)
        elif kind == "metrics" and "epoch" in ev.metrics:
            m = ev.metrics
            what = f"{m['variant']} " if "variant" in m else ""
            val = f"  val loss {m['val_loss']:.4f}" if "val_loss" in m else ""
            held = f"  held-out loss {m['held_out_loss']:.4f}" if "held_out_loss" in m else ""
            print(f"\r  {what}epoch {int(m['epoch']):3d}  train loss {m['train_loss'] if 'train_loss' in m else float('nan'):.4f}{val}{held}",
                  end="", file=sys.stderr, flush=True)
        elif kind == "state" and ev.state in FINAL:
            print(f"\n{common_pb2.Job.State.Name(ev.state).lower()}", file=sys.stderr)
    return client.jobs.get(job.name)


def run_job(a, client, job, result_type):
    """Without --wait: print the job and return 0. With it: follow the job and return
    (result, finished job), or 1 if it did not succeed."""
    if not getattr(a, "wait", False):
        print_json(to_jsonable(job)) if a.json else print(f"started {job.name}; watch it with `minehead jobs watch {job.name}`")
        return 0
    done = follow(client, job, quiet=a.json)
    if done.state != common_pb2.Job.SUCCEEDED:
        print(f"error: job {done.name} {common_pb2.Job.State.Name(done.state)}: {done.error}", file=sys.stderr)
        return 1
    result = result_type()
    done.result.Unpack(result)
    return result, done


def zip_folder(folder: Path) -> bytes:
    return make_zip({str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                     if p.is_file() and not p.name.startswith(".")})


def dataset_arg(dataset: str) -> str:
    """--dataset as the server takes it: "datasets/{id}" as given, a folder as its absolute path."""
    return dataset if dataset.startswith("datasets/") else str(Path(dataset).resolve())


def start_with_dataset(dataset: str, start, upload):
    """start(ref: str) -> Job, with ref = dataset_arg(dataset). When the server may not read the
    folder (not under its allowed roots: PERMISSION_DENIED) or cannot see it (another machine:
    NOT_FOUND), upload it once to the one dataset store with upload(zip bytes, display name) ->
    head.v1.Dataset and start again on "datasets/{id}", which training, mining and drafting all
    take."""
    import grpc

    try:
        return start(dataset_arg(dataset))
    except grpc.RpcError as e:
        local = Path(dataset)
        if e.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND) or not local.is_dir():
            raise
        print(f"note: the server cannot read {local} ({e.details()}); uploading it instead", file=sys.stderr)
        ds = upload(zip_folder(local), local.name)
        print(f"note: uploaded as {ds.name} ({ds.image_count} images, {ds.label_count} labels); "
              f"give --dataset {ds.name} next time", file=sys.stderr)
        return start(ds.name)
