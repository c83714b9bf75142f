"""Curves of a linearization run over training, from ``Trainer.state.log_history``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

from matplotlib.figure import Figure

CURVES = (
    ("linearize/nonlinear_fraction", "nonlinear fraction"),
    ("linearize/apl_normalized", "normalized APL"),
    ("linearize/apl_unnormalized", "unnormalized APL"),
    ("linearize/lambda", "prior lambda"),
    ("loss", "training loss"),
)
"""(log key, axis title) of each panel."""


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: Union[str, os.PathLike]) -> Path:
    """Write a PNG with one panel per logged quantity in :data:`CURVES`, against the optimizer step.

    Panels whose key never appears in ``log_history`` are left out; raises ``ValueError`` if none appears.
    """
    series = {
        key: [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        for key, _ in CURVES
    }
    present = [(key, title) for key, title in CURVES if series[key]]
    if not present:
        raise ValueError(f"No linearization metrics in the log history; expected some of {[k for k, _ in CURVES]}.")
    figure = Figure(figsize=(4.0 * len(present), 3.2), constrained_layout=True)
    for axis, (key, title) in zip(figure.subplots(1, len(present), squeeze=False)[0], present):
        steps, values = zip(*series[key])
        axis.plot(steps, values, marker=".")
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out
