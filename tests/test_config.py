"""LinearizeConfig: validation and JSON round trip."""

from __future__ import annotations

import pytest

from hf_linearize import LinearizeConfig


def test_json_round_trip(tmp_path):
    config = LinearizeConfig(target_modules=["activation_fn"], exclude_modules=r".*decoder.*", gate_init=0.25,
                             prior_lambda=2.0, prior_start=0.5, prior_warmup=100, freeze_gates_after=0.9,
                             budget_target=0.3, gate_lr=1e-2, budget_gain=0.05, budget_tolerance=0.01,
                             budget_scale=0.1, extra={"note": "x"})
    path = tmp_path / "linearize_config.json"
    config.to_json_file(path)
    loaded = LinearizeConfig.from_json_file(path)
    assert loaded == config
    assert isinstance(loaded.prior_start, float) and isinstance(loaded.prior_warmup, int)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gate_init": 1.5}, r"gate_init=1.5 is out of range; it must lie in \[0.0, 1.0\]"),
        ({"gate_init": "0"}, "gate_init must be a finite number"),
        ({"linear_threshold": 0.0}, r"linear_threshold=0.0 is out of range"),
        ({"prior_lambda": -1.0}, "prior_lambda=-1.0 is out of range"),
        ({"prior_start": 1.5}, "a float is a fraction of training, write an int for a step"),
        ({"prior_start": -3}, "negative step"),
        ({"prior_warmup": None}, "prior_warmup must be an int step or a float fraction"),
        ({"freeze_gates_after": True}, "freeze_gates_after must be an int step"),
        ({"target_modules": []}, "target_modules must be None, a regex string or a non-empty list"),
        ({"exclude_modules": [3]}, "exclude_modules must be None"),
        ({"budget_metric": "apl"}, "budget_metric='apl' is unknown"),
        ({"budget_target": 1.2}, "budget_target=1.2 is out of range"),
        ({"gate_lr": 0.0}, "gate_lr=0.0 is out of range"),
        ({"freeze_linear": 1}, "freeze_linear must be a bool"),
        ({"budget_gain": 0.0}, r"budget_gain=0.0 is out of range; it must lie in \(0.0, inf\]"),
        ({"budget_gain": "fast"}, "budget_gain must be a finite number"),
        ({"budget_gain": float("inf")}, "budget_gain must be a finite number; got inf"),
        ({"prior_lambda": float("nan")}, "prior_lambda must be a finite number; got nan"),
        ({"budget_tolerance": -0.01}, r"budget_tolerance=-0.01 is out of range; it must lie in \[0.0, inf\]"),
        ({"budget_scale": 0.0}, "budget_scale=0.0 is out of range"),
        ({"budget_scale": -1.0}, "budget_scale=-1.0 is out of range"),
    ],
)
def test_invalid_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearizeConfig(**kwargs)


def test_apl_budget_may_exceed_one():
    assert LinearizeConfig(budget_metric="normalized_apl", budget_target=4.5).budget_target == 4.5


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match=r"Unknown LinearizeConfig field\(s\) \['gate_int'\]"):
        LinearizeConfig.from_dict({"gate_int": 0.0})
