"""What a recipe run leaves in its output folder besides the checkpoint: ``results.json``, ``plots/`` and a
one-line summary on stdout. Shared by the translation and the vision recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .core_map import plot_core_map
from .training_plots import plot_training_curves


def write_run_outputs(output_dir: Path, results: dict[str, Any], log_history: Optional[list[dict[str, Any]]],
                      headline: str) -> None:
    """Write ``plots/training_curves.png`` (when the run trained: ``log_history`` given), ``plots/core_map.png``
    from ``results["path_length"]`` and ``results.json``, then print ``headline`` (the task metric) next to the
    normalized APL and the nonlinear fraction of ``results``."""
    report = results["path_length"]
    plots = Path(output_dir) / "plots"
    if log_history is not None:
        plot_training_curves(log_history, plots / "training_curves.png")
    plot_core_map(report, plots / "core_map.png")
    (Path(output_dir) / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n",
                                                   encoding="utf-8")
    print(f"\n{headline}  normalized APL {report['normalized_apl']:.3f} of {report['depth']['normalized']:.3f}  "
          f"nonlinear fraction {results['summary']['total']['nonlinear_fraction']:.3f}\noutputs in {output_dir}")
