"""The locator as one ONNX graph, built node by node from the trained net's weights (as the
heads are: no tracing, nothing but the trained function).

    fmap [N, C, R, Cols] -> heat [N, K, R, Cols] (probabilities), size [N, 2, R, Cols]
    (log width, log height in cells), offset [N, 2, R, Cols] (sub-cell centre, 0..1)

R and Cols are free: the same graph runs on any map size of its channel count.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT = "fmap"
OUTPUTS = ("heat", "size", "offset")


def to_onnx(net) -> bytes:
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    c_in = sd["stem.weight"].shape[1]
    k = sd["heat.weight"].shape[0]
    inits = [numpy_helper.from_array(sd["mean"], "mean"), numpy_helper.from_array(sd["inv_std"], "inv_std")]
    for name in ("stem", "conv1", "conv2", "heat", "size", "offset"):
        inits += [numpy_helper.from_array(sd[f"{name}.weight"], f"{name}.w"),
                  numpy_helper.from_array(sd[f"{name}.bias"], f"{name}.b")]
    conv = helper.make_node
    nodes = [
        conv("Sub", [INPUT, "mean"], ["centred"]),
        conv("Mul", ["centred", "inv_std"], ["x0"]),
        conv("Conv", ["x0", "stem.w", "stem.b"], ["s0"]),
        conv("Relu", ["s0"], ["x1"]),
        conv("Conv", ["x1", "conv1.w", "conv1.b"], ["s1"], pads=[1, 1, 1, 1]),
        conv("Relu", ["s1"], ["x2"]),
        conv("Conv", ["x2", "conv2.w", "conv2.b"], ["s2"], pads=[2, 2, 2, 2], dilations=[2, 2]),
        conv("Relu", ["s2"], ["f"]),
        conv("Conv", ["f", "heat.w", "heat.b"], ["heat_logits"]),
        conv("Sigmoid", ["heat_logits"], ["heat"]),
        conv("Conv", ["f", "size.w", "size.b"], ["size"]),
        conv("Conv", ["f", "offset.w", "offset.b"], ["offset_logits"]),
        conv("Sigmoid", ["offset_logits"], ["offset"]),
    ]
    graph = helper.make_graph(
        nodes, "minehead_locator",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", c_in, "R", "C"])],
        [helper.make_tensor_value_info("heat", TensorProto.FLOAT, ["N", k, "R", "C"]),
         helper.make_tensor_value_info("size", TensorProto.FLOAT, ["N", 2, "R", "C"]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, ["N", 2, "R", "C"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="minehead")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def parity(net, onnx_bytes: bytes, maps: list[np.ndarray]) -> float:
    """max |onnx - torch| over the three outputs on `maps`."""
    from minehead.encoders.onnx_backend import small_graph_session as onnx_session
    from minehead.locator.train import predict

    sess = onnx_session(onnx_bytes)
    err = 0.0
    for m in maps:
        want = predict(net, [m])
        got = sess.run(list(OUTPUTS), {INPUT: m[None].astype(np.float32)})
        err = max(err, *(float(np.abs(a - b).max()) for a, b in zip(got, want)))
    return err
