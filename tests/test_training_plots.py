"""Training curves from a Trainer log history."""

from __future__ import annotations

import matplotlib.image
import pytest

from hf_linearize.training_plots import plot_training_curves


def test_writes_one_panel_per_logged_metric(tmp_path):
    history = [{"step": s, "loss": 3.0 / s, "linearize/nonlinear_fraction": 1 - s / 10,
                "linearize/apl_normalized": 2 * (1 - s / 10)} for s in range(1, 6)] + [{"train_runtime": 1.0}]
    path = plot_training_curves(history, tmp_path / "plots" / "curves.png")
    image = matplotlib.image.imread(path)
    wide = plot_training_curves(history + [{"step": 6, "linearize/lambda": 1.0}], tmp_path / "more.png")
    assert matplotlib.image.imread(wide).shape[1] > image.shape[1] > image.shape[0]


def test_no_metrics_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="No linearization metrics"):
        plot_training_curves([{"epoch": 1.0}], tmp_path / "x.png")
