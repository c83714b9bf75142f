"""Tables and plots of a linearization sweep, from the ``results.json`` files that the recipes write.

A *row* is one run, flattened by :func:`result_row`: its labels (task, model, schedule, budget, lambda, ...), its
task metrics, both APL forms and the full depth, the nonlinear fraction and the per-layer nonlinear counts, its
compute and its checkpoint path. :func:`write_results` saves rows as CSV and JSON, :func:`plot_quality_vs_apl`
draws a task metric against the normalized APL per schedule, and :func:`plot_core_maps` draws the per-layer
nonlinear fractions of every run side by side.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .core_map import _short_labels

PathLike = Union[str, os.PathLike]

SCHEDULE_STYLE = {"early": ("tab:blue", "o"), "late": ("tab:red", "s")}
"""Curve colour and marker of each prior schedule in :func:`plot_quality_vs_apl`."""
OTHER_COLORS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")
"""Curve colours of any other schedule (e.g. the one-shot methods ``one_shot_affine``), in sorted order."""
REFERENCE_STYLE = {"baseline": ("black", "-"), "control": ("tab:gray", "--")}
"""Horizontal-line colour and style of each run without a prior (the baseline, the same-compute control)."""


def metric_column(path: str) -> str:
    """The column name of a dotted score path: ``"test.bleu"`` -> ``"test_bleu"``."""
    return path.replace(".", "_")


def _score(scores: Mapping[str, Any], path: str) -> float:
    value: Any = scores
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(f"results.json has no score {path!r} (looked under 'scores'; it holds "
                           f"{sorted(scores)}); name an existing score, e.g. 'test.bleu' or 'test.accuracy'.")
        value = value[part]
    return float(value)


def result_row(results: Mapping[str, Any], metrics: Sequence[str], **labels: Any) -> dict[str, Any]:
    """One table row from a recipe's ``results.json`` (a mapping with ``scores``, ``path_length``, ``summary`` and
    ``train``): ``labels`` first, then one column per metric path in ``metrics`` (``"test.bleu"`` ->
    ``test_bleu``), ``normalized_apl``, ``unnormalized_apl``, ``depth_normalized``, ``depth_unnormalized``,
    ``units``, ``nonlinear_units``, ``nonlinear_fraction`` (in [0, 1]), ``layer_nonlinear`` and ``layer_units``
    (dicts: gated layer -> count, in the model's order), the core network's ``active_layers`` (gated layers with
    a nonlinear unit left) and ``core_width`` (their mean nonlinear units; 0 without one), ``steps``, ``epochs``
    and ``train_runtime_s`` (seconds; None when ``train`` is null, i.e. a one-shot run without training).

    Raises ``KeyError`` naming the missing score or section.
    """
    for section in ("scores", "path_length", "summary", "train"):
        if section not in results:
            raise KeyError(f"results.json has no {section!r} section; it was not written by a recipe of this "
                           "version (rerun the run).")
    report, total, train = results["path_length"], results["summary"]["total"], results["train"] or {}
    active = [layer["nonlinear"] for layer in report["layers"].values() if layer["nonlinear"] > 0]
    row = dict(labels)
    row.update({metric_column(path): _score(results["scores"], path) for path in metrics})
    row.update(
        normalized_apl=report["normalized_apl"],
        unnormalized_apl=report["unnormalized_apl"],
        depth_normalized=report["depth"]["normalized"],
        depth_unnormalized=report["depth"]["unnormalized"],
        units=total["units"],
        nonlinear_units=total["nonlinear"],
        nonlinear_fraction=total["nonlinear_fraction"],
        layer_nonlinear={name: layer["nonlinear"] for name, layer in report["layers"].items()},
        layer_units={name: layer["units"] for name, layer in report["layers"].items()},
        active_layers=len(active),
        core_width=sum(active) / len(active) if active else 0.0,
        steps=train.get("steps"),
        epochs=train.get("epochs"),
        train_runtime_s=train.get("runtime_s"),
    )
    return row


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: PathLike) -> tuple[Path, Path]:
    """Write ``rows`` to ``out_dir/results.csv`` and ``out_dir/results.json`` (the folder is created); return both
    paths. The CSV's columns are the union of the rows' keys in first-seen order; dict and list values are JSON
    strings there, missing values empty cells. The JSON file is the list of rows as they are."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    csv_path, json_path = out / "results.csv", out / "results.json"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: json.dumps(value) if isinstance(value, (dict, list)) else value
                             for key, value in row.items()})
    json_path.write_text(json.dumps(list(rows), indent=2) + "\n", encoding="utf-8")
    return csv_path, json_path


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row.get("task", "")), str(row.get("model", ""))), []).append(row)
    return groups


def curve_styles(schedules: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Colour and marker of each schedule drawn as a curve: ``early`` and ``late`` as in ``SCHEDULE_STYLE``, any
    other (e.g. ``one_shot_affine``) in ``OTHER_COLORS`` order, sorted by name; the reference runs (baseline,
    control) are lines, not curves, and are left out."""
    present = set(schedules) - set(REFERENCE_STYLE)
    others = sorted(present - set(SCHEDULE_STYLE))
    return {**{s: style for s, style in SCHEDULE_STYLE.items() if s in present},
            **{s: (OTHER_COLORS[i % len(OTHER_COLORS)], "^") for i, s in enumerate(others)}}


def plot_quality_vs_apl(rows: Sequence[Mapping[str, Any]], path: PathLike, metric: str,
                        schedules: Optional[Iterable[str]] = None) -> Path:
    """PNG of the ``metric`` column against ``normalized_apl``: one panel per (task, model), one curve per
    schedule (``early``, ``late``, then any other such as ``one_shot_affine``; only those in ``schedules`` when
    given; points sorted by APL, labelled with their budget), the ``baseline`` and ``control`` runs as horizontal
    lines, the full depth as a dotted vertical line. Rows need ``schedule``; raises ``ValueError`` when no row has
    the metric. Returns the path (its folder is created)."""
    from matplotlib.figure import Figure

    keep = None if schedules is None else set(schedules) | set(REFERENCE_STYLE)
    rows = [row for row in rows if row.get(metric) is not None and not math.isnan(float(row[metric]))
            and (keep is None or row.get("schedule") in keep)]
    if not rows:
        raise ValueError(f"No run has the metric {metric!r} to plot.")
    groups = _groups(rows)
    figure = Figure(figsize=(5.2 * len(groups), 4.0), layout="constrained")
    for axis, ((task, model), members) in zip(figure.subplots(1, len(groups), squeeze=False)[0], groups.items()):
        for schedule, (color, marker) in curve_styles(str(row.get("schedule")) for row in members).items():
            points = sorted((row["normalized_apl"], row[metric], row.get("budget_target")) for row in members
                            if row.get("schedule") == schedule)
            if points:
                xs, ys, budgets = zip(*points)
                axis.plot(xs, ys, color=color, marker=marker, label=schedule)
                for x, y, budget in points:
                    if budget is not None:
                        axis.annotate(f"{budget:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                                      color=color)
        for schedule, (color, style) in REFERENCE_STYLE.items():
            for row in members:
                if row.get("schedule") == schedule:
                    axis.axhline(row[metric], color=color, linestyle=style, linewidth=1.2,
                                 label=f"{schedule} ({row[metric]:.3g})")
        axis.axvline(members[0]["depth_normalized"], color="black", linestyle=":", linewidth=1,
                     label=f"full depth {members[0]['depth_normalized']:.3g}")
        axis.set_xlim(left=0)
        axis.set_xlabel("normalized APL")
        axis.set_ylabel(metric)
        axis.set_title(" / ".join(part for part in (task, model) if part), fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out


def _column_label(row: Mapping[str, Any]) -> str:
    budget = row.get("budget_target")
    parts = [f"{row.get('budget_metric', 'budget')}\n{budget:g}" if budget is not None else "no budget"]
    if row.get("prior_lambda") is not None:
        parts.append(f"λ {row['prior_lambda']:g}")
    return "\n".join(parts)


def plot_core_maps(rows: Sequence[Mapping[str, Any]], path: PathLike,
                   schedules: Sequence[str] = ("early", "late")) -> Path:
    """PNG grid of per-layer nonlinear-fraction maps: a row of panels per (task, model), a panel per schedule in
    ``schedules``, in each panel one row per gated layer and one column per run, ordered by budget (largest
    first) then lambda; cells hold the nonlinear fraction (0 = all linear, 1 = all nonlinear). Rows need
    ``schedule``, ``layer_nonlinear`` and ``layer_units``; raises ``ValueError`` when no row has one of
    ``schedules``. Returns the path (its folder is created)."""
    from matplotlib.figure import Figure

    groups = _groups([r for r in rows if r.get("schedule") in schedules])
    if not groups:
        raise ValueError(f"No run with schedule in {list(schedules)} to draw a core map of.")
    layer_count = max(len(r["layer_units"]) for members in groups.values() for r in members)
    run_count = max(sum(r["schedule"] == s for r in members) for members in groups.values() for s in schedules)
    figure = Figure(figsize=(max(7.0, 2.2 + len(schedules) * (1.6 + 0.75 * run_count)),
                             len(groups) * (1.8 + 0.24 * layer_count)), layout="constrained")
    axes = figure.subplots(len(groups), len(schedules), squeeze=False)
    image = None
    for axes_row, ((task, model), members) in zip(axes, groups.items()):
        for axis, schedule in zip(axes_row, schedules):
            runs = sorted((r for r in members if r["schedule"] == schedule),
                          key=lambda r: (-(r.get("budget_target") if r.get("budget_target") is not None else math.inf),
                                         r.get("prior_lambda") or 0.0))
            axis.set_title(f"{' / '.join(p for p in (task, model) if p)}: {schedule}", fontsize=9)
            if not runs:
                axis.set_axis_off()
                continue
            names = list(runs[0]["layer_units"])
            values = np.array([[r["layer_nonlinear"][n] / r["layer_units"][n] for r in runs] for n in names])
            image = axis.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            labels, pattern = _short_labels(names)
            axis.set_yticks(range(len(names)), labels, fontsize=7 if len(names) > 24 else 8)
            axis.set_xticks(range(len(runs)), [_column_label(r) for r in runs], fontsize=7)
            if pattern:
                axis.set_ylabel(pattern, fontsize=7)
            if len(names) <= 48:
                for (i, j), value in np.ndenumerate(values):
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                              color="white" if value < 0.6 else "black")
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), label="nonlinear fraction of the layer", shrink=0.8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out
