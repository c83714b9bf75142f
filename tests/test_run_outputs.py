"""The output folder of a recipe run: results.json, the plots and the summary line."""

from __future__ import annotations

import json

from conftest import FAMILY_CASES

import hf_linearize as hl
from hf_linearize.run_outputs import write_run_outputs


def test_outputs_with_and_without_training(tmp_path, capsys):
    model = hl.patch_model(FAMILY_CASES["marian"]()[0].eval())
    hl.set_linear(model, 0.5)
    results = {"path_length": hl.path_length_report(model), "summary": dict(hl.summary(model))}
    log = [{"step": 1, "loss": 2.0, "linearize/nonlinear_fraction": 1.0}, {"step": 2, "loss": 1.5,
                                                                           "linearize/nonlinear_fraction": 0.5}]
    write_run_outputs(tmp_path / "trained", results, log, "BLEU 1.00")
    assert json.loads((tmp_path / "trained" / "results.json").read_text())["summary"]["total"]["linear"] > 0
    for png in ("training_curves.png", "core_map.png"):
        assert (tmp_path / "trained" / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    line = capsys.readouterr().out
    assert "BLEU 1.00" in line and f"of {results['path_length']['depth']['normalized']:.3f}" in line
    assert "nonlinear fraction 0.500" in line
    write_run_outputs(tmp_path / "scored", results, None, "accuracy 90.00%")
    assert not (tmp_path / "scored" / "plots" / "training_curves.png").exists()
    assert (tmp_path / "scored" / "plots" / "core_map.png").is_file()
