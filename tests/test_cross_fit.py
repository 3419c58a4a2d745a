"""Cross-fitting (issue 34): fold assignment, fold heads fitted without their fold, the bundle's
fold graphs (validated, zipped, picked per image) and mining's out-of-fold scoring. Library
level: no gRPC here (test_miner mines with a cross-fitted head end to end)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from head_svc.cross_fit import CrossFit, assign_folds, fit_fold_heads, folds_for, meta_section
from head_svc.estimators import LogRegHead
from minehead.core.errors import InvalidArgument
from minehead.core.images import DecodedImage
from minehead.heads.bundle import HeadBundle, bundle_from_head, fold_names, meta_json
from miner_svc.detectors.base import Detector, DetectorInfo, ImageState
from miner_svc.recipes.scorer import HeadScorer

CLASSES = ["cat", "dog", "__bg_0"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sets(st.integers(0, 4), max_size=3), min_size=2, max_size=30), st.integers(2, 4),
       st.integers(0, 10))
def test_folds_cover_every_image_and_none_is_empty(image_classes, k, seed):
    k = min(k, len(image_classes))
    fold = assign_folds(image_classes, k, seed)
    assert fold.shape == (len(image_classes),) and fold.min() >= 0 and fold.max() < k
    assert (assign_folds(image_classes, k, seed) == fold).all()  # a seed decides
    assert np.bincount(fold, minlength=k).min() >= 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 4), min_size=2, max_size=30), st.integers(2, 4), st.integers(0, 10))
def test_each_class_is_dealt_evenly_over_the_folds(labels, k, seed):
    """One class an image (-1: none): a class in m images has min(m, k) folds, and its counts
    per fold differ by at most one, so no fold model misses a class needlessly."""
    k = min(k, len(labels))
    fold = assign_folds([{c} if c >= 0 else set() for c in labels], k, seed)
    for c in set(labels) - {-1}:
        per_fold = np.bincount([f for f, l in zip(fold, labels) if l == c], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1


def test_fold_count_rules():
    assert folds_for(10, 0) == 0 and folds_for(10, 1) == 0 and folds_for(10, 2) == 2 and folds_for(10, 4) == 4
    assert folds_for(1, 2) == 0  # one labelled image: nothing to hold out
    with pytest.raises(ValueError):
        folds_for(10, 9)


class _Ctx:
    def check_cancelled(self):
        pass

    def log(self, *_):
        pass

    def metrics(self, *_):
        raise AssertionError("a fold's fit must not report metrics")


def _data(rng, n_images=6, per_image=5, dim=8):
    X = rng.normal(size=(n_images * per_image, dim)).astype(np.float32)
    y = rng.integers(0, 3, len(X))
    X[np.arange(len(X)), y] += 3.0
    group = np.repeat(np.arange(n_images), per_image)
    group[-2:] = -1  # hard negatives: in every fold's training part
    return X, y, group


def test_a_fold_head_is_the_head_fitted_on_the_other_folds_crops():
    from head_svc.training import Prepared, Variant, fit_variant

    rng = np.random.default_rng(0)
    X, y, group = _data(rng)
    p = Prepared(X, y, group, CLASSES, train=np.ones(len(y), bool), hold=np.zeros(len(y), bool), model=None,
                 policy=None, dataset=None, fingerprint="", notes=[], seed=0, holdout_fraction=0.25,
                 object_sides=[0.1, 0.2, 0.3])
    fold = np.array([0, 1, 0, 1, 0, 1])
    shipped = LogRegHead(seed=0).fit(X, y, 3)
    shipped.temperature_ = 1.7
    heads = fit_fold_heads(p, lambda part: fit_variant(part, Variant("logreg"), _Ctx(), quiet=True)[0], fold, shipped,
                           _Ctx())
    assert len(heads) == 2
    for k, h in enumerate(heads):
        outside = (group == -1) | ((group >= 0) & (fold[np.maximum(group, 0)] != k))
        want = LogRegHead(seed=0).fit(X[outside], y[outside], 3)
        np.testing.assert_allclose(h.coef_, want.coef_, atol=1e-6)
        assert h.temperature_ == 1.7  # the shipped head's calibration
    assert not np.allclose(heads[0].coef_, heads[1].coef_)


def _cross_fitted(rng, with_ids=("a" * 16, "b" * 16, "c" * 16)):
    X, y, _ = _data(rng)
    heads = [LogRegHead(seed=s).fit(X[s::2], y[s::2], 3) for s in (0, 1)]
    shipped = LogRegHead().fit(X, y, 3)
    base = bundle_from_head(shipped, CLASSES, "m")
    files = base.files()
    from minehead.heads.onnx_export import export_head

    folds = {fold_names(k)[0]: export_head(h) for k, h in enumerate(heads)}
    meta = dict(base.meta)
    meta.pop("head_id")
    fit = CrossFit(np.array([0, 1, 0]), heads)
    meta["cross_fit"] = meta_section(fit, list(with_ids), {n: hashlib.sha256(b).hexdigest() for n, b in folds.items()})
    files["meta.json"] = meta_json(meta)
    return {**files, **folds}, heads, shipped, X


def test_a_cross_fitted_bundle_round_trips_and_picks_each_images_fold():
    files, heads, shipped, X = _cross_fitted(np.random.default_rng(1))
    b = HeadBundle.from_zip(HeadBundle.from_files(files).to_zip())
    assert b.folds == 2
    np.testing.assert_allclose(b.predict_proba(X), shipped.predict_proba(X), atol=1e-5)
    for sha, k in (("a" * 64, 0), ("b" * 64, 1), ("c" * 64, 0)):
        fold = b.fold_for(sha)
        assert fold.head_id == f"{b.head_id}.fold{k}" and fold.folds == 0
        np.testing.assert_allclose(fold.predict_proba(X), heads[k].predict_proba(X), atol=1e-5)
    assert b.fold_for("d" * 64) is b  # an image the head was not trained on: the head itself
    # the folds are part of the content: another fold graph, another head id
    other, _, _, _ = _cross_fitted(np.random.default_rng(2))
    assert HeadBundle.from_files(other).head_id != b.head_id


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.pop("head.fold1.onnx"), "missing head.fold1.onnx"),
    (lambda f: f.__setitem__("head.fold1.onnx", f["head.fold0.onnx"]), "head.fold1.onnx does not match"),
    (lambda f: f.__setitem__("meta.json", f["meta.json"].replace(b'"folds": 2', b'"folds": 9')), "cross_fit.folds"),
    (lambda f: f.__setitem__("meta.json", f["meta.json"].replace(b'"cccccccccccccccc": 0', b'"cccccccccccccccc": 5')),
     "image_fold"),
])
def test_a_damaged_cross_fit_is_invalid_argument_naming_it(damage, message):
    files, _, _, _ = _cross_fitted(np.random.default_rng(1))
    damage(files)
    with pytest.raises(InvalidArgument, match=message):
        HeadBundle.from_files(files)


def _state(sha: str) -> ImageState:
    return ImageState(DecodedImage(np.zeros((4, 4, 3), np.uint8), sha))


class _Embeds:
    def __init__(self, X):
        self.X = X

    def embed(self, data, boxes, policy, model):
        return self.X[: len(boxes)]


class _Model:
    dim = 8


def test_mining_scores_each_labelled_image_with_its_folds_head():
    files, heads, shipped, X = _cross_fitted(np.random.default_rng(1))
    b = HeadBundle.from_files(files)
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], np.float32)
    oof = HeadScorer(b, _Embeds(X), _Model(), out_of_fold=True)
    plain = HeadScorer(b, _Embeds(X), _Model())
    for sha, want in (("b" * 64, heads[1]), ("a" * 64, heads[0]), ("e" * 64, shipped)):
        np.testing.assert_allclose(oof.score(_state(sha), b"", boxes)[1], want.predict_proba(X[:2]), atol=1e-5)
        np.testing.assert_allclose(plain.score(_state(sha), b"", boxes)[1], shipped.predict_proba(X[:2]), atol=1e-5)


class _HeadDetector(Detector):
    """A head-using detector at its smallest (the fold binding is the base class's)."""

    uses_head = True
    info = DetectorInfo("toy", class_agnostic=False)

    @property
    def cache_key(self):
        return f"toy|{self.head.head_id}" + ("|out-of-fold" if self.out_of_fold else "")

    def with_head(self, head, out_of_fold=False):
        return self._bind(head, out_of_fold)


def test_an_out_of_fold_detector_view_proposes_with_the_images_fold():
    files, _, _, _ = _cross_fitted(np.random.default_rng(1))
    b = HeadBundle.from_files(files)
    det = _HeadDetector()
    plain, oof = det.with_head(b), det.with_head(b, out_of_fold=True)
    assert plain.cache_key != oof.cache_key  # their detections are cached apart
    assert plain.fold_view(_state("a" * 64)) is plain
    view = oof.fold_view(_state("b" * 64))
    assert view.head.head_id == f"{b.head_id}.fold1" and view.counters is oof.counters
    assert oof.fold_view(_state("b" * 64)) is view  # one view per fold
    assert oof.fold_view(_state("f" * 64)) is oof
