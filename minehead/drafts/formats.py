"""Drafted boxes in the formats annotation tools import: YOLO lines, COCO, Label Studio
pre-annotations, and the review queue. Pure functions of one `miner.v1.DraftedImage`.

Coordinates: a DraftBox's box is XYXY pixels of the decoded image; its polygon is flat
x1,y1,x2,y2,… pixels; its rle (a mask, from FindSimilar's refinement) is COCO's uncompressed RLE
over the image, column-major, written to COCO as it is. YOLO wants normalised cx,cy,w,h (or normalised polygon points), COCO
wants [x, y, width, height] pixels, Label Studio wants percentages of the image size.
"""

from __future__ import annotations

import numpy as np

from minehead.miner.v1 import drafting_pb2


def _norm(v: float, size: int) -> float:
    return min(max(v / size, 0.0), 1.0)


def yolo_lines(img: drafting_pb2.DraftedImage, class_ids: dict[str, int], polygons: bool) -> list[str]:
    """One line per box: `id cx cy w h` or, with polygons and a mask, `id x1 y1 x2 y2 …`."""
    out = []
    W, H = img.width, img.height
    for b in img.boxes:
        cid = class_ids[b.class_name]
        if polygons and len(b.polygon) >= 6:
            pts = " ".join(f"{_norm(v, W if i % 2 == 0 else H):.6f}" for i, v in enumerate(b.polygon))
            out.append(f"{cid} {pts}")
            continue
        x1, y1, x2, y2 = (_norm(b.box.x1, W), _norm(b.box.y1, H), _norm(b.box.x2, W), _norm(b.box.y2, H))
        out.append(f"{cid} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
    return out


def _polygon_area(flat) -> float:
    p = np.asarray(flat, np.float64).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def coco_image(img: drafting_pb2.DraftedImage, image_id: int, file_name: str) -> dict:
    return {"id": image_id, "file_name": file_name, "width": img.width, "height": img.height}


def coco_annotations(img: drafting_pb2.DraftedImage, image_id: int, first_ann_id: int, category_ids: dict[str, int],
                     polygons: bool) -> list[dict]:
    """COCO detection results with ground-truth fields too (area, iscrowd, segmentation), so
    the file loads as a dataset in COCO tools and as results in COCOeval (`score`). The
    segmentation is the polygon (with polygons), else the box's mask as uncompressed RLE
    ({"size": [h, w], "counts": [...]}, area = its pixels) when it has one, else the box."""
    anns = []
    for k, b in enumerate(img.boxes):
        w, h = b.box.x2 - b.box.x1, b.box.y2 - b.box.y1
        a = {"id": first_ann_id + k, "image_id": image_id, "category_id": category_ids[b.class_name],
             "bbox": [round(b.box.x1, 2), round(b.box.y1, 2), round(w, 2), round(h, 2)], "score": round(b.score, 5),
             "head_prob": round(b.head_prob, 5), "iscrowd": 0, "area": round(w * h, 2)}
        if polygons and len(b.polygon) >= 6:
            a["segmentation"] = [[round(v, 2) for v in b.polygon]]
            a["area"] = round(_polygon_area(b.polygon), 2)
        elif b.rle:
            counts = [int(c) for c in b.rle.split()]
            a["segmentation"] = {"size": [img.height, img.width], "counts": counts}
            a["area"] = float(sum(counts[1::2]))
        else:
            a["segmentation"] = [[round(v, 2) for v in (b.box.x1, b.box.y1, b.box.x2, b.box.y1, b.box.x2, b.box.y2,
                                                         b.box.x1, b.box.y2)]]
        anns.append(a)
    return anns


def review_score(img: drafting_pb2.DraftedImage) -> float:
    """The prediction-level score of a drafted image: the smallest `uncertainty` of its boxes
    (the review queue's sort key, lower = review first), 1.0 for an image without boxes.
    Label Studio sorts tasks by this number (the data manager's prediction score column, and
    "uncertainty sampling" serves the lowest first), so its order is review.jsonl's order."""
    return round(float(min(b.uncertainty for b in img.boxes)), 5) if len(img.boxes) else 1.0


def labelstudio_prediction(img: drafting_pb2.DraftedImage, model_version: str, polygons: bool,
                           from_name: str = "label", to_name: str = "image") -> dict:
    """One Label Studio prediction: rectanglelabels (or polygonlabels) in percent of the original
    image size, each result scored with its head probability; the prediction scored with
    review_score (see there: an ordering number, not a confidence)."""
    W, H = img.width, img.height
    results = []
    for k, b in enumerate(img.boxes):
        base = {"id": f"r{img.index}_{k}", "from_name": from_name, "to_name": to_name, "original_width": W,
                "original_height": H, "image_rotation": 0, "score": round(float(b.head_prob), 5)}
        if polygons and len(b.polygon) >= 6:
            pts = [[round(100 * b.polygon[i] / W, 4), round(100 * b.polygon[i + 1] / H, 4)] for i in range(0, len(b.polygon) - 1, 2)]
            results.append({**base, "type": "polygonlabels", "value": {"points": pts, "polygonlabels": [b.class_name]}})
        else:
            results.append({**base, "type": "rectanglelabels", "value": {
                "x": round(100 * b.box.x1 / W, 4), "y": round(100 * b.box.y1 / H, 4),
                "width": round(100 * (b.box.x2 - b.box.x1) / W, 4), "height": round(100 * (b.box.y2 - b.box.y1) / H, 4),
                "rotation": 0, "rectanglelabels": [b.class_name]}})
    return {"model_version": model_version, "score": review_score(img), "result": results}


def labelstudio_task(img: drafting_pb2.DraftedImage, image_url: str, model_version: str, polygons: bool) -> dict:
    """A Label Studio task with one prediction (pre-annotations to review)."""
    return {"data": {"image": image_url}, "predictions": [labelstudio_prediction(img, model_version, polygons)]}


def labelstudio_config(classes: list[str], polygons: bool) -> str:
    """The labelling config matching the tasks (from_name "label", to_name "image")."""
    tag = "PolygonLabels" if polygons else "RectangleLabels"
    labels = "\n".join(f'    <Label value="{c}"/>' for c in classes)
    return f'<View>\n  <Image name="image" value="$image"/>\n  <{tag} name="label" toName="image">\n{labels}\n  </{tag}>\n</View>\n'


def review_line(img: drafting_pb2.DraftedImage, k: int, head_classes: list[str]) -> dict:
    """One box of the review queue, with its provenance."""
    b = img.boxes[k]
    return {"image": img.image, "box_index": k, "class": b.class_name, "box_xyxy": [round(v, 2) for v in (b.box.x1, b.box.y1, b.box.x2, b.box.y2)],
            "uncertainty": round(b.uncertainty, 5), "ambiguous": b.ambiguous, "margin": round(b.margin, 5),
            "second_class": b.second_class, "runner_up": ({"class": b.runner_up_class, "head_prob": round(b.runner_up_prob, 5)}
                                                          if b.runner_up_class else None),
            "recipe_id": b.recipe_id, "step_index": b.step_index, "prompt": b.prompt, "detector_score": round(b.score, 5),
            "head_prob": round(b.head_prob, 5),
            "head_probabilities": {c: round(float(p), 5) for c, p in zip(head_classes, b.head_probabilities)},
            "reason": b.reason}
