"""The HTTP edge of the Label Studio ML backend (Flask): Label Studio's ML backend protocol on
top of minehead.labelstudio.backend.Backend, nothing else.

    GET  /health                {"status": "UP", "model_version": …, "rounds": running, pending, last}
    POST /setup                 {"model_version": …}; 400 naming both label lists when they differ
    POST /predict               {"results": [prediction per task]}
    POST /webhook               START_TRAINING: a round (201) or queued behind the running one (202);
                                ANNOTATION_* counted (--train-every)
    POST /train                 the older training call (annotations inline): a round on them
    GET  /versions              model versions so far (the recipe sets)
    GET  /rounds[/<id>]         rounds (jobs) with phase, progress, error, result
    POST /rounds/<id>/cancel    cancel a round; the current model version stays

Every route but /health asks for HTTP basic auth when credentials are set (401 with
WWW-Authenticate otherwise). Bodies are bounded before any work (minehead.labelstudio.guard):
413 over --max-body-mb or --max-tasks, 400 for nesting deeper than the limit or malformed tasks,
429 when webhooks come faster than the rate.

Errors answer {"status": "error", "message": …} with 400 (bad input, labels that do not match,
training asked of a backend started without --recipes), 401, 404, 413, 429, 503 (a service
down) or 502 (another gRPC error), and the message is logged. Label Studio 1.23 reads no error
body: what it keeps (the model's error_message, shown on the model's card) is requests'
"400 Client Error: REASON for url: …", so the message is also the status line's reason phrase
(ASCII, one line, at most REASON_CHARS characters).

The backend is minehead.labelstudio.backend.Backend (a recipe set: drafts and training rounds)
or minehead.labelstudio.interactive.ExemplarBackend (started without --recipes: interactive
find only); both answer the same calls.
"""

from __future__ import annotations

import logging

import grpc
from flask import Flask, jsonify, request
from google.protobuf import json_format
from werkzeug.exceptions import HTTPException

from minehead.common.v1 import common_pb2
from minehead.core.errors import MineheadError
from minehead.core.jobs import job_id_from_name
from minehead.labelstudio.backend import Backend
from minehead.labelstudio.interactive import ExemplarBackend
from minehead.labelstudio.guard import Credentials, Limits, TokenBucket, TooFast, parse_body

log = logging.getLogger("minehead.labelstudio")
REASON_CHARS = 400
_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
           grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.PERMISSION_DENIED: 403}


def _job(job: common_pb2.Job) -> dict:
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def status_line(code: int, message: str) -> str:
    """"400 the message": the message as an HTTP reason phrase (printable ASCII, one line, cut)."""
    reason = "".join(c if " " <= c <= "~" else "?" for c in " ".join(str(message).split()))
    if len(reason) > REASON_CHARS:
        reason = reason[:REASON_CHARS - 3] + "..."
    return f"{code} {reason}" if reason else str(code)


def create_app(backend: Backend | ExemplarBackend, credentials: Credentials | None = None, limits: Limits | None = None) -> Flask:
    credentials = credentials or Credentials(None, None)
    limits = limits or backend.limits
    hooks = TokenBucket(limits.webhook_rate, limits.webhook_burst, "webhooks and training calls")
    app = Flask("minehead-labelstudio")
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body_bytes  # refused (413) before the body is read

    def body() -> dict:
        if request.content_length is None and request.environ.get("wsgi.input_terminated"):
            # chunked: werkzeug would cut it at the limit without a word; read one byte past it
            return parse_body(request.environ["wsgi.input"].read(limits.max_body_bytes + 1), limits)
        return parse_body(request.get_data(cache=False), limits)

    @app.before_request
    def _auth():
        if request.path != "/health" and not credentials.check(request.headers.get("Authorization")):
            # no detail: a caller without credentials learns only that it needs them
            log.warning("%s %s from %s -> 401", request.method, request.path, request.remote_addr)
            return (jsonify(status="error", message="authentication required: HTTP basic auth with the backend's "
                                                    "credentials (Label Studio: the model's Basic Auth settings)"),
                    401, {"WWW-Authenticate": 'Basic realm="minehead ML backend", charset="UTF-8"'})
        if request.path in ("/webhook", "/train"):
            hooks.take()  # before reading the body: a flood costs a token check, not a parse
        return None

    @app.errorhandler(Exception)
    def _error(e):
        if isinstance(e, HTTPException):
            msg = e.description
            if e.code == 413:
                msg = (f"the request body is {request.content_length or 'over'} bytes; the limit is "
                       f"{limits.max_body_bytes} (--max-body-mb)")
            log.error("%s %s -> %d: %s", request.method, request.path, e.code, msg)
            return jsonify(status="error", message=msg), status_line(e.code, msg)
        headers = {}
        if getattr(e, "http_status", None):  # guard.Refused: the status is part of the refusal
            code, msg = e.http_status, str(e)
            if isinstance(e, TooFast):
                headers["Retry-After"] = str(max(1, round(e.retry_after)))
        elif isinstance(e, MineheadError):
            code, msg = _STATUS.get(e.code, 500), str(e)
        elif isinstance(e, grpc.RpcError):
            code, msg = _STATUS.get(e.code(), 502), f"{e.code().name}: {e.details()}"
        else:
            log.exception("unexpected error")
            code, msg = 500, f"{type(e).__name__}: {e}"
        log.error("%s %s -> %d: %s", request.method, request.path, code, msg)
        return jsonify(status="error", message=msg), status_line(code, msg), headers

    @app.get("/health")
    @app.get("/")
    def health():
        out = backend.health()
        if out["rounds"]["last"] and not credentials.check(request.headers.get("Authorization")):
            out["rounds"]["last"].pop("error")  # it may name paths and hosts: for callers with credentials only
        return jsonify(out)

    @app.get("/metrics")
    def metrics():
        return jsonify({})

    @app.post("/setup")
    def setup():
        return jsonify(backend.setup(body()))

    @app.post("/predict")
    def predict():
        return jsonify({"results": backend.predict(body())})

    @app.post("/webhook")
    def webhook():
        out = backend.webhook(body())
        return jsonify(out), {"ok": 201, "queued": 202}.get(out["status"], 200) if "round" in out else 200

    @app.post("/train")
    def train():
        out = backend.train(body())
        return jsonify(out), 201 if out["status"] == "ok" else 202

    @app.get("/versions")
    def versions():
        return jsonify(backend.versions())

    @app.get("/rounds")
    def rounds():
        return jsonify({"rounds": [_job(j) for j in backend.rounds()]})

    @app.get("/rounds/<path:jid>")
    def round_get(jid: str):
        return jsonify(_job(backend.round(job_id_from_name(jid))))

    @app.post("/rounds/<path:jid>/cancel")
    def round_cancel(jid: str):
        return jsonify(_job(backend.cancel_round(job_id_from_name(jid))))

    return app
