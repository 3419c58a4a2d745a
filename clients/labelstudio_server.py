"""`minehead labelstudio serve` under gunicorn (as Label Studio's own ML backends run).

    serve(make_backend, app_kwargs, host, port, workers=1, threads=8, grace_s=20)

Each worker process builds its own Backend after the fork (gRPC channels must not cross a
fork); what the workers must agree on is on disk (minehead.labelstudio.state). The default is
one worker with threads: a request spends its time waiting on the miner's DraftImages stream,
so threads are enough, and a round, a prediction cache and the miner's channel are not repeated
per process. More workers are safe (rounds still run one at a time, in the worker holding the
runner lock) but each keeps its own cache.

SIGTERM (or Ctrl-C): gunicorn stops accepting, finishes the requests in flight, then each
worker's worker_exit runs Backend.close(grace_s): a running round stops at its next safe point
(INTERRUPTED, its head or miner job cancelled) or is marked INTERRUPTED when grace_s runs out.
The model version is the old set or the round's complete new one (state.json is replaced
atomically), never a part of one.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys

from gunicorn.app.base import BaseApplication

log = logging.getLogger("minehead.labelstudio")


class BackendServer(BaseApplication):
    def __init__(self, make_app, options: dict, banner=None) -> None:
        """make_app() -> (wsgi_app, backend), called in each worker; banner(url) -> a line for stderr."""
        self._make_app, self._options, self._banner = make_app, options, banner
        self.backend = None
        super().__init__()

    def load_config(self) -> None:
        for k, v in self._options.items():
            self.cfg.set(k, v)
        self.cfg.set("when_ready", self._when_ready)
        self.cfg.set("worker_exit", self._worker_exit)

    def load(self):
        app, self.backend = self._make_app()
        return app

    def _when_ready(self, server) -> None:
        host, port = server.LISTENERS[0].sock.getsockname()[:2]
        if self._banner is not None:
            print(self._banner(f"http://{host}:{port}"), file=sys.stderr, flush=True)

    def _worker_exit(self, server, worker) -> None:
        if self.backend is None:
            return
        grace = self._options.get("graceful_timeout", 30) - 2  # leave gunicorn time before it kills us
        self.backend.close(grace_s=max(0.5, grace))
        if getattr(self.backend, "busy", False):
            # A round thread is still blocked (an export that will not return): the round is
            # marked INTERRUPTED already; exit now rather than wait on it at interpreter exit.
            logging.shutdown()
            os._exit(0)


def serve(make_app, *, host: str, port: int, workers: int = 1, threads: int = 8, grace_s: float = 20.0,
          banner=None, access_log: bool = False) -> int:
    options = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread",
        # Label Studio waits 100 s for /predict; the budget answers within 60 s (predict.py).
        "timeout": 120,
        "graceful_timeout": math.ceil(grace_s) + 2,  # gunicorn wants whole seconds
        "keepalive": 5,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "minehead-labelstudio",
        "preload_app": False,
        # gunicorn >= 25's control socket defaults to one path per user: two backends (or a backend
        # beside another gunicorn app) would take each other's; nothing here uses it.
        "control_socket_disable": True,
    }
    # The CLI restores SIGPIPE's default (so `minehead … | head` ends quietly); a server must not:
    # a client that gave up (Label Studio's ML_TIMEOUT_PREDICT) would kill the worker, and the
    # round it runs, on the answer's write. Ignored, the write is an error for that request only.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    BackendServer(make_app, options, banner).run()
    return 0
