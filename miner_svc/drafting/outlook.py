"""How sure a draft is, for summary.json: what each class's drafts are expected to be, on what
evidence, and which images look unlike the labelled ones (a reviewer opens those first).

    expected(recipe_set)                       # class -> {"precision", "recall", intervals, ...}
    unlike_labelled(boxes_per_image, head)     # [{"image", "boxes", "why", "p"}], most unlike first

Expected figures are mining's report split (held-out images of the labelled set) with 95% Wilson
intervals on the counts they rest on: 3 right boxes of 3 say "precision 1.00" and mean
"somewhere between 0.44 and 1.00". They describe images like the labelled ones; the images
flagged here are where they may not hold.

An image is flagged when its drafted box count would be very unlikely (tail probability under
FLAG_P) if it held objects as the labelled images do (a Poisson count with the labelled images'
mean per image): many more boxes (a denser image: crowded objects are where recall falls), or
none or few where the labelled images hold several (a locator that finds nothing on an unfamiliar
image drafts nothing, which no other figure shows).
"""

from __future__ import annotations

import math

from minehead.heads.bundle import HeadBundle
from minehead.miner.v1 import drafting_pb2

FLAG_P = 0.01  # a one-sided tail probability: about 1 image in 100 like the labelled ones is flagged
Z95 = 1.959964


def wilson(k: int, n: int) -> list[float] | None:
    """The 95% Wilson score interval [low, high] for k successes in n trials (None when n = 0)."""
    if n <= 0:
        return None
    p = k / n
    d = 1 + Z95 ** 2 / n
    c = (p + Z95 ** 2 / (2 * n)) / d
    h = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / d
    return [round(max(0.0, c - h), 3), round(min(1.0, c + h), 3)]


def expected(recipe_set: drafting_pb2.RecipeSet) -> dict:
    """Per class: mining's held-out precision and recall, their intervals and what they rest on."""
    out = {}
    for r in recipe_set.recipes:
        s = r.summary
        tp, fp, gt = s.true_positives, s.false_positives, s.ground_truth
        e = {"precision": round(s.precision, 3), "recall": round(s.recall, 3),
             "precision_interval": wilson(tp, tp + fp), "recall_interval": wilson(tp, gt),
             "measured_on": f"mining's report split: {s.report_images} held-out labelled images, {gt} objects, "
                            f"{tp + fp} boxes kept",
             "applies_to": "new images like the labelled ones (see unlike_labelled)"}
        if gt < 30:
            e["note"] = f"only {gt} objects: the figures are rough (see the intervals)"
        out[r.class_name] = e
    return out


def _poisson_cdf(k: int, lam: float) -> float:
    term = total = math.exp(-lam)
    for i in range(1, k + 1):
        term *= lam / i
        total += term
    return min(1.0, total)


def unlike_labelled(boxes_per_image: dict[str, int], head: HeadBundle) -> list[dict]:
    """Images whose drafted box count is far from the labelled images' (Poisson tails), most
    unlike first. Nothing without the head's dataset figures (labels, images)."""
    ds = head.meta.get("dataset", {})
    n_img, n_lab = int(ds.get("images", 0) or 0), int(ds.get("labels", 0) or 0)
    if n_img <= 0 or n_lab <= 0:
        return []
    lam = n_lab / n_img
    out = []
    for name, n in boxes_per_image.items():
        low = _poisson_cdf(n, lam)  # P(N <= n)
        high = 1.0 - _poisson_cdf(n - 1, lam) if n > 0 else 1.0  # P(N >= n)
        if high < FLAG_P:
            out.append({"image": name, "boxes": n, "p": float(f"{high:.3g}"),
                        "why": f"denser than the labelled images: {n} boxes drafted, they hold {lam:.1f} objects on "
                               "average (crowded objects are where drafts miss most)"})
        elif low < FLAG_P:
            out.append({"image": name, "boxes": n, "p": float(f"{low:.3g}"),
                        "why": f"{n} boxes drafted where the labelled images hold {lam:.1f} objects on average "
                               "(an image unlike them may have objects the drafts missed)"})
    return sorted(out, key=lambda f: f["p"])
