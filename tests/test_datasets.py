"""YOLO reading: boxes, polygons, boxes with confidence, and every dropped line reported."""

from __future__ import annotations

import numpy as np
import pytest

from minehead.datasets import load_dataset, parse_label_line
from minehead.synth import CLASSES, make_synthetic_dataset
from minehead.core.errors import InvalidArgument
from tests.conftest import png_bytes, scene


def test_box_polygon_and_confidence_lines():
    cls, box = parse_label_line("1 0.5 0.5 0.2 0.4", 200, 100, 3)
    assert cls == 1 and np.allclose(box, [80, 30, 120, 70])
    cls, box = parse_label_line("2 0.5 0.5 0.2 0.4 0.93", 200, 100, 3)  # trailing confidence: still a box
    assert cls == 2 and np.allclose(box, [80, 30, 120, 70])
    cls, box = parse_label_line("0 0.1 0.2 0.3 0.2 0.2 0.6", 200, 100, 3)  # triangle: min/max of its points
    assert cls == 0 and np.allclose(box, [20, 20, 60, 60])


@pytest.mark.parametrize("line,words", [
    ("0 0.5 0.5 0.2", "4 fields"),
    ("0 0.5 0.5 0.2 0.2 0.1 0.1 0.3", "not a box"),
    ("7 0.5 0.5 0.2 0.2", "unknown class id 7"),
    ("1.5 0.5 0.5 0.2 0.2", "not an integer"),
    ("0 nan 0.5 0.2 0.2", "NaN"),
    ("0 0.5 0.5 -0.2 0.2", "zero or negative size"),
    ("0 3.0 0.5 0.2 0.2", "outside [0, 1]"),
    ("zero 0.5 0.5 0.2 0.2", "not all fields are numbers"),
])
def test_bad_lines_have_reasons(line, words):
    r = parse_label_line(line, 200, 100, 3)
    assert isinstance(r, str) and words in r


def test_dropped_lines_are_reported_with_file_and_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "labelmap.txt").write_text("cat\ndog\n")
    (tmp_path / "images" / "a.png").write_bytes(png_bytes(scene(100, 100)))
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n\n1 0.5 0.5 nan 0.1\n")
    ds = load_dataset(tmp_path)
    assert ds.label_count == 1
    assert ds.dropped == ["labels/a.txt:2: unknown class id 5 (the labelmap has 2 classes)",
                          "labels/a.txt:4: a coordinate is NaN or infinite"]


def test_data_yaml_names_and_split_layouts(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", images=8, seed=3, splits=True)
    (root / "labelmap.txt").unlink()  # names then come from data.yaml (an {id: name} mapping)
    ds = load_dataset(root)
    assert ds.classes == CLASSES and ds.has_splits
    assert {r.split for r in ds.images} == {"train", "val"}
    (root / "data.yaml").write_text("names: [a, b, c, d]\n")
    assert load_dataset(root).classes == ["a", "b", "c", "d"]


@pytest.mark.parametrize("setup,words", [
    (lambda p: None, "no class names"),
    (lambda p: (p / "labelmap.txt").write_text("a\n__bg_0\n"), "reserved for background"),
    (lambda p: (p / "labelmap.txt").write_text("a\na\n"), "duplicate class names"),
    (lambda p: (p / "data.yaml").write_text("names: {0: a, 2: b}\n"), "must run 0..1"),
])
def test_bad_datasets_are_refused(tmp_path, setup, words):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes(scene(50, 50)))
    setup(tmp_path)
    with pytest.raises(InvalidArgument, match=words):
        load_dataset(tmp_path)


def test_synthetic_dataset_has_both_label_formats_and_every_class(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", images=12, seed=1)
    lines = [ln.split() for f in sorted((root / "labels").glob("*.txt")) for ln in f.read_text().splitlines()]
    assert any(len(ln) == 5 for ln in lines) and any(len(ln) == 6 for ln in lines) and any(len(ln) > 7 for ln in lines)
    ds = load_dataset(root)
    assert not ds.dropped and all(n > 0 for n in ds.counts().values())
