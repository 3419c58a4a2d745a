"""ScoreResponse.scores in protobuf wire format, written column by column.

Building one CropScore message per crop through the protobuf API cost ~10 µs a crop, more than
the head itself. Here the fixed-width fields of every crop (five floats, the decision, the
ambiguity flag) are one numpy structured array, class-name fields come from per-class byte
strings picked by index, and the only per-crop Python is joining each crop's pieces. The bytes
are parsed once by upb into the response message (tens of µs for 256 crops).

Field numbers and types are read from the generated descriptor and checked at import, so a
change to head.proto that this encoder does not follow fails loudly instead of mis-encoding;
tests/test_score_wire.py compares the result with the message-by-message build.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.descriptor import FieldDescriptor as FD

from minehead.head.v1 import head_pb2

from head_svc.scoring import ScoreResult

_FIELDS = head_pb2.CropScore.DESCRIPTOR.fields_by_name
_FLOATS = ("top1_prob", "top2_prob", "margin", "best_background_prob", "target_prob")
_SMALL_INTS = ("decision", "ambiguous")  # varints whose values (1..4, 0/1) fit one byte
_CLASS_NAMES = ("top1_class", "top2_class", "best_background_class", "target_class")
_TEXTS = ("reason", "ambiguity")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_PREFIX = [_varint(i) for i in range(1 << 12)]


def _len(n: int) -> bytes:
    return _PREFIX[n] if n < len(_PREFIX) else _varint(n)


def _tag(name: str, wire_type: int) -> int:
    number = _FIELDS[name].number
    if number >= 16:
        raise AssertionError(f"CropScore.{name} = {number} needs a two-byte tag; score_wire assumes one")
    return (number << 3) | wire_type


def _check_schema() -> None:
    want = {**{n: FD.TYPE_FLOAT for n in _FLOATS}, "decision": FD.TYPE_ENUM, "ambiguous": FD.TYPE_BOOL,
            **{n: FD.TYPE_STRING for n in _CLASS_NAMES + _TEXTS}, "probabilities": FD.TYPE_FLOAT}
    got = {f.name: f.type for f in head_pb2.CropScore.DESCRIPTOR.fields}
    if got != want:
        raise AssertionError(f"head.proto CropScore changed ({got}); update head_svc/score_wire.py")
    if head_pb2.ScoreResponse.DESCRIPTOR.fields_by_name["scores"].number != 1:
        raise AssertionError("ScoreResponse.scores is no longer field 1; update head_svc/score_wire.py")


_check_schema()
_FIXED = np.dtype([x for n in _FLOATS for x in ((f"tag_{n}", "u1"), (n, "<f4"))]
                  + [x for n in _SMALL_INTS for x in ((f"tag_{n}", "u1"), (n, "u1"))])
_SCORES_TAG = bytes([(1 << 3) | 2])
_PROBS_TAG = bytes([_tag("probabilities", 2)])


def _class_column(name: str, classes: list[str], idx: np.ndarray) -> list[bytes]:
    tag = bytes([_tag(name, 2)])
    enc = [c.encode() for c in classes]
    table = np.array([tag + _len(len(e)) + e for e in enc] + [b""], dtype=object)  # -1: field left out
    return table[idx].tolist()


def _text_column(name: str, texts: list[str]) -> list[bytes]:
    tag = bytes([_tag(name, 2)])
    return [tag + _len(len(e)) + e if e else b"" for e in (t.encode() for t in texts)]


def _rows_as_bytes(a: np.ndarray) -> list[bytes]:
    return a.view(np.dtype((np.void, a.dtype.itemsize * (a.shape[1] if a.ndim > 1 else 1)))).reshape(-1).tolist()


def encode_scores(res: ScoreResult, include_probabilities: bool = False) -> bytes:
    """The serialised `repeated CropScore scores = 1` of a ScoreResponse for every crop of res."""
    n = len(res)
    if n == 0:
        return b""
    fixed = np.empty(n, _FIXED)
    values = {"top1_prob": res.top1_prob, "top2_prob": res.top2_prob, "margin": res.margin,
              "best_background_prob": res.best_background_prob, "target_prob": res.target_prob,
              "decision": res.decision, "ambiguous": res.ambiguous}
    for name in _FLOATS:
        fixed[f"tag_{name}"] = _tag(name, 5)
        fixed[name] = values[name]
    for name in _SMALL_INTS:
        fixed[f"tag_{name}"] = _tag(name, 0)
        fixed[name] = values[name]
    cols = [_rows_as_bytes(fixed),
            _class_column("top1_class", res.classes, res.top1),
            _class_column("top2_class", res.classes, res.top2),
            _class_column("best_background_class", res.classes, res.best_background),
            _class_column("target_class", res.classes, res.target),
            _text_column("reason", res.reasons),
            _text_column("ambiguity", res.ambiguity)]
    if include_probabilities:
        p = np.ascontiguousarray(res.probabilities, dtype="<f4")
        prefix = _PROBS_TAG + _len(p.shape[1] * 4)
        cols.append([prefix + r for r in _rows_as_bytes(p)])
    records = [b"".join(parts) for parts in zip(*cols)]
    return b"".join([b for r in records for b in (_SCORES_TAG, _len(len(r)), r)])


def score_response(res: ScoreResult, head_id: str, include_probabilities: bool = False) -> head_pb2.ScoreResponse:
    """The whole ScoreResponse: head fields through the API, scores through encode_scores
    (concatenated serialised messages merge, and repeated fields append)."""
    t = res.thresholds
    top = head_pb2.ScoreResponse(head_id=head_id, warnings=res.warnings,
                                 thresholds=head_pb2.Thresholds(min_prob=t.min_prob, margin=t.margin,
                                                                background_guard=t.background_guard,
                                                                background_margin=t.background_margin))
    return head_pb2.ScoreResponse.FromString(top.SerializeToString() + encode_scores(res, include_probabilities))
