"""The locator as one ONNX graph, built node by node from the trained net's weights (as the
heads are: no tracing, nothing but the trained function).

    fmap [N, C, R, Cols] -> heat [N, K, R, Cols] (probabilities), size [N, 2, R, Cols]
    (log width, log height in cells), offset [N, 2, R, Cols] (sub-cell centre, 0..1)

An ensemble (a few nets fitted with different seeds, for datasets of a few images) is one graph
too: each member's nodes under its own prefix, the three outputs averaged with Mean.

R and Cols are free: the same graph runs on any map size of its channel count.

With a refiner (minehead.locator.refiner) the graph has a second, independent part: input
box_features [M, F] -> box_deltas [M, 4], box_quality [M] (one MatMul, the fitted linear map).
It runs after the peaks are decoded, so minehead.locator.model runs each part as its own
session (`parts`); one file keeps the bundle's members and content id as they were.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT = "fmap"
OUTPUTS = ("heat", "size", "offset")
REFINER_INPUT = "box_features"
REFINER_OUTPUTS = ("box_deltas", "box_quality")


def _member(sd: dict, p: str) -> tuple[list, list]:
    """One net's initializers and nodes, every name prefixed with p; its outputs are
    {p}heat, {p}size, {p}offset."""
    inits = [numpy_helper.from_array(sd["mean"], f"{p}mean"), numpy_helper.from_array(sd["inv_std"], f"{p}inv_std")]
    for name in ("stem", "conv1", "conv2", "heat", "size", "offset"):
        inits += [numpy_helper.from_array(sd[f"{name}.weight"], f"{p}{name}.w"),
                  numpy_helper.from_array(sd[f"{name}.bias"], f"{p}{name}.b")]
    node = helper.make_node
    nodes = [
        node("Sub", [INPUT, f"{p}mean"], [f"{p}centred"]),
        node("Mul", [f"{p}centred", f"{p}inv_std"], [f"{p}x0"]),
        node("Conv", [f"{p}x0", f"{p}stem.w", f"{p}stem.b"], [f"{p}s0"]),
        node("Relu", [f"{p}s0"], [f"{p}x1"]),
        node("Conv", [f"{p}x1", f"{p}conv1.w", f"{p}conv1.b"], [f"{p}s1"], pads=[1, 1, 1, 1]),
        node("Relu", [f"{p}s1"], [f"{p}x2"]),
        node("Conv", [f"{p}x2", f"{p}conv2.w", f"{p}conv2.b"], [f"{p}s2"], pads=[2, 2, 2, 2], dilations=[2, 2]),
        node("Relu", [f"{p}s2"], [f"{p}f"]),
        node("Conv", [f"{p}f", f"{p}heat.w", f"{p}heat.b"], [f"{p}heat_logits"]),
        node("Sigmoid", [f"{p}heat_logits"], [f"{p}heat"]),
        node("Conv", [f"{p}f", f"{p}size.w", f"{p}size.b"], [f"{p}size"]),
        node("Conv", [f"{p}f", f"{p}offset.w", f"{p}offset.b"], [f"{p}offset_logits"]),
        node("Sigmoid", [f"{p}offset_logits"], [f"{p}offset"]),
    ]
    return inits, nodes


def _refiner(ref) -> tuple[list, list]:
    """The refiner's linear map: box_features @ weight + bias -> deltas (first 4), quality logit."""
    node = helper.make_node
    inits = [numpy_helper.from_array(ref.weight.astype(np.float32), "refiner.w"),
             numpy_helper.from_array(ref.bias.astype(np.float32), "refiner.b"),
             numpy_helper.from_array(np.array([0], np.int64), "refiner.i0"),
             numpy_helper.from_array(np.array([4], np.int64), "refiner.i4"),
             numpy_helper.from_array(np.array([5], np.int64), "refiner.i5"),
             numpy_helper.from_array(np.array([1], np.int64), "refiner.axis")]
    nodes = [
        node("MatMul", [REFINER_INPUT, "refiner.w"], ["refiner.xw"]),
        node("Add", ["refiner.xw", "refiner.b"], ["refiner.out"]),
        node("Slice", ["refiner.out", "refiner.i0", "refiner.i4", "refiner.axis"], ["box_deltas"]),
        node("Slice", ["refiner.out", "refiner.i4", "refiner.i5", "refiner.axis"], ["refiner.logit"]),
        node("Squeeze", ["refiner.logit", "refiner.axis"], ["refiner.logit1"]),
        node("Sigmoid", ["refiner.logit1"], ["box_quality"]),
    ]
    return inits, nodes


def to_onnx(net, refiner=None) -> bytes:
    """One net, or a list of nets (an ensemble: the graph averages their heat probabilities,
    sizes and offsets with ONNX Mean, as train.predict does); with `refiner`
    (minehead.locator.refiner.Refiner) its part too."""
    nets = list(net) if isinstance(net, (list, tuple)) else [net]
    sds = [{k: v.detach().cpu().numpy().astype(np.float32) for k, v in n.state_dict().items()} for n in nets]
    c_in = sds[0]["stem.weight"].shape[1]
    k = sds[0]["heat.weight"].shape[0]
    inits, nodes = [], []
    if len(sds) == 1:
        inits, nodes = _member(sds[0], "")
    else:
        for i, sd in enumerate(sds):
            a, b = _member(sd, f"m{i}.")
            inits += a
            nodes += b
        for out in OUTPUTS:
            nodes.append(helper.make_node("Mean", [f"m{i}.{out}" for i in range(len(sds))], [out]))
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", c_in, "R", "C"])]
    outputs = [helper.make_tensor_value_info("heat", TensorProto.FLOAT, ["N", k, "R", "C"]),
               helper.make_tensor_value_info("size", TensorProto.FLOAT, ["N", 2, "R", "C"]),
               helper.make_tensor_value_info("offset", TensorProto.FLOAT, ["N", 2, "R", "C"])]
    if refiner is not None:
        a, b = _refiner(refiner)
        inits += a
        nodes += b
        inputs.append(helper.make_tensor_value_info(REFINER_INPUT, TensorProto.FLOAT, ["M", refiner.in_features]))
        outputs += [helper.make_tensor_value_info("box_deltas", TensorProto.FLOAT, ["M", 4]),
                    helper.make_tensor_value_info("box_quality", TensorProto.FLOAT, ["M"])]
    graph = helper.make_graph(nodes, "minehead_locator", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="minehead")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def parts(onnx_bytes: bytes) -> tuple[bytes, bytes | None]:
    """(the locator part: fmap -> heat, size, offset; the refiner part or None), each a graph
    of its own (onnx.utils.Extractor: the same nodes and weights, nothing else)."""
    import onnx.utils

    model = onnx.load_from_string(onnx_bytes)
    names = {i.name for i in model.graph.input}
    if REFINER_INPUT not in names:
        return onnx_bytes, None
    ex = onnx.utils.Extractor(model)
    loc = ex.extract_model([INPUT], list(OUTPUTS))
    ref = ex.extract_model([REFINER_INPUT], list(REFINER_OUTPUTS))
    for m in (loc, ref):
        m.ir_version, m.producer_name = model.ir_version, model.producer_name
    return loc.SerializeToString(), ref.SerializeToString()


def parity(net, onnx_bytes: bytes, maps: list[np.ndarray], refiner=None, features: np.ndarray | None = None) -> float:
    """max |onnx - torch| over the three outputs on `maps` (and with a refiner, |onnx - numpy|
    over its outputs on `features`, M x F)."""
    from minehead.encoders.onnx_backend import small_graph_session as onnx_session
    from minehead.locator.train import predict

    loc_bytes, ref_bytes = parts(onnx_bytes)
    sess = onnx_session(loc_bytes)
    err = 0.0
    for m in maps:
        want = predict(net, [m])
        got = sess.run(list(OUTPUTS), {INPUT: m[None].astype(np.float32)})
        err = max(err, *(float(np.abs(a - b).max()) for a, b in zip(got, want)))
    if refiner is not None and features is not None and len(features):
        got = onnx_session(ref_bytes).run(list(REFINER_OUTPUTS), {REFINER_INPUT: np.asarray(features, np.float32)})
        err = max(err, *(float(np.abs(a - b).max()) for a, b in zip(got, refiner.outputs(features))))
    return err
