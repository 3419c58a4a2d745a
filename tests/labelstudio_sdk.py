"""label-studio-sdk driven from the Label Studio virtualenv (var/ls-venv), for
tests/test_labelstudio_live.py.

The SDK (pinned by label-studio==1.23.2 itself: label-studio-sdk==2.1.2) cannot live in the
project's venv: its opencv-python-headless caps numpy below 2.3, ours is pinned at 2.4.6. So
the test runs this file with var/ls-venv/bin/python and talks to it over stdin/stdout, one JSON
object a line: {"op": …, …} in, {"ok": result} or {"error": "…"} out.

    LS_URL, LS_TOKEN   the instance and its API token (environment)
"""

from __future__ import annotations

import json
import os
import sys

from label_studio_sdk import LabelStudio


def _task(t) -> dict:
    d = t if isinstance(t, dict) else t.model_dump()
    return {"id": d["id"], "data": d.get("data"), "annotations": len(d.get("annotations") or []),
            "predictions": [{"model_version": p.get("model_version"), "score": p.get("score"), "result": p.get("result")}
                            for p in (d.get("predictions") or [])]}


def main() -> None:
    ls = LabelStudio(base_url=os.environ["LS_URL"], api_key=os.environ["LS_TOKEN"], timeout=300)

    def create_project(title, label_config):
        return ls.projects.create(title=title, label_config=label_config).id

    def import_tasks(project, tasks):
        r = ls.projects.import_tasks(project, request=tasks, return_task_ids=True)
        return list(r.task_ids or [])

    def tasks(project):
        # fields=all: predictions and annotations with each task
        return [_task(t) for t in ls.tasks.list(project=project, fields="all", page_size=1000)]

    def predictions(task):
        return [{"model_version": p.model_version, "score": p.score, "result": p.result}
                for p in ls.predictions.list(task=task)]

    def connect_ml(project, url, user=None, password=None, interactive=False):
        auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password} if user else {}
        m = ls.ml.create(project=project, url=url, title="minehead", is_interactive=interactive, **auth)
        return {"id": m.id, "state": str(m.state), "error": m.error_message}

    def webhook_headers(project, url, headers):
        """Extra headers on the webhook Label Studio made for the ML backend (`url`): it sends the
        ML connection's basic auth with its own calls, not with webhooks."""
        hooks = [w for w in ls.webhooks.list(project=str(project)) if w.url == url]
        for w in hooks:
            ls.webhooks.update(w.id, url=w.url, headers=headers)
        return len(hooks)

    def ml(id):
        m = ls.ml.get(id)
        return {"state": str(m.state), "model_version": m.model_version, "error": m.error_message}

    def retrieve_predictions(project, task_ids):
        ls.actions.create(id="retrieve_tasks_predictions", project=project,
                          selected_items={"all": False, "included": task_ids})
        return True

    def annotate(task, result):
        return ls.annotations.create(task, result=result, was_cancelled=False).id

    def train(id):
        ls.ml.train(id)
        return True

    ops = {f.__name__: f for f in (create_project, import_tasks, tasks, predictions, connect_ml, ml, retrieve_predictions,
                                   annotate, train, webhook_headers)}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            out = {"ok": ops[req.pop("op")](**req)}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
            out = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out, default=str) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
