"""Sweep linearization budgets and prior weights, early against late, by running a recipe once per grid point.

    python recipes/sweep.py --config recipes/configs/sweeps/multi30k.yaml [--dry_run] [--output_dir DIR]
        [--budgets 0.2 0.05] [--lambdas 0.1] [--schedules late one_shot] [--one_shot_methods affine]
        [--baseline_run DIR] [--report_only]
        [--launcher "accelerate launch --num_processes 2"] [--push_to_hub REPO_ID [--push_checkpoints]]
        [-- --recipe_flag value ...]
    python recipes/sweep.py --compare SWEEP.yaml OTHER.yaml ... --output_dir DIR    # several sweeps, one table

The sweep YAML names the recipe (``translate`` or ``classify``), its base config, the task and model labels (and an
optional ``label`` for comparisons), the grid (``budgets`` on ``budget_metric``, ``lambdas``, ``schedules``), the
``metrics`` to tabulate, and recipe flags for every run (``overrides``) and per arm (``baseline``, ``early``,
``late``, ``control``: each a mapping with ``overrides``; ``baseline`` and ``control`` may instead name an existing
finished ``run``, e.g. another sweep's). An optional ``one_shot`` mapping names post-training methods, each with its
recipe flags (e.g. ``identity: {one_shot_target: identity, train: false}``). Command-line options replace the
YAML's, and recipe flags after ``--`` are appended to every run's command, so they win over both.

Runs, each a subprocess of the recipe writing ``output_dir/runs/NAME`` (``NAME/log.txt`` holds its output):

* ``baseline``: the base config with ``prior_lambda 0`` (no prior, the gates stay 0);
* ``early_*``: from scratch with the base config, the prior on from step 0, one run per budget and lambda;
* ``late_*``: the baseline's ``final/`` checkpoint fine-tuned with the prior on from step 0 (the fine-tune length is
  the ``late`` arm's ``num_train_epochs``/``max_steps``);
* ``one_shot_METHOD_*`` (schedule ``one_shot``, with a ``one_shot`` mapping): the baseline's ``final/`` linearized in
  one shot to each budget (``--one_shot_budget``, a nonlinear fraction) with the method's flags, the prior off;
  with ``train: false`` it is only scored, otherwise the fine-tune that follows is a recovery fine-tune;
* ``control`` (when the YAML has a ``control`` key and the sweep runs ``late``): the same fine-tune from the
  baseline without the prior, i.e. the baseline trained for the same extra compute as every late run (or, with
  ``control.run``, an existing such run that the sweep only reads).

A run whose ``results.json`` exists is skipped, so an interrupted sweep resumes where it stopped. Then the sweep
writes ``results.csv``/``results.json`` (one row per run, see `hf_linearize.sweep_report.result_row`, plus the
compute: ``wall_s`` of the run, ``total_epochs``/``total_wall_s`` counting the baseline for late and control runs),
``quality_vs_apl.png`` (early and late), ``one_shot_vs_apl.png`` (the one-shot methods and late, when the sweep has
them) and ``core_maps.png`` into ``output_dir``.

``--compare`` puts the finished runs of several sweeps of one task (e.g. one that adds an arm to another's
baseline) into one table and one pair of plots; see `compare`.

``--push_to_hub REPO_ID`` then pushes the tables and plots of a sweep whose runs all finished to a Hub dataset repo
(``--push_checkpoints``: each run's ``final/`` to a model repo too); see `hf_linearize.hub_results.push_results`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hf_linearize.arguments import load_yaml
from hf_linearize.config import BUDGET_METRICS
from hf_linearize.hub import HubPushError
from hf_linearize.hub_results import push_results
from hf_linearize.sweep_report import metric_column, plot_core_maps, plot_quality_vs_apl, result_row, write_results

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "results" / "sweeps"
"""The committed tables and plots of the sweeps the README reports (their run folders are not shipped)."""


@dataclass(frozen=True)
class RecipeSpec:
    """How the sweep drives one recipe."""

    script: Path
    metrics: tuple[str, ...]
    """Default score paths in ``results.json['scores']``; the first is plotted."""
    late_init: dict[str, str]
    """Recipe flags that start a run from the baseline's checkpoint; ``{final}`` is its ``final/`` folder."""
    model_keys: tuple[str, ...]
    """Base-config keys that name the model, for the default ``model`` label."""


RECIPES = {
    "translate": RecipeSpec(ROOT / "recipes" / "translate_wmt.py", ("test.bleu", "test.chrf"),
                            {"model_name_or_path": "{final}"}, ("model_name_or_path", "preset")),
    "classify": RecipeSpec(ROOT / "recipes" / "classify_images.py", ("test.accuracy",),
                           {"model_name_or_path": "{final}"}, ("model_name",)),
}
SCHEDULES = ("early", "late", "one_shot")
ARMS = ("baseline", "early", "late", "control")
KEYS = {"recipe", "task", "model", "label", "base_config", "output_dir", "budget_metric", "budgets", "lambdas",
        "schedules", "metrics", "overrides", "late_init", "one_shot", *ARMS}
METRIC_ABBREVIATIONS = {"nonlinear_fraction": "nf", "normalized_apl": "apl"}


@dataclass
class Sweep:
    """A validated sweep YAML (paths absolute)."""

    recipe: str
    task: str
    model: str
    base_config: Path
    output_dir: Path
    budget_metric: str
    budgets: list[Optional[float]]
    lambdas: list[float]
    schedules: list[str]
    metrics: list[str]
    overrides: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    """Arm name -> its recipe flags; ``control`` is present only when the sweep runs one."""
    late_init: dict[str, str]
    one_shot: dict[str, dict[str, Any]] = field(default_factory=dict)
    """One-shot method name -> its recipe flags (the ``one_shot`` schedule)."""
    baseline_run: Optional[Path] = None
    control_run: Optional[Path] = None
    """An existing finished control run (``control.run``) that the sweep reads instead of running one."""
    label: str = ""
    """Names this sweep's prior arms in a comparison with other sweeps (``late (LABEL)``): the YAML's ``label``,
    else its file name."""


@dataclass
class Run:
    """One recipe invocation of the sweep."""

    name: str
    schedule: str
    """``baseline``, ``early``, ``late``, ``control`` or ``one_shot_METHOD``."""
    directory: Path
    flags: dict[str, Any] = field(default_factory=dict)
    budget_target: Optional[float] = None
    prior_lambda: float = 0.0
    external: bool = False
    """An existing run the sweep only reads (``baseline.run``, ``control.run``)."""

    @property
    def from_baseline(self) -> bool:
        return self.schedule in ("late", "control") or self.schedule.startswith("one_shot")

    @property
    def done(self) -> bool:
        return (self.directory / "results.json").is_file()


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of recipe flags to values; got {value!r}.")
    return value


def _numbers(value: Any, where: str, allow_none: bool) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list, e.g. [0.5, 0.1]; got {value!r}.")
    for item in value:
        if (item is None and not allow_none) or (item is not None and (isinstance(item, bool) or not isinstance(
                item, (int, float)) or item < 0)):
            raise ValueError(f"{where} must hold numbers >= 0{' or null' if allow_none else ''}; got {item!r}.")
    numbers = [None if item is None else float(item) for item in value]
    if len(set(numbers)) < len(numbers):
        raise ValueError(f"{where} {value} repeats a value; list each once.")
    return numbers


def load_sweep(path: str | Path, output_dir: Optional[str] = None, budgets: Optional[Sequence[float]] = None,
               lambdas: Optional[Sequence[float]] = None, schedules: Optional[Sequence[str]] = None,
               baseline_run: Optional[str] = None, one_shot_methods: Optional[Sequence[str]] = None) -> Sweep:
    """Read and validate a sweep YAML; the keyword arguments (command-line options) replace its values.

    ``base_config`` and a ``baseline.run`` are relative to the YAML's folder, ``output_dir`` to the working
    directory. Raises ``ValueError`` naming the wrong key and the fix.
    """
    path = Path(path)
    data = load_yaml(path)
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise ValueError(f"Unknown keys {unknown} in sweep config {path}; valid keys are {sorted(KEYS)}.")
    recipe = data.get("recipe")
    if recipe not in RECIPES:
        raise ValueError(f"{path}: recipe must be one of {sorted(RECIPES)}; got {recipe!r}.")
    for key in ("task", "base_config"):
        if not data.get(key):
            raise ValueError(f"{path}: {key!r} is required.")
    base_config = (path.parent / data["base_config"]).resolve()
    base = load_yaml(base_config)
    if base.get("budget_target") is not None:
        raise ValueError(f"Base config {base_config} sets budget_target; the sweep sets budgets itself from "
                         "'budgets', and its baseline must run without one. Remove budget_target from the base config.")
    output = output_dir or data.get("output_dir")
    if not output:
        raise ValueError(f"{path}: give 'output_dir' in the YAML or --output_dir.")
    budget_metric = data.get("budget_metric", "nonlinear_fraction")
    if budget_metric not in BUDGET_METRICS:
        raise ValueError(f"{path}: budget_metric must be one of {BUDGET_METRICS}; got {budget_metric!r}.")
    budget_list = _numbers(list(budgets) if budgets is not None else data.get("budgets"), "budgets", True)
    if budget_metric == "nonlinear_fraction" and any(b is not None and b > 1 for b in budget_list):
        raise ValueError(f"budgets {budget_list} are nonlinear fractions and must lie in [0, 1].")
    lambda_list = _numbers(list(lambdas) if lambdas is not None else data.get("lambdas"), "lambdas", False)
    one_shot = {str(name): _mapping(flags, f"one_shot.{name}")
                for name, flags in _mapping(data.get("one_shot"), "one_shot").items()}
    if one_shot_methods is not None:
        unknown = sorted(set(one_shot_methods) - set(one_shot))
        if unknown:
            raise ValueError(f"one-shot methods {unknown} are not in {path}'s one_shot mapping {sorted(one_shot)}.")
        one_shot = {name: flags for name, flags in one_shot.items() if name in one_shot_methods}
    default_schedules = ["early", "late"] + (["one_shot"] if one_shot else [])
    schedule_list = list(schedules) if schedules is not None else data.get("schedules", default_schedules)
    if not isinstance(schedule_list, list) or not schedule_list or set(schedule_list) - set(SCHEDULES):
        raise ValueError(f"schedules must be a non-empty list drawn from {list(SCHEDULES)}; got {schedule_list!r}.")
    if "one_shot" in schedule_list and not one_shot:
        raise ValueError(f"{path}: schedule 'one_shot' needs a 'one_shot' mapping of method names to recipe flags, "
                         "e.g. one_shot: {affine: {train: false}}.")
    if one_shot and budget_metric != "nonlinear_fraction":
        raise ValueError(f"{path}: one-shot methods linearize to a nonlinear fraction; set budget_metric to "
                         f"nonlinear_fraction or drop 'one_shot' (got {budget_metric!r}).")
    metrics = data.get("metrics", list(RECIPES[recipe].metrics))
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ValueError(f"{path}: metrics must be a non-empty list of score paths such as 'test.bleu'.")
    arms = {}
    for arm in ARMS:
        if arm not in data:
            continue
        spec = _mapping(data[arm], arm)
        existing = arm in ("baseline", "control")
        extra = sorted(set(spec) - ({"overrides", "run"} if existing else {"overrides"}))
        if extra:
            raise ValueError(f"{path}: unknown keys {extra} under {arm!r}; it takes 'overrides'"
                             f"{' or run' if existing else ''}.")
        if existing and spec.get("run") and spec.get("overrides") and not (arm == "baseline" and baseline_run):
            raise ValueError(f"{path}: {arm} has both 'run' (an existing run) and 'overrides' (for training one); "
                             "keep one.")
        arms[arm] = _mapping(spec.get("overrides"), f"{arm}.overrides")
    runs = {arm: (path.parent / arm_spec["run"]).resolve() for arm in ("baseline", "control")
            if isinstance(arm_spec := data.get(arm), dict) and arm_spec.get("run")}
    run = Path(baseline_run).resolve() if baseline_run else runs.get("baseline")
    late_init = _mapping(data.get("late_init"), "late_init") or RECIPES[recipe].late_init
    model = data.get("model") or next((str(base[k]) for k in RECIPES[recipe].model_keys if base.get(k)), "")
    return Sweep(recipe=recipe, task=str(data["task"]), model=str(model), base_config=base_config,
                 output_dir=Path(output).resolve(), budget_metric=budget_metric, budgets=budget_list,
                 lambdas=lambda_list, schedules=schedule_list, metrics=metrics,
                 overrides=_mapping(data.get("overrides"), "overrides"), arms=arms,
                 late_init={k: str(v) for k, v in late_init.items()}, one_shot=one_shot,
                 baseline_run=run, control_run=runs.get("control"), label=str(data.get("label") or path.stem))


def run_name(schedule: str, budget_metric: str, budget: Optional[float], prior_lambda: float) -> str:
    """``late_nf0.05_lam0.1``: schedule, budget (metric abbreviated; left out without a budget) and lambda."""
    budget_part = f"_{METRIC_ABBREVIATIONS[budget_metric]}{budget:g}" if budget is not None else ""
    return f"{schedule}{budget_part}_lam{prior_lambda:g}"


def plan(sweep: Sweep) -> list[Run]:
    """Every run of the sweep in the order they must run: the baseline, the early runs, then the late runs, the
    one-shot runs and the control, which start from the baseline's ``final/`` checkpoint."""
    runs_dir = sweep.output_dir / "runs"
    baseline = (Run("baseline", "baseline", sweep.baseline_run, external=True) if sweep.baseline_run else
                Run("baseline", "baseline", runs_dir / "baseline",
                    {**sweep.overrides, **sweep.arms.get("baseline", {}), "prior_lambda": 0.0}))
    start = {key: value.format(final=baseline.directory / "final") for key, value in sweep.late_init.items()}
    runs = [baseline]
    for schedule in ("early", "late"):
        if schedule not in sweep.schedules:
            continue
        for budget in sweep.budgets:
            for prior_lambda in sweep.lambdas:
                grid: dict[str, Any] = {"prior_lambda": prior_lambda}
                if budget is not None:
                    grid.update(budget_target=budget, budget_metric=sweep.budget_metric)
                flags = {"prior_start": 0, **sweep.overrides, **sweep.arms.get(schedule, {}),
                         **(start if schedule == "late" else {}), **grid}
                name = run_name(schedule, sweep.budget_metric, budget, prior_lambda)
                runs.append(Run(name, schedule, runs_dir / name, flags, budget, prior_lambda))
    for method, method_flags in sweep.one_shot.items() if "one_shot" in sweep.schedules else ():
        for budget in (b for b in sweep.budgets if b is not None):
            flags = {**sweep.overrides, **start, "eval_before_training": False, "prior_lambda": 0.0,
                     "one_shot_budget": budget, **method_flags}
            name = f"one_shot_{method}_{METRIC_ABBREVIATIONS[sweep.budget_metric]}{budget:g}"
            runs.append(Run(name, f"one_shot_{method}", runs_dir / name, flags, budget,
                            float(flags["prior_lambda"])))
    if sweep.control_run and "late" in sweep.schedules:
        runs.append(Run("control", "control", sweep.control_run, external=True))
    elif "control" in sweep.arms and "late" in sweep.schedules:
        flags = {**sweep.overrides, **sweep.arms.get("late", {}), **sweep.arms["control"], **start,
                 "prior_lambda": 0.0}
        runs.append(Run("control", "control", runs_dir / "control", flags))
    return runs


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def recipe_command(sweep: Sweep, run: Run, launcher: Optional[str], extra: Sequence[str]) -> list[str]:
    """The command line of one run: the launcher (default: this Python), the recipe, ``--config`` (the base
    config), ``--output_dir`` (and ``--overwrite_output_dir``), the run's flags, then ``extra`` (so the command
    line's recipe flags win)."""
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    # the sweep skips finished runs, so a run folder it starts holds only a failed attempt's files (and log.txt)
    args = ["--config", str(sweep.base_config), "--output_dir", str(run.directory), "--overwrite_output_dir", "true"]
    for key, value in run.flags.items():
        args += [f"--{key}", _text(value)]
    return [*prefix, str(RECIPES[sweep.recipe].script), *args, *extra]


def _flag(name: str, flags: dict[str, Any], extra: Sequence[str], base: dict[str, Any]) -> Any:
    """The value a run's recipe will see for flag ``name``: the last of ``extra``, its flags, the base config."""
    for i in range(len(extra) - 1, -1, -1):
        if extra[i] == f"--{name}" and i + 1 < len(extra):
            return extra[i + 1]
        if extra[i].startswith(f"--{name}="):
            return extra[i].split("=", 1)[1]
    return flags.get(name, base.get(name))


def planned_length(run: Run, extra: Sequence[str], base: dict[str, Any]) -> str:
    """The run's training length as configured: ``no training`` (``train: false``), ``N steps`` when
    ``max_steps`` > 0, else ``N epochs``."""
    if run.external:
        return "existing run"
    if str(_flag("train", run.flags, extra, base)).lower() == "false":
        return "no training"
    steps = _flag("max_steps", run.flags, extra, base)
    if steps is not None and int(steps) > 0:
        return f"{int(steps)} steps"
    epochs = _flag("num_train_epochs", run.flags, extra, base)
    return f"{float(epochs):g} epochs" if epochs is not None else "recipe default epochs"


def _record(run: Run) -> dict[str, Any]:
    file = run.directory / "sweep_run.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def print_plan(sweep: Sweep, runs: Sequence[Run], launcher: Optional[str], extra: Sequence[str],
               commands: bool) -> None:
    """One line per run: name, schedule, budget, lambda, start, planned length, status; then, with ``commands``,
    the command line of every run still to do."""
    base = load_yaml(sweep.base_config)
    print(f"Sweep {sweep.task} ({sweep.recipe}, model {sweep.model or '?'}) -> {sweep.output_dir}")
    print(f"{'run':<28} {'schedule':<21} {'budget':<24} {'lambda':<7} {'starts from':<12} {'training':<22} status")
    for run in runs:
        budget = f"{sweep.budget_metric} {run.budget_target:g}" if run.budget_target is not None else "-"
        if run.done:
            wall = _record(run).get("wall_s")
            status = "done" + (f" ({wall:.0f} s)" if wall is not None else "")
        else:
            status = "missing (external baseline)" if run.external else "to run"
        start = "baseline" if run.from_baseline else "scratch" if not run.external else "-"
        length = planned_length(run, extra, base)
        if run.from_baseline and not run.external and length != "no training":
            length = f"baseline + {length}"
        print(f"{run.name:<28} {run.schedule:<21} {budget:<24} {run.prior_lambda:<7g} {start:<12} {length:<22} "
              f"{status}")
    todo = [run for run in runs if not run.done and not run.external]
    print(f"{sum(run.done for run in runs)} of {len(runs)} runs done, {len(todo)} to run.")
    for run in todo if commands else ():
        print("  " + shlex.join(recipe_command(sweep, run, launcher, extra)))


def hardware() -> str:
    """What this machine runs the recipes on, for ``sweep_run.json``: CPU cores and architecture, GPUs."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), " + (", ".join(gpus) if gpus else "no GPU")


def execute(sweep: Sweep, run: Run, launcher: Optional[str], extra: Sequence[str]) -> bool:
    """Run the recipe for ``run`` (output to ``run.directory/log.txt``); on success record its command, wall
    time and :func:`hardware` in ``sweep_run.json``. Returns whether it finished with a ``results.json``."""
    command = recipe_command(sweep, run, launcher, extra)
    run.directory.mkdir(parents=True, exist_ok=True)
    log = run.directory / "log.txt"
    print(f"[sweep] running {run.name}: {shlex.join(command)}", flush=True)
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as handle:
        returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.monotonic() - start
    if returncode != 0 or not run.done:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
        print(f"[sweep] {run.name} FAILED (exit {returncode}) after {wall:.0f} s; log {log}:\n{tail}", flush=True)
        return False
    record = {"command": command, "wall_s": wall, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "hardware": hardware()}
    (run.directory / "sweep_run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"[sweep] {run.name} done in {wall:.0f} s", flush=True)
    return True


def _warn_if_changed(sweep: Sweep, run: Run, launcher: Optional[str], extra: Sequence[str]) -> None:
    """Say so when a finished run was started with other recipe arguments than the sweep would use now (never for
    an existing run the sweep only reads: its own sweep started it, with its own settings)."""
    if run.external:
        return
    recorded = _record(run).get("command")
    planned = recipe_command(sweep, run, launcher, extra)
    script = str(RECIPES[sweep.recipe].script)
    if recorded and script in recorded and recorded[recorded.index(script):] != planned[planned.index(script):]:
        print(f"[sweep] note: {run.name} finished with other settings than the sweep's now (see "
              f"{run.directory / 'sweep_run.json'}); delete {run.directory} to rerun it.")


def folder_runs(sweep: Sweep, planned: Sequence[Run]) -> list[Run]:
    """The planned runs, then every other finished run in ``output_dir/runs`` (one of another slice of the grid,
    e.g. ``--budgets 0.5`` earlier): its schedule from its name (:func:`run_name`), its budget and lambda from the
    command in its ``sweep_run.json``. So the tables always hold every finished run of the folder; a folder whose
    name no schedule of the sweep makes is skipped with a note."""
    known = {run.directory for run in planned}
    found = []
    for directory in sorted((sweep.output_dir / "runs").glob("*/results.json")):
        directory = directory.parent
        command = _record(Run(directory.name, "", directory)).get("command")
        if directory in known or not command:
            continue
        name = directory.name
        schedule = (name if name in ("baseline", "control") else name.rsplit("_", 1)[0] if name.startswith(
            "one_shot_") else name.split("_", 1)[0])
        if _group(schedule) not in GROUPS:
            print(f"[sweep] note: {directory} is not a run of this sweep's grid (by its name); left out of the tables.")
            continue
        budget = _flag("one_shot_budget" if schedule.startswith("one_shot") else "budget_target", {}, command, {})
        found.append(Run(name, schedule, directory, budget_target=None if budget in (None, "none") else float(budget),
                         prior_lambda=float(_flag("prior_lambda", {}, command, {}) or 0.0)))
    return sorted([*planned, *found], key=lambda run: GROUPS.index(_group(run.schedule)))


GROUPS = ("baseline", "early", "late", "one_shot", "control")
"""The schedules' groups in plan order (:func:`folder_runs` sorts by them and keeps the order within a group)."""


def _group(schedule: str) -> str:
    return "one_shot" if schedule.startswith("one_shot") else schedule


def collect(sweep: Sweep, runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per finished run (see the module docstring), baseline first."""
    rows = []
    baseline_row: Optional[dict[str, Any]] = None
    for run in runs:
        if not run.done:
            continue
        results = json.loads((run.directory / "results.json").read_text(encoding="utf-8"))
        wall = _record(run).get("wall_s")
        row = result_row(results, sweep.metrics, task=sweep.task, model=sweep.model, recipe=sweep.recipe,
                         run=run.name, schedule=run.schedule,
                         start="baseline" if run.from_baseline else "scratch",
                         budget_metric=sweep.budget_metric if run.budget_target is not None else None,
                         budget_target=run.budget_target, prior_lambda=run.prior_lambda)
        row["budget_reached_step"] = next((entry["linearize/budget_reached_step"] for entry in
                                           reversed(results.get("log_history", []))
                                           if "linearize/budget_reached_step" in entry), None)
        row["wall_s"] = wall if wall is not None else row["train_runtime_s"]
        row["total_epochs"], row["total_wall_s"] = row["epochs"], row["wall_s"]
        if run.from_baseline and baseline_row is not None:
            for key, own in (("total_epochs", "epochs"), ("total_wall_s", "wall_s")):
                if baseline_row[own] is not None:  # a run without training (one-shot) adds no epochs
                    row[key] = (row[own] or 0) + baseline_row[own]
        final = run.directory / "final"  # relative to the project when inside it, so committed tables are portable
        row["checkpoint"] = str(final.relative_to(ROOT) if final.is_relative_to(ROOT) else final)
        if run.name == "baseline":
            baseline_row = row
        rows.append(row)
    return rows


def report(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """Write the tables and plots, and print the compute and headline metric of every run."""
    csv_path, json_path = write_results(rows, sweep.output_dir)
    headline = metric_column(sweep.metrics[0])
    outputs = [csv_path, json_path]
    outputs.append(plot_quality_vs_apl(rows, sweep.output_dir / "quality_vs_apl.png", headline, ("early", "late")))
    one_shot = sorted({row["schedule"] for row in rows if row["schedule"].startswith("one_shot_")})
    if one_shot:  # post-training methods, with the late prior for reference
        outputs.append(plot_quality_vs_apl(rows, sweep.output_dir / "one_shot_vs_apl.png", headline,
                                           ("late", *one_shot)))
    if any(row["schedule"] in ("early", "late") for row in rows):
        outputs.append(plot_core_maps(rows, sweep.output_dir / "core_maps.png"))
    print(f"{'run':<28} {headline:>12} {'norm. APL':>10} {'nonlinear':>10} {'core':>9} {'epochs':>8} "
          f"{'total ep.':>9} {'wall s':>8} {'total wall s':>12}")
    for row in rows:  # core: gated layers with a nonlinear unit left x their mean nonlinear units
        print(f"{row['run']:<28} {row[headline]:>12.4g} {row['normalized_apl']:>10.3f} "
              f"{row['nonlinear_fraction']:>10.3f} {row['active_layers']:>3}x{row['core_width']:<5.0f} "
              f"{row['epochs'] or 0:>8.2f} {row['total_epochs'] or 0:>9.2f} "
              f"{row['wall_s'] or 0:>8.0f} {row['total_wall_s'] or 0:>12.0f}")
    print("wrote " + ", ".join(str(p) for p in outputs))


def compare(configs: Sequence[str | Path], output_dir: Path) -> list[dict[str, Any]]:
    """Rows of the finished runs of several sweeps of one task, written to ``output_dir`` as ``results.csv`` and
    ``results.json``, with ``quality_vs_apl.png`` and ``core_maps.png`` of their early and late arms.

    The first sweep's schedules keep their names; a later sweep's early and late runs become ``early (LABEL)`` and
    ``late (LABEL)`` (its YAML ``label``, else its file name). A run that several sweeps read (an existing baseline
    or control) appears once. Rows gain ``sweep``, the label of the sweep they come from.
    """
    sweeps = [load_sweep(config) for config in configs]
    rows, seen = [], set()
    for index, sweep in enumerate(sweeps):
        for row in collect(sweep, folder_runs(sweep, plan(sweep))):
            if row["checkpoint"] in seen:
                continue
            seen.add(row["checkpoint"])
            if index and row["schedule"] in ("early", "late"):
                row["schedule"] = f"{row['schedule']} ({sweep.label})"
            rows.append({"sweep": sweep.label, **row})
    if not rows:
        raise ValueError(f"None of the sweeps {[str(c) for c in configs]} has a finished run to compare.")
    write_results(rows, output_dir)
    prior = list(dict.fromkeys(row["schedule"] for row in rows if row["schedule"].split(" ")[0] in ("early", "late")))
    if prior:
        headline = metric_column(sweeps[0].metrics[0])
        plot_quality_vs_apl(rows, output_dir / "quality_vs_apl.png", headline, prior)
        plot_core_maps(rows, output_dir / "core_maps.png", prior)
    return rows


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    """Sweep options, and the recipe flags after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Recipe flags for every run go after '--'.")
    parser.add_argument("--config", help="sweep YAML (recipes/configs/sweeps/*.yaml)")
    parser.add_argument("--compare", nargs="+", metavar="CONFIG", help="sweep YAMLs of one task whose finished runs "
                        "go into one table and plot in --output_dir (runs nothing)")
    parser.add_argument("--output_dir", help="replaces the YAML's output_dir")
    parser.add_argument("--budgets", nargs="+", type=float, help="replaces the YAML's budgets")
    parser.add_argument("--lambdas", nargs="+", type=float, help="replaces the YAML's lambdas")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, help="replaces the YAML's schedules")
    parser.add_argument("--one_shot_methods", nargs="+", help="only these of the YAML's one_shot methods")
    parser.add_argument("--baseline_run", help="an existing finished baseline run folder (with results.json and "
                        "final/) used instead of training one")
    parser.add_argument("--launcher", help="command prefix for each run, e.g. 'accelerate launch --num_processes 2' "
                        "(default: this Python)")
    parser.add_argument("--dry_run", action="store_true", help="print the grid, what is done and the commands; "
                        "run nothing")
    parser.add_argument("--report_only", action="store_true", help="write the tables and plots of the finished "
                        "runs; run nothing (e.g. after running the grid in slices)")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="after the sweep, push results.csv's rows "
                        "(Parquet), the plots and a dataset card to this Hub dataset repo")
    parser.add_argument("--push_checkpoints", action="store_true", help="with --push_to_hub: also push each run's "
                        "final/ to the model repo REPO_ID-RUN")
    args = parser.parse_args(argv)
    if args.push_checkpoints and not args.push_to_hub:
        parser.error("--push_checkpoints needs --push_to_hub REPO_ID, the dataset repo the models link to.")
    if args.push_to_hub and not args.config:
        parser.error("--push_to_hub pushes one sweep: give --config SWEEP.yaml (for a --compare folder use "
                     "hf-linearize push-results DIR REPO_ID).")
    if bool(args.config) == bool(args.compare):
        parser.error("give either --config SWEEP.yaml (run or report one sweep) or --compare A.yaml B.yaml ... "
                     "--output_dir DIR (several sweeps in one table).")
    if args.compare and not args.output_dir:
        parser.error("--compare needs --output_dir, the folder for the joint table and plots.")
    return args, extra


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = parse_args(argv)
    if args.compare:
        try:
            rows = compare(args.compare, Path(args.output_dir).resolve())
        except ValueError as error:
            print(f"[sweep] {error} They are read from each sweep's output_dir/runs/*/results.json; a fresh clone "
                  f"has none (the finished runs are not shipped, their tables and plots are: {SHIPPED}/).")
            return 1
        print(f"[sweep] {len(rows)} finished runs of {len(args.compare)} sweeps "
              f"({', '.join(str(c) for c in args.compare)}) -> {args.output_dir}")
        return 0
    sweep = load_sweep(args.config, args.output_dir, args.budgets, args.lambdas, args.schedules, args.baseline_run,
                       args.one_shot_methods)
    runs = plan(sweep)
    print_plan(sweep, runs, args.launcher, extra, commands=args.dry_run)
    if args.dry_run:
        return 0
    failed = []
    baseline = runs[0]
    for run in () if args.report_only else runs:
        if run.done:
            _warn_if_changed(sweep, run, args.launcher, extra)
            continue
        if run.external:
            failed.append(run.name)
            print(f"[sweep] the existing {run.name} run {run.directory} has no results.json; finish it or drop "
                  f"{run.name}.run.")
            continue
        if run.from_baseline and not baseline.done:
            failed.append(run.name)
            print(f"[sweep] skipping {run.name}: it starts from the baseline, which has not finished.")
            continue
        if not execute(sweep, run, args.launcher, extra):
            failed.append(run.name)
    rows = collect(sweep, folder_runs(sweep, runs))
    if rows:
        print(f"[sweep] tables and plots of the {len(rows)} finished runs in {sweep.output_dir / 'runs'}:")
        report(sweep, rows)
    elif args.report_only:
        shipped = SHIPPED / sweep.output_dir.name
        print(f"[sweep] no finished run in {sweep.output_dir / 'runs'} (a run is finished when its results.json "
              "exists), so no table was written. Run the sweep first (drop --report_only)"
              + (f"; this sweep's committed tables and plots are in {shipped}/." if shipped.is_dir() else "."))
        return 1
    if failed:
        print(f"[sweep] {len(failed)} run(s) did not finish: {', '.join(failed)}; rerun the sweep to retry them"
              f"{' (nothing was pushed to the Hub)' if args.push_to_hub else ''}.")
        return 1
    if args.push_to_hub and rows:
        try:
            pushed = push_results(sweep.output_dir, args.push_to_hub, push_checkpoints=args.push_checkpoints)
        except HubPushError as error:
            print(f"[sweep] {error}")
            return 1
        print(f"[sweep] pushed to dataset {args.push_to_hub}: {pushed.dataset_commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
