"""Classifier heads on frozen embeddings, in the scikit-learn style: `fit`, `predict_proba`.

Both heads see the same input transform: L2-normalise the embedding, then standardise with
the training mean / std. Both expose their computation as plain arrays (`layers()`), which
is what the ONNX export builds the graph from, so the exported graph is the trained function.

Arrays: X is N x D float32 embeddings; y is N class indices; soft targets are N x C rows that
sum to 1.

Soft targets:
- label smoothing eps: the target row is (1 - eps) on the label and eps / (C - 1) elsewhere;
- teacher targets: softmax(teacher logits / T), from a logreg teacher (temperature T);
- margin loss (MLP): hinge on (logit[target] - best other logit) < margin.
Logreg trains on soft rows *exactly*: multinomial log-loss with soft targets equals the
weighted log-loss over each sample repeated once per class with weight = its target mass,
which scikit-learn's LogisticRegression fits with sample_weight.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from minehead.seeding import seeded_torch


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def smooth_targets(y: np.ndarray, n_classes: int, eps: float) -> np.ndarray:
    t = np.full((len(y), n_classes), eps / max(n_classes - 1, 1))
    t[np.arange(len(y)), y] = 1.0 - eps
    return t


def teacher_targets(teacher_logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.asarray(teacher_logits, np.float64) / temperature, axis=1)


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class weight n / (k * count): rare classes count as much as common ones."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


class _Standardised:
    """L2-normalise then standardise with statistics from the training set."""

    mean_: np.ndarray
    std_: np.ndarray

    def _fit_transform(self, X: np.ndarray) -> np.ndarray:
        Z = l2_normalise(X)
        self.mean_ = Z.mean(0)
        self.std_ = Z.std(0) + 1e-6
        return (Z - self.mean_) / self.std_

    def _transform(self, X: np.ndarray) -> np.ndarray:
        return (l2_normalise(X) - self.mean_) / self.std_

    temperature_: float = 1.0

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """N x C probabilities (calibration temperature applied)."""
        return softmax(self.logits(X) / self.temperature_, axis=1)

    def logits(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class LogRegHead(_Standardised):
    head_type = "logreg"

    def __init__(self, C: float = 1.0, class_balance: bool = True, max_iter: int = 3000, seed: int = 0) -> None:
        self.C = C
        self.class_balance = class_balance
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int, targets: np.ndarray | None = None) -> "LogRegHead":
        from sklearn.linear_model import LogisticRegression

        Z = self._fit_transform(X)
        y = np.asarray(y, np.int64)
        cw = balanced_weights(y, n_classes) if self.class_balance else np.ones(n_classes)
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        if targets is None:
            clf.fit(Z, y, sample_weight=cw[y])
        else:
            # Each sample once per class, weighted by its target mass (see the module docstring).
            w = (np.asarray(targets) * cw[y][:, None]).ravel()
            Zr = np.repeat(Z, n_classes, axis=0)
            yr = np.tile(np.arange(n_classes), len(Z))
            keep = w > 1e-9
            clf.fit(Zr[keep], yr[keep], sample_weight=w[keep])
        # Classes absent from training get a large negative bias: they are never predicted.
        self.coef_ = np.zeros((n_classes, Z.shape[1]))
        self.intercept_ = np.full(n_classes, -30.0)
        cls = clf.classes_.astype(int)
        if len(cls) == 2 and clf.coef_.shape[0] == 1:  # sklearn's binary form: one row for class 1
            self.coef_[cls[1]], self.intercept_[cls[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
            self.coef_[cls[0]], self.intercept_[cls[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
        else:
            self.coef_[cls] = clf.coef_
            self.intercept_[cls] = clf.intercept_
        self.n_classes_ = n_classes
        return self

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self._transform(X) @ self.coef_.T + self.intercept_

    def layers(self) -> list[tuple[np.ndarray, np.ndarray, str]]:
        """[(W out x in, b, activation)] after standardisation; the last layer gives logits."""
        return [(self.coef_, self.intercept_, "none")]

    def params(self) -> dict:
        return {"C": self.C, "class_balance": self.class_balance, "max_iter": self.max_iter}


def _seeded_dropout(p: float, generator):
    """Dropout whose masks come from the fit's own generator: torch.nn.Dropout draws from the
    process-wide one, which trainings running side by side in threads share, so a seed would
    not decide the weights."""
    import torch

    class SeededDropout(torch.nn.Module):
        def forward(self, x):
            if not self.training or p <= 0:
                return x
            keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
            return x * keep / (1.0 - p)

    return SeededDropout()


class MLPHead(_Standardised):
    head_type = "mlp"

    def __init__(self, hidden_sizes=(256,), dropout: float = 0.1, weight_decay: float = 1e-4, lr: float = 1e-3,
                 max_epochs: int = 200, patience: int = 15, batch_size: int = 256, margin_loss: float = 0.0,
                 class_balance: bool = True, seed: int = 0) -> None:
        if not 1 <= len(hidden_sizes) <= 2:
            raise ValueError("the MLP head has 1 or 2 hidden layers")
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.margin_loss = margin_loss
        self.class_balance = class_balance
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int, targets: np.ndarray | None = None,
            X_val: np.ndarray | None = None, y_val: np.ndarray | None = None, on_epoch=None,
            X_monitor: np.ndarray | None = None, y_monitor: np.ndarray | None = None) -> "MLPHead":
        """Early stopping on the validation loss (X_val, y_val: a group-split slice of the
        training images; never the held-out split). X_monitor / y_monitor (the held-out split)
        are only measured for progress reports and never steer training.
        `on_epoch(epoch, train_loss, val_loss, monitor_loss)` may raise to stop (cancellation)."""
        import torch

        g = torch.Generator().manual_seed(self.seed)
        Z = torch.tensor(self._fit_transform(X), dtype=torch.float32)
        y = np.asarray(y, np.int64)
        T = torch.tensor(targets if targets is not None else np.eye(n_classes)[y], dtype=torch.float32)
        yt = torch.tensor(y)
        cw = torch.tensor(balanced_weights(y, n_classes) if self.class_balance else np.ones(n_classes), dtype=torch.float32)
        dims = [Z.shape[1], *self.hidden_sizes]
        mods = []
        with seeded_torch(self.seed):  # jobs run in threads: the initial weights must be this seed's
            for a, b in zip(dims[:-1], dims[1:]):
                mods += [torch.nn.Linear(a, b), torch.nn.ReLU(), _seeded_dropout(self.dropout, g)]
            mods.append(torch.nn.Linear(dims[-1], n_classes))
        net = torch.nn.Sequential(*mods)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        Zv = torch.tensor(self._transform(X_val), dtype=torch.float32) if X_val is not None and len(X_val) else None
        yv = torch.tensor(np.asarray(y_val, np.int64)) if Zv is not None else None
        Zm = torch.tensor(self._transform(X_monitor), dtype=torch.float32) if X_monitor is not None and len(X_monitor) else None
        ym = torch.tensor(np.asarray(y_monitor, np.int64)) if Zm is not None else None

        def loss_fn(logits, tgt, labels):
            per = -(tgt * torch.log_softmax(logits, 1)).sum(1)
            if self.margin_loss > 0:
                zt = logits.gather(1, labels[:, None])[:, 0]
                other = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
                per = per + torch.relu(self.margin_loss - (zt - other))
            w = cw[labels]
            return (per * w).sum() / w.sum()

        best, best_state, stale = float("inf"), None, 0
        self.history_ = []
        for epoch in range(self.max_epochs):
            net.train()
            perm = torch.randperm(len(Z), generator=g)
            total = 0.0
            for i in range(0, len(Z), self.batch_size):
                idx = perm[i:i + self.batch_size]
                opt.zero_grad()
                loss = loss_fn(net(Z[idx]), T[idx], yt[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            train_loss = total / len(Z)
            net.eval()
            with torch.no_grad():
                val_loss = float(torch.nn.functional.cross_entropy(net(Zv), yv)) if Zv is not None else train_loss
                mon_loss = float(torch.nn.functional.cross_entropy(net(Zm), ym)) if Zm is not None else float("nan")
            self.history_.append((epoch, train_loss, val_loss, mon_loss))
            if on_epoch:
                on_epoch(epoch, train_loss, val_loss, mon_loss)
            if val_loss < best - 1e-4:
                best, stale = val_loss, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        self.net_ = net
        self.n_classes_ = n_classes
        self.epochs_run_ = len(self.history_)
        return self

    def logits(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.net_(torch.tensor(self._transform(X), dtype=torch.float32)).double().numpy()

    def layers(self) -> list[tuple[np.ndarray, np.ndarray, str]]:
        import torch

        lin = [m for m in self.net_ if isinstance(m, torch.nn.Linear)]
        return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy(), "relu" if i < len(lin) - 1 else "none")
                for i, m in enumerate(lin)]

    def params(self) -> dict:
        return {"hidden_sizes": list(self.hidden_sizes), "dropout": self.dropout, "weight_decay": self.weight_decay,
                "lr": self.lr, "max_epochs": self.max_epochs, "patience": self.patience, "batch_size": self.batch_size,
                "epochs_run": getattr(self, "epochs_run_", 0), "class_balance": self.class_balance}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising held-out log-loss of softmax(logits / T); 1.0 with no data."""
    if len(y) == 0:
        return 1.0
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y, np.int64)

    def nll(log_t):
        return -log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean()

    r = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(r.x))
