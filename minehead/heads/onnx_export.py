"""One ONNX graph from embedding to probabilities, built from a head's arrays.

    embedding [N, D] -> L2-normalise -> (x - mean) / std -> Gemm (+ReLU) … -> * (1/T) -> Softmax
                     -> probabilities [N, C]

Built node by node (no tracing), so the graph is exactly the trained function and nothing
else: no ZipMap, no label output, float32 throughout. `parity` compares it with the training
framework's own predict_proba.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT = "embedding"
OUTPUT = "probabilities"


def build_head_graph(mean: np.ndarray, std: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray, str]],
                     temperature: float, name: str = "minehead_head") -> bytes:
    d = int(len(mean))
    c = int(layers[-1][0].shape[0])
    inits = [
        numpy_helper.from_array(np.array([1e-12], np.float32), "eps"),
        numpy_helper.from_array(np.asarray(mean, np.float32).reshape(1, d), "mean"),
        numpy_helper.from_array((1.0 / np.asarray(std, np.float64)).astype(np.float32).reshape(1, d), "inv_std"),
        numpy_helper.from_array(np.array([1.0 / temperature], np.float32), "inv_temperature"),
    ]
    nodes = [
        helper.make_node("ReduceL2", [INPUT], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["norm_safe"]),
        helper.make_node("Div", [INPUT, "norm_safe"], ["unit"]),
        helper.make_node("Sub", ["unit", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["h0"]),
    ]
    x = "h0"
    for i, (W, b, act) in enumerate(layers):
        inits += [numpy_helper.from_array(np.asarray(W, np.float32), f"W{i}"),
                  numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}")]
        out = f"z{i}"
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [out], transB=1))
        if act == "relu":
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"]))
            out = f"a{i}"
        x = out
    nodes += [helper.make_node("Mul", [x, "inv_temperature"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], [OUTPUT], axis=1)]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", c])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="minehead")
    model.ir_version = 8  # readable by every onnxruntime from 1.14 on
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def export_head(head) -> bytes:
    """A fitted LogRegHead / MLPHead (with temperature_) -> ONNX bytes."""
    return build_head_graph(head.mean_, head.std_, head.layers(), head.temperature_)


def onnx_session(onnx_bytes: bytes):
    from minehead.encoders.onnx_backend import small_graph_session

    return small_graph_session(onnx_bytes)


def parity(head, onnx_bytes: bytes, X: np.ndarray) -> float:
    """max |onnx - training framework| over the probabilities of X."""
    if len(X) == 0:
        return 0.0
    got = onnx_session(onnx_bytes).run([OUTPUT], {INPUT: np.asarray(X, np.float32)})[0]
    return float(np.max(np.abs(got - head.predict_proba(X))))
