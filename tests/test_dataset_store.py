"""One dataset store for training, mining and drafting (issue 13), over real gRPC: the head and
miner servers, head and FAKE ScriptedDetector of tests/test_miner.py (declared there)."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile

import grpc
import numpy as np
import pytest

from clients.cli_common import zip_folder
from minehead import dataset_store
from minehead.core.errors import InvalidArgument
from minehead.datasets import load_dataset
from minehead.miner.v1 import miner_pb2
from minehead.recipes.v2 import recipes_pb2
from tests.test_miner import env  # noqa: F401  (the session's miner_env: the shared servers)


@pytest.fixture(scope="module")
def outside(env, tmp_path_factory):  # noqa: F811
    """The test dataset copied to a folder outside the servers' allowed roots."""
    d = tmp_path_factory.mktemp("outside") / "shapes"
    shutil.copytree(env["dataset"], d)
    return d


@pytest.fixture(scope="module")
def uploaded(env, outside):  # noqa: F811
    return env["head_client"].upload_dataset(zip_folder(outside), "shapes")


def _spec(env, dataset):  # noqa: F811
    return miner_pb2.MiningSpec(dataset=dataset, head=env["head"], classes=["blue_circle"], seed=1,
                                clip_head_auto_tune=True, clip_head_background_apply=recipes_pb2.FINAL)


def _mine(env, dataset):  # noqa: F811
    from minehead.common.v1 import common_pb2

    job = env["stub"].StartMining(miner_pb2.StartMiningRequest(spec=_spec(env, dataset)))
    list(env["jobs"].watch(job.name))
    done = env["jobs"].get(job.name)
    assert done.state == common_pb2.Job.SUCCEEDED, done.error
    res = miner_pb2.MiningResult()
    done.result.Unpack(res)
    return res


def test_an_uploaded_dataset_mines_like_its_folder(env, outside, uploaded):  # noqa: F811
    with pytest.raises(grpc.RpcError) as e:
        env["stub"].StartMining(miner_pb2.StartMiningRequest(spec=_spec(env, str(outside))))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the miner may not read it ...
    assert uploaded.name.startswith("datasets/") and uploaded.image_count == len(env["ds"].images)
    a = _mine(env, uploaded.name).recipes[0]  # ... but the same data uploaded once mines
    b = _mine(env, str(env["dataset"])).recipes[0]
    sa, sb = a.summary, b.summary
    assert (sa.true_positives, sa.false_positives, sa.ground_truth, sa.report_images) == \
        (sb.true_positives, sb.false_positives, sb.ground_truth, sb.report_images)
    assert [(s.prompt, s.seed_threshold) for s in a.steps] == [(s.prompt, s.seed_threshold) for s in b.steps]
    assert a.provenance.dataset == uploaded.name and a.provenance.sample_sha256 == b.provenance.sample_sha256
    # fetched from the head service once, kept by id
    did = dataset_store.dataset_id(uploaded.name)
    assert (env["servicer"].res.dir / "datasets" / did / "labels").is_dir()
    out = env["stub"].ApplyRecipe(miner_pb2.ApplyRecipeRequest(recipe=a.recipe_id, dataset=uploaded.name,
                                                               mask_format=miner_pb2.ApplyRecipeRequest.NONE))
    assert len(out.images) == uploaded.image_count


def test_unknown_and_malformed_names(env):  # noqa: F811
    for name, code in (("datasets/0123456789abcdef", grpc.StatusCode.NOT_FOUND),
                       ("datasets/../../etc", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            env["stub"].StartMining(miner_pb2.StartMiningRequest(spec=_spec(env, name)))
        assert e.value.code() == code, (name, e.value.details())
        with pytest.raises(grpc.RpcError) as e:
            env["head_client"].export_dataset(name)
        assert e.value.code() == code


def test_get_and_export_round_trip(env, outside, uploaded):  # noqa: F811
    got = env["head_client"].get_dataset(uploaded.name)
    assert (got.name, list(got.classes), got.image_count) == (uploaded.name, list(uploaded.classes), uploaded.image_count)
    data = env["head_client"].export_dataset(uploaded.name)
    assert data == env["head_client"].export_dataset(uploaded.name)  # deterministic
    names = sorted(zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert names == sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*") if p.is_file())


def test_cli_mine_start_uploads_what_the_miner_may_not_read(env, outside):  # noqa: F811
    from tests.test_cli import run_cli

    e = dict(os.environ, MINEHEAD_MINER_ADDR=env["addr"], MINEHEAD_HEAD_ADDR=env["head_client"].address)
    r = run_cli("mine", "start", "--dataset", str(outside), "--head", env["head"], "--classes", "blue_circle",
                "--wait", "--json", env=e)
    assert r.returncode == 0, r.stderr
    assert "uploading it instead" in r.stderr and "uploaded as datasets/" in r.stderr, r.stderr
    rec = json.loads(r.stdout)["recipes"][0]
    assert rec["provenance"]["dataset"].startswith("datasets/") and rec["summary"]["ground_truth"] > 0


def test_unpack_refuses_hostile_zips_and_non_datasets(tmp_path, outside):
    def z(files):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as f:
            for k, v in files.items():
                f.writestr(k, v)
        return buf.getvalue()

    for bad in ({"../evil.txt": b"x"}, {"/abs.txt": b"x"}, {"labelmap.txt": b"a\n", "w.pkl": b"\x80\x04x"}):
        with pytest.raises(InvalidArgument):
            dataset_store.unpack(z(bad), tmp_path, "bad")
    with pytest.raises(InvalidArgument, match="no class names"):
        dataset_store.unpack(z({"notes.txt": b"hello"}), tmp_path, "notadataset")
    assert not [p for p in tmp_path.iterdir()], "nothing half-made is left visible"
    with pytest.raises(InvalidArgument):
        dataset_store.dataset_id("datasets/a/b")
    # a zip of "shapes/..." (one level down) and one of the folder's contents unpack alike
    root = dataset_store.unpack(zip_folder(outside.parent), tmp_path, "nested")
    flat = dataset_store.unpack(zip_folder(outside), tmp_path, "flat")
    a, b = load_dataset(root), load_dataset(flat)
    assert a.classes == b.classes and len(a.images) == len(b.images)
    assert np.array_equal(a.images[0].boxes, b.images[0].boxes)
