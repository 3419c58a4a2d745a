"""`minehead labelstudio serve`: minehead as a Label Studio ML backend.

    minehead labelstudio serve [--recipes SET_OR_JOB] [--port 9090] [--host 127.0.0.1]
                               [--labelstudio-url URL] [--images-root DIR] [--base-dataset DIR]
                               [--train-every N] [--data-dir DIR] [--predict-budget S]
                               [--auth-user U --auth-password P | --insecure]
                               [--workers N] [--threads N] [--graceful-timeout S]
                               [--max-body-mb MB] [--max-tasks N] [--max-depth N] [--webhook-rate R]

Without --recipes the backend serves Label Studio's interactive mode only (rectangles drawn with
auto-annotation on come back with every object like them: FindSimilar, no dataset needed);
/predict without drawn rectangles answers no prediction and training is refused naming --recipes.

Inbound requests need HTTP basic auth (all but /health) when credentials are given:
--auth-user/--auth-password, MINEHEAD_ML_BACKEND_USER/_PASSWORD, or BASIC_AUTH_USER/_PASS.
Without them the backend listens on loopback only, unless --insecure.

The token for Label Studio's API (exports, image URLs) comes from MINEHEAD_LABELSTUDIO_TOKEN
or LABEL_STUDIO_API_KEY: a personal access token or a legacy API token. The protocol is served
by clients/labelstudio_app.py; what it does is minehead.labelstudio (docs/labelstudio.md).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def cmd_serve(a) -> int:
    from clients.labelstudio_server import serve
    from minehead.labelstudio.guard import Credentials, Limits, is_loopback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        creds = Credentials.from_env(a.auth_user, a.auth_password)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not creds.enabled and not is_loopback(a.host) and not a.insecure:
        print(f"error: --host {a.host} is not a loopback address and no credentials are set: anyone who reaches the "
              "port could predict and train. Set --auth-user/--auth-password (or MINEHEAD_ML_BACKEND_USER/"
              "MINEHEAD_ML_BACKEND_PASSWORD, or BASIC_AUTH_USER/BASIC_AUTH_PASS) and the same in Label Studio's "
              "model settings (Basic Auth), or pass --insecure", file=sys.stderr)
        return 2
    if not a.recipes:
        needs = [f for f, v in (("--base-dataset", a.base_dataset), ("--train-every", a.train_every)) if v]
        if needs:
            print(f"error: {' and '.join(needs)} set(s) up training rounds, and rounds need a recipe set: add "
                  "--recipes SET_OR_JOB, or leave them out to serve interactive find only", file=sys.stderr)
            return 2
    for name, addr in (("miner", a.miner), ("head service", a.head))[:2 if a.recipes else 1]:
        if (why := unreachable(addr)) is not None:
            print(f"error: the {name} at {addr} is not reachable ({why}); start the services (make run-all) or "
                  f"pass --{name.split()[0]} ADDRESS", file=sys.stderr)
            return 2
    limits = Limits(max_body_bytes=int(a.max_body_mb * (1 << 20)), max_tasks=a.max_tasks, max_depth=a.max_depth,
                    webhook_rate=a.webhook_rate, webhook_burst=max(1, int(a.webhook_rate * 5)))

    def make_app():  # in each gunicorn worker, after the fork
        from clients.labelstudio_app import create_app
        from minehead.client.heads import HeadClient
        from minehead.client.miner import MinerClient
        from minehead.labelstudio.backend import Backend
        from minehead.labelstudio.client import LabelStudioAPI

        token = os.environ.get("MINEHEAD_LABELSTUDIO_TOKEN") or os.environ.get("LABEL_STUDIO_API_KEY")
        ls = LabelStudioAPI(a.labelstudio_url, token) if a.labelstudio_url else None
        data_dir = Path(a.data_dir or Path(os.environ.get("MINEHEAD_DATA_DIR", "var")) / "labelstudio")
        if not a.recipes:  # interactive find only: no state, no rounds, no head service
            from minehead.labelstudio.interactive import ExemplarBackend

            backend = ExemplarBackend(MinerClient(a.miner, token=a.token), labelstudio=ls, images_root=a.images_root,
                                      budget_s=a.predict_budget, limits=limits)
            return create_app(backend, creds, limits), backend
        miner, head = MinerClient(a.miner, token=a.token), HeadClient(a.head, token=a.token)
        backend = Backend(miner, head, recipes=a.recipes, data_dir=data_dir, labelstudio=ls, images_root=a.images_root,
                          base_dataset=a.base_dataset, train_every=a.train_every, budget_s=a.predict_budget,
                          limits=limits)
        return create_app(backend, creds, limits), backend

    def banner(url: str) -> str:
        auth = f"basic auth as {creds.user!r}" if creds.enabled else "NO authentication"
        mode = (f"drafting with {a.recipes}" if a.recipes else "interactive find only, no recipe set: turn on "
                "'Use for interactive preannotations' and auto-annotation")
        return (f"minehead ML backend on {url} ({a.workers} worker(s) x {a.threads} threads, {auth}; {mode}); add it in "
                "Label Studio: project settings > Model > Connect model")

    return serve(make_app, host=a.host, port=a.port, workers=a.workers, threads=a.threads,
                 grace_s=a.graceful_timeout, banner=banner, access_log=a.access_log)


def unreachable(addr: str, timeout: float = 3.0) -> str | None:
    """Why a host:port address takes no TCP connection (None if it does, or if the address is
    not a plain host:port, which gRPC resolves itself). A plain socket, not a gRPC channel: the
    gunicorn workers fork after this, and gRPC's threads must not be running when they do;
    without the check a dead miner surfaced as gunicorn's "Worker failed to boot" traceback."""
    import socket

    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return None
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def add_commands(sub, add) -> None:
    ls = sub.add_parser("labelstudio", help="Label Studio ML backend").add_subparsers(dest="ls_cmd", required=True)
    s = add(ls, "serve", cmd_serve, "serve minehead as a Label Studio ML backend (predict, train rounds)")
    s.add_argument("--recipes", default=None,
                   help="the recipe set to draft with and train from: recipeSets/ID or jobs/ID of its mining job. "
                        "Without it: interactive find only (drawn rectangles -> every object like them; no drafts "
                        "for undrawn tasks, no training rounds)")
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
    s.add_argument("--auth-user", default=None,
                   help="HTTP basic auth user for every route but /health (MINEHEAD_ML_BACKEND_USER, BASIC_AUTH_USER)")
    s.add_argument("--auth-password", default=None,
                   help="its password (prefer MINEHEAD_ML_BACKEND_PASSWORD or BASIC_AUTH_PASS: flags show in ps)")
    s.add_argument("--insecure", action="store_true",
                   help="listen on a non-loopback --host without credentials (anyone reaching the port may train)")
    s.add_argument("--workers", type=int, default=1,
                   help="gunicorn worker processes (default 1: requests wait on the miner, threads suffice)")
    s.add_argument("--threads", type=int, default=8, help="threads per worker: concurrent requests (default 8)")
    s.add_argument("--graceful-timeout", type=float, default=20.0, metavar="S",
                   help="on SIGTERM, seconds a running round gets to reach a safe point before it is marked "
                        "INTERRUPTED (default 20)")
    s.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, MB (default 16; 413 above)")
    s.add_argument("--max-tasks", type=int, default=10000, help="most tasks in one /predict or /train (default 10000)")
    s.add_argument("--max-depth", type=int, default=32, help="deepest JSON nesting accepted (default 32)")
    s.add_argument("--webhook-rate", type=float, default=20.0, metavar="R",
                   help="webhooks and /train calls a second, bursts of 5 s worth (default 20; 429 above, 0: no limit)")
    s.add_argument("--access-log", action="store_true", help="log every request (gunicorn's access log) to stderr")
