"""Training-side gate math (`hf_linearize.sparsity`), tested in plain torch without a Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hf_linearize.config import (
    DEFAULT_APL_BUDGET_SCALE_RATIO,
    DEFAULT_FRACTION_BUDGET_SCALE,
    LAMBDA_BOUNDS,
    LinearizeConfig,
)
from hf_linearize.gates import GatedActivation
from hf_linearize.sparsity import (
    BudgetController,
    GateRegularizer,
    LinearUnitTracker,
    PriorSchedule,
    gate_stats,
    linear_quota,
    prior_loss,
    project_,
    snap_,
)

EPS = 1e-3
THR = float(torch.tensor(1 - EPS, dtype=torch.float32))  # the fp32 threshold: a >= THR is linear


def _params(*values: list[float]) -> list[nn.Parameter]:
    return [nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in values]


# --- prior -----------------------------------------------------------------------------------------
def test_prior_loss_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    alphas = [nn.Parameter(torch.rand(n, generator=g)) for n in (3, 5, 8)]
    loss = prior_loss(alphas, 2.5)
    expected = 2.5 * (1 - torch.cat([a.detach() for a in alphas])).mean()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for a in alphas:  # mean over all 16 units: every unit gets -lam / 16, whatever its tensor's size
        torch.testing.assert_close(a.grad, torch.full_like(a, -2.5 / 16))


def test_prior_loss_is_fp32_under_autocast_and_zero_weight_gives_zero_grad() -> None:
    alphas = _params([0.25, 0.5], [0.75])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = prior_loss(alphas, 1.0 / 3.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(0.5 / 3.0))
    prior_loss(alphas, 0.0).backward()
    assert all(torch.equal(a.grad, torch.zeros_like(a)) for a in alphas)


def test_prior_loss_rejects_empty_and_non_1d() -> None:
    with pytest.raises(ValueError, match="No gate tensors"):
        prior_loss([], 1.0)
    with pytest.raises(ValueError, match="1-D"):
        prior_loss([torch.zeros(2, 2)], 1.0)


# --- projection, snapping, stats ---------------------------------------------------------------------
def test_project_clamps_in_place() -> None:
    (a,) = _params([-0.5, 0.0, 0.3, 1.0, 1.7])
    project_([a])
    assert a.tolist() == [0.0, 0.0, pytest.approx(0.3), 1.0, 1.0]


def test_snap_sets_exactly_one_and_counts_new_units() -> None:
    a, b = _params([0.5, THR, 0.9995, 1.0, 1.2], [float(torch.nextafter(torch.tensor(THR), torch.tensor(0.0)))])
    assert snap_([a, b], EPS) == 3  # THR, 0.9995, 1.2; the 1.0 was already linear; b is just below THR
    assert a.tolist() == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert b.item() < THR
    assert snap_([a, b], EPS) == 0


def test_snap_with_masks_and_max_new() -> None:
    a, b = _params([0.9995, 0.2, 1.0], [1.3, 0.9992, 0.9999])
    masks = [torch.tensor([False, False, True]), torch.zeros(3, dtype=torch.bool)]
    # 4 candidates (a0, b0, b1, b2); only the 2 largest (1.3, 0.9999) may snap, the rest go just below THR.
    assert snap_([a, b], EPS, masks, max_new=2) == 2
    assert masks[0].tolist() == [False, False, True] and masks[1].tolist() == [True, False, True]
    assert a[2].item() == 1.0 and b[0].item() == 1.0 and b[2].item() == 1.0
    assert a[0].item() < THR and b[1].item() < THR and a[1].item() == pytest.approx(0.2)
    assert gate_stats([a, b], EPS)["linear_units"] == 3


def test_gate_stats_counts() -> None:
    stats = gate_stats(_params([0.0, THR, 1.0], [0.5, 0.998]), EPS)
    assert stats == {"total_units": 5, "linear_units": 2, "nonlinear_units": 3, "nonlinear_fraction": 0.6}


def test_linear_quota_never_undershoots_the_target() -> None:
    assert linear_quota(0.3, 400) == 280
    assert linear_quota(0.29, 100) == 71  # 0.29 * 100 = 28.999999999999996 in floats
    assert linear_quota(0.301, 400) == 280  # nonlinear fraction 0.3 <= target
    assert linear_quota(0.0, 7) == 7 and linear_quota(1.0, 7) == 0


# --- linear-unit tracker -----------------------------------------------------------------------------
def test_frozen_units_stay_exactly_one_through_adam_momentum() -> None:
    (a,) = _params([0.9, 0.9, 0.9, 0.9])
    tracker = LinearUnitTracker([a], EPS)
    opt = torch.optim.Adam([a], lr=0.1)
    for _ in range(6):  # the task pulls every unit down: Adam momentum points toward nonlinear
        opt.zero_grad()
        a.sum().backward()
        opt.step()
    with torch.no_grad():
        a[:2] = 1.0  # units 0 and 1 become linear (as the prior would have made them)
    assert tracker.update([a]) == 2
    assert tracker.masks[0].tolist() == [True, True, False, False]
    for _ in range(20):
        opt.zero_grad()
        (10.0 * a.sum()).backward()
        tracker.mask_grads_([a])
        assert a.grad[:2].tolist() == [0.0, 0.0]
        opt.step()
        moved = a[:2].detach().clone()
        assert tracker.update([a]) == 0
        assert a[:2].tolist() == [1.0, 1.0]
    assert (moved < THR).all()  # momentum alone moved them well below the threshold each step


def test_unfrozen_tracker_lets_units_leave() -> None:
    (a,) = _params([1.0, 0.2])
    tracker = LinearUnitTracker([a], EPS, freeze=False)
    assert tracker.update([a]) == 1 and tracker.linear_units == 1
    with torch.no_grad():
        a[0] = 0.9
    assert tracker.update([a]) == 0
    assert tracker.linear_units == 0 and a[0].item() == pytest.approx(0.9)


def test_tracker_quota_caps_linear_units() -> None:
    (a,) = _params([0.0, 0.0, 0.0, 0.0])
    tracker = LinearUnitTracker([a], EPS, max_linear=2)
    with torch.no_grad():
        a.copy_(torch.tensor([1.0, 1.05, 1.02, 0.5]))
    assert tracker.update([a]) == 2
    assert a.tolist()[1:3] == [1.0, 1.0] and a[0].item() < THR
    assert tracker.masks[0].tolist() == [False, True, True, False]
    with torch.no_grad():
        a[0], a[3] = 1.0, 1.0
    assert tracker.update([a]) == 0
    assert gate_stats([a], EPS)["linear_units"] == 2


def test_tracker_rejects_other_shapes() -> None:
    tracker = LinearUnitTracker(_params([0.0, 0.0]), EPS)
    with pytest.raises(ValueError, match="shapes"):
        tracker.update(_params([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="masks"):
        tracker.load_state_dict({"masks": [torch.zeros(3, dtype=torch.bool)]})


# --- schedule ----------------------------------------------------------------------------------------
def test_schedule_start_and_warmup_ramp() -> None:
    s = PriorSchedule(start=10, warmup=4, lam=2.0)
    assert [s.lambda_at(t) for t in (0, 9, 10, 11, 12, 13, 14, 1000)] == [0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert not s.active(9) and s.active(10) and not s.gates_frozen(10**6)
    assert PriorSchedule(lam=3.0).lambda_at(0) == 3.0


def test_schedule_freeze_after() -> None:
    s = PriorSchedule(start=0, freeze_after=5, lam=1.0)
    assert s.active(4) and not s.gates_frozen(4)
    assert s.gates_frozen(5) and not s.active(5) and s.lambda_at(5) == 0.0


def test_schedule_fractions_resolve_like_steps() -> None:
    frac = PriorSchedule(start=0.25, warmup=0.1, freeze_after=0.9, lam=1.0).resolve(200)
    steps = PriorSchedule(start=50, warmup=20, freeze_after=180, lam=1.0)
    assert frac == steps.resolve(None) == steps
    assert [frac.lambda_at(t) for t in range(200)] == [steps.lambda_at(t) for t in range(200)]


def test_schedule_fraction_needs_total_steps() -> None:
    with pytest.raises(ValueError, match="total number of optimizer steps is unknown"):
        PriorSchedule(start=0.5).resolve(None)
    with pytest.raises(ValueError, match="resolve"):
        PriorSchedule(warmup=0.1).lambda_at(3)
    assert PriorSchedule(start=0.0, warmup=0).resolve(None).lambda_at(0) == 0.0  # 0.0 is step 0 for any total


@pytest.mark.parametrize("kwargs", [{"start": -1}, {"warmup": 1.5}, {"freeze_after": "end"}, {"lam": -1.0},
                                    {"start": None}])
def test_schedule_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="PriorSchedule"):
        PriorSchedule(**kwargs)


# --- budget controller -------------------------------------------------------------------------------
def test_controller_law() -> None:
    c = BudgetController(0.3, init_lambda=2.0, gain=0.1, scale=0.05, tolerance=0.02, lambda_max=2.5)
    assert c.lam == 2.0 and c.error is None
    c.update(0.9, step=0)  # far above: saturated step of +gain in log space
    assert c.lam == pytest.approx(2.0 * math.exp(0.1))
    c.update(0.325, step=1)  # half the scale above: half a step
    assert c.lam == pytest.approx(2.0 * math.exp(0.15))
    assert c.reached_step is None  # 0.025 > tolerance
    for step in range(2, 10):
        c.update(0.9, step)
    assert c.lam == pytest.approx(2.5)  # clipped at lambda_max
    c.update(0.31, step=10)
    assert c.reached_step == 10 and c.error == pytest.approx(0.01)
    c.update(0.3, step=11)  # at the target: the prior is off, the stored lambda keeps its value
    assert c.lam == 0.0 and c.state_dict()["log_lambda"] == pytest.approx(math.log(2.5))
    c.update(0.2, step=12)
    assert c.lam == 0.0 and c.state_dict()["log_lambda"] == pytest.approx(math.log(2.5) - 0.1)
    c.update(0.35, step=13)  # back above (units came back): the prior restarts from the stored lambda
    assert c.lam == pytest.approx(2.5 * math.exp(-0.1) * math.exp(0.1)) and c.reached_step == 10


def _toy_run(target: float, steps: int, seed: int, quota: bool = True, init_lambda: float = 1.0) -> tuple:
    """Gates with per-unit importance w (log-uniform in [0.01, 100]): the noisy task loss ``mean(w * a)``
    pulls each gate toward nonlinearity with force w / N, the prior toward linearity with lambda / N.
    The run needs lambda near the (1 - target) quantile of w, which the controller must find."""
    g = torch.Generator().manual_seed(seed)
    sizes = (64, 96, 128, 112)
    alphas = [nn.Parameter(torch.zeros(n)) for n in sizes]
    weights = [10 ** (torch.rand(n, generator=g) * 4 - 2) for n in sizes]
    opt = torch.optim.Adam(alphas, lr=0.02)
    controller = BudgetController(target, init_lambda=init_lambda, scale=0.05)
    reg = GateRegularizer(alphas, PriorSchedule(), EPS, controller=controller)
    if not quota:
        reg.tracker.max_linear = None
    for step in range(steps):
        noise = [1 + 0.5 * torch.randn(n, generator=g) for n in sizes]
        task = sum((w * z * a).sum() for w, z, a in zip(weights, noise, alphas)) / sum(sizes)
        opt.zero_grad()
        (task + reg.loss(step)).backward()
        reg.before_step(step)
        opt.step()
        metrics = reg.after_step(step)
    return metrics, controller


@pytest.mark.parametrize("seed", [0, 1])
def test_controller_reaches_and_holds_target_without_quota(seed: int) -> None:
    metrics, controller = _toy_run(0.3, steps=500, seed=seed, quota=False)
    assert abs(metrics["nonlinear_fraction"] - 0.3) <= 0.02
    assert controller.reached_step is not None and controller.reached_step < 400
    assert abs(controller.error) <= 0.02


def test_quota_lands_on_target_even_with_far_too_large_lambda() -> None:
    metrics, controller = _toy_run(0.8, steps=150, seed=0, init_lambda=1e3)
    assert metrics["nonlinear_fraction"] == 0.8 and metrics["linear_units"] == linear_quota(0.8, 400)
    assert controller.lam == 0.0
    metrics, _ = _toy_run(0.8, steps=150, seed=0, init_lambda=1e3, quota=False)
    assert metrics["nonlinear_fraction"] < 0.5  # what the quota prevents


# --- the regularizer on a real model ------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, width), nn.Linear(width, 1)
        self.act = GatedActivation(nn.GELU(), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _regression(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 0.1 * x[:, :1] ** 2


def _train(model: _MLP, reg: GateRegularizer, opt: torch.optim.Optimizer, steps: range) -> list[dict]:
    x, y = _regression()
    log = []
    for step in steps:
        task = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        (task + reg.loss(step)).backward()
        reg.before_step(step)
        opt.step()
        log.append({**reg.after_step(step), "task_loss": task.item()})
    return log


def _optimizer(model: _MLP) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]},
                              {"params": [model.act.alpha], "lr": 0.05, "weight_decay": 0.0}], lr=1e-2)


def test_large_lambda_linearizes_most_units_and_loss_stays_finite() -> None:
    torch.manual_seed(0)
    model = _MLP()
    reg = GateRegularizer([model.act.alpha], PriorSchedule(lam=10.0), EPS)
    log = _train(model, reg, _optimizer(model), range(100))
    assert log[-1]["nonlinear_fraction"] <= 0.1
    assert all(math.isfinite(m["task_loss"]) for m in log) and log[-1]["task_loss"] < log[0]["task_loss"]
    alpha = model.act.alpha.detach()
    assert torch.equal(alpha[reg.tracker.masks[0]], torch.ones(int(reg.tracker.masks[0].sum())))


def test_zero_lambda_with_zero_gate_gradient_changes_no_gate() -> None:
    torch.manual_seed(0)
    model = _MLP()
    with torch.no_grad():
        model.fc2.weight.zero_()  # the output ignores the activations: the task gradient of the gates is 0
        model.act.alpha.uniform_(0.0, 0.9)
    before = model.act.alpha.detach().clone()
    reg = GateRegularizer([model.act.alpha], PriorSchedule(lam=0.0), EPS)
    opt = torch.optim.Adam([model.act.alpha, model.fc2.bias], lr=0.1)
    _train(model, reg, opt, range(20))
    assert torch.equal(model.act.alpha.detach(), before)
    reg = GateRegularizer([model.act.alpha], PriorSchedule(lam=1.0), EPS)  # the same with a prior does move them
    _train(model, reg, opt, range(1))
    assert (model.act.alpha.detach() > before).all()


def test_gates_are_held_before_start_and_in_a_run_without_prior() -> None:
    torch.manual_seed(0)
    model = _MLP()
    with torch.no_grad():
        model.act.alpha.uniform_(0.2, 0.8)  # the task gradient of every gate is nonzero here
    start = model.act.alpha.detach().clone()
    reg = GateRegularizer([model.act.alpha], PriorSchedule(start=10, lam=1.0), EPS)
    opt = _optimizer(model)
    assert reg.gates_held(9) and not reg.gates_held(10)
    _train(model, reg, opt, range(10))
    assert torch.equal(model.act.alpha.detach(), start)
    _train(model, reg, opt, range(10, 11))
    assert not torch.equal(model.act.alpha.detach(), start)
    off = GateRegularizer([model.act.alpha], PriorSchedule(lam=0.0), EPS)
    assert off.gates_held(0)
    assert not GateRegularizer([model.act.alpha], PriorSchedule(lam=0.0), EPS,
                               controller=BudgetController(0.5)).gates_held(0)


def test_gates_stay_put_after_freeze_despite_momentum() -> None:
    torch.manual_seed(0)
    model = _MLP()
    reg = GateRegularizer([model.act.alpha], PriorSchedule(lam=1.0, freeze_after=30), EPS)
    opt = _optimizer(model)
    _train(model, reg, opt, range(30))
    frozen = model.act.alpha.detach().clone()
    log = _train(model, reg, opt, range(30, 40))
    assert torch.equal(model.act.alpha.detach(), frozen)
    assert all(m["prior_lambda"] == 0.0 and m["newly_linear"] == 0 for m in log)
    assert reg.loss(35).item() == 0.0


def test_from_config_and_apl_budget() -> None:
    model = _MLP()
    config = LinearizeConfig(prior_start=0.5, prior_warmup=0.25, budget_target=0.3)
    with pytest.raises(ValueError, match="fraction"):
        GateRegularizer.from_config([model.act.alpha], config)
    reg = GateRegularizer.from_config([model.act.alpha], config, total_steps=40)
    assert reg.schedule == PriorSchedule(20, 10, None, 0.0)
    assert reg.tracker.max_linear == linear_quota(0.3, 32) and reg.lambda_at(29) == 1.0
    _train(model, reg, _optimizer(model), range(20))  # before prior_start the controller does not integrate
    assert reg.controller.error is None and reg.lambda_at(20) == 0.1
    apl = LinearizeConfig(budget_target=1.5, budget_metric="normalized_apl", prior_lambda=0.1)
    with pytest.raises(ValueError, match="measure"):
        GateRegularizer.from_config([model.act.alpha], apl)
    calls = []
    reg = GateRegularizer.from_config([model.act.alpha], apl, measure=lambda: calls.append(1) or 2.0)
    assert reg.tracker.max_linear is None and reg.lambda_at(0) == pytest.approx(0.1)
    metrics = _train(model, reg, torch.optim.SGD(model.parameters(), lr=0.0), range(1))[-1]
    assert calls == [1] and metrics["budget_measured"] == 2.0
    assert reg.controller.scale == pytest.approx(0.1)  # 5% of the first measurement
    assert reg.lambda_at(1) == pytest.approx(0.1 * math.exp(0.01))


def test_controller_from_config() -> None:
    config = LinearizeConfig(budget_target=0.4, prior_lambda=3.0, budget_gain=0.2, budget_tolerance=0.05,
                             budget_scale=0.1)
    c = BudgetController.from_config(config)
    assert (c.target, c.lam, c.gain, c.tolerance, c.scale) == (0.4, pytest.approx(3.0), 0.2, 0.05, 0.1)
    assert BudgetController.from_config(LinearizeConfig(budget_target=0.4)).scale == 0.05
    apl = LinearizeConfig(budget_target=2.0, budget_metric="normalized_apl")
    assert BudgetController.from_config(apl).scale is None
    with pytest.raises(ValueError, match="budget_target is None"):
        BudgetController.from_config(LinearizeConfig())


def test_defaults_and_lambda_bounds_live_in_the_config() -> None:
    """The controller's and regularizer's keyword defaults are LinearizeConfig's, and lambda saturates at exactly
    the bounds that config.py declares."""
    import inspect

    defaults = LinearizeConfig()
    controller = inspect.signature(BudgetController).parameters
    assert (controller["gain"].default, controller["tolerance"].default) == (defaults.budget_gain,
                                                                             defaults.budget_tolerance)
    regularizer = inspect.signature(GateRegularizer).parameters
    assert (regularizer["eps"].default, regularizer["freeze_linear"].default, regularizer["budget_metric"].default) == (
        defaults.linear_threshold, defaults.freeze_linear, defaults.budget_metric)
    assert BudgetController.from_config(LinearizeConfig(budget_target=0.4)).scale == DEFAULT_FRACTION_BUDGET_SCALE
    low, high = LAMBDA_BOUNDS
    up, down = BudgetController(0.0, init_lambda=1.0, gain=5.0), BudgetController(1.0, init_lambda=1.0, gain=5.0)
    for step in range(10):
        up.update(1.0, step)
        down.update(0.9, step)
    assert up.lam == pytest.approx(high, rel=1e-12) and math.exp(down.log_lambda) == pytest.approx(low, rel=1e-12)
    apl = BudgetController(1.0)
    apl.update(4.0, 0)
    assert apl.scale == pytest.approx(DEFAULT_APL_BUDGET_SCALE_RATIO * 4.0)


# --- resume --------------------------------------------------------------------------------------------
def test_state_dict_round_trip_gives_identical_continuation() -> None:
    def build(model: _MLP) -> tuple[GateRegularizer, torch.optim.Optimizer]:
        config = LinearizeConfig(prior_warmup=5, budget_target=0.5, freeze_gates_after=70)
        return GateRegularizer.from_config([model.act.alpha], config), _optimizer(model)

    torch.manual_seed(0)
    model = _MLP()
    reg, opt = build(model)
    _train(model, reg, opt, range(20))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), reg.state_dict()))
    assert 0 < reg.tracker.linear_units < linear_quota(0.5, 32)  # mid-way: lambda still growing, snapping going on
    reference = _train(model, reg, opt, range(20, 80))

    torch.manual_seed(1)
    model2 = _MLP()
    reg2, opt2 = build(model2)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    reg2.load_state_dict(saved[2])
    assert reg2.state_dict()["controller"] == saved[2]["controller"]
    assert [torch.equal(m, s) for m, s in zip(reg2.tracker.masks, saved[2]["tracker"]["masks"])] == [True]
    resumed = _train(model2, reg2, opt2, range(20, 80))
    assert resumed == reference
    assert torch.equal(model2.act.alpha, model.act.alpha)


def test_tracker_and_controller_round_trip() -> None:
    def tracker_run(tracker: LinearUnitTracker, alphas: list[nn.Parameter], values: list[torch.Tensor]) -> list:
        out = []
        for v in values:
            with torch.no_grad():
                alphas[0].copy_(v)
            out.append((tracker.update(alphas), alphas[0].tolist()))
        return out

    g = torch.Generator().manual_seed(0)
    values = [torch.rand(6, generator=g) * 0.01 + 0.995 for _ in range(4)]
    alphas = _params([0.0] * 6)
    tracker = LinearUnitTracker(alphas, EPS, max_linear=4)
    tracker_run(tracker, alphas, values[:2])
    fresh = LinearUnitTracker(alphas, EPS, max_linear=4)
    fresh.load_state_dict(copy.deepcopy(tracker.state_dict()))
    assert tracker_run(fresh, alphas, values[2:]) == tracker_run(tracker, alphas, values[2:])

    controller = BudgetController(0.3, scale=None)
    for step, m in enumerate([1.0, 0.8, 0.31, 0.6]):
        controller.update(m, step)
    fresh = BudgetController(0.3, scale=None)
    fresh.load_state_dict(copy.deepcopy(controller.state_dict()))
    assert fresh.reached_step == 2 and fresh.scale == 0.05 and fresh.lam == controller.lam
    assert [fresh.update(m, 4 + i) for i, m in enumerate([0.5, 0.2, 0.4])] == \
        [controller.update(m, 4 + i) for i, m in enumerate([0.5, 0.2, 0.4])]
    assert fresh.state_dict() == controller.state_dict()


def test_load_state_dict_rejects_controller_mismatch() -> None:
    alphas = _params([0.0, 0.0])
    with_budget = GateRegularizer(alphas, PriorSchedule(), EPS, controller=BudgetController(0.5))
    without = GateRegularizer(alphas, PriorSchedule(), EPS)
    with pytest.raises(ValueError, match="budget controller"):
        without.load_state_dict(with_budget.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gates() -> None:
    alphas = [nn.Parameter(torch.tensor(v, device="cuda")) for v in ([0.2, 1.3, 1.1], [0.9995, 0.4])]
    with torch.autocast("cuda", dtype=torch.float16):
        loss = prior_loss(alphas, 1.0)
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    tracker = LinearUnitTracker(alphas, EPS, max_linear=2)
    loss.backward()
    tracker.mask_grads_(alphas)
    assert tracker.update(alphas) == 2
    assert [a.tolist() for a in alphas][0][1:] == [1.0, 1.0] and alphas[1][0].item() < THR
    assert all(m.device.type == "cuda" for m in tracker.masks)
    assert gate_stats(alphas, EPS)["linear_units"] == 2


def test_units_linear_before_training_start_frozen():
    """A one-shot linearization before training: its linear units never move, even in the first step."""
    from hf_linearize.sparsity import LinearUnitTracker

    alpha = torch.tensor([1.0, 0.25, 1.0, 0.9995, 1.0])
    tracker = LinearUnitTracker([alpha], eps=1e-3, freeze=True, max_linear=3)
    # the quota keeps the largest values (ties by position); the other candidate is held just below 1 - eps
    assert tracker.linear_units == 3 and alpha[[0, 1, 2, 4]].tolist() == [1.0, 0.25, 1.0, 1.0]
    assert alpha[3] < 1 - 1e-3
    alpha.grad = torch.ones(5)
    tracker.mask_grads_([alpha])
    assert alpha.grad.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert LinearUnitTracker([alpha], eps=1e-3, freeze=False).linear_units == 0
