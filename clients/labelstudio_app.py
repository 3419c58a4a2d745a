"""The HTTP edge of the Label Studio ML backend (Flask): Label Studio's ML backend protocol on
top of minehead.labelstudio.backend.Backend, nothing else.

    GET  /health, /             {"status": "UP", "model_version": …}
    POST /setup                 {"model_version": …}; 400 naming both label lists when they differ
    POST /predict               {"results": [prediction per task]}
    POST /webhook               START_TRAINING starts a round (201); ANNOTATION_* counted (--train-every)
    POST /train                 the older training call (annotations inline): a round on them
    GET  /versions              model versions so far (the recipe sets)
    GET  /rounds[/<id>]         rounds (jobs) with phase, progress, error, result
    POST /rounds/<id>/cancel    cancel a round; the current model version stays

Errors answer {"status": "error", "message": …} with 400 (bad input, labels that do not match),
404, 503 (a service down) or 502 (another gRPC error), and the message is logged: Label Studio
shows only the status code in its UI.
"""

from __future__ import annotations

import json
import logging

import grpc
from flask import Flask, jsonify, request
from google.protobuf import json_format
from werkzeug.exceptions import HTTPException

from minehead.common.v1 import common_pb2
from minehead.core.errors import InvalidArgument, MineheadError
from minehead.core.jobs import job_id_from_name
from minehead.importers import MAX_JSON_BYTES
from minehead.labelstudio.backend import ROUND_KIND, Backend

log = logging.getLogger("minehead.labelstudio")
_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
           grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.PERMISSION_DENIED: 403}


def _job(job: common_pb2.Job) -> dict:
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def create_app(backend: Backend) -> Flask:
    app = Flask("minehead-labelstudio")
    app.config["MAX_CONTENT_LENGTH"] = MAX_JSON_BYTES  # a bigger body is refused (413) before it is read

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise InvalidArgument("the request body is not a JSON object")
        return data

    @app.errorhandler(Exception)
    def _error(e):
        if isinstance(e, HTTPException):
            return jsonify(status="error", message=e.description), e.code
        if isinstance(e, MineheadError):
            code, msg = _STATUS.get(e.code, 500), str(e)
        elif isinstance(e, grpc.RpcError):
            code, msg = _STATUS.get(e.code(), 502), f"{e.code().name}: {e.details()}"
        else:
            log.exception("unexpected error")
            code, msg = 500, f"{type(e).__name__}: {e}"
        log.error("%s %s -> %d: %s", request.method, request.path, code, msg)
        return jsonify(status="error", message=msg), code

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(backend.health())

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
        return jsonify(out), 201 if "round" in out else 200

    @app.post("/train")
    def train():
        data = body()
        tasks = data.get("annotations")
        if not isinstance(tasks, list):
            raise InvalidArgument("/train expects `annotations`: the tasks with their annotations")
        pid = int(str(data.get("project", "0")).split(".", 1)[0] or 0)
        job = backend.start_round(pid, export=lambda: json.dumps(tasks).encode())
        return jsonify({"status": "ok", "round": job.name}), 201

    @app.get("/versions")
    def versions():
        return jsonify({"versions": [backend.state["origin"]] + [r["recipe_set"] for r in backend.state["rounds"]],
                        "current": backend.model_version})

    @app.get("/rounds")
    def rounds():
        jobs, _ = backend.store.list(kind=ROUND_KIND, page_size=100)
        return jsonify({"rounds": [_job(j) for j in jobs]})

    @app.get("/rounds/<path:jid>")
    def round_get(jid: str):
        return jsonify(_job(backend.store.get(job_id_from_name(jid))))

    @app.post("/rounds/<path:jid>/cancel")
    def round_cancel(jid: str):
        return jsonify(_job(backend.store.request_cancel(job_id_from_name(jid))))

    return app
