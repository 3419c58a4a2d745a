"""Adapting a trained locator to the images being drafted (transductive self-training).

A locator fitted on a user's first, sparse images finds too few objects on denser, more crowded
ones. Its confident drafts on those new images are mostly right, though, and they show the
objects in the new context (touching neighbours, other density). So: draft, keep the confident
drafts as pseudo-labels, refit the locator on the labelled maps plus the pseudo-labelled ones,
draft again.

    t = pseudo_targets(confident, ids, unsure, frame, n_classes)   # one new image's Targets
    nets = finetune(nets_from_onnx(onnx), maps, targets, params, epochs)   # from the shipped weights
    onnx_bytes, meta = export_adapted(nets, locator_meta, refiner, maps, info)

What a new image teaches is only what its confident drafts show: the cells in and around each
confident box (its centre a positive, the margin around it background). The rest of a new image
counts in no loss: objects the first locator missed are exactly the ones adaptation is for, and
taking them as background would teach it to miss them again. Cells of drafts that were not
confident (and are not a confident box's own centre) count in no loss either.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from minehead.core.errors import FailedPrecondition
from minehead.locator import export, refiner as loc_refiner, targets as loc_targets, train as loc_train
from minehead.locator.frame import FeatureFrame
from minehead.locator.model import PARITY_LIMIT

# Around a confident box, this share of its sides on each side is taught as background: less
# than half a side, so a touching neighbour's centre (a whole side away) stays out of it.
CONTEXT = 0.25
# Fine-tuning: this share of the shipped fit's epochs (at least MIN_EPOCHS), at this share of
# its learning rate: enough to take in the new images, little enough that peak scores stay on the
# scale the recipes' thresholds were tuned on. (A refit from scratch on the labelled and
# pseudo-labelled maps lost the shipped fit's flipped copies and ensemble draws, and its scores
# moved under the thresholds: 8 sparse -> 4 crowded scenes F1 0.53 -> 0.35.)
EPOCH_SHARE = 0.25
MIN_EPOCHS = 10
LR_SHARE = 0.3


def pseudo_targets(confident: np.ndarray, class_ids: np.ndarray, unsure: np.ndarray, frame: FeatureFrame,
                   n_classes: int, context: float = CONTEXT) -> loc_targets.Targets:
    """One new image's targets. confident: N x 4 XYXY image px, the pseudo-labels, with
    class_ids (N ints in [0, n_classes)); unsure: M x 4 XYXY image px, drafts that were not
    confident. Per class (`valid` is K x R x C): only the cells within `context` sides of that
    class's confident boxes count, less the cells of unsure boxes that carry no confident centre.
    A pseudo-label teaches its own class only: an object the drafts called crimson may be a red
    look-alike, and teaching "not red" there took a look-alike class's recall from 0.22 to 0
    (12 sparse -> 10 crowded scenes)."""
    confident = np.asarray(confident, np.float64).reshape(-1, 4)
    class_ids = np.asarray(class_ids, np.int64)
    t = loc_targets.build(confident, class_ids, frame, n_classes)
    R, C = frame.rows, frame.cols
    taught = t.size_mask if t.size_mask is not None else t.centres
    doubt = _cover(frame.to_cells(unsure), R, C, 0.0) & ~taught
    valid = np.stack([t.valid & _cover(frame.to_cells(confident[class_ids == k]), R, C, context) & ~doubt
                      for k in range(n_classes)])
    keep = valid.any(0)
    return loc_targets.Targets(t.heat, t.size, t.offset, t.centres & keep, valid,
                               (t.size_mask & keep) if t.size_mask is not None else None)


def per_class_valid(t: loc_targets.Targets, n_classes: int) -> loc_targets.Targets:
    """A labelled image's targets with `valid` per class (K x R x C), to train beside pseudo-labels."""
    if t.valid.ndim == 3:
        return t
    return dataclasses.replace(t, valid=np.repeat(t.valid[None], n_classes, 0))


def _cover(cells: np.ndarray, rows: int, cols: int, grow: float) -> np.ndarray:
    """R x C bool: the cells that boxes (N x 4 XYXY in cell units), each grown by `grow` of its
    sides on every side, touch."""
    out = np.zeros((rows, cols), bool)
    for x0, y0, x1, y1 in np.asarray(cells, np.float64).reshape(-1, 4):
        gx, gy = grow * (x1 - x0), grow * (y1 - y0)
        ra, rb = max(0, int(np.floor(y0 - gy))), min(rows, int(np.ceil(y1 + gy)))
        ca, cb = max(0, int(np.floor(x0 - gx))), min(cols, int(np.ceil(x1 + gx)))
        out[ra:rb, ca:cb] = True
    return out


def params_of(locator_meta: dict) -> loc_train.LocatorParams:
    """The hyperparameters the locator was trained with (meta.json locator.hyperparameters)."""
    known = {f.name for f in dataclasses.fields(loc_train.LocatorParams)}
    return loc_train.LocatorParams(**{k: v for k, v in locator_meta.get("hyperparameters", {}).items() if k in known})


def nets_from_onnx(onnx_bytes: bytes) -> list:
    """The torch nets (minehead.locator.train.make_net) a locator.onnx was exported from: one, or
    an ensemble's members (their initializers prefixed m0., m1., ...), weights as exported."""
    import onnx
    from onnx import numpy_helper

    torch = loc_train._torch()
    graph = onnx.load_from_string(export.parts(onnx_bytes)[0]).graph
    w = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    prefixes = sorted({n[:n.index(".") + 1] for n in w if n.startswith("m") and n.endswith(".mean")}) or [""]
    nets = []
    for p in prefixes:
        stem = w[f"{p}stem.w"]
        net = loc_train.make_net(stem.shape[1], w[f"{p}heat.w"].shape[0], stem.shape[0], w[f"{p}mean"].ravel(),
                                 1.0 / w[f"{p}inv_std"].ravel())
        sd = {"mean": torch.tensor(w[f"{p}mean"]), "inv_std": torch.tensor(w[f"{p}inv_std"])}
        for name in ("stem", "conv1", "conv2", "heat", "size", "offset"):
            sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.tensor(w[f"{p}{name}.w"]), torch.tensor(w[f"{p}{name}.b"])
        net.load_state_dict(sd)
        net.eval()
        nets.append(net)
    return nets


def refiner_from_onnx(onnx_bytes: bytes):
    """The refiner part of a locator.onnx as a minehead.locator.refiner.Refiner, or None. It reads
    the feature map, not the nets, so fine-tuned nets keep it as it is."""
    import onnx
    from onnx import numpy_helper

    ref = export.parts(onnx_bytes)[1]
    if ref is None:
        return None
    w = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(ref).graph.initializer}
    return loc_refiner.Refiner(w["refiner.w"].astype(np.float32), w["refiner.b"].astype(np.float32))


def finetune(nets: list, maps: list[np.ndarray], targets: list[loc_targets.Targets], params: loc_train.LocatorParams,
             epochs: int) -> list:
    """Each net trained on further for `epochs` epochs on maps (C x R x Cols each) with their
    targets, from its own weights and input normalisation (so its scores stay on the scale the
    recipes' thresholds were tuned on), member j with seed params.seed + j. In place; returns them."""
    torch = loc_train._torch()
    data = loc_train._tensors(maps, targets)
    n = len(maps)
    with loc_train.one_torch_thread():
        for j, net in enumerate(nets):
            rng = np.random.default_rng(params.seed + j)
            opt = torch.optim.AdamW(net.parameters(), lr=params.lr * LR_SHARE, weight_decay=params.weight_decay)
            net.train()
            for _ in range(epochs):
                order = rng.permutation(n)
                for i in range(0, n, params.batch_size):
                    idx = torch.tensor(order[i:i + params.batch_size])
                    batch = tuple(t[idx] for t in data)
                    loss = loc_train.loss_terms(net, *batch[:6], params, size_mask=batch[6])[0]
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            net.eval()
    return nets


def finetune_epochs(locator_meta: dict) -> int:
    """A share of the epochs the shipped locator was fitted for (meta.json locator.epochs)."""
    return max(MIN_EPOCHS, int(round(EPOCH_SHARE * int(locator_meta.get("epochs", 0)))))


def export_adapted(nets: list, locator_meta: dict, refiner, maps: list[np.ndarray], info: dict,
                   refiner_features: np.ndarray | None = None) -> tuple[bytes, dict]:
    """(locator.onnx bytes, meta.json "locator" section) for fine-tuned nets: the original section
    with the new graph's hash and parity, and `adapted` (what they were trained on) added. The
    refiner section stays only with a refiner (the shipped one, `refiner_from_onnx`)."""
    onnx_bytes = export.to_onnx(nets, refiner)
    err = export.parity(nets, onnx_bytes, maps[:2], refiner, refiner_features)
    if err > PARITY_LIMIT:
        raise FailedPrecondition(f"adapted locator: export differs from the fitted nets by {err:.3g} (> {PARITY_LIMIT})")
    meta = {k: v for k, v in locator_meta.items() if k != "refiner" or refiner is not None}
    meta.update(onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(), parity_max_abs_err=float(err), adapted=info)
    return onnx_bytes, meta
