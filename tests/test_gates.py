"""Gate modules: exact endpoints, every activation type, channel layouts, dtypes."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import transformers.activations as hf_act
from torch import nn

from hf_linearize.gates import GatedActivation, SharedGatedActivation

ACTIVATIONS = {
    "relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
    "hardswish": nn.Hardswish(), "hf_gelu_new": hf_act.ACT2FN["gelu_new"], "hf_gelu": hf_act.ACT2FN["gelu"],
    "hf_quick_gelu": hf_act.ACT2FN["quick_gelu"], "hf_swish": hf_act.ACT2FN["swish"],
    "timm_gelu": timm.layers.activations.GELU(), "timm_hardswish": timm.layers.activations.HardSwish(),
    "timm_swish": timm.layers.activations.Swish(),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("channel_dim, shape", [(-1, (3, 5, 8)), (1, (3, 8, 4, 4))])
def test_endpoints_are_exact(name, channel_dim, shape):
    act = ACTIVATIONS[name]
    x = torch.randn(*shape) * 3
    gate = GatedActivation(act, 8, channel_dim=channel_dim)
    assert torch.equal(gate(x), act(x))
    gate.alpha.data.fill_(1.0)
    assert torch.equal(gate(x), x)
    gate.alpha.data.fill_(0.25)
    torch.testing.assert_close(gate(x), 0.25 * x + 0.75 * act(x))


def test_per_channel_mixing_follows_the_channel_dim():
    x = torch.randn(2, 3, 5, 5)
    gate = GatedActivation(nn.ReLU(), 3, channel_dim=1)
    gate.alpha.data = torch.tensor([0.0, 1.0, 0.5])
    y = gate(x)
    assert torch.equal(y[:, 0], x[:, 0].relu())
    assert torch.equal(y[:, 1], x[:, 1])
    torch.testing.assert_close(y[:, 2], torch.where(x[:, 2] > 0, x[:, 2], 0.5 * x[:, 2]))  # PReLU, slope 0.5


def test_glu_gate_goes_to_one():
    u = torch.randn(4, 6)
    gate = GatedActivation(nn.SiLU(), 6, kind="glu")
    assert torch.equal(gate(u), nn.functional.silu(u))
    gate.alpha.data.fill_(1.0)
    assert torch.equal(gate(u), torch.ones_like(u))


def test_bf16_input_keeps_fp32_gates_and_gradients():
    gate = GatedActivation(nn.GELU(), 8, init=0.5)
    x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    y = gate(x)
    assert y.dtype == torch.bfloat16 and gate.alpha.dtype == torch.float32
    y.float().sum().backward()
    assert gate.alpha.grad is not None and gate.alpha.grad.dtype == torch.float32


def test_shared_sites_cycle_and_reset():
    sites = [GatedActivation(nn.ReLU(), 4, init=v) for v in (0.0, 1.0)]
    shared = SharedGatedActivation(sites)
    x = -torch.ones(1, 4)
    assert torch.equal(shared(x), torch.zeros(1, 4))
    assert torch.equal(shared(x), x)
    shared.reset()
    assert torch.equal(shared(x), torch.zeros(1, 4))


@pytest.mark.parametrize("kwargs, message", [({"kind": "bilinear"}, "Gate kind"), ({"channel_dim": 2}, "channel_dim")])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedActivation(nn.ReLU(), 4, **kwargs)
