"""Training-side math for gate tensors: L1 prior, projection, snapping/freezing, schedule, budget controller.

Everything here works on a sequence of 1-D floating gate tensors ``alphas`` (``GatedActivation.alpha``,
fp32, values in [0, 1]; 0 = original nonlinearity, 1 = exactly linear) and knows nothing about models or
the Trainer. A unit is *linear* when ``a >= 1 - eps`` (``eps`` = ``LinearizeConfig.linear_threshold``).

Step convention: ``step`` is the number of optimizer steps already completed, i.e. 0 for the first update
(``TrainerState.global_step`` inside that update's loss and optimizer hooks).

Order of calls for one optimizer step (what `GateRegularizer` does)::

    loss = task_loss + reg.loss(step)          # prior_loss(alphas, lambda_at(step))
    loss.backward()
    reg.before_step(step)                      # zero grads of frozen units (all units while gates are held)
    optimizer.step()
    reg.after_step(step)                       # re-pin frozen units, snap + freeze, clamp, budget update

The gates move only while the prior acts on them: before ``start``, from ``freeze_after`` on, and for a whole run
whose prior weight is 0 without a budget, every gate is held where it is (`GateRegularizer.gates_held`).

Sharded gates. A gate tensor may be a ``DTensor`` (FSDP2's ``fully_shard`` shards every parameter on dim 0), and
then every function here must be called on all ranks alike (they communicate). The prior sums each tensor over its
shards (an all-reduce whose backward gives every unit its own gradient, ``-lam / N``, on the rank that holds it,
sharded like the gate). Everything that looks at more than one unit (snapping with its global ``max_new`` choice,
the frozen-unit masks, the counts) works on whole tensors: the gates (or their gradients) are gathered to every
rank, changed there identically, and each rank writes its own shard back. Masks are whole plain tensors on every
rank, so the counts, the budget controller and `LinearUnitTracker.state_dict` are global and the same everywhere.
Elementwise updates that need no mask (clamping, holding the gates) run on the shards as they are.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

from .config import (
    BUDGET_METRICS,
    DEFAULT_APL_BUDGET_SCALE_RATIO,
    DEFAULT_FRACTION_BUDGET_SCALE,
    LAMBDA_BOUNDS,
    LinearizeConfig,
    Schedule,
    check_schedule,
)

__all__ = [
    "BudgetController",
    "GateRegularizer",
    "LinearUnitTracker",
    "PriorSchedule",
    "gate_stats",
    "linear_counts",
    "linear_quota",
    "prior_loss",
    "project_",
    "snap_",
    "whole_tensors",
]

Alphas = Sequence[torch.Tensor]
Position = Schedule
"""A training position: an int is an optimizer step (>= 0); a float in [0, 1] is a fraction of all steps."""

_DEFAULTS = LinearizeConfig()
"""The default settings: keyword defaults below are read from it, so that each lives in `LinearizeConfig` only."""

_SLACK = 1e-6
"""A measured budget value within this of the target counts as at the target (absorbs float rounding)."""


def _check_alphas(alphas: Alphas) -> None:
    if len(alphas) == 0:
        raise ValueError("No gate tensors given: patch the model first (hf_linearize.patch_model).")
    for i, a in enumerate(alphas):
        if a.dim() != 1 or not a.is_floating_point():
            raise ValueError(f"Gate tensor {i} must be 1-D floating point; got {a.dtype}, shape {tuple(a.shape)}.")


@functools.lru_cache(maxsize=None)
def _thresholds(eps: float, dtype: torch.dtype) -> tuple[float, float]:
    """``(thr, cap)`` in ``dtype``: a unit is linear iff ``a >= thr``; ``cap`` is the largest value below ``thr``."""
    if not 0.0 < eps <= 0.5:
        raise ValueError(f"eps={eps} is out of range; it must lie in (0, 0.5].")
    thr = torch.tensor(1.0 - eps, dtype=dtype)
    return float(thr), float(torch.nextafter(thr, torch.zeros((), dtype=dtype)))


def _counts(masks: Sequence[torch.Tensor]) -> list[int]:
    """Number of True entries of each bool tensor, with a single device sync."""
    dev = masks[0].device
    return torch.stack([m.sum().to(dev) for m in masks]).tolist()


def whole_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor whole, as a ``torch.Tensor``: a ``DTensor`` is gathered (on every rank: call on all ranks), any
    other tensor is returned as it is (not copied)."""
    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


@contextlib.contextmanager
def _in_place(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Yield :func:`whole_tensors` of ``tensors`` to change in place; on leaving, each ``DTensor`` takes its own shard
    back from its changed whole copy (every rank changes identical copies identically, so the shards stay
    consistent)."""
    whole = whole_tensors(tensors)
    yield whole
    for t, w in zip(tensors, whole):
        if isinstance(t, DTensor):
            t.copy_(distribute_tensor(w, t.device_mesh, t.placements, src_data_rank=None))


def _sum(a: torch.Tensor) -> torch.Tensor:
    """``a.sum()`` in fp32 as a 0-dim ``torch.Tensor``. A ``DTensor``'s local sums are all-reduced, so that the
    gradient reaches each unit once, on the rank that holds it, placed as ``a`` is (a ``Shard(0)`` gradient of a
    ``Shard(0)`` parameter: what FSDP2 adds its reduced gradient to). ``a.sum().full_tensor()`` would give every rank
    a replicated gradient of the whole tensor instead."""
    if not isinstance(a, DTensor):
        return a.sum(dtype=torch.float32)
    local = a.to_local().sum(dtype=torch.float32)
    placements = [Partial() if p.is_shard() else Replicate() for p in a.placements]
    return DTensor.from_local(local, a.device_mesh, placements).full_tensor()


def prior_loss(alphas: Alphas, lam: float) -> torch.Tensor:
    """``lam * mean(1 - a)`` over all units of all tensors: a 0-dim fp32 ``torch.Tensor`` on ``alphas[0].device``.

    Computed as ``lam * (1 - sum_i a.sum() / N)`` (no concatenation), in fp32 even under autocast; a ``DTensor``'s
    sum is all-reduced over its shards. Gradient: ``-lam / N`` for every unit, N = total number of units (for a
    ``DTensor``, on its own shard, with its placements).
    """
    _check_alphas(alphas)
    dev = alphas[0].device
    n = sum(a.numel() for a in alphas)
    total = torch.stack([_sum(a).to(dev) for a in alphas]).sum()
    return lam * (1.0 - total / n)


@torch.no_grad()
def project_(alphas: Alphas) -> None:
    """Clamp every gate into [0, 1] in place (elementwise: on each shard of a ``DTensor``)."""
    for a in alphas:
        a.clamp_(0.0, 1.0)


@torch.no_grad()
def snap_(
    alphas: Alphas, eps: float, masks: Optional[Sequence[torch.Tensor]] = None, max_new: Optional[int] = None
) -> int:
    """Set units with ``a >= 1 - eps`` to exactly 1.0 in place; return how many were newly snapped.

    ``masks`` (optional): one bool tensor per gate tensor marking units already linear; newly snapped units
    are OR-ed in. Without masks a unit already exactly 1.0 counts as already linear.
    ``max_new`` (optional): snap at most this many new units, those with the largest (pre-clamp) gate values,
    ties broken by position; the other candidates are set to the largest value below ``1 - eps``, so after
    the call a unit counts as linear iff it is already linear or was snapped now.
    """
    _check_alphas(alphas)
    if masks is not None and len(masks) != len(alphas):
        raise ValueError(f"Got {len(masks)} masks for {len(alphas)} gate tensors.")
    if max_new is not None and max_new < 0:
        raise ValueError(f"max_new={max_new} must be >= 0.")
    with _in_place(alphas) as whole:
        return _snap_whole(whole, eps, masks, max_new)


def _snap_whole(
    alphas: Alphas, eps: float, masks: Optional[Sequence[torch.Tensor]], max_new: Optional[int]
) -> int:
    """`snap_` on whole (not sharded) gate tensors."""
    above, new = [], []
    for i, a in enumerate(alphas):
        thr, _ = _thresholds(eps, a.dtype)
        ab = a >= thr
        already = masks[i] if masks is not None else a == 1.0
        above.append(ab)
        new.append(ab & ~already)
    counts = _counts(new)
    chosen = new
    if max_new is not None and sum(counts) > max_new:
        dev = alphas[0].device
        values = torch.cat([a[c].float().to(dev) for a, c in zip(alphas, new)])
        keep = torch.zeros_like(values, dtype=torch.bool)
        keep[torch.sort(values, descending=True, stable=True).indices[:max_new]] = True
        chosen = []
        for c, part in zip(new, keep.split(counts)):
            sel = torch.zeros_like(c)
            sel[c] = part.to(c.device)
            chosen.append(sel)
    for i, a in enumerate(alphas):
        rejected = new[i] & ~chosen[i]
        a.masked_fill_(above[i] & ~rejected, 1.0).masked_fill_(rejected, _thresholds(eps, a.dtype)[1])
        if masks is not None:
            masks[i] |= chosen[i]
    n_new = sum(counts)
    return n_new if max_new is None else min(n_new, max_new)


def _masked_fill_(tensors: Alphas, masks: Sequence[torch.Tensor], value: float) -> None:
    """Set the entries of each tensor (gates or their gradients, sharded or not) where its whole mask is True."""
    with _in_place(tensors) as whole:
        for t, m in zip(whole, masks):
            t.masked_fill_(m, value)


@torch.no_grad()
def linear_counts(alphas: Alphas, eps: float) -> list[int]:
    """Per gate tensor, the number of linear units (``a >= 1 - eps``) over all its shards."""
    _check_alphas(alphas)
    return _counts([a >= _thresholds(eps, a.dtype)[0] for a in whole_tensors(alphas)])


@torch.no_grad()
def gate_stats(alphas: Alphas, eps: float) -> dict[str, float]:
    """Counts over all units: ``total_units``, ``linear_units`` (``a >= 1 - eps``), ``nonlinear_units``
    (ints) and ``nonlinear_fraction`` (float in [0, 1])."""
    linear = sum(linear_counts(alphas, eps))
    total = sum(a.numel() for a in alphas)
    return {
        "total_units": total,
        "linear_units": linear,
        "nonlinear_units": total - linear,
        "nonlinear_fraction": (total - linear) / total,
    }


def linear_quota(target_fraction: float, total_units: int) -> int:
    """Most units that may be linear for a nonlinear-fraction target: ``N - floor(target * N)``.

    At the quota the nonlinear fraction is ``floor(target * N) / N``: at most the target, less than ``1 / N``
    below it.
    """
    if not 0.0 <= target_fraction <= 1.0:
        raise ValueError(f"target_fraction={target_fraction} must lie in [0, 1].")
    return total_units - math.floor(target_fraction * total_units + _SLACK)


class LinearUnitTracker:
    """Which units are linear (exactly 1.0) and, with ``freeze=True``, keeps them at exactly 1.0 for good.

    Args:
        alphas: the gate tensors. With ``freeze``, units already at ``a >= 1 - eps`` are snapped and frozen at once
            (within ``max_linear``), so that no gradient step can move them.
        eps: a unit is linear when ``a >= 1 - eps``.
        freeze: snapped units never move again (``LinearizeConfig.freeze_linear``). Without it the masks
            are the units linear after the last `update`, and a unit may leave.
        max_linear: hard cap on the number of linear units (see `linear_quota`); None = no cap. Units
            that would exceed it are held just below ``1 - eps``; frozen units are never released.

    Per optimizer step: `mask_grads_` before ``optimizer.step()``, `update` after it.
    """

    def __init__(self, alphas: Alphas, eps: float, freeze: bool = True, max_linear: Optional[int] = None) -> None:
        _check_alphas(alphas)
        _thresholds(eps, torch.float32)
        if max_linear is not None and max_linear < 0:
            raise ValueError(f"max_linear={max_linear} must be >= 0 or None.")
        self.eps = eps
        self.freeze = freeze
        self.max_linear = max_linear
        self.masks = [torch.zeros(a.shape, dtype=torch.bool, device=a.device) for a in alphas]
        if freeze:  # units linear already (one-shot linearization, a resumed prior) are frozen before any step
            snap_(alphas, eps, self.masks, max_linear)

    @property
    def linear_units(self) -> int:
        return sum(_counts(self.masks))

    def _check(self, alphas: Alphas) -> None:
        if [tuple(a.shape) for a in alphas] != [tuple(m.shape) for m in self.masks]:
            raise ValueError("The gate tensors do not match the shapes this tracker was built for.")

    @torch.no_grad()
    def enforce_(self, alphas: Alphas) -> None:
        """With ``freeze``: set every frozen unit to exactly 1.0 (undoes optimizer momentum/weight decay)."""
        self._check(alphas)
        if self.freeze:
            _masked_fill_(alphas, self.masks, 1.0)

    @torch.no_grad()
    def mask_grads_(self, alphas: Alphas) -> None:
        """With ``freeze``: zero the gradient of every frozen unit (call before ``optimizer.step()``)."""
        self._check(alphas)
        if self.freeze:
            with_grad = [i for i, a in enumerate(alphas) if a.grad is not None]
            _masked_fill_([alphas[i].grad for i in with_grad], [self.masks[i] for i in with_grad], 0.0)

    @torch.no_grad()
    def update(self, alphas: Alphas) -> int:
        """After ``optimizer.step()``: re-pin frozen units, snap new linear units (within ``max_linear``),
        clamp everything into [0, 1]. Returns the number of newly linear units."""
        self._check(alphas)
        with _in_place(alphas) as whole:
            if self.freeze:
                self.enforce_(whole)
            else:
                for a, m in zip(whole, self.masks):
                    m &= a >= _thresholds(self.eps, a.dtype)[0]
            max_new = None if self.max_linear is None else max(0, self.max_linear - self.linear_units)
            newly = snap_(whole, self.eps, self.masks, max_new)
            project_(whole)
        return newly

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"masks": [m.detach().cpu().clone() for m in self.masks]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        masks = state["masks"]
        if [tuple(m.shape) for m in masks] != [tuple(m.shape) for m in self.masks]:
            raise ValueError("Saved linear-unit masks do not match the gate tensors of this model.")
        self.masks = [s.to(device=m.device, dtype=torch.bool).clone() for s, m in zip(masks, self.masks)]


@dataclass(frozen=True)
class PriorSchedule:
    """When the prior acts and how strongly. Positions: int = optimizer step, float in [0, 1] = fraction
    of ``total_steps`` (rounded to the nearest step; resolve them with `resolve`).

    * ``step < start``: off (``lambda_at = 0``); `GateRegularizer` holds the gates.
    * ``start <= step``: on, ``lambda_at(start + k) = lam * min(1, (k + 1) / warmup)`` (``warmup = 0``: ``lam``).
    * ``step >= freeze_after``: all gates frozen; the prior is off again.
    """

    start: Position = 0
    warmup: Position = 0
    freeze_after: Position = None
    lam: float = 0.0

    def __post_init__(self) -> None:
        check_schedule("PriorSchedule", "start", self.start, allow_none=False)
        check_schedule("PriorSchedule", "warmup", self.warmup, allow_none=False)
        check_schedule("PriorSchedule", "freeze_after", self.freeze_after, allow_none=True)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 <= self.lam < math.inf:
            raise ValueError(f"PriorSchedule.lam must be a finite number >= 0; got {self.lam!r}.")

    @classmethod
    def from_config(cls, config: LinearizeConfig) -> PriorSchedule:
        return cls(config.prior_start, config.prior_warmup, config.freeze_gates_after, config.prior_lambda)

    def resolve(self, total_steps: Optional[int]) -> PriorSchedule:
        """A copy with every position as an int step. A float 0.0 needs no ``total_steps``; any other
        fraction with ``total_steps=None`` raises ``ValueError``."""
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 0):
            raise ValueError(f"total_steps must be an int >= 0 or None; got {total_steps!r}.")

        def to_step(name: str, value: Position) -> Optional[int]:
            if not isinstance(value, float):
                return value
            if value == 0.0:
                return 0
            if total_steps is None:
                raise ValueError(
                    f"PriorSchedule.{name}={value} is a fraction of training, but the total number of optimizer "
                    "steps is unknown; set max_steps (or num_train_epochs with a sized dataset) or give an int step."
                )
            return int(round(value * total_steps))

        return replace(self, start=to_step("start", self.start), warmup=to_step("warmup", self.warmup),
                       freeze_after=to_step("freeze_after", self.freeze_after))

    def _steps(self) -> tuple[int, int, Optional[int]]:
        for name in ("start", "warmup", "freeze_after"):
            if isinstance(getattr(self, name), float):
                raise ValueError(f"PriorSchedule.{name} is a fraction of training; call resolve(total_steps) first.")
        return self.start, self.warmup, self.freeze_after  # type: ignore[return-value]

    def gates_frozen(self, step: int) -> bool:
        """True from ``freeze_after`` on: gates no longer change."""
        freeze_after = self._steps()[2]
        return freeze_after is not None and step >= freeze_after

    def active(self, step: int) -> bool:
        """True while the prior is on: ``start <= step`` and the gates are not frozen."""
        return step >= self._steps()[0] and not self.gates_frozen(step)

    def ramp(self, step: int) -> float:
        """Multiplier of ``lam`` at ``step``, in [0, 1]."""
        if not self.active(step):
            return 0.0
        start, warmup, _ = self._steps()
        return 1.0 if warmup == 0 else min(1.0, (step - start + 1) / warmup)

    def lambda_at(self, step: int) -> float:
        """Prior weight for the loss of update ``step``: ``lam * ramp(step)``."""
        return self.lam * self.ramp(step)


class BudgetController:
    """Adjust the prior weight lambda so that a budget metric reaches ``target`` and stays there.

    The metric must fall as gates linearize (nonlinear fraction, normalized APL). Each `update` gets the
    value measured after an optimizer step and applies a saturating integral law in log space::

        e = measured - target
        log(lam) += gain * clip(e / scale, -1, 1)          then clipped to [lambda_min, lambda_max]

    * far above the target lambda grows geometrically (``exp(gain)`` per update), so no prior
      knowledge of its magnitude is needed (it spans orders of magnitude between models);
    * within ``scale`` of the target the growth slows in proportion to the error;
    * once ``measured <= target`` (within 1e-6) the effective lambda (`lam`) is 0, so no further unit is
      pushed to linearity; frozen linear units cannot come back, so overshoot would be permanent. If units
      drift back (``freeze=False``) the prior restarts from the stored (slowly decaying) lambda.

    Lambda only grows geometrically from ``init_lambda``, so start below what the target needs: a start far
    above it sends many units to linearity at once before any measurement reacts.

    Hard guarantee for a nonlinear-fraction target: give the tracker ``max_linear = linear_quota(target, N)``
    (`GateRegularizer` does); the fraction then never falls below ``floor(target * N) / N``.

    Args:
        target: value of the budget metric to reach.
        init_lambda: starting lambda (> 0), e.g. ``prior_lambda`` or 1.0.
        gain: log-lambda step per update at full error.
        scale: error (metric units) at which the law saturates; None = ``DEFAULT_APL_BUDGET_SCALE_RATIO`` (5%) of
            the first measured value.
        tolerance: ``reached_step`` is the first step with ``|measured - target| <= tolerance``.
        lambda_min, lambda_max: bounds of the stored lambda (default ``config.LAMBDA_BOUNDS``).
    """

    def __init__(
        self,
        target: float,
        init_lambda: float = 1.0,
        gain: float = _DEFAULTS.budget_gain,
        scale: Optional[float] = None,
        tolerance: float = _DEFAULTS.budget_tolerance,
        lambda_min: float = LAMBDA_BOUNDS[0],
        lambda_max: float = LAMBDA_BOUNDS[1],
    ) -> None:
        if not 0.0 < lambda_min <= init_lambda <= lambda_max < math.inf:
            raise ValueError(
                f"Need 0 < lambda_min <= init_lambda <= lambda_max < inf; "
                f"got {lambda_min}, {init_lambda}, {lambda_max}."
            )
        if not (target >= 0.0 and gain > 0.0 and tolerance >= 0.0 and (scale is None or scale > 0.0)):
            raise ValueError(
                f"Need target >= 0, gain > 0, tolerance >= 0, scale > 0 or None; got {target}, {gain}, {tolerance}, "
                f"{scale}."
            )
        self.target = target
        self.gain = gain
        self.tolerance = tolerance
        self.log_lambda_min = math.log(lambda_min)
        self.log_lambda_max = math.log(lambda_max)
        self.scale = scale
        self.log_lambda = math.log(init_lambda)
        self.last_measured: Optional[float] = None
        self.reached_step: Optional[int] = None

    @property
    def error(self) -> Optional[float]:
        """``measured - target`` of the last update (None before the first); the final error after training."""
        return None if self.last_measured is None else self.last_measured - self.target

    @property
    def lam(self) -> float:
        """Lambda to use now: 0 once the target is met, else the stored lambda."""
        err = self.error
        return 0.0 if err is not None and err <= _SLACK else math.exp(self.log_lambda)

    def update(self, measured: float, step: int) -> float:
        """Record the metric measured after update ``step``; return the new `lam`."""
        if not math.isfinite(measured):
            raise ValueError(f"Measured budget metric is not finite: {measured}.")
        if self.scale is None:
            self.scale = max(DEFAULT_APL_BUDGET_SCALE_RATIO * abs(measured), 1e-6)
        self.last_measured = measured
        err = measured - self.target
        step_size = self.gain * max(-1.0, min(1.0, err / self.scale))
        self.log_lambda = max(self.log_lambda_min, min(self.log_lambda_max, self.log_lambda + step_size))
        if self.reached_step is None and abs(err) <= self.tolerance:
            self.reached_step = step
        return self.lam

    @classmethod
    def from_config(cls, config: LinearizeConfig) -> BudgetController:
        """The controller of ``config.budget_target``: starts at ``prior_lambda`` (0 = 1.0) with ``budget_gain``,
        ``budget_tolerance`` and ``budget_scale`` (None = ``DEFAULT_FRACTION_BUDGET_SCALE`` for a nonlinear
        fraction, else ``DEFAULT_APL_BUDGET_SCALE_RATIO`` of the first measurement)."""
        if config.budget_target is None:
            raise ValueError("LinearizeConfig.budget_target is None; set it to use a budget controller.")
        scale = config.budget_scale
        if scale is None and config.budget_metric == "nonlinear_fraction":
            scale = DEFAULT_FRACTION_BUDGET_SCALE
        return cls(config.budget_target, init_lambda=config.prior_lambda or 1.0, gain=config.budget_gain,
                   scale=scale, tolerance=config.budget_tolerance)

    def state_dict(self) -> dict[str, Optional[float]]:
        return {"log_lambda": self.log_lambda, "scale": self.scale, "last_measured": self.last_measured,
                "reached_step": self.reached_step}

    def load_state_dict(self, state: dict[str, Optional[float]]) -> None:
        self.log_lambda = float(state["log_lambda"])  # type: ignore[arg-type]
        self.scale = state["scale"]
        self.last_measured = state["last_measured"]
        self.reached_step = None if state["reached_step"] is None else int(state["reached_step"])


class GateRegularizer:
    """The per-step gate logic of a linearization run: schedule, prior, snapping/freezing, budget.

    Args:
        alphas: the gate tensors (``GatedActivation.alpha`` of the patched model).
        schedule: a resolved `PriorSchedule`; its ``lam`` is the weight unless ``controller`` is given.
        eps: linear threshold (``LinearizeConfig.linear_threshold``).
        freeze_linear: snapped units stay at exactly 1.0.
        controller: optional `BudgetController`; its `lam` replaces ``schedule.lam`` (still times the ramp)
            and it is updated after every step where the prior is active.
        budget_metric: ``"nonlinear_fraction"`` (measured here, and capped with `linear_quota`) or
            ``"normalized_apl"`` (measured by calling ``measure()`` after the gates were updated).
        measure: zero-argument callable returning the normalized APL of the current gates.
    """

    def __init__(
        self,
        alphas: Alphas,
        schedule: PriorSchedule,
        eps: float = _DEFAULTS.linear_threshold,
        freeze_linear: bool = _DEFAULTS.freeze_linear,
        controller: Optional[BudgetController] = None,
        budget_metric: str = _DEFAULTS.budget_metric,
        measure: Optional[Callable[[], float]] = None,
    ) -> None:
        _check_alphas(alphas)
        schedule._steps()
        if budget_metric not in BUDGET_METRICS:
            raise ValueError(f"budget_metric={budget_metric!r} is unknown; use one of {BUDGET_METRICS}.")
        if controller is not None and budget_metric == "normalized_apl" and measure is None:
            raise ValueError("A normalized_apl budget needs `measure`, a callable returning the normalized APL.")
        self.alphas = list(alphas)
        self.schedule = schedule
        self.eps = eps
        self.controller = controller
        self.budget_metric = budget_metric
        self.measure = measure
        max_linear = None
        if controller is not None and budget_metric == "nonlinear_fraction":
            max_linear = linear_quota(controller.target, sum(a.numel() for a in self.alphas))
        self.tracker = LinearUnitTracker(self.alphas, eps, freeze=freeze_linear, max_linear=max_linear)
        self._pinned: Optional[list[torch.Tensor]] = None

    @classmethod
    def from_config(
        cls,
        alphas: Alphas,
        config: LinearizeConfig,
        total_steps: Optional[int] = None,
        measure: Optional[Callable[[], float]] = None,
    ) -> GateRegularizer:
        """Build from a `LinearizeConfig`; ``total_steps`` resolves fractional schedule positions."""
        controller = None if config.budget_target is None else BudgetController.from_config(config)
        return cls(alphas, PriorSchedule.from_config(config).resolve(total_steps), config.linear_threshold,
                   config.freeze_linear, controller, config.budget_metric, measure)

    def gates_held(self, step: int) -> bool:
        """True when update ``step`` must leave every gate as it is: outside the prior's window
        (``step < start`` or ``step >= freeze_after``) or in a run whose prior weight is always 0 (``lam = 0``
        and no controller), which then trains the rest of the model only."""
        return not self.schedule.active(step) or (self.controller is None and self.schedule.lam == 0.0)

    def lambda_at(self, step: int) -> float:
        """Prior weight for the loss of update ``step``."""
        lam = self.schedule.lam if self.controller is None else self.controller.lam
        return lam * self.schedule.ramp(step)

    def loss(self, step: int) -> torch.Tensor:
        """The prior term to add to the task loss of update ``step`` (0-dim fp32 tensor)."""
        return prior_loss(self.alphas, self.lambda_at(step))

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Between ``backward()`` (and gradient clipping) and ``optimizer.step()``: zero the gradients of
        frozen units; while `gates_held`, zero all gate gradients and remember the values that `after_step`
        restores (optimizer momentum and weight decay would move them otherwise)."""
        if self.gates_held(step):
            self._pinned = [a.detach().clone() for a in self.alphas]
            for a in self.alphas:
                if a.grad is not None:
                    a.grad.zero_()
        else:
            self._pinned = None
            self.tracker.mask_grads_(self.alphas)

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, float]:
        """After ``optimizer.step()``: update the gates and the controller; return metrics for logging."""
        if self.gates_held(step):
            if self._pinned is None:
                raise RuntimeError("With held gates, call before_step(step) before optimizer.step() and after_step.")
            for a, v in zip(self.alphas, self._pinned):
                a.copy_(v)
            self._pinned = None
            newly = 0
        else:
            newly = self.tracker.update(self.alphas)
        stats = gate_stats(self.alphas, self.eps)
        metrics = {**stats, "newly_linear": newly}
        if self.controller is not None:
            measured = stats["nonlinear_fraction"] if self.budget_metric == "nonlinear_fraction" else self.measure()
            metrics["budget_measured"] = measured
            if self.schedule.active(step):
                self.controller.update(measured, step)
        metrics["prior_lambda"] = self.lambda_at(step + 1)
        return metrics

    def state_dict(self) -> dict[str, object]:
        return {"tracker": self.tracker.state_dict(),
                "controller": None if self.controller is None else self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.tracker.load_state_dict(state["tracker"])  # type: ignore[arg-type]
        if (state["controller"] is None) != (self.controller is None):
            raise ValueError("Saved regularizer state and this run disagree on whether a budget controller is used.")
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])  # type: ignore[arg-type]
