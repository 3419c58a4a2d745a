"""`make run-all`: start the embedder, head and miner services, wait until each answers its
health check, and stop all three together on Ctrl-C / SIGTERM (or when one of them dies).

Configuration passes through the environment (MINEHEAD_DATA_DIR, MINEHEAD_MODELS_DIR,
MINEHEAD_<SERVICE>_PORT, …), so the servers see exactly what they would when started alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from clients.cli_common import SERVICES
from minehead.client.health import check_health
from minehead.core.config import DEFAULT_PORTS

MODULES = {"embedder": "embedder_svc", "head": "head_svc", "miner": "miner_svc"}


def main() -> int:
    host = os.environ.get("MINEHEAD_HOST", "127.0.0.1")
    procs: dict[str, subprocess.Popen] = {}
    for svc, mod in MODULES.items():
        procs[svc] = subprocess.Popen([sys.executable, "-m", mod], env=os.environ.copy())

    def stop(*_):
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    try:
        pending = dict(SERVICES)
        deadline = time.time() + 120
        while pending and time.time() < deadline:
            for svc in list(pending):
                if procs[svc].poll() is not None:
                    print(f"run-all: {svc} exited with code {procs[svc].returncode}", file=sys.stderr)
                    stop()
                    return 1
                port = int(os.environ.get(f"MINEHEAD_{svc.upper()}_PORT", DEFAULT_PORTS[svc]))
                if check_health(f"{host}:{port}", pending[svc], timeout=1.0) == "SERVING":
                    print(f"run-all: {svc:8s} SERVING on {host}:{port}", flush=True)
                    del pending[svc]
            time.sleep(0.3)
        if pending:
            print(f"run-all: not healthy after 120 s: {', '.join(pending)}", file=sys.stderr)
            stop()
            return 1
        print("run-all: all three services are up; try `minehead health`. Ctrl-C stops them.", flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [s for s, p in procs.items() if p.poll() is not None]
        print(f"run-all: {', '.join(dead)} stopped; stopping the rest", file=sys.stderr)
        stop()
        return 1
    except KeyboardInterrupt:
        stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
