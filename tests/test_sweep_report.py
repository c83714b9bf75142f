"""hf_linearize.sweep_report: rows from recipe results, the CSV/JSON tables and the two sweep plots."""

from __future__ import annotations

import csv
import json

import pytest

import hf_linearize as hl
from hf_linearize.sweep_report import (
    SCHEDULE_STYLE,
    curve_styles,
    metric_column,
    plot_core_maps,
    plot_quality_vs_apl,
    result_row,
    write_results,
)


def _results(marian, fraction: float, bleu: float) -> dict:
    """A recipe-shaped results.json of the tiny Marian with ``fraction`` of every layer's units linear."""
    model, _ = marian
    hl.set_linear(model, fraction)
    return {"scores": {"test": {"bleu": bleu, "chrf": 2 * bleu}}, "path_length": hl.path_length_report(model),
            "summary": dict(hl.summary(model)), "train": {"steps": 10, "epochs": 0.5, "runtime_s": 3.0}}


@pytest.fixture
def rows(marian):
    model, _ = marian
    hl.patch_model(model)
    out = [result_row(_results(marian, 0.0, 30.0), ["test.bleu", "test.chrf"], task="t", model="m", run="baseline",
                      schedule="baseline", budget_target=None, prior_lambda=0.0)]
    for schedule, fraction, bleu in (("early", 0.5, 20.0), ("late", 0.5, 28.0), ("late", 0.75, 25.0)):
        out.append(result_row(_results(marian, fraction, bleu), ["test.bleu"], task="t", model="m",
                              run=f"{schedule}{fraction}", schedule=schedule, budget_metric="nonlinear_fraction",
                              budget_target=1 - fraction, prior_lambda=0.1))
    return out


def test_result_row_reads_the_recipe_results(marian, rows):
    model, _ = marian
    base, late = rows[0], rows[-1]
    assert list(base)[:6] == ["task", "model", "run", "schedule", "budget_target", "prior_lambda"]
    assert base["test_bleu"] == 30.0 and base["test_chrf"] == 60.0 and "test_chrf" not in late
    assert base["normalized_apl"] == pytest.approx(base["depth_normalized"])
    assert base["unnormalized_apl"] == pytest.approx(base["depth_unnormalized"])
    assert base["nonlinear_fraction"] == 1.0 and base["units"] == 24 + 24 + 20 + 20
    assert late["nonlinear_units"] == sum(late["layer_nonlinear"].values()) == hl.summary(model)["total"]["nonlinear"]
    assert late["normalized_apl"] == pytest.approx(hl.average_path_length(model))
    assert late["unnormalized_apl"] == pytest.approx(hl.average_path_length(model, normalized=False))
    assert late["layer_units"] == {name: layer["units"] for name, layer in hl.summary(model)["layers"].items()}
    active = [count for count in late["layer_nonlinear"].values() if count]
    assert late["active_layers"] == len(active) and late["core_width"] == pytest.approx(sum(active) / len(active))
    assert base["active_layers"] == 4 and base["core_width"] == pytest.approx(88 / 4)
    assert late["steps"] == 10 and late["epochs"] == 0.5 and late["train_runtime_s"] == 3.0
    assert metric_column("validation.accuracy") == "validation_accuracy"


def test_result_row_errors_name_the_missing_part(marian, rows):
    results = _results(marian, 0.0, 1.0)
    with pytest.raises(KeyError, match="no score 'test.accuracy'"):
        result_row(results, ["test.accuracy"])
    results["train"] = None  # a one-shot run without training
    assert result_row(results, ["test.bleu"])["steps"] is None
    del results["train"]
    with pytest.raises(KeyError, match="no 'train' section"):
        result_row(results, ["test.bleu"])


def test_write_results_round_trips(tmp_path, rows):
    csv_path, json_path = write_results(rows, tmp_path / "out")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and table[0]["test_chrf"] == "60.0" and table[1]["test_chrf"] == ""
    assert {k: int(v) for k, v in json.loads(table[2]["layer_nonlinear"]).items()} == rows[2]["layer_nonlinear"]
    assert table[0]["budget_target"] == "" and float(table[1]["budget_target"]) == rows[1]["budget_target"]
    assert json.loads(json_path.read_text()) == rows


def test_plots_are_pngs(tmp_path, rows):
    for path in (plot_quality_vs_apl(rows, tmp_path / "a" / "q.png", "test_bleu"),
                 plot_core_maps(rows, tmp_path / "b" / "c.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_schedule_gets_its_own_curve_style():
    styles = curve_styles(["baseline", "late", "one_shot_identity", "early", "one_shot_affine", "control", "late"])
    assert list(styles) == ["early", "late", "one_shot_affine", "one_shot_identity"]
    assert styles["early"] == SCHEDULE_STYLE["early"] and len({color for color, _ in styles.values()}) == 4


def test_plots_refuse_empty_input(tmp_path, rows):
    with pytest.raises(ValueError, match="metric 'test_accuracy'"):
        plot_quality_vs_apl(rows, tmp_path / "q.png", "test_accuracy")
    with pytest.raises(ValueError, match="metric 'test_bleu'"):  # only the schedules asked for are drawn
        plot_quality_vs_apl(rows[1:], tmp_path / "q.png", "test_bleu", schedules=["one_shot_affine"])
    with pytest.raises(ValueError, match="No run with schedule"):
        plot_core_maps(rows[:1], tmp_path / "c.png")
