"""`minehead labelstudio serve`: minehead as a Label Studio ML backend.

    minehead labelstudio serve --recipes SET_OR_JOB [--port 9090] [--host 127.0.0.1]
                               [--labelstudio-url URL] [--images-root DIR] [--base-dataset DIR]
                               [--train-every N] [--data-dir DIR] [--predict-budget S]

The token for Label Studio's API (exports, image URLs) comes from MINEHEAD_LABELSTUDIO_TOKEN
or LABEL_STUDIO_API_KEY: a personal access token or a legacy API token. The protocol is served
by clients/labelstudio_app.py; what it does is minehead.labelstudio (docs/labelstudio.md).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path


def cmd_serve(a) -> int:
    from werkzeug.serving import make_server

    from clients.labelstudio_app import create_app
    from minehead.client.heads import HeadClient
    from minehead.client.miner import MinerClient
    from minehead.labelstudio.backend import Backend
    from minehead.labelstudio.client import LabelStudioAPI

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get("MINEHEAD_LABELSTUDIO_TOKEN") or os.environ.get("LABEL_STUDIO_API_KEY")
    ls = LabelStudioAPI(a.labelstudio_url, token) if a.labelstudio_url else None
    data_dir = Path(a.data_dir or Path(os.environ.get("MINEHEAD_DATA_DIR", "var")) / "labelstudio")
    miner, head = MinerClient(a.miner, token=a.token), HeadClient(a.head, token=a.token)
    backend = Backend(miner, head, recipes=a.recipes, data_dir=data_dir, labelstudio=ls, images_root=a.images_root,
                      base_dataset=a.base_dataset, train_every=a.train_every, budget_s=a.predict_budget)
    server = make_server(a.host, a.port, create_app(backend), threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    print(f"minehead ML backend on http://{a.host}:{server.server_port} (model version {backend.model_version}); "
          f"add it in Label Studio: project settings > Model > Connect model", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
        miner.close()
        head.close()
    return 0


def add_commands(sub, add) -> None:
    ls = sub.add_parser("labelstudio", help="Label Studio ML backend").add_subparsers(dest="ls_cmd", required=True)
    s = add(ls, "serve", cmd_serve, "serve minehead as a Label Studio ML backend (predict, train rounds)")
    s.add_argument("--recipes", required=True, help="the recipe set to draft with: recipeSets/ID or jobs/ID of its mining job")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--labelstudio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                   help="the Label Studio instance (LABEL_STUDIO_URL): exports and image URLs come from it, no other host")
    s.add_argument("--images-root", default=None,
                   help="where local image paths are read: Label Studio's LOCAL_FILES_DOCUMENT_ROOT for /data/local-files/")
    s.add_argument("--base-dataset", default=None,
                   help="the YOLO dataset the first head was trained on: every round trains on it plus the reviewed tasks")
    s.add_argument("--train-every", type=int, default=0, metavar="N",
                   help="also start a round after every N created or updated annotations (default: only on START_TRAINING)")
    s.add_argument("--data-dir", default=None, help="state, rounds and their jobs (default MINEHEAD_DATA_DIR/labelstudio)")
    s.add_argument("--predict-budget", type=float, default=None, metavar="S",
                   help="seconds one /predict may draft before answering (default 60; Label Studio waits 100)")
