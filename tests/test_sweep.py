"""recipes/sweep.py: the grid it plans, the commands it builds, config errors, and a tiny sweep end to end."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_script, run_subprocess
from hub_server import LocalHub, hub_env, load_dataset

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "recipes" / "sweep.py"
TINY = ROOT / "recipes" / "configs" / "sweeps" / "tiny_synthetic.yaml"
SWEEP_CONFIGS = sorted((ROOT / "recipes" / "configs" / "sweeps").glob("*.yaml"))


def _write(tmp_path: Path, **changes) -> Path:
    """The tiny sweep YAML with ``changes`` (None deletes a key), written next to a copy of its base config."""
    data = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    data["base_config"] = str(ROOT / "recipes" / "configs" / "synthetic.yaml")
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_sweep_configs_load_and_plan_both_schedules():
    sweep = load_script(SWEEP)
    full = {"tiny_synthetic", "multi30k", "mnist_resnet", "mnist_vit"}  # every schedule; the others add to one
    assert full <= {p.stem for p in SWEEP_CONFIGS}
    for config in SWEEP_CONFIGS:
        loaded = sweep.load_sweep(config)
        runs = sweep.plan(loaded)
        schedules = [run.schedule for run in runs]
        assert schedules[0] == "baseline" and ("control" in schedules) == ("late" in loaded.schedules), config.name
        if config.stem in full:
            assert {"early", "late", "one_shot"} <= set(loaded.schedules), config.name
        for schedule in ("early", "late"):
            planned = len(loaded.budgets) * len(loaded.lambdas) if schedule in loaded.schedules else 0
            assert schedules.count(schedule) == planned, config.name
        one_shot = [run for run in runs if run.schedule.startswith("one_shot_")]
        assert len(one_shot) == len(loaded.budgets) * len(loaded.one_shot) * ("one_shot" in loaded.schedules)
        for run in one_shot:  # from the baseline, to the run's budget, without the prior
            assert run.from_baseline and run.flags["one_shot_budget"] == run.budget_target, config.name
            assert run.flags["prior_lambda"] == 0.0 and run.flags["eval_before_training"] is False, config.name
        if config.stem in full - {"tiny_synthetic"}:
            assert len(loaded.budgets) >= 4, config.name
        for run in runs:
            if run.schedule == "late":
                assert any(str(run.directory.parent / "baseline" / "final") in str(value) for value in
                           run.flags.values()) or loaded.baseline_run is not None, config.name
        if loaded.baseline_run is not None:  # another sweep's runs, inside the project
            assert loaded.baseline_run.is_relative_to(ROOT / "outputs" / "sweeps"), config.name


def test_existing_control_run_is_read_not_run(tmp_path, capsys):
    sweep = load_script(SWEEP)
    existing = tmp_path / "other_sweep" / "runs"
    config = _write(tmp_path, baseline={"run": str(existing / "baseline")}, control={"run": str(existing / "control")},
                    output_dir=str(tmp_path / "out"))
    loaded = sweep.load_sweep(config)
    runs = {run.name: run for run in sweep.plan(loaded)}
    assert runs["control"].external and runs["control"].directory == existing / "control"
    assert runs["baseline"].external and runs["late_nf0.5_lam1"].flags["model_name_or_path"] == str(
        existing / "baseline" / "final")
    assert sweep.main(["--config", str(config), "--dry_run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("control", "baseline"))]
    assert len(lines) == 2 and all("existing run" in line for line in lines)
    assert all("--output_dir " + str(existing) not in line for line in lines)
    without_late = sweep.load_sweep(config, schedules=["early"])
    assert "control" not in [run.name for run in sweep.plan(without_late)]


def test_multi30k_sweep_reaches_five_percent():
    sweep = load_script(SWEEP).load_sweep(ROOT / "recipes" / "configs" / "sweeps" / "multi30k.yaml")
    assert sweep.budget_metric == "nonlinear_fraction" and min(sweep.budgets) <= 0.05


def test_dry_run_prints_grid_and_commands(tmp_path, capsys):
    sweep = load_script(SWEEP)
    out = tmp_path / "out"
    assert sweep.main(["--config", str(TINY), "--output_dir", str(out), "--dry_run", "--", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    names = ["baseline", "early_nf0.5_lam1", "early_nf0.2_lam1", "late_nf0.5_lam1", "late_nf0.2_lam1",
             "one_shot_affine_nf0.5", "one_shot_affine_nf0.2", "control"]
    lines = {line.split()[0]: line for line in printed.splitlines() if line.split() and line.split()[0] in names}
    assert set(lines) == set(names)
    assert all(line.endswith("to run") for line in lines.values())
    assert "12 steps" in lines["early_nf0.2_lam1"] and "8 steps" in lines["late_nf0.2_lam1"]
    assert "no training" in lines["one_shot_affine_nf0.2"] and "baseline + " not in lines["one_shot_affine_nf0.2"]
    assert "0 of 8 runs done, 8 to run." in printed
    commands = [line for line in printed.splitlines() if "translate_wmt.py" in line]
    assert len(commands) == 8 and all(line.rstrip().endswith("--seed 3") for line in commands)
    late = next(line for line in commands if "late_nf0.2_lam1" in line)
    assert f"--model_name_or_path {out / 'runs' / 'baseline' / 'final'}" in late
    assert "--budget_target 0.2 --budget_metric nonlinear_fraction" in late
    assert not out.exists(), "a dry run writes nothing"


def test_command_line_options_replace_the_yaml(tmp_path):
    sweep = load_script(SWEEP)
    loaded = sweep.load_sweep(TINY, output_dir=str(tmp_path), budgets=[0.3], lambdas=[0.5, 2.0],
                              schedules=["late"])
    runs = sweep.plan(loaded)
    assert [run.name for run in runs] == ["baseline", "late_nf0.3_lam0.5", "late_nf0.3_lam2", "control"]
    control = runs[-1]
    assert control.flags["prior_lambda"] == 0.0 and control.flags["max_steps"] == 8, "control = late without prior"
    command = sweep.recipe_command(loaded, runs[1], "accelerate launch --num_processes 2", ["--max_steps", "3"])
    assert command[:4] == ["accelerate", "launch", "--num_processes", "2"] and command[-2:] == ["--max_steps", "3"]
    assert sweep.planned_length(runs[1], ["--max_steps", "3"], {}) == "3 steps"
    with pytest.raises(ValueError, match=r"one-shot methods \['refit'\] are not in"):
        sweep.load_sweep(TINY, one_shot_methods=["refit"])
    one_shot = sweep.load_sweep(TINY, schedules=["one_shot"], one_shot_methods=["affine"], budgets=[0.3])
    assert [run.name for run in sweep.plan(one_shot)] == ["baseline", "one_shot_affine_nf0.3"]


@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, "Unknown keys"),
    ({"recipe": "summarize"}, "recipe must be one of"),
    ({"budgets": [0.5, 1.5]}, "must lie in"),
    ({"budgets": []}, "non-empty list"),
    ({"lambdas": [-1.0]}, "numbers >= 0"),
    ({"lambdas": [0.1, 0.1]}, "repeats a value"),
    ({"schedules": ["early", "middle"]}, "schedules must be"),
    ({"schedules": ["one_shot"], "one_shot": None}, "needs a 'one_shot' mapping"),
    ({"budget_metric": "normalized_apl", "budgets": [1.0]}, "one-shot methods linearize to a nonlinear fraction"),
    ({"one_shot": {"affine": [1]}}, "one_shot.affine must be a mapping"),
    ({"budget_metric": "depth"}, "budget_metric must be one of"),
    ({"output_dir": None}, "output_dir"),
    ({"task": None}, "'task' is required"),
    ({"base_config": "missing.yaml"}, "does not exist"),
    ({"late": {"overides": {}}}, "unknown keys"),
    ({"baseline": {"run": "somewhere", "overrides": {"max_steps": 3}}}, "keep one"),
    ({"control": {"run": "somewhere", "overrides": {"max_steps": 3}}}, "control has both"),
    ({"control": {"run": "somewhere", "extra": 1}}, "unknown keys"),
    ({"overrides": [1, 2]}, "mapping"),
])
def test_bad_configs_say_what_is_wrong(tmp_path, changes, message):
    sweep = load_script(SWEEP)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sweep.load_sweep(_write(tmp_path, **changes))


def test_base_config_with_a_budget_is_refused(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "recipes" / "configs" / "synthetic.yaml").read_text() + "budget_target: 0.3\n")
    with pytest.raises(ValueError, match="Remove budget_target"):
        load_script(SWEEP).load_sweep(_write(tmp_path, base_config=str(base)))


def _sweep(*args: str, config: Path = TINY, offline: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, str(SWEEP), *(["--config", str(config)] if config else []), *args]
    done = run_subprocess(command, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sweep"
    first = _sweep("--output_dir", str(out), "--schedules", "early")
    assert "[sweep] running baseline" in first and "[sweep] running late" not in first
    runs = out / "runs"
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/results.json")}
    assert set(stamps) == {"baseline", "early_nf0.5_lam1", "early_nf0.2_lam1"}, "control comes with late"

    second = _sweep("--output_dir", str(out))  # resumes: only the late, one-shot and control runs are missing
    ran = [line.split()[2].rstrip(":") for line in second.splitlines() if line.startswith("[sweep] running")]
    assert ran == ["late_nf0.5_lam1", "late_nf0.2_lam1", "one_shot_affine_nf0.5", "one_shot_affine_nf0.2", "control"]
    assert {name: (runs / name / "results.json").stat().st_mtime_ns for name in stamps} == stamps

    third = _sweep("--output_dir", str(out))
    assert "8 of 8 runs done, 0 to run." in third and "[sweep] running" not in third
    (out / "results.csv").unlink()
    partial = _sweep("--output_dir", str(out), "--schedules", "early", "--report_only")  # a slice's report
    assert "[sweep] running" not in partial
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 8, "it keeps every finished run"
    _sweep("--output_dir", str(out), "--report_only")

    with (out / "results.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run"] for row in rows] == ["baseline", "early_nf0.5_lam1", "early_nf0.2_lam1", "late_nf0.5_lam1",
                                            "late_nf0.2_lam1", "one_shot_affine_nf0.5", "one_shot_affine_nf0.2",
                                            "control"]
    assert json.loads((out / "results.json").read_text())[0]["run"] == "baseline"
    by_run = {row["run"]: row for row in rows}
    baseline_steps = int(by_run["baseline"]["steps"])
    for row in rows:
        layers, units = json.loads(row["layer_nonlinear"]), json.loads(row["layer_units"])
        assert len(layers) == 4 and sum(layers.values()) == int(row["nonlinear_units"])
        assert float(row["nonlinear_fraction"]) == pytest.approx(int(row["nonlinear_units"]) / sum(units.values()))
        assert float(row["depth_normalized"]) == pytest.approx(1.75) and row["test_bleu"] and row["test_chrf"]
        assert float(row["wall_s"]) > 0 and row["checkpoint"] == str(runs / row["run"] / "final")
        results = json.loads((runs / row["run"] / "results.json").read_text())
        if row["schedule"] in ("early", "late"):
            target = float(row["budget_target"])
            assert target - 1 / 1024 <= float(row["nonlinear_fraction"]) < 1.0  # the hard quota floors the count
            assert float(row["normalized_apl"]) < float(row["depth_normalized"])
        elif row["schedule"] == "one_shot_affine":  # linearized exactly to the budget, scored, not trained
            assert float(row["nonlinear_fraction"]) == pytest.approx(float(row["budget_target"]), abs=1 / 1024)
            assert row["steps"] == "" and row["start"] == "baseline"
            assert results["one_shot"]["scores"] == results["scores"]
            assert results["settings"]["model"]["model_name_or_path"] == str(runs / "baseline" / "final")
            continue
        else:
            assert float(row["nonlinear_fraction"]) == 1.0 and float(row["normalized_apl"]) == 1.75
        start = results["settings"]["model"]["model_name_or_path"]
        if row["schedule"] in ("late", "control"):
            assert start == str(runs / "baseline" / "final") and row["start"] == "baseline"
            assert int(row["steps"]) == 8
            baseline_epochs = float(by_run["baseline"]["epochs"])
            assert float(row["total_epochs"]) == pytest.approx(float(row["epochs"]) + baseline_epochs)
            assert float(row["total_wall_s"]) > float(row["wall_s"])
        else:
            assert start is None and int(row["steps"]) == baseline_steps == 12
            assert row["total_epochs"] == row["epochs"]
    for png in ("quality_vs_apl.png", "one_shot_vs_apl.png", "core_maps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with LocalHub() as hub, hub_env(hub):  # one command from the finished sweep to a Hub dataset
        pushed = _sweep("--output_dir", str(out), "--report_only", "--push_to_hub", "user/tiny-sweep", offline=False)
        assert "[sweep] pushed to dataset user/tiny-sweep" in pushed
        table = load_dataset(hub, "user/tiny-sweep", tmp_path / "datasets-cache")
    assert table["run"] == [row["run"] for row in rows]

    # A second sweep adds an arm to this one's baseline and control (fitted targets), and --compare joins them.
    data = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    data.update(base_config=str(ROOT / "recipes" / "configs" / "synthetic.yaml"), output_dir=str(out))
    first = tmp_path / "tiny.yaml"  # this sweep, with its output folder
    first.write_text(yaml.safe_dump(data), encoding="utf-8")
    data.update(label="fitted", budgets=[0.5], schedules=["late"], output_dir=str(tmp_path / "fitted"),
                baseline={"run": str(runs / "baseline")}, control={"run": str(runs / "control")})
    data["late"]["overrides"].update(fit_targets=True, calibration_batches=1)
    fitted = tmp_path / "fitted.yaml"
    fitted.write_text(yaml.safe_dump(data), encoding="utf-8")
    added = _sweep(config=fitted)
    assert [line.split()[2] for line in added.splitlines() if line.startswith("[sweep] running")] == [
        "late_nf0.5_lam1:"], "the existing baseline and control are read, not run"
    fitted_results = json.loads((tmp_path / "fitted" / "runs" / "late_nf0.5_lam1" / "results.json").read_text())
    assert fitted_results["fit_targets"]["fitted"] == fitted_results["fit_targets"]["units"]
    _sweep("--compare", str(first), str(fitted), "--output_dir", str(tmp_path / "both"), config=None)
    joint = json.loads((tmp_path / "both" / "results.json").read_text())
    assert [(row["sweep"], row["schedule"]) for row in joint] == [
        *(("tiny", row["schedule"]) for row in rows), ("fitted", "late (fitted)")]
    for png in ("quality_vs_apl.png", "core_maps.png"):
        assert (tmp_path / "both" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_and_config_are_exclusive(capsys):
    sweep = load_script(SWEEP)
    for argv in ([], ["--config", str(TINY), "--compare", str(TINY), "--output_dir", "x"], ["--compare", str(TINY)]):
        with pytest.raises(SystemExit):
            sweep.main(argv)
    assert "--compare needs --output_dir" in capsys.readouterr().err


def test_a_finished_run_with_other_settings_is_noted(tmp_path, capsys):
    sweep = load_script(SWEEP)
    loaded = sweep.load_sweep(TINY, output_dir=str(tmp_path))
    run = sweep.plan(loaded)[1]
    run.directory.mkdir(parents=True)
    command = sweep.recipe_command(loaded, run, None, [])
    (run.directory / "sweep_run.json").write_text(json.dumps({"command": command, "wall_s": 1.0}))
    sweep._warn_if_changed(loaded, run, "accelerate launch", [])  # another launcher, same recipe arguments
    assert capsys.readouterr().out == ""
    sweep._warn_if_changed(loaded, run, None, ["--seed", "4"])
    assert f"delete {run.directory} to rerun it" in capsys.readouterr().out
    existing = sweep.plan(sweep.load_sweep(TINY, output_dir=str(tmp_path), baseline_run=str(run.directory)))[0]
    assert existing.external and existing.directory == run.directory
    sweep._warn_if_changed(loaded, existing, None, ["--seed", "4"])  # read, not run, by this sweep
    assert capsys.readouterr().out == ""


def test_a_slice_reports_every_finished_run_of_the_folder(tmp_path, capsys):
    """Runs of other slices (other budgets, schedules, methods), read from their sweep_run.json, join the tables."""
    sweep = load_script(SWEEP)
    full = sweep.load_sweep(TINY, output_dir=str(tmp_path), budgets=[0.5, 0.3], schedules=["early", "late",
                                                                                            "one_shot"])
    for run in sweep.plan(full):
        run.directory.mkdir(parents=True)
        (run.directory / "results.json").write_text("{}")
        command = sweep.recipe_command(full, run, None, [])
        (run.directory / "sweep_run.json").write_text(json.dumps({"command": command, "wall_s": 1.0}))
    (tmp_path / "runs" / "early_nf0.9_lam1").mkdir()  # a failed run: not finished, not reported
    stray = tmp_path / "runs" / "test"  # a finished run of no schedule of this sweep (e.g. copied in by hand)
    stray.mkdir()
    (stray / "results.json").write_text("{}")
    (stray / "sweep_run.json").write_text(json.dumps({"command": ["python", "x.py", "--seed", "1"]}))
    planned = sweep.plan(sweep.load_sweep(TINY, output_dir=str(tmp_path), budgets=[0.5], schedules=["early"]))
    assert [run.name for run in planned] == ["baseline", "early_nf0.5_lam1"]
    runs = sweep.folder_runs(full, planned)
    assert runs[:2] == planned and [run.schedule for run in runs] == [run.schedule for run in sweep.plan(full)]
    assert sorted((run.name, run.schedule, run.budget_target, run.prior_lambda) for run in runs) == sorted(
        (run.name, run.schedule, run.budget_target, run.prior_lambda) for run in sweep.plan(full))
    assert f"{stray} is not a run of this sweep's grid" in capsys.readouterr().out


def test_report_only_and_compare_say_what_they_found(tmp_path, capsys):
    sweep = load_script(SWEEP)
    assert sweep.main(["--config", str(TINY), "--output_dir", str(tmp_path / "none"), "--report_only"]) == 1
    assert f"no finished run in {tmp_path / 'none' / 'runs'}" in capsys.readouterr().out
    config = tmp_path / "multi30k.yaml"  # a README sweep, whose tables are committed under results/sweeps
    data = yaml.safe_load((TINY.parent / "multi30k.yaml").read_text(encoding="utf-8"))
    data.update(base_config=str(TINY.parent.parent / "multi30k.yaml"), output_dir=str(tmp_path / "multi30k"))
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert sweep.main(["--config", str(config), "--report_only"]) == 1
    assert f"committed tables and plots are in {ROOT / 'results' / 'sweeps' / 'multi30k'}/" in capsys.readouterr().out
    assert sweep.main(["--compare", str(config), "--output_dir", str(tmp_path / "both")]) == 1
    out = capsys.readouterr().out
    assert "has a finished run to compare" in out and f"are not shipped, their tables and plots are: {ROOT}" in out
