"""Held-out metrics for heads: per-class precision / recall / F1, confusion, most-confused pairs."""

from __future__ import annotations

import numpy as np


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], top_k: int = 5) -> dict:
    """y_*: N class indices into `classes`. Returns a JSON-ready dict."""
    c = len(classes)
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    tp = np.diag(cm).astype(float)
    pred_n = cm.sum(0).astype(float)
    true_n = cm.sum(1).astype(float)
    precision = np.divide(tp, pred_n, out=np.zeros(c), where=pred_n > 0)
    recall = np.divide(tp, true_n, out=np.zeros(c), where=true_n > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c), where=(precision + recall) > 0)
    per_class = {name: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                        "f1": round(float(f1[i]), 4), "support": int(true_n[i])} for i, name in enumerate(classes)}
    off = [(int(cm[i, j] + cm[j, i]), i, j) for i in range(c) for j in range(i + 1, c) if cm[i, j] + cm[j, i] > 0]
    off.sort(reverse=True)
    confusions = [{"a": classes[i], "b": classes[j], "a_as_b": int(cm[i, j]), "b_as_a": int(cm[j, i]), "total": n}
                  for n, i, j in off[:top_k]]
    n = int(cm.sum())
    supported = true_n > 0
    return {
        "accuracy": round(float(tp.sum() / n), 4) if n else 0.0,
        "macro_f1": round(float(f1[supported].mean()), 4) if supported.any() else 0.0,
        "samples": n,
        "per_class": per_class,
        "confusion_matrix": {"classes": classes, "rows_true_cols_pred": cm.tolist()},
        "most_confused": confusions,
    }
