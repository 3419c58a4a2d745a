"""miner_svc.detectors.probing: which prompts the head-guided detector spends decoder passes on.
Pure bookkeeping, no models: the similarity function and the found objects are given here."""

from __future__ import annotations

import numpy as np

from miner_svc.detectors import probing
from miner_svc.detectors.probing import Probe, Probing

H, W = 200, 300


def anchors(n: int, size: float = 10.0) -> list[Probe]:
    """n anchors on a row, far apart from each other."""
    return [Probe(np.array([x, 100, x + size, 100 + size], float), 0, "anchor") for x in np.linspace(5, 280, n)]


def box_mask(box) -> np.ndarray:
    m = np.zeros((H, W), bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[y0:y1, x0:x1] = True
    return m


def alike(box, likes):  # every box looks like every object
    return np.ones(len(likes))


def test_without_finds_the_budget_is_spent_on_anchors_in_order_and_then_it_stops():
    a = anchors(30)
    p = Probing(a, (H, W), budget=8, max_passes=48, similarity=alike)
    got = [p.next() for _ in range(8)]
    assert [g is q for g, q in zip(got, a[:8])] == [True] * 8
    assert p.next() is None and p.passes == 8 and p.report()["tried"] == {"anchor": 8, "neighbour": 0}


def test_the_pass_limit_grows_with_objects_found_up_to_max_passes():
    p = Probing(anchors(200, 1.0), (H, W), budget=4, max_passes=12, similarity=lambda b, l: np.zeros(len(l)))
    assert p.limit == 4
    for k in range(12):
        probe = p.next()
        assert probe is not None, k
        box = probe.box + [0, 0, 1, 1]
        p.record(probe, box, box_mask(box), confident=False, like=np.ones(3))
    # 12 objects found: PASSES_PER_OBJECT each would be more, max_passes caps it.
    assert p.limit == 12 and p.next() is None and p.passes == 12


def test_a_found_object_puts_its_four_neighbours_first():
    p = Probing(anchors(5), (H, W), budget=20, max_passes=20, similarity=alike)
    first = p.next()
    obj = np.array([100.0, 50, 120, 90])  # 20 x 40
    p.record(first, obj, box_mask(obj), confident=True, like=np.ones(3))
    nxt = [p.next() for _ in range(4)]
    assert [n.source for n in nxt] == ["neighbour"] * 4
    centres = sorted(map(tuple, np.round([n.centre for n in nxt], 3)))
    step = probing.NEIGHBOUR_STEP
    assert centres == sorted([(110 + 20 * step, 70), (110 - 20 * step, 70), (110, 70 + 40 * step), (110, 70 - 40 * step)])
    assert all(np.allclose(n.box[2:] - n.box[:2], [20, 40]) for n in nxt)
    assert p.next().source == "anchor"


def test_a_neighbour_that_does_not_look_like_its_object_costs_no_pass():
    # Similar to the object it steps from (first row), and to its chain's first object (second row).
    sims = {"both": (0.95, 0.95), "unlike parent": (0.5, 0.95), "drifted": (0.95, 0.5)}
    for case, (to_parent, to_root) in sims.items():
        p = Probing(anchors(3), (H, W), budget=10, max_passes=10, similarity=lambda b, l: np.array([to_parent, to_root]))
        first = p.next()
        obj = np.array([100.0, 80, 120, 100])
        p.record(first, obj, box_mask(obj), confident=True, like=np.ones(3))
        n = p.next()
        if case == "both":
            assert n.source == "neighbour" and p.passes == 2
        else:
            assert n.source == "anchor" and p.passes == 2, case  # all four neighbours skipped, unpaid


def test_a_chain_compares_with_its_first_object():
    seen = []

    def sim(box, likes):
        seen.append(likes.copy())
        return np.ones(len(likes))

    p = Probing(anchors(2), (H, W), budget=10, max_passes=10, similarity=sim)
    first = p.next()
    root, second = np.array([1.0, 0, 0]), np.array([0.0, 1, 0])
    obj = np.array([100.0, 80, 120, 100])
    p.record(first, obj, box_mask(obj), confident=False, like=root)
    n = p.next()
    nb = n.box
    p.record(n, nb, box_mask(nb), confident=False, like=second)
    while p.next() is not None:
        pass
    # The first object's neighbours compare with it twice over; the second's with it, then the first.
    assert any(np.array_equal(s, np.stack([second, root])) for s in seen)
    assert all(np.array_equal(s[1], root) for s in seen)


def test_covered_prompts_are_skipped_and_unsure_objects_do_not_skip_anchors():
    a = anchors(3)
    p = Probing(list(a), (H, W), budget=10, max_passes=10, similarity=alike)
    first = p.next()
    # An unsure object around the second anchor's centre: anchors still get their pass ...
    obj = a[1].box + [-5, -5, 5, 5]
    p.record(first, obj, box_mask(obj), confident=False, like=np.ones(3))
    assert p.covered(a[1].centre, any_object=True) and not p.covered(a[1].centre, any_object=False)
    # ... a confident one skips them, and a step off the image is covered.
    p.record(first, obj, box_mask(obj), confident=True, like=np.ones(3))
    assert p.covered(a[1].centre, any_object=False)
    assert p.covered(np.array([-1.0, 5]), any_object=False) and p.covered(np.array([5.0, H]), any_object=False)


def test_a_mask_mostly_inside_found_objects_is_no_new_object():
    p = Probing(anchors(2), (H, W), budget=10, max_passes=10, similarity=alike)
    obj = np.array([100.0, 80, 140, 120])
    p.record(p.next(), obj, box_mask(obj), confident=False, like=np.ones(3))
    assert not p.is_new(box_mask([110, 90, 150, 130]))  # 30 x 30 of its 40 x 40 inside: 56 %
    assert p.is_new(box_mask([130, 90, 170, 130]))  # 10 x 30 of 40 x 40: 19 %


def test_a_second_pass_is_paid_only_within_the_limit():
    p = Probing(anchors(5), (H, W), budget=2, max_passes=2, similarity=alike)
    p.next()
    assert p.spend() and p.passes == 2 and not p.spend() and p.next() is None


def test_a_confident_answer_that_is_no_object_only_skips_prompts():
    """SAM is sure of the mask but the head does not call it the class: later prompts inside it
    are skipped (as before neighbours existed), yet it neither grows the limit nor has neighbours."""
    a = anchors(3)
    p = Probing(list(a), (H, W), budget=2, max_passes=10, similarity=alike)
    first = p.next()
    obj = a[1].box + [-5, -5, 5, 5]
    p.record(first, obj, box_mask(obj), confident=True, like=None)
    assert p.covered(a[1].centre, any_object=False) and p.limit == 2 and p.report()["hits"]["anchor"] == 0
    assert p.next() is a[2] and p.next() is None


def test_once_the_queues_are_empty_a_class_with_many_objects_probes_its_gaps():
    """A class with GAP_MIN_FOUND objects found gets, once both queues are empty, a lattice of
    its median object size over the image wherever no found object claims the centre; each
    box is gated like a neighbour of the nearest object. A class with fewer gets none."""
    n = probing.GAP_MIN_FOUND
    right_half = lambda box, likes: np.full(len(likes), 1.0 if (box[0] + box[2]) / 2 > 150 else 0.0)  # noqa: E731
    p = Probing([], (H, W), budget=1000, max_passes=1000, similarity=right_half)
    objs = [np.array([5.0 + 16 * k, 10, 21 + 16 * k, 30]) for k in range(n)]  # 16 x 20, in the left half
    for k, box in enumerate(objs):
        p.record(Probe(box, 0, "anchor"), box, box_mask(box), confident=False, like=np.eye(n)[k])
    few = np.array([10.0, 150, 30, 170])
    p.record(Probe(few, 1, "anchor"), few, box_mask(few), confident=False, like=np.ones(n))
    got = []
    while (q := p.next()) is not None:
        got.append(q)
    gaps = [q for q in got if q.r == 0 and np.allclose(q.box[2:] - q.box[:2], [16, 20])]
    assert gaps and all(q.source == "neighbour" for q in gaps) and {q.r for q in got} == {0}
    centres = np.array([q.centre for q in gaps])
    assert (centres[:, 0] > 150).all()  # the look-alike gate still applies
    step = 16 * probing.GAP_STEP
    assert np.allclose((centres[:, 0] - 8) / step, np.round((centres[:, 0] - 8) / step))  # on the lattice
    assert not any(p.claimed[int(y), int(x)] for x, y in centres)
    assert all(q.like is q.root for q in gaps) and all(q.like[-1] == 1 for q in gaps)  # the nearest object: the last one
    assert p.next() is None  # the lattice is queued once
