"""Label Studio as minehead's review tool: an ML backend's library half.

    config.py    the labelling config a project uses (labels, tag, names) and its check against a set
    client.py    Label Studio's REST API, the little the backend needs (export, auth, image bytes)
    predict.py   tasks -> drafts through the miner -> Label Studio predictions, within a time budget
    rounds.py    a training round: export -> import -> train -> mine -> recipe set, as a job
    backend.py   the backend's state (current recipe set, rounds, annotation counter)
    interactive.py  drawn rectangles -> everything like them (FindSimilar); ExemplarBackend: the backend with no recipe set
    state.py     that state on disk, shared by gunicorn's workers (locked updates, the runner lock)
    guard.py     what is refused before any work: credentials, body and task limits, webhook floods

The HTTP edge (Flask) is clients/labelstudio_app.py; it only turns requests into calls here.
"""
