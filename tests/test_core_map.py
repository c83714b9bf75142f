"""path_length_report / save_report_json / plot_core_map: the core-network map of a patched model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILY_CASES
from matplotlib.image import imread

import hf_linearize as hl
from hf_linearize.core_map import (
    _short_labels,
    average_path_length,
    path_length_report,
    plot_core_map,
    save_report_json,
)


def patched(case: str):
    torch.manual_seed(0)
    model, inputs = FAMILY_CASES[case]()
    return hl.patch_model(model.eval(), example_inputs=inputs if case.startswith("torchvision") else None)


def test_report_contents():
    model = patched("marian")
    fresh, fresh_with_cost = path_length_report(model), path_length_report(model, ungated_cost=0.25)
    assert fresh["normalized_apl"] == pytest.approx(1.75)  # 2 encoder layers / 2 + (2 decoder layers + 1) / 4
    assert fresh["ungated_contribution"] == {"normalized": 0.0, "unnormalized": 0.0}
    hl.set_linear(model, {"model.encoder.layers.0.activation_fn": 0.5, "model.decoder.layers.1.activation_fn": 1.0})
    report = path_length_report(model, ungated_cost=0.25)
    assert report["family"] == "seq2seq_fc" and report["ungated_cost"] == 0.25
    assert report["depth"] == {"normalized": fresh_with_cost["normalized_apl"],
                               "unnormalized": fresh_with_cost["unnormalized_apl"]}
    assert report["normalized_apl"] == pytest.approx(average_path_length(model, True, 0.25), rel=1e-12)
    assert report["unnormalized_apl"] == pytest.approx(average_path_length(model, False, 0.25), rel=1e-12)
    layers = report["layers"]
    assert list(layers) == [n for n, _ in hl.gated_modules(model)]
    assert layers["model.encoder.layers.0.activation_fn"] == {
        "stack": "encoder", "units": 24, "nonlinear": 12, "nonlinear_fraction": 0.5,
        "contribution_normalized": pytest.approx(0.25), "contribution_unnormalized": pytest.approx(0.5 * 24 / 25)}
    last = layers["model.decoder.layers.1.activation_fn"]
    assert last["stack"] == "decoder" and last["nonlinear"] == 0 and last["contribution_normalized"] == 0.0
    for form in ("normalized", "unnormalized"):
        parts = [v[f"contribution_{form}"] for v in layers.values()] + [report["ungated_contribution"][form]]
        assert math.fsum(parts) == pytest.approx(report[f"{form}_apl"], rel=1e-12)
    assert report["ungated_contribution"]["normalized"] == pytest.approx(0.25 * 10)  # see test_graphs: 10 costs


def test_report_json_round_trip(tmp_path):
    model = patched("timm_resnet")
    hl.set_linear(model, 0.3)
    report = path_length_report(model)
    path = save_report_json(report, tmp_path / "core_map.json")
    assert json.loads(path.read_text()) == report
    assert {v["stack"] for v in report["layers"].values()} == {"blocks"}


@pytest.mark.parametrize("case", ["marian", "timm_efficientnet"])
def test_plot_core_map_writes_png(tmp_path, case):
    model = patched(case)
    hl.set_linear(model, {n: i / 20 % 1 for i, (n, _) in enumerate(hl.gated_modules(model))})
    path = plot_core_map(path_length_report(model), tmp_path / f"{case}.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    height, width, _ = imread(path).shape
    assert width > 300 and height > 200
    if case == "marian":  # encoder and decoder side by side: wider than tall
        assert width > height


def test_short_labels():
    names = [f"model.encoder.layers.{i}.activation_fn" for i in range(3)]
    assert _short_labels(names) == (["0", "1", "2"], "model.encoder.layers.*.activation_fn")
    assert _short_labels(["act1", "layer1.0.act1"]) == (["act1", "layer1.0.act1"], "")
    assert _short_labels(["a.x", "a.y"]) == (["x", "y"], "a.*")
    assert _short_labels(["only.one"]) == (["only.one"], "")
