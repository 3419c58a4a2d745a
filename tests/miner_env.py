"""The miner's shared test servers: a real embedder (the session's), head service and head,
miner and recipe store, over a 40-scene synthetic dataset, with the FAKE ScriptedDetector as the
miner's default detector (SAM3's real outputs cannot exist here; see test_miner.py).

`miner_env` is session-scoped (conftest.py imports it): test_miner, test_mining_truth and
test_dataset_store read the same servers and head, trained once (~40 s of encoder passes and a
head with a short locator), instead of one of each a module.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from minehead.client.channel import connect
from minehead.client.heads import HeadClient
from minehead.client.jobs import JobsClient
from minehead.common.v1 import common_pb2
from minehead.core.server import start_server
from minehead.datasets import load_dataset
from minehead.geometry import iou_matrix
from minehead.head.v1 import head_pb2
from minehead.miner.v1 import miner_pb2, miner_pb2_grpc
from minehead.synth import make_synthetic_dataset
from miner_svc.detectors import register_detector
from miner_svc.detectors.base import Detections, Detector, DetectorInfo
from tests.conftest import make_config

N_IMAGES = 40


class ScriptedDetector(Detector):
    """FAKE detector with known answers, keyed by image sha256:
    - prompt "<class name>": that class's objects (score 0.75-0.95), the look-alike class's
      objects (0.45-0.65), and clutter: background boxes (0.3-0.6);
    - prompt "clutter": background boxes only;
    - box exemplars: every object of the exemplars' class (score 0.6), including ones the text
      prompt scored low."""

    LOOKALIKE = {"red square": "crimson_square", "crimson square": "red_square"}

    def __init__(self, *datasets) -> None:
        super().__init__()
        self.info = DetectorInfo("scripted-fake")
        from minehead.core.images import sha256_hex

        self.by_sha = {sha256_hex(r.path.read_bytes()): r for ds in datasets for r in ds.images}
        self.classes = datasets[0].classes
        assert all(ds.classes == self.classes for ds in datasets), "one generator's classes"

    def _clutter(self, rec, seed):
        from minehead.sampling import sample_background_boxes

        rng = np.random.default_rng(seed)
        return sample_background_boxes(rec.width, rec.height, rec.boxes, 3, rng, min_frac=0.1, max_frac=0.25)

    def predict_text(self, state, prompt, threshold):
        self.counters.add(decoder=1, text=1, backbone=int(state.features is None))
        state.features = True
        rec = self.by_sha[state.image.sha256]
        # zlib.crc32, not hash(): str hashes are salted per process, and a fake must answer the same every run
        rng = np.random.default_rng(zlib.crc32(f"{state.image.sha256}|{prompt}".encode()))
        names = [self.classes[c] for c in rec.class_ids]
        boxes, scores = [], []
        if prompt != "clutter":
            cls = prompt.replace(" ", "_")
            for b, n in zip(rec.boxes, names):
                if n == cls:
                    boxes.append(b)
                    scores.append(rng.uniform(0.75, 0.95))
                elif n == self.LOOKALIKE.get(prompt):
                    boxes.append(b)
                    scores.append(rng.uniform(0.45, 0.65))
        for b in self._clutter(rec, zlib.crc32(prompt.encode()) % 1000):
            boxes.append(b)
            scores.append(rng.uniform(0.3, 0.6))
        d = Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                       np.zeros((len(scores), rec.height, rec.width), bool))
        for i, b in enumerate(d.boxes.astype(int)):
            d.masks[i, b[1]:b[3], b[0]:b[2]] = True
        return d.above(threshold)

    def predict_exemplars(self, state, boxes, threshold):
        self.counters.add(decoder=1)
        rec = self.by_sha[state.image.sha256]
        if not len(rec.boxes):
            return Detections.empty(rec.height, rec.width)
        hit = iou_matrix(boxes, rec.boxes).max(0) > 0.5
        cls = set(rec.class_ids[hit])
        sel = np.isin(rec.class_ids, list(cls))
        b = rec.boxes[sel].astype(np.float32)
        d = Detections(b, np.full(len(b), 0.6, np.float32), np.zeros((len(b), rec.height, rec.width), bool))
        return d.above(threshold)


_SCRIPTED: list = []  # every dataset a fixture's scripted fake answers for


def start_head_and_miner(tmp: Path, embedder_address: str, models_dir: Path, ds):
    """A real head service and miner on free loopback ports, the miner's default detector the
    scripted fake answering for ds. The detector registry is process-wide and a miner creates its
    detector on first use: the fake answers for every fixture's dataset, so a module that starts
    its own (test_drafting) cannot take the session's images away from miner_env's miner.
    -> (head runner, head server, miner runner, miner server); stop_head_and_miner ends them."""
    from head_svc.__main__ import build as build_head
    from miner_svc.__main__ import build as build_miner

    _SCRIPTED.append(ds)
    register_detector("scripted-fake", lambda mid, md, off: ScriptedDetector(*_SCRIPTED))
    hcfg = make_config("head", tmp, extra={"embedder_addr": embedder_address})
    hrunner, hb = build_head(hcfg)
    hserver = start_server(hcfg, hb)
    mcfg = make_config("miner", tmp, models_dir, extra={"embedder_addr": embedder_address,
                                                        "head_addr": f"127.0.0.1:{hserver.port}",
                                                        "default_detector": "scripted-fake"})
    mrunner, mb = build_miner(mcfg)
    return hrunner, hserver, mrunner, start_server(mcfg, mb)


def stop_head_and_miner(hrunner, hserver, mrunner, mserver) -> None:
    mserver.stop(0.5)
    hserver.stop(0.5)
    mrunner.shutdown()
    hrunner.shutdown()


@pytest.fixture(scope="session")
def miner_env(embedder_server, models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("miner")
    ds_path = make_synthetic_dataset(tmp / "shapes", images=N_IMAGES, seed=1)
    ds = load_dataset(ds_path)
    hrunner, hserver, mrunner, mserver = start_head_and_miner(tmp, embedder_server.address, models_dir, ds)
    head_addr, addr = f"127.0.0.1:{hserver.port}", f"127.0.0.1:{mserver.port}"
    hc = HeadClient(head_addr)
    # With a locator (so the head records every labelled image as trained on, which the report
    # warning below checks), but a short one: the scripted fake and minisam-auto never read it.
    # A cap under the final fit's floor of 20 epochs once failed the job (a KeyError). No crowded
    # copies: 24 more encoder passes for a locator nothing here measures.
    # Cross-fitted (2 folds), so test_miner can mine out of fold; mine() below mines in fold
    # unless asked.
    job = hc.start_training(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds_path)), seed=1,
                                                  locator_max_epochs=5, cross_fit_folds=2, locator_crowded_copies=0))
    list(hc.jobs.watch(job.name))
    r = head_pb2.TrainingResult()
    done = hc.jobs.get(job.name)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    done.result.Unpack(r)
    ch = connect(addr)
    yield {"addr": addr, "stub": miner_pb2_grpc.MinerServiceStub(ch), "jobs": JobsClient(addr, channel=ch), "dataset": ds_path, "ds": ds,
           "head": r.head.head_id, "servicer": mrunner.servicer, "head_client": hc, "tmp": tmp}
    hc.close()
    ch.close()
    stop_head_and_miner(hrunner, hserver, mrunner, mserver)


def mine(env, **spec_kw):
    """Mine the env's dataset with its head. In fold unless asked (out_of_fold=True): these
    modules test mining's own mechanics (set cover, gates, the guard's vetoes of the scripted
    clutter) on the images the head was fitted on, as they were written; the cross-fitted path
    has its own tests (test_miner: test_out_of_fold_mining_*)."""
    spec_kw.setdefault("out_of_fold", False)
    spec = miner_pb2.MiningSpec(dataset=str(env["dataset"]), head=env["head"], seed=1, **spec_kw)
    job = env["stub"].StartMining(miner_pb2.StartMiningRequest(spec=spec))
    events = list(env["jobs"].watch(job.name))
    done = env["jobs"].get(job.name)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    res = miner_pb2.MiningResult()
    done.result.Unpack(res)
    return res, events, done


