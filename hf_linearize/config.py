"""`LinearizeConfig`: every setting of a linearization run, validated, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

Pattern = Union[str, list[str], None]
"""A module selector: a regex (full match on the dotted module name), a list of name suffixes, or None."""

Schedule = Union[int, float, None]
"""A training position: an int is an optimizer step (>= 0); a float in [0, 1] is a fraction of all steps."""

BUDGET_METRICS = ("nonlinear_fraction", "normalized_apl")
"""The metrics a budget can hold (``LinearizeConfig.budget_metric``)."""

LAMBDA_BOUNDS = (1e-6, 1e6)
"""Bounds ``(min, max)`` of the budget controller's stored prior weight lambda."""

DEFAULT_FRACTION_BUDGET_SCALE = 0.05
"""``budget_scale`` used when None and the budget metric is ``nonlinear_fraction``."""

DEFAULT_APL_BUDGET_SCALE_RATIO = 0.05
"""``budget_scale`` used when None and the metric is ``normalized_apl``: this share of the first measured value."""


def _setting(default: Any, help: str) -> Any:
    """A `LinearizeConfig` field with its description (``metadata["help"]``, also the recipe flag's help text)."""
    return field(default=default, metadata={"help": help})


def _check_pattern(name: str, value: Pattern) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise ValueError(
        f"LinearizeConfig.{name} must be None, a regex string or a non-empty list of module-name suffixes; "
        f"got {value!r}."
    )


def check_schedule(owner: str, name: str, value: Schedule, allow_none: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is a training position: an int step >= 0 or a float in [0, 1]
    (or None when ``allow_none``). ``owner.name`` names the field in the message."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{name} must be an int step or a float fraction in [0, 1]; got {value!r}.")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{owner}.{name}={value} is a negative step; use a step >= 0.")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{owner}.{name}={value} is a float outside [0, 1]; a float is a fraction of training, "
            "write an int for a step number."
        )


def _check_range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"LinearizeConfig.{name} must be a finite number; got {value!r}.")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"LinearizeConfig.{name}={value} is out of range; it must lie in {bracket}{low}, {high}].")


@dataclass
class LinearizeConfig:
    """Settings for patching (which activations get gates, how they start) and for the training prior.

    Gate value ``a`` of a unit lies in [0, 1]: 0 is the original nonlinearity, 1 is exactly linear.
    """

    # --- patching -------------------------------------------------------------------------------
    target_modules: Pattern = _setting(
        None, "Activation modules to gate: regex (full match) or list of name suffixes. None = the family default.")
    exclude_modules: Pattern = _setting(None, "Modules never to gate, same syntax as target_modules.")
    gate_init: float = _setting(
        0.0, "Initial gate value of every unit, in [0, 1]. 0 keeps the model's function exactly.")
    linear_threshold: float = _setting(
        1e-3, "A unit with gate >= 1 - linear_threshold counts as linear (and is snapped to exactly 1 in training); "
        "in (0, 0.5].")

    # --- training prior (used by LinearizeTrainer) ---------------------------------------------
    prior_lambda: float = _setting(
        0.0, "Weight of the L1 prior lambda * mean(1 - a) over all gated units; >= 0. 0 without a budget trains the "
        "model with every gate held where it is. With budget_target it is the controller's starting lambda "
        "(0 = 1.0).")
    prior_start: Schedule = _setting(
        0, "When the prior switches on (int step or float fraction of training). 0 = from the start (early); "
        "later = late. Before it the gates are held.")
    prior_warmup: Schedule = _setting(
        0, "Length (int steps or float fraction) of the linear ramp of lambda from 0 to prior_lambda after "
        "prior_start.")
    freeze_gates_after: Schedule = _setting(
        None, "After this point (int step or float fraction) the gates stop changing. None = never.")
    freeze_linear: bool = _setting(True, "Once a unit is snapped to exactly 1 it stays there.")
    gate_lr: Optional[float] = _setting(
        None, "Learning rate of the gate parameter group (no weight decay); > 0. None = the model learning rate.")
    budget_target: Optional[float] = _setting(
        None, "If set, a controller adjusts lambda to reach this value of budget_metric and hold it.")
    budget_metric: str = _setting(
        "nonlinear_fraction", "What the budget measures: 'nonlinear_fraction' (in [0, 1]) or 'normalized_apl' (>= 0).")
    budget_gain: float = _setting(
        0.01, "Budget controller: change of log(lambda) per optimizer step at full error; > 0.")
    budget_tolerance: float = _setting(
        0.02, "Budget controller: the target counts as reached once |measured - target| <= budget_tolerance; >= 0.")
    budget_scale: Optional[float] = _setting(
        None, "Budget controller: error (in metric units) at which its step saturates; > 0. None = "
        f"{DEFAULT_FRACTION_BUDGET_SCALE} for 'nonlinear_fraction', {DEFAULT_APL_BUDGET_SCALE_RATIO:.0%} of the "
        "first measured value for 'normalized_apl'.")
    extra: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Free-form metadata carried along in saved checkpoints (JSON-serialisable mapping)."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and its allowed values."""
        _check_pattern("target_modules", self.target_modules)
        _check_pattern("exclude_modules", self.exclude_modules)
        _check_range("gate_init", self.gate_init, 0.0, 1.0)
        _check_range("linear_threshold", self.linear_threshold, 0.0, 0.5, low_open=True)
        _check_range("prior_lambda", self.prior_lambda, 0.0, float("inf"))
        check_schedule("LinearizeConfig", "prior_start", self.prior_start, allow_none=False)
        check_schedule("LinearizeConfig", "prior_warmup", self.prior_warmup, allow_none=False)
        check_schedule("LinearizeConfig", "freeze_gates_after", self.freeze_gates_after, allow_none=True)
        if not isinstance(self.freeze_linear, bool):
            raise ValueError(f"LinearizeConfig.freeze_linear must be a bool; got {self.freeze_linear!r}.")
        if self.gate_lr is not None:
            _check_range("gate_lr", self.gate_lr, 0.0, float("inf"), low_open=True)
        if self.budget_metric not in BUDGET_METRICS:
            raise ValueError(
                f"LinearizeConfig.budget_metric={self.budget_metric!r} is unknown; use one of {BUDGET_METRICS}."
            )
        if self.budget_target is not None:
            high = 1.0 if self.budget_metric == "nonlinear_fraction" else float("inf")
            _check_range("budget_target", self.budget_target, 0.0, high)
        _check_range("budget_gain", self.budget_gain, 0.0, float("inf"), low_open=True)
        _check_range("budget_tolerance", self.budget_tolerance, 0.0, float("inf"))
        if self.budget_scale is not None:
            _check_range("budget_scale", self.budget_scale, 0.0, float("inf"), low_open=True)
        if not isinstance(self.extra, dict):
            raise ValueError(f"LinearizeConfig.extra must be a dict; got {type(self.extra).__name__}.")

    # --- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearizeConfig:
        """Build from a dict; unknown keys raise so that a typo is never silently ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"LinearizeConfig.from_dict expects a dict; got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LinearizeConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> LinearizeConfig:
        return cls.from_dict(json.loads(text))

    def to_json_file(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string() + "\n")

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> LinearizeConfig:
        with open(path, encoding="utf-8") as fh:
            return cls.from_json_string(fh.read())
