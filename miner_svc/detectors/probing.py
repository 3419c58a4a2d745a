"""Which prompts the head-guided detector spends its decoder passes on, and when it stops.

Two sources of prompts, one bookkeeping:

- *anchors*: the head's best anchor boxes (minisam_guided), prompted with a point at the centre;
- *neighbours*: once an object is found, where the next one of its kind would be if objects
  repeat (a wall of bricks, a canopy, a tray of cells): a box of its size one step left, right,
  up and down, prompted with that box (grown NEIGHBOUR_BOX_GROWTH) and its centre.

Why neighbours: on a photo the objects fill, a head trained elsewhere is unsure where an object
is aligned (its anchors land on the mortar), and SAM answers a lone point there with a column
of bricks; a box of about the right size makes it cut at the joints. Measured on skimage's
brick photo, SAM's mask hit the brick (box IoU >= 0.5) 96 % of the time from a point and a box
1.2x the brick, its centre moved by up to 40 % of the height and its size by up to 20 %; 55 %
from the point alone. Neighbour steps give such boxes without asking the head.

Why a look-alike gate: where objects do not repeat (a few shapes on a table) a step lands on the
background, and a pass there is wasted. A neighbour is prompted only when its box's embedding
(a ROI pool: microseconds) has cosine similarity >= NEIGHBOUR_MIN_SIMILARITY with the object its
chain started from (found from an anchor, so vouched for by the head): measured, bricks' steps
0.94-0.999 (10th-90th percentile), steps off shapes in crowded synthetic scenes 0.30-0.84.
Comparing with the chain's first object, not the previous one, keeps a chain from drifting into
the background one look-alike patch at a time.

Why a growing budget: 40 passes cannot find 93 bricks. The limit is `budget` passes and grows
to PASSES_PER_OBJECT per object found, at most max_passes: a scene of many objects costs more
while passes keep finding them; a scene of a few costs what it did. Measured on the brick wall
(held-out halves, both ways): 2 passes an object 0.55 recall at 162 passes, 3: 0.77 at ~310
(0.67 when capped at 240), 4: 0.78 at 330 (the queue ran dry before the limit).

Why gaps: when both queues are empty, a class with many objects found gets a lattice of its
object size over what no object claims, each box a neighbour of the nearest object found.
Brick wall: 0.78 -> 0.82 at ~360 passes with 4 passes an object and a cap of 512 (0.79 with 3).
Crowded synthetic scenes (a few objects a class) never reach GAP_MIN_FOUND: 40 -> 41.6 passes
an image, from the fourth pass an object.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

NEIGHBOUR_STEP = 1.1  # from a found object's centre to its neighbour's: one size plus a joint
NEIGHBOUR_BOX_GROWTH = 1.2  # the neighbour's box prompt: the found object's size grown this much
NEIGHBOUR_MIN_SIMILARITY = 0.9  # cosine similarity of a neighbour's box with the object it steps from
CHAIN_MIN_SIMILARITY = 0.75  # ... and with its chain's first object
PASSES_PER_OBJECT = 4.0  # the pass limit grows to this many passes per object found
DUPLICATE_SHARE = 0.5  # a mask this much inside objects found already finds nothing new
STEPS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # right, left, down, up, in object sizes
GAP_MIN_FOUND = 8  # objects of a class found before its gaps are probed (objects that repeat)
GAP_STEP = 1.0  # the gap lattice's spacing, in the class's median object size
OBJECT_MARGIN = 0.1  # a prompt centred within this share of an object's size of its box is that object's


@dataclass
class Probe:
    """One prompt to spend a pass on. box: XYXY image pixels (the anchor, or the box a
    neighbour is expected in); r: the head's real-class column it looks for; source: "anchor"
    or "neighbour"; like / root: a neighbour's embeddings (D,) of the object it steps from and
    of its chain's first object (found from an anchor)."""

    box: np.ndarray
    r: int
    source: str
    bounded: bool = False  # an anchor whose too-large answer may take a second, box-bounded pass
    like: np.ndarray | None = None
    root: np.ndarray | None = None

    @property
    def centre(self) -> np.ndarray:
        return (self.box[:2] + self.box[2:]) / 2


class Probing:
    """The prompts for one image and head, and what the passes found so far.

    size: (H, W) image pixels; budget / max_passes: decoder passes before / after growth;
    similarity(box XYXY, embeddings K x D) -> K cosine similarities of the box's embedding.
    next() -> the next Probe worth a pass, None to stop; spend() -> one more pass for it (a
    second pass) if in budget; record() what the pass answered; is_new(mask): not mostly an
    object found already.
    """

    def __init__(self, anchors: list[Probe], size: tuple[int, int], budget: int, max_passes: int,
                 similarity: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        self.H, self.W = size
        self.anchors = deque(anchors)
        self.neighbours: deque[Probe] = deque()
        self.budget, self.max_passes = budget, max(budget, max_passes)
        self.similarity = similarity
        self.passes = 0
        self.tried = {"anchor": 0, "neighbour": 0}
        self.hits = {"anchor": 0, "neighbour": 0}
        self.taken = np.zeros(size, bool)  # inside a confidently found object's mask
        self.claimed = np.zeros(size, bool)  # inside any found object's mask
        self.objects = np.zeros((0, 4))  # found objects' boxes grown OBJECT_MARGIN a side
        self.sure = np.zeros((0, 4))  # confident answers' boxes, grown the same
        self.found: list = []  # (box XYXY, real-class column, embedding) of each object found
        self.gaps_done = False  # the gap lattice is queued once

    @property
    def limit(self) -> int:
        """Passes allowed now: the budget, grown with the objects found."""
        return int(min(self.max_passes, max(self.budget, PASSES_PER_OBJECT * len(self.objects))))

    def covered(self, xy: np.ndarray, any_object: bool) -> bool:
        """Is a prompt at xy (image px) inside something answered already: a confident answer's
        mask, or its box grown OBJECT_MARGIN (an edge crop of it); with any_object, also any
        object found's box. Anchors are skipped only by confident answers: a thin diamond
        beside a square found unsurely is centred in that square's grown box."""
        x, y = xy
        if not (0 <= x < self.W and 0 <= y < self.H):
            return True  # a step off the image
        if self.taken[int(y), int(x)]:
            return True
        o = np.concatenate([self.sure, self.objects]) if any_object else self.sure
        return bool(((o[:, 0] <= x) & (x <= o[:, 2]) & (o[:, 1] <= y) & (y <= o[:, 3])).any())

    def next(self) -> Probe | None:
        while self.passes < self.limit:
            queue = self.neighbours or self.anchors or self._gaps()
            if not queue:
                return None
            p = queue.popleft()
            if p.source == "neighbour":
                if self.covered(p.centre, True):
                    continue
                sim = self.similarity(p.box, np.stack([p.like, p.root]))
                if sim[0] < NEIGHBOUR_MIN_SIMILARITY or sim[1] < CHAIN_MIN_SIMILARITY:
                    continue
            elif self.covered(p.centre, False):
                continue
            self.passes += 1
            self.tried[p.source] += 1
            return p
        return None

    def _gaps(self) -> deque:
        """Once both queues are empty (and only once): for each class with GAP_MIN_FOUND objects
        found, a lattice of boxes of its median object size over the image, one wherever its
        centre lies in no object found; each is queued as a neighbour of the nearest object of
        its class (the same prompt and look-alike gate). Why: chains of neighbours stop where
        the objects stop lining up (a wall's bricks narrowing with the perspective, a gap where
        an object was missed), leaving islands of unfound objects between found ones."""
        if self.gaps_done:
            return self.neighbours
        self.gaps_done = True
        for r in sorted({r for _, r, _ in self.found}):
            objs = [(b, v) for b, rr, v in self.found if rr == r]
            if len(objs) < GAP_MIN_FOUND:
                continue
            boxes = np.array([b for b, _ in objs])
            w, h = np.median(boxes[:, 2:] - boxes[:, :2], 0)
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            for cy in np.arange(h / 2, self.H, h * GAP_STEP):
                for cx in np.arange(w / 2, self.W, w * GAP_STEP):
                    if self.claimed[int(cy), int(cx)]:
                        continue
                    v = objs[int(np.argmin(((centres - [cx, cy]) ** 2).sum(1)))][1]
                    box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                    self.neighbours.append(Probe(box, r, "neighbour", like=v, root=v))
        return self.neighbours

    def spend(self) -> bool:
        if self.passes >= self.limit:
            return False
        self.passes += 1
        return True

    def is_new(self, mask: np.ndarray) -> bool:
        """Whether a mask (H x W bool) is not mostly (DUPLICATE_SHARE) an object found already."""
        return int((mask & self.claimed).sum()) < DUPLICATE_SHARE * int(mask.sum())

    def record(self, probe: Probe, box: np.ndarray, mask: np.ndarray, confident: bool,
               like: np.ndarray | None) -> None:
        """A pass's answer (box XYXY, mask H x W bool). confident: SAM's strict filters and a
        plausible size: later prompts inside its mask or box are skipped. like: its embedding
        (D,) when it is an object found: it counts toward the pass limit and puts its neighbours
        in the queue, their chain starting here when the prompt came from an anchor."""
        box = np.asarray(box, np.float64)
        wh = box[2:] - box[:2]
        grown = np.concatenate([box[:2] - wh * OBJECT_MARGIN, box[2:] + wh * OBJECT_MARGIN])
        if confident:
            self.taken |= mask
            self.sure = np.concatenate([self.sure, [grown]])
        if like is None:
            return
        self.hits[probe.source] += 1
        self.found.append((box, probe.r, like))
        self.objects = np.concatenate([self.objects, [grown]])
        self.claimed |= mask
        root = like if probe.root is None else probe.root
        for step in STEPS:
            box2 = box + np.tile(np.array(step) * wh * NEIGHBOUR_STEP, 2)
            self.neighbours.append(Probe(box2, probe.r, "neighbour", like=like, root=root))

    def report(self) -> dict:
        """Passes spent, prompts tried and objects found per source (for benches and logs)."""
        return {"passes": self.passes, "tried": dict(self.tried), "hits": dict(self.hits)}
