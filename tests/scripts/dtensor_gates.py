"""Every gate operation of `hf_linearize.sparsity` on gates sharded as FSDP2 shards them (``DTensor``, ``Shard(0)``,
uneven shard sizes included) against the same operation on whole tensors, and the model-level counts (``summary``,
``linear_units``, ``average_path_length``, ``path_length_report``) of a patched model under ``fully_shard`` against
its unsharded copy; run under ``torchrun --nproc_per_node 2`` (gloo, CPU). Exits non-zero on the first mismatch
(torchrun then fails too).

Usage: ``torchrun --nproc_per_node 2 tests/scripts/dtensor_gates.py``, with the tests folder on PYTHONPATH
(tests/test_distributed.py does this).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from tiny_models import DECODER_LMS
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import hf_linearize as hl
from hf_linearize.patching import linear_units
from hf_linearize.sparsity import (
    BudgetController,
    GateRegularizer,
    LinearUnitTracker,
    PriorSchedule,
    gate_stats,
    linear_counts,
    prior_loss,
    project_,
    snap_,
)

WHOLE = ([0.3, 0.97, -0.1, 0.5, 1.05, 0.96, 0.2], [0.99, 0.1, 0.6, 0.94], [0.8])
"""The gates, the same on every rank. Shards of 7 and 1 units are uneven over 2 ranks (1 leaves rank 1 an empty
shard); 4 units are at or above the linear threshold 1 - 0.05, on both ranks, and the two largest (1.05, 0.99) lie
on different ranks, so a quota of 1 or 2 new linear units is a choice across shards."""
SIZES = tuple(len(values) for values in WHOLE)


def whole_gates() -> list[torch.Tensor]:
    return [torch.tensor(values) for values in WHOLE]


def pair() -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Whole gates and FSDP2-style sharded copies of them, as leaf parameters."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    whole = [torch.nn.Parameter(a.clone()) for a in whole_gates()]
    sharded = [torch.nn.Parameter(distribute_tensor(a.detach().clone(), mesh, [Shard(0)])) for a in whole_gates()]
    return whole, sharded


def check(whole: list[torch.Tensor], sharded: list[torch.Tensor], what: str) -> None:
    """Equal values, and each sharded tensor still sharded as FSDP2 shards it."""
    for i, (w, s) in enumerate(zip(whole, sharded)):
        assert isinstance(s, DTensor) and s.placements == (Shard(0),), (what, i, s)
        assert torch.equal(s.full_tensor(), w), (what, i, s.full_tensor(), w)


def check_model_counts() -> None:
    """``summary``, ``linear_units`` and both path-length functions of a tiny LLaMA with half its units linear (24
    units per gate, shards of 12) count all units when ``fully_shard`` (per layer and at the root, as Accelerate's
    FSDP2 wraps) has made every ``alpha`` a ``DTensor``: equal to its unsharded copy on every rank. Counting only the
    local shard would give a different number of linear units on each rank."""
    model = hl.patch_model(DECODER_LMS["llama"]()[0])
    hl.set_linear(model, 0.5, seed=1)
    whole = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    alphas = [gate.alpha for _, gate in hl.gated_modules(model)]
    assert all(isinstance(a, DTensor) and a.placements == (Shard(0),) for a in alphas), alphas
    local = sum(int((a.to_local() == 1.0).sum()) for a in alphas)  # set_linear's units; the others are at 0
    expected = hl.summary(whole)
    assert 0 < local < expected["total"]["linear"], (local, expected["total"])  # a local count would be wrong
    assert hl.summary(model) == expected, (hl.summary(model)["total"], expected["total"])
    masks, whole_masks = linear_units(model), linear_units(whole)
    assert masks.keys() == whole_masks.keys() and all(torch.equal(masks[k], whole_masks[k]) for k in masks)
    for normalized in (True, False):
        assert hl.average_path_length(model, normalized) == hl.average_path_length(whole, normalized), normalized
    assert hl.path_length_report(model) == hl.path_length_report(whole)


def main() -> None:
    dist.init_process_group("gloo")
    eps = 0.05

    whole, sharded = pair()
    for alphas in (whole, sharded):
        prior_loss(alphas, lam=3.0).backward()
    assert prior_loss(sharded, 3.0).item() == prior_loss(whole, 3.0).item()
    check([a.grad for a in whole], [a.grad for a in sharded], "prior gradient")
    assert linear_counts(sharded, eps) == linear_counts(whole, eps)
    assert gate_stats(sharded, eps) == gate_stats(whole, eps)

    for max_new in (None, 1):  # a global choice: the largest candidates over all shards
        whole, sharded = pair()
        masks = [[torch.zeros(n, dtype=torch.bool) for n in SIZES] for _ in range(2)]
        assert snap_(sharded, eps, masks[1], max_new) == snap_(whole, eps, masks[0], max_new)
        check(whole, sharded, f"snap_ max_new={max_new}")
        assert all(torch.equal(a, b) for a, b in zip(*masks))
    project_(whole)
    project_(sharded)
    check(whole, sharded, "project_")

    for freeze in (True, False):
        whole, sharded = pair()
        trackers = [LinearUnitTracker(alphas, eps, freeze=freeze, max_linear=2) for alphas in (whole, sharded)]
        assert trackers[0].linear_units == trackers[1].linear_units == (2 if freeze else 0)  # the quota of 2
        for step in range(3):
            for alphas, tracker in zip((whole, sharded), trackers):
                prior_loss(alphas, 5.0).backward()
                tracker.mask_grads_(alphas)
                with torch.no_grad():
                    for a in alphas:
                        a.add_(-0.5 * a.grad)
                        a.grad = None
                tracker.update(alphas)
            check(whole, sharded, f"tracker freeze={freeze} step {step}")
            assert trackers[0].state_dict()["masks"][0].shape == (SIZES[0],)
            assert all(torch.equal(a, b) for a, b in zip(trackers[0].masks, trackers[1].masks))

    whole, sharded = pair()
    regs = [GateRegularizer(alphas, PriorSchedule(start=1, lam=2.0), eps, controller=BudgetController(0.5, 2.0))
            for alphas in (whole, sharded)]
    for step in range(4):
        metrics = []
        for alphas, reg in zip((whole, sharded), regs):
            reg.loss(step).backward()
            reg.before_step(step)
            with torch.no_grad():
                for a in alphas:
                    a.add_(-0.3 * a.grad)
                    a.grad = None
            metrics.append(reg.after_step(step))
        assert metrics[0] == metrics[1], (step, metrics)
        check(whole, sharded, f"regularizer step {step}")
    assert regs[0].state_dict()["controller"] == regs[1].state_dict()["controller"]

    check_model_counts()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
