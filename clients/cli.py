"""The `minehead` command.

    minehead health
    minehead models list [--json]
    minehead models export MODEL_ID --name NAME [--models-dir DIR]
    minehead embed images PATH... [--model ID] [--json]
    minehead embed crops --image PATH --box X1,Y1,X2,Y2 [--box ...] [--model ID] [--json]
    minehead embed text TEXT... [--model ID] [--json]
    minehead datasets synth DIR [--images 60] [--seed 1]
    minehead heads train|list|get|download|upload|delete|score|compare   (see clients/cli_heads.py)
    minehead mine start|watch|cancel|ab, recipes list|get|export|import|apply|delete, negatives export
    minehead recipes sets list|get|create|delete|export|import
    minehead draft --recipes SET_OR_JOB --images DIR -o OUT [--format yolo,coco,labelstudio] [--polygons] [--merge] [--resume JOB]
    minehead find --image PATH --box [CLASS=]X1,Y1,X2,Y2 [--box …] [--not X1,Y1,X2,Y2 …] [--images DIR] -o OUT
    minehead labelstudio serve [--recipes SET_OR_JOB] [--port 9090]   (a Label Studio ML backend; clients/cli_labelstudio.py)

Service addresses come from --embedder/--head/--miner or MINEHEAD_<SERVICE>_ADDR
(defaults 127.0.0.1:50051/50052/50053). gRPC errors print as "error: CODE: message" and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
import numpy as np

from minehead.client.channel import default_address
from minehead.client.embedder import EmbedderClient
from minehead.client.health import check_health
from clients import cli_draft, cli_find, cli_heads, cli_labelstudio, cli_miner
from clients.cli_common import SERVICES, parse_box, print_json, print_table, to_jsonable




def cmd_health(a) -> int:
    rows, out, ok = [], {}, True
    for svc, full in SERVICES.items():
        addr = getattr(a, svc)
        status = check_health(addr, full, token=a.token)
        ok &= status == "SERVING"
        rows.append((svc, addr, status))
        out[svc] = {"address": addr, "status": status}
    print_json(out) if a.json else print_table(["service", "address", "status"], rows)
    return 0 if ok else 1


def cmd_models_list(a) -> int:
    with EmbedderClient(a.embedder, token=a.token) as c:
        models = c.list_models()
    if a.json:
        print_json([to_jsonable(m) for m in models])
        return 0
    if not models:
        print("no models: run `make models` on the embedder's machine, or start it with --default-model")
        return 0
    print_table(["id", "backend", "dim", "input", "device", "loaded", "default"],
                [(m.id, m.backend, m.dim or "?", m.preprocessing.input_size or "?", m.device or "-",
                  "yes" if m.loaded else "no", "*" if m.is_default else "") for m in models])
    return 0


def cmd_models_export(a) -> int:
    from minehead.encoders.export import export_vision_tower

    models_dir = Path(a.models_dir or os.environ.get("MINEHEAD_MODELS_DIR", "var/models"))
    m = export_vision_tower(a.model_id, a.name, models_dir, opset=a.opset, tolerance=a.tolerance)
    if a.json:
        print_json(m)
    else:
        print(f"exported {a.model_id} to {models_dir / 'onnx' / a.name} (dim {m['dim']}, "
              f"parity max |onnx - torch| = {m['parity_max_abs_err']:.3g}); serve it as model {a.name!r}")
    return 0


def _print_embeddings(a, resp, labels: list[str]) -> None:
    from minehead.core import embeddings as codec

    vecs = codec.from_proto(resp.embeddings)
    if a.json:
        print_json({
            "model": to_jsonable(resp.model),
            "count": int(vecs.shape[0]),
            "dim": int(vecs.shape[1]) if vecs.ndim == 2 else 0,
            "cache_hits": getattr(resp, "cache_hits", 0),
            "labels": labels,
            "embeddings": np.round(vecs.astype(np.float64), 7).tolist(),
        })
        return
    print(f"model {resp.model.model_id}  dim {resp.model.dim}  rows {len(vecs)}"
          + (f"  cache hits {resp.cache_hits}" if hasattr(resp, "cache_hits") else ""))
    print_table(["#", "input", "norm", "first values"],
                [(i, labels[i], float(np.linalg.norm(v)), " ".join(f"{x:+.3f}" for x in v[:6]) + " …")
                 for i, v in enumerate(vecs)])


def cmd_embed_images(a) -> int:
    with EmbedderClient(a.embedder, token=a.token) as c:
        resp = c.embed_images_raw(a.paths, a.model or "")
    _print_embeddings(a, resp, [str(p) for p in a.paths])
    return 0


def cmd_embed_crops(a) -> int:
    from minehead.common.v1 import common_pb2

    policy = None
    if a.padding is not None or a.no_square or a.output_size:
        policy = common_pb2.CropPolicy(padding_ratio=a.padding or 0.0, output_size=a.output_size or 0,
                                       square=common_pb2.CropPolicy.SQUARE_MODE_NONE if a.no_square else 0)
    with EmbedderClient(a.embedder, token=a.token) as c:
        resp = c.embed_crops_raw(a.image, a.box, a.model or "", policy)
    _print_embeddings(a, resp, [",".join(f"{v:g}" for v in b) for b in a.box])
    return 0


def cmd_embed_text(a) -> int:
    with EmbedderClient(a.embedder, token=a.token) as c:
        from minehead.embedder.v1 import embedder_pb2

        resp = c.stub.EmbedText(embedder_pb2.EmbedTextRequest(model=a.model or "", texts=a.texts), timeout=c.timeout)
    _print_embeddings(a, resp, list(a.texts))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minehead", description="Draft detection boxes with SAM3 recipes and classifier heads.")
    p.add_argument("--embedder", default=default_address("embedder"), help="embedder address (MINEHEAD_EMBEDDER_ADDR)")
    p.add_argument("--head", default=default_address("head"), help="head service address (MINEHEAD_HEAD_ADDR)")
    p.add_argument("--miner", default=default_address("miner"), help="miner address (MINEHEAD_MINER_ADDR)")
    p.add_argument("--token", default=os.environ.get("MINEHEAD_AUTH_TOKEN"), help="bearer token, if the servers want one")
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent, name, fn, help_):
        sp = parent.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sp.set_defaults(fn=fn)
        return sp

    add(sub, "health", cmd_health, "check the three services' health endpoints")

    models = sub.add_parser("models", help="embedding models").add_subparsers(dest="models_cmd", required=True)
    add(models, "list", cmd_models_list, "list the embedder's models")
    ex = add(models, "export", cmd_models_export, "export a CLIP or DINOv3 vision tower to ONNX (runs locally)")
    ex.add_argument("model_id", help='for example "hf-clip:openai/clip-vit-base-patch32" or "dinov3:facebook/dinov3-vits16-pretrain-lvd1689m"')
    ex.add_argument("--name", required=True, help="the ONNX model's id (a folder under MODELS_DIR/onnx)")
    ex.add_argument("--models-dir", default=None, help="default: MINEHEAD_MODELS_DIR or var/models")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--tolerance", type=float, default=1e-4, help="max |onnx - torch| accepted")

    embed = sub.add_parser("embed", help="embeddings from the embedder service").add_subparsers(dest="embed_cmd", required=True)
    ei = add(embed, "images", cmd_embed_images, "embed whole images")
    ei.add_argument("paths", nargs="+", help="image files")
    ei.add_argument("--model", default="")
    ec = add(embed, "crops", cmd_embed_crops, "embed boxes of one image")
    ec.add_argument("--image", required=True, help="image file")
    ec.add_argument("--box", type=parse_box, action="append", required=True, metavar="X1,Y1,X2,Y2",
                    help="a box in pixels; repeat for more")
    ec.add_argument("--model", default="")
    ec.add_argument("--padding", type=float, default=None, help="padding ratio (default 0.08)")
    ec.add_argument("--no-square", action="store_true", help="keep the padded box's aspect ratio")
    ec.add_argument("--output-size", type=int, default=0, help="crop side before the encoder's resize")
    et = add(embed, "text", cmd_embed_text, "embed texts (CLIP models)")
    et.add_argument("texts", nargs="+")
    et.add_argument("--model", default="")
    cli_heads.add_commands(sub, add)
    recipes = cli_miner.add_commands(sub, add)
    cli_draft.add_commands(sub, add, recipes)
    cli_find.add_commands(sub, add)
    cli_labelstudio.add_commands(sub, add)
    return p


def entry() -> int:
    """The `minehead` command: main() with SIGPIPE's default restored, so `minehead … | head`
    ends quietly. Only here: main() called in-process (tests, other programs) must leave the
    caller's SIGPIPE alone, or the caller dies of the next write to a closed socket (a pytest
    run did, mid-suite, after a CLI test)."""
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return main()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - local errors (export) print as one line
        from minehead.core.errors import MineheadError

        if isinstance(e, MineheadError):
            print(f"error: {e.code.name}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(entry())
