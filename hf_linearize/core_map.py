"""Measure a patched model: its path graph, its average path length (APL) and its core-network map.

APL is the expected number of nonlinear units met on a path from the model's input to its output
(:mod:`hf_linearize.path_length`); the graph is read from a recorded forward pass of the model
(:mod:`hf_linearize.traced_graph`).
The *core-network map* lists, for every gated layer, its units, how many are still nonlinear, and what
the layer adds to each APL form. :func:`path_length_report` returns it as a JSON-serialisable dict,
:func:`save_report_json` writes it and :func:`plot_core_map` draws it as a PNG heatmap.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from torch import nn

from .families import find_family
from .patching import patch_state, summary
from .path_length import PathGraph, apl, node_contributions
from .probe_inputs import recorded_probe
from .traced_graph import Sites, TracedStructure, trace_structure

PathLike = Union[str, os.PathLike]
logger = logging.getLogger(__name__)


def unit_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per gated site of a patched model: ``(units, nonlinear units)``, by the rule of
    :func:`~hf_linearize.patching.summary`."""
    return {name: (layer["units"], layer["nonlinear"]) for name, layer in summary(model)["layers"].items()}


def _check_cost(ungated_cost: float) -> float:
    if isinstance(ungated_cost, bool) or not isinstance(ungated_cost, (int, float)) or not (
        math.isfinite(ungated_cost) and ungated_cost >= 0
    ):
        raise ValueError(f"ungated_cost must be a finite number >= 0; got {ungated_cost!r}.")
    return float(ungated_cost)


def traced_structure(model: nn.Module) -> TracedStructure:
    """The path-graph structure of a patched model, traced on its probe input the first time it is asked for and
    kept on the model's patch state (it does not depend on the gate values). Gated sites on no input-to-output path
    are logged once as a warning: they add nothing to the path length."""
    state = patch_state(model)
    if state.path_structure is None:
        try:
            inputs = recorded_probe(model, state.probe)
        except ValueError as error:  # no input to trace with: no graph, as for any model that cannot be traced
            raise NotImplementedError(f"No path graph: {error}") from None
        state.path_structure = trace_structure(model, inputs)
        off = state.path_structure.off_path(unit_counts(model))
        if off:
            logger.warning(f"Gated site(s) {off[:5]} lie on no path from the model's main input to its main output "
                           "in its forward pass (an auxiliary head, or values the model drops): they add 0 to the "
                           "path length.")
    return state.path_structure


def _graph(model: nn.Module, sites: Sites, ungated_cost: float) -> PathGraph:
    return traced_structure(model).graph(sites, _check_cost(ungated_cost))


def model_graph(model: nn.Module, ungated_cost: float = 0.0) -> PathGraph:
    """The path graph of a patched model, with its current nonlinear unit counts.

    ``ungated_cost`` (>= 0) is the constant each ungated nonlinearity (softmax, LayerNorm, ...) adds.
    The graph is traced from one forward pass on the model's probe input (:mod:`hf_linearize.traced_graph`).
    Raises ``ValueError`` for an unpatched model or a bad cost, ``NotImplementedError`` when the model cannot be
    traced (no probe input). Gated sites on no path from the main input to the main output are not in the graph
    (they add 0).
    """
    return _graph(model, unit_counts(model), ungated_cost)


def average_path_length(model: nn.Module, normalized: bool = True, ungated_cost: float = 0.0) -> float:
    """APL of a patched model: normalized (equal branches at every fork) or over all unit paths.

    0 when every gated unit is linear (and ``ungated_cost`` is 0); never increased by linearizing a unit.
    """
    return apl(model_graph(model, ungated_cost), normalized)


def _stack(name: str) -> str:
    parts = name.split(".")
    tower = next((part for part in parts if part.startswith(("text", "vision"))), None)  # dual encoders
    if tower is not None:
        return "text" if tower.startswith("text") else "vision"
    return next((stack for stack in ("encoder", "decoder") if stack in parts), "blocks")


def path_length_report(model: nn.Module, ungated_cost: float = 0.0) -> dict[str, Any]:
    """Both APL forms, the full depth and the core-network map of a patched model, as a JSON-ready dict.

    Keys: ``family``, ``ungated_cost``, ``normalized_apl``, ``unnormalized_apl``, ``depth`` (both forms of
    the APL with every gated unit nonlinear, i.e. of the freshly patched model), ``ungated_contribution``
    (both forms' share of the ungated costs), and ``layers``: per gated site (each expert of a fused MoE layer is
    one, ``…experts.<e>``) ``stack`` (``"encoder"``, ``"decoder"``, ``"text"``, ``"vision"`` or ``"blocks"``),
    ``units``, ``nonlinear``, ``nonlinear_fraction``, ``calls`` (the site's nodes in the graph: more than 1 for a
    module whose weights are reused at several depths, as ALBERT's layer; 0 for a site on no input-to-output path,
    which contributes 0), ``contribution_normalized`` and
    ``contribution_unnormalized``. Per form, the layer contributions plus the ungated contribution sum to the APL.
    """
    sites = unit_counts(model)
    structure = traced_structure(model)
    graph = structure.graph(sites, _check_cost(ungated_cost))
    contributions = {form: node_contributions(graph, form) for form in (True, False)}
    totals = {form: math.fsum(c.values()) for form, c in contributions.items()}
    nodes = {name: [] for name in sites} | structure.site_nodes()
    for name, (units, _) in sites.items():
        for node in nodes[name]:
            graph.set_nonlinear(node, units)
    layers = {
        name: {
            "stack": _stack(name),
            "units": units,
            "nonlinear": nonlinear,
            "nonlinear_fraction": nonlinear / units,
            "calls": len(nodes[name]),
            "contribution_normalized": math.fsum(contributions[True][graph.names[n]] for n in nodes[name]),
            "contribution_unnormalized": math.fsum(contributions[False][graph.names[n]] for n in nodes[name]),
        }
        for name, (units, nonlinear) in sites.items()
    }
    return {
        "family": find_family(model).name,
        "ungated_cost": float(ungated_cost),
        "normalized_apl": totals[True],
        "unnormalized_apl": totals[False],
        "depth": {"normalized": apl(graph, True), "unnormalized": apl(graph, False)},
        "ungated_contribution": {
            "normalized": totals[True] - math.fsum(c["contribution_normalized"] for c in layers.values()),
            "unnormalized": totals[False] - math.fsum(c["contribution_unnormalized"] for c in layers.values()),
        },
        "layers": layers,
    }


def save_report_json(report: dict[str, Any], path: PathLike) -> Path:
    """Write a :func:`path_length_report` as indented JSON (creating the folder when missing); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def _short_labels(names: list[str]) -> tuple[list[str], str]:
    """Drop the dotted prefix and suffix that all ``names`` share; return the labels and the shared pattern."""
    parts = [name.split(".") for name in names]
    shortest = min(len(p) for p in parts)
    if len(names) < 2 or shortest < 2:
        return names, ""
    pre = 0
    while pre < shortest - 1 and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while pre + suf < shortest - 1 and len({p[-1 - suf] for p in parts}) == 1:
        suf += 1
    if pre == suf == 0:
        return names, ""
    labels = [".".join(p[pre:len(p) - suf]) for p in parts]
    return labels, ".".join(parts[0][:pre] + ["*"] + parts[0][len(parts[0]) - suf:])


_COLUMNS = (
    ("nonlinear_fraction", "nonlinear\nfraction"),
    ("contribution_normalized", "APL contrib.\n(normalized)"),
    ("contribution_unnormalized", "APL contrib.\n(unnormalized)"),
)


def plot_core_map(report: dict[str, Any], path: PathLike) -> Path:
    """Draw the core-network map of a :func:`path_length_report` as a PNG heatmap at ``path`` (its folder is
    created when missing); return the path.

    One panel per stack (encoder and decoder side by side), one row per gated layer, and three columns:
    the nonlinear fraction and the two APL contributions, coloured relative to the largest value of the
    column; cells carry the values. Uses matplotlib's Agg canvas and never touches pyplot state.
    """
    from matplotlib.figure import Figure

    layers = report["layers"]
    if not layers:
        raise ValueError("The report has no gated layers to plot.")
    stacks: dict[str, list[str]] = {}
    for name, layer in layers.items():
        stacks.setdefault(layer["stack"], []).append(name)
    scale = [max(max(layer[key] for layer in layers.values()), 1e-300) for key, _ in _COLUMNS]
    rows = max(len(names) for names in stacks.values())
    fig = Figure(figsize=(max(6.0, 1.2 + 3.6 * len(stacks)), 2.0 + 0.26 * rows), layout="constrained")
    axes = fig.subplots(1, len(stacks), squeeze=False)[0]
    for ax, (stack, names) in zip(axes, stacks.items()):
        values = np.array([[layers[n][key] for key, _ in _COLUMNS] for n in names])
        image = ax.imshow(values / scale, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        labels, pattern = _short_labels(names)
        ax.set_yticks(range(len(names)), labels, fontsize=7 if rows > 24 else 9)
        ax.set_xticks(range(len(_COLUMNS)), [label for _, label in _COLUMNS], fontsize=8)
        ax.set_title(f"{stack} ({len(names)} layers)" + (f"\n{pattern}" if pattern else ""), fontsize=9)
        ax.set_ylabel("gated layer", fontsize=8)
        if rows <= 48:
            for (i, j), value in np.ndenumerate(values):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6 if rows > 24 else 8,
                        color="white" if value / scale[j] < 0.6 else "black")
    fig.colorbar(image, ax=list(axes), label="value / column maximum", shrink=0.8)
    depth = report["depth"]
    fig.suptitle(
        f"{report['family']} core-network map\nAPL {report['normalized_apl']:.3f} of {depth['normalized']:.3f} "
        f"(normalized), {report['unnormalized_apl']:.3f} of {depth['unnormalized']:.3f} (unnormalized)",
        fontsize=10,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
