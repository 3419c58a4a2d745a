"""The locator network and its fit (torch, CPU is enough: a few thousand parameters on a
frozen map).

    input  fmap [N, C, R, Cols] float32, the encoder's feature map (cells)
    -> (x - mean) / std per channel (from the training maps, part of the graph)
    -> 1x1 conv (C -> H) -> ReLU -> 3x3 conv -> ReLU -> 3x3 conv, dilation 2 -> ReLU
    -> heat   [N, K, R, Cols]  sigmoid: P(an object of class k is centred in this cell)
       size   [N, 2, R, Cols]  log(width), log(height) in cells
       offset [N, 2, R, Cols]  sigmoid: the centre's position inside its cell (x, y)

Loss (CenterNet): focal loss on the heatmap (alpha 2, beta 4: negatives near a centre weigh
little), L1 on size and offset at the centre cells; padding cells count nowhere.

Optimiser: AdamW on batches of 2 maps, the learning rate warmed up over the first epoch, then
decayed to zero along a cosine over the schedule's epochs (as many as make `steps` optimizer
steps). On the review round's 56 scenes 25-30 epochs of it reached a held-out loss within 5 % of
what a constant rate on batches of 8 reached at its best epoch, 81 of 121 run (0.64 against 0.61),
with the same held-out F1 within a box or two: a fifth of the fitting time (docs/benchmarks.md,
"Training time").
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Callable

import numpy as np

from minehead.locator.targets import Targets
from minehead.seeding import seeded_torch

PRIOR = 0.01  # the heatmap's starting probability (CenterNet's bias init)
# How far (cells) the net looks from a cell: conv1 3x3 (1) + conv2 3x3 dilation 2 (2); the 1x1
# layers add nothing. A cell's outputs depend on the input within this many cells only.
REACH = 3


@dataclasses.dataclass
class LocatorParams:
    hidden: int = 32  # channels after the 1x1 conv
    max_epochs: int = 400  # the schedule's cap (schedule_epochs)
    patience: int = 40  # epochs without a better early-stopping loss
    lr: float = 3e-3  # the peak learning rate, reached after the first epoch
    weight_decay: float = 1e-4
    batch_size: int = 2
    steps: int = 1000  # optimizer steps the cosine schedule spans (schedule_epochs)
    size_weight: float = 1.0
    offset_weight: float = 1.0
    seed: int = 0
    augment: str = "auto"  # flipped / turned copies of few images (minehead.locator.augment.choose)
    crowded_copies: int | None = None  # crowded copies per image (minehead.locator.paste); None = auto

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _torch():
    import torch

    return torch


def make_net(in_channels: int, n_classes: int, hidden: int, mean: np.ndarray, std: np.ndarray):
    torch = _torch()
    nn = torch.nn

    class LocatorNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1))
            self.register_buffer("inv_std", torch.tensor(1.0 / np.asarray(std, np.float32)).view(1, -1, 1, 1))
            self.stem = nn.Conv2d(in_channels, hidden, 1)
            self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2)
            self.heat = nn.Conv2d(hidden, n_classes, 1)
            self.size = nn.Conv2d(hidden, 2, 1)
            self.offset = nn.Conv2d(hidden, 2, 1)
            nn.init.constant_(self.heat.bias, float(np.log(PRIOR / (1 - PRIOR))))

        def features(self, x):
            x = (x - self.mean) * self.inv_std
            x = torch.relu(self.stem(x))
            x = torch.relu(self.conv1(x))
            return torch.relu(self.conv2(x))

        def forward(self, x):
            """-> (heat logits, size, offset logits)."""
            f = self.features(x)
            return self.heat(f), self.size(f), self.offset(f)

    return LocatorNet()


def loss_terms(net, x, heat, size, offset, centres, valid, params: LocatorParams, size_mask=None):
    """(total, focal, size L1, offset L1) for a batch; tensors N x . x R x C. size_mask: the
    cells with a size target (default: the centres)."""
    torch = _torch()
    F = torch.nn.functional
    z, s, o = net(x)
    logp, log1mp = F.logsigmoid(z), F.logsigmoid(-z)
    p = torch.sigmoid(z)
    v = (valid[:, None] if valid.dim() == 3 else valid).float()  # N x R x C, or per class N x K x R x C
    pos = (heat >= 1.0).float() * v
    neg = (1 - pos) * v
    n_pos = pos.sum().clamp(min=1.0)
    focal = -((1 - p) ** 2 * logp * pos + (1 - heat) ** 4 * p ** 2 * log1mp * neg).sum() / n_pos
    c = centres[:, None].float()
    n_c = c.sum().clamp(min=1.0)
    sm = c if size_mask is None else size_mask[:, None].float()
    l_size = ((s - size).abs() * sm).sum() / sm.sum().clamp(min=1.0)
    l_off = ((torch.sigmoid(o) - offset).abs() * c).sum() / n_c
    total = focal + params.size_weight * l_size + params.offset_weight * l_off
    return total, focal, l_size, l_off


def _tensors(maps: list[np.ndarray], targets: list[Targets]):
    torch = _torch()
    return (torch.tensor(np.stack(maps), dtype=torch.float32),
            torch.tensor(np.stack([t.heat for t in targets])),
            torch.tensor(np.stack([t.size for t in targets])),
            torch.tensor(np.stack([t.offset for t in targets])),
            torch.tensor(np.stack([t.centres for t in targets])),
            torch.tensor(np.stack([t.valid for t in targets])),
            torch.tensor(np.stack([t.centres if t.size_mask is None else t.size_mask for t in targets])))


def on_image(batch: tuple) -> tuple:
    """A batch (_tensors' order) cut to the cells that count: the rows and columns up to the last
    valid cell (or centre, or size target), plus REACH cells for what the net reads around them.
    The loss sees only those cells, and their outputs read no cell past the cut, so the loss is the
    full map's (up to float rounding) at a fraction of the work: a 4:3 image fills 48 of a
    square encoder's 64 rows (the rest is padding), so 51 rows are computed instead of 64."""
    valid = batch[5] if batch[5].dim() == 3 else batch[5].any(dim=1)  # N x R x C, or per class N x K x R x C
    counts = valid | batch[4] | batch[6]  # valid cells, centres, size targets
    rows, cols = counts.shape[-2:]
    if not bool(counts.any()):
        return batch
    r = int(counts.any(dim=(0, 2)).nonzero().max()) + 1 + REACH
    c = int(counts.any(dim=(0, 1)).nonzero().max()) + 1 + REACH
    if r >= rows and c >= cols:
        return batch
    return tuple(t[..., :min(r, rows), :min(c, cols)] for t in batch)


def channel_stats(maps: list[np.ndarray], targets: list[Targets]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over the valid cells of the training maps."""
    cells = np.concatenate([m[:, t.valid] for m, t in zip(maps, targets)], axis=1)
    return cells.mean(1), np.maximum(cells.std(1), 1e-4)


MIN_SCHEDULE = 10  # epochs: a schedule is never shorter, however many maps


def schedule_epochs(n_maps: int, params: LocatorParams) -> int:
    """How many epochs the learning rate's schedule spans for n_maps training maps: enough for
    params.steps optimizer steps, at least MIN_SCHEDULE and at most params.max_epochs. Steps,
    not epochs, are what a fit needs: 4 maps and 400 ask for about the same number of them."""
    per_epoch = max(1, math.ceil(n_maps / params.batch_size))
    return max(1, min(params.max_epochs, max(MIN_SCHEDULE, math.ceil(params.steps / per_epoch))))


def lr_factor(epoch: int, batch: int, batches: int, schedule: int) -> float:
    """The share of the peak learning rate for step `batch` (0-based, of `batches`) of epoch
    `epoch` (1-based): a linear warm-up over the first epoch (AdamW's early steps on a fresh net
    are large), then a cosine from 1 down to 0 at the end of epoch `schedule`."""
    if epoch == 1:
        return (batch + 1) / batches
    done = min(1.0, ((epoch - 2) + batch / batches) / max(schedule - 1, 1))
    return 0.5 * (1.0 + math.cos(math.pi * done))


class EpochCount:
    """The epoch count an early-stopping fit settles on, told as it goes to fits that run beside
    it. The final fit on every image then runs while early stopping is still deciding how long it
    should run (on two cores the two fits take the time of one), keeps its weights from each
    epoch that could still be the answer, and ends with those of the settled epoch: the weights
    of a fit told that count in advance (the same seed, the same steps in the same order, the same
    schedule: nothing in the optimiser depends on where it stops), up to float rounding (~1e-6:
    BLAS may sum in another order beside another thread)."""

    def __init__(self, floor: int = 1):
        self._cond = threading.Condition()
        self.floor = floor
        self.least = floor  # no epoch before this can be the answer any more
        self.final: int | None = None
        self.failed = False

    def improved(self, epoch: int) -> None:
        with self._cond:
            self.least = max(self.least, epoch)

    def settle(self, best_epoch: int) -> None:
        with self._cond:
            self.final = max(best_epoch, self.floor)
            self._cond.notify_all()

    def abandon(self) -> None:
        with self._cond:
            self.failed = True
            self._cond.notify_all()

    def wait(self) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self.final is not None or self.failed)
            if self.final is None:
                raise RuntimeError("the early-stopping fit this fit followed did not finish")
            return self.final


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextlib.contextmanager
def one_torch_thread():
    """torch on one intra-op thread while any fit runs (fits may run side by side in threads,
    each on its own core; the count is per process, so the last one out restores it)."""
    global _threads_users, _threads_saved
    torch = _torch()
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            # One thread: these convolutions are small, and torch's OpenMP pool spin-waits
            # between them; beside the services' other threads on 2 cores, 2 threads took 70 s
            # for what one thread does in 1.8 s (100 epochs on one 64 x 64 map, measured).
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def fit(maps: list[np.ndarray], targets: list[Targets], n_classes: int, params: LocatorParams, *,
        val_maps: list[np.ndarray] = (), val_targets: list[Targets] = (), epochs: int | None = None,
        schedule: int | None = None, on_epoch: Callable[[int, float, float], None] | None = None,
        lead: EpochCount | None = None, follow: EpochCount | None = None):
    """Fit on maps (each C x R x Cols) with their targets.

    With validation maps: early stopping on their loss (patience), the best epoch's weights
    kept; `lead` is told each better epoch and, at the end, the best one. With `epochs`: exactly
    that many epochs (the final fit on every image, once early stopping has said how long). With
    `follow`: the epoch count another fit's early stopping settles on, while it runs (see
    EpochCount). Returns (net in eval mode, history [(epoch, train, val)], best epoch
    (1-based))."""
    with one_torch_thread():
        try:
            if schedule is None:
                schedule = epochs or schedule_epochs(len(maps), params)
            return _fit(_torch(), maps, targets, n_classes, params, val_maps, val_targets, epochs, schedule, on_epoch,
                        lead, follow)
        except BaseException:
            if lead is not None:
                lead.abandon()
            raise


def _fit(torch, maps, targets, n_classes, params, val_maps, val_targets, epochs, schedule, on_epoch, lead, follow):
    rng = np.random.default_rng(params.seed)
    mean, std = channel_stats(maps, targets)
    with seeded_torch(params.seed):  # fits run side by side: the draws must be this seed's
        net = make_net(maps[0].shape[0], n_classes, params.hidden, mean, std)
    opt = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    train = _tensors(maps, targets)
    val = on_image(_tensors(list(val_maps), list(val_targets))) if len(val_maps) else None
    n = len(maps)
    max_epochs = epochs or schedule
    batches = math.ceil(n / params.batch_size)
    best, best_epoch, best_state, history = np.inf, 0, None, []
    kept: dict[int, dict] = {}  # follow: the weights after each epoch that may be the answer
    for epoch in range(1, max_epochs + 1):
        net.train()
        order = rng.permutation(n)
        total = 0.0
        for b, i in enumerate(range(0, n, params.batch_size)):
            for group in opt.param_groups:
                group["lr"] = params.lr * lr_factor(epoch, b, batches, schedule)
            idx = torch.tensor(order[i:i + params.batch_size])
            batch = on_image(tuple(t[idx] for t in train))
            loss = loss_terms(net, *batch[:6], params, size_mask=batch[6])[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        train_loss = total / n
        val_loss = float("nan")
        if val is not None:
            net.eval()
            with torch.no_grad():
                val_loss = float(loss_terms(net, *val[:6], params, size_mask=val[6])[0])
            if val_loss < best - 1e-4:
                best, best_epoch = val_loss, epoch
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
                if lead is not None:
                    lead.improved(epoch)
        history.append((epoch, round(train_loss, 5), round(val_loss, 5) if np.isfinite(val_loss) else None))
        if on_epoch:
            on_epoch(epoch, train_loss, val_loss)
        if follow is not None:
            if follow.failed and follow.final is None:
                raise RuntimeError("the early-stopping fit this fit followed did not finish")
            if epoch >= follow.least:
                kept[epoch] = {k: v.clone() for k, v in net.state_dict().items()}
            for e in [e for e in kept if e < follow.least]:
                del kept[e]
            if follow.final is not None and epoch >= follow.final:
                break
        if val is not None and epoch - best_epoch >= params.patience:
            break
    if lead is not None:
        lead.settle(best_epoch if best_state is not None else len(history))
    if follow is not None:
        best_epoch = follow.wait()
        net.load_state_dict(kept[best_epoch])
        history = history[:best_epoch]
    elif best_state is not None:
        net.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    net.eval()
    return net, history, best_epoch


def predict(net, maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trained net's outputs as the ONNX graph gives them: (heat probabilities, size, offset).
    `net` may be a list of nets (an ensemble): their outputs averaged, as export.to_onnx does."""
    torch = _torch()
    nets = net if isinstance(net, (list, tuple)) else [net]
    outs = []
    with torch.no_grad():
        x = torch.tensor(np.stack(maps), dtype=torch.float32)
        for n in nets:
            z, s, o = n(x)
            outs.append((torch.sigmoid(z).numpy(), s.numpy(), torch.sigmoid(o).numpy()))
    if len(outs) == 1:
        return outs[0]
    return tuple(np.mean([o[j] for o in outs], axis=0).astype(np.float32) for j in range(3))
