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
    """Every layer's contribution against values derived by hand from the graph in the README.

    Marian fixture: 2+2 layers, d_model 16 (attention: 16 value channels), encoder FFN 24, decoder FFN 20.
    Normalized: each residual branch is taken with probability 1/2, and the source path joins the decoder at
    layer 0 or 1 with probability 1/2 each, so a decoder FFN of layer l is reached with probability (l+1)/2.
    Unnormalized: a branch of width w next to a width-1 skip is taken with probability w/(w+1); the source path
    joins at layer 0 in N0/(N0+N1) of all paths, N0 = 16·21·(17·17·21) (cross-attn of layer 0, FFN 0, then
    layer 1's self-attn, cross-attn and FFN) and N1 = 16·21.
    """
    model = patched("marian")
    fresh, fresh_with_cost = path_length_report(model), path_length_report(model, ungated_cost=0.25)
    assert fresh["normalized_apl"] == pytest.approx(1.75)  # 2 encoder layers / 2 + (2 decoder layers + 1) / 4
    assert fresh["ungated_contribution"] == {"normalized": 0.0, "unnormalized": 0.0}
    joins_first = 17 * 17 * 21 / (17 * 17 * 21 + 1)
    hand = {  # layer: (nonlinear fraction after set_linear, normalized reach, unnormalized reach)
        "model.encoder.layers.0.activation_fn": (0.5, 1 / 2, 24 / 25),
        "model.encoder.layers.1.activation_fn": (1.0, 1 / 2, 24 / 25),
        "model.decoder.layers.0.activation_fn": (1.0, 1 / 4, joins_first * 20 / 21),
        "model.decoder.layers.1.activation_fn": (0.0, 1 / 2, 20 / 21),
    }
    for name, layer in fresh["layers"].items():
        _, normalized, unnormalized = hand[name]
        assert layer["contribution_normalized"] == pytest.approx(normalized, rel=1e-12), name
        assert layer["contribution_unnormalized"] == pytest.approx(unnormalized, rel=1e-12), name
    assert fresh["unnormalized_apl"] == pytest.approx(math.fsum(u for _, _, u in hand.values()), rel=1e-12)

    hl.set_linear(model, {"model.encoder.layers.0.activation_fn": 0.5, "model.decoder.layers.1.activation_fn": 1.0})
    report = path_length_report(model, ungated_cost=0.25)
    assert report["family"] == "seq2seq_fc" and report["ungated_cost"] == 0.25
    assert report["depth"] == {"normalized": fresh_with_cost["normalized_apl"],
                               "unnormalized": fresh_with_cost["unnormalized_apl"]}
    assert report["normalized_apl"] == pytest.approx(average_path_length(model, True, 0.25), rel=1e-12)
    assert report["unnormalized_apl"] == pytest.approx(average_path_length(model, False, 0.25), rel=1e-12)
    layers = report["layers"]
    assert list(layers) == [n for n, _ in hl.gated_modules(model)] == list(hand)
    assert layers["model.encoder.layers.0.activation_fn"] == {
        "stack": "encoder", "units": 24, "nonlinear": 12, "nonlinear_fraction": 0.5, "calls": 1,
        "contribution_normalized": pytest.approx(0.25), "contribution_unnormalized": pytest.approx(0.5 * 24 / 25)}
    for name, (fraction, normalized, unnormalized) in hand.items():
        assert layers[name]["nonlinear_fraction"] == fraction, name
        assert layers[name]["contribution_normalized"] == pytest.approx(fraction * normalized, rel=1e-12), name
        assert layers[name]["contribution_unnormalized"] == pytest.approx(fraction * unnormalized, rel=1e-12), name
    assert layers["model.decoder.layers.1.activation_fn"]["stack"] == "decoder"
    assert report["ungated_contribution"]["normalized"] == pytest.approx(0.25 * 10)  # see test_graphs: 10 costs
    assert report["normalized_apl"] == pytest.approx(0.25 + 0.5 + 0.25 + 0.0 + 0.25 * 10, rel=1e-12)


def test_eva_and_llama_reports():
    """EVA-02 (timm_transformer; GluMlp of 512 GLU units): each block's FFN residual is taken with probability 1/2
    (normalized) or 512/513 (unnormalized). LLaMA (generic family): the same, from its traced graph."""
    from conftest import GLU_FFN_CASES

    torch.manual_seed(0)
    eva = hl.patch_model(GLU_FFN_CASES["timm_eva"]()[0].eval())
    hl.set_linear(eva, {"blocks.1.mlp.act": 0.25})
    report = path_length_report(eva)
    assert report["family"] == "timm_transformer" and report["depth"]["normalized"] == pytest.approx(1.0)
    assert report["depth"]["unnormalized"] == pytest.approx(2 * 512 / 513, rel=1e-12)
    assert {n: (v["stack"], v["nonlinear"]) for n, v in report["layers"].items()} == {
        "blocks.0.mlp.act": ("blocks", 512), "blocks.1.mlp.act": ("blocks", 384)}
    assert report["layers"]["blocks.1.mlp.act"]["contribution_normalized"] == pytest.approx(0.75 / 2, rel=1e-12)
    assert report["unnormalized_apl"] == pytest.approx(1.75 * 512 / 513, rel=1e-12)
    llama = hl.patch_model(GLU_FFN_CASES["llama"]()[0].eval())
    report = path_length_report(llama)
    gates = dict(hl.gated_modules(llama))
    assert report["family"] == "generic" and report["depth"]["normalized"] == pytest.approx(len(gates) / 2)
    assert report["depth"]["unnormalized"] == pytest.approx(sum(g.channels / (g.channels + 1) for g in gates.values()))


def test_report_json_round_trip(tmp_path):
    model = patched("timm_resnet")
    hl.set_linear(model, 0.3)
    report = path_length_report(model)
    path = save_report_json(report, tmp_path / "reports" / "core_map.json")
    assert json.loads(path.read_text()) == report
    assert {v["stack"] for v in report["layers"].values()} == {"blocks"}


@pytest.mark.parametrize("case", ["marian", "timm_efficientnet"])
def test_plot_core_map_writes_png(tmp_path, case):
    model = patched(case)
    hl.set_linear(model, {n: i / 20 % 1 for i, (n, _) in enumerate(hl.gated_modules(model))})
    path = plot_core_map(path_length_report(model), tmp_path / "plots" / "new" / f"{case}.png")  # folders made
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
