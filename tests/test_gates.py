"""Gate modules: exact endpoints, every activation type, channel layouts, dtypes, higher derivatives."""

from __future__ import annotations

import copy

import pytest
import timm.layers
import torch
import transformers.activations as hf_act
from conftest import FAMILY_CASES, GLU_FFN_CASES, run
from torch import nn

import hf_linearize as hl
from hf_linearize.gates import ExpertGatedActivation, GatedActivation, SharedGatedActivation, _GateFunction

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


def _reference(gate: GatedActivation, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The gate formula written out with plain autograd ops."""
    w = alpha.view(-1, *([1] * (x.dim() - 2))) if gate.channel_dim == 1 and x.dim() > 2 else alpha
    return torch.lerp(gate.act(x), x if gate.kind == "elementwise" else torch.ones_like(x), w)


@pytest.mark.parametrize("kind", ["elementwise", "glu"])
@pytest.mark.parametrize("channel_dim, shape", [(-1, (3, 5, 8)), (1, (3, 8, 4, 4)), (1, (6, 8))])
@pytest.mark.parametrize("alpha", [[0.0] * 8, [0.0, 1.0, 0.25, 0.5, 0.75, 0.0, 1.0, 0.1]])
def test_gradients_match_the_formula(kind, channel_dim, shape, alpha):
    gate = GatedActivation(nn.GELU(), 8, channel_dim=channel_dim, kind=kind).double()
    gate.alpha.data = torch.tensor(alpha, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = gate(x)
    assert torch.equal(out, _reference(gate, x, gate.alpha))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, gate.alpha), g)
    expected = torch.autograd.grad(_reference(gate, x, gate.alpha), (x, gate.alpha), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    def call(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(gate, {"alpha": a}, (x,))

    assert torch.autograd.gradcheck(call, (x, gate.alpha.detach().clone().requires_grad_()))


def test_training_graph_keeps_only_the_input_and_the_gates():
    """act(x) is recomputed in backward, not saved; the output is a fresh tensor that may be changed in place."""
    gate = GatedActivation(nn.SiLU(), 8, init=0.5)
    x = torch.randn(4, 8, requires_grad=True)
    out = gate(x)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is x and saved[1] is gate.alpha
    gate.alpha.data.zero_()  # the all-zero shortcut returns act(x) itself
    out = gate(x)
    assert torch.equal(out, nn.functional.silu(x))
    out.mul_(2.0).sum().backward()
    torch.testing.assert_close(gate.alpha.grad, (2.0 * (x - nn.functional.silu(x))).sum(0).detach())


def test_activation_parameters_and_zero_gates_get_gradients():
    gate = GatedActivation(nn.PReLU(8), 8, init=0.0)
    x = torch.randn(4, 8, requires_grad=True)
    gate(x).sum().backward()
    assert gate.act.weight.grad is not None and bool(gate.act.weight.grad.any())
    torch.testing.assert_close(gate.alpha.grad, (x - gate.act(x)).sum(0).detach())


def test_traced_and_exported_gates_follow_later_gate_values():
    gate = GatedActivation(nn.GELU(), 4)
    x = torch.randn(2, 4)
    traced = torch.jit.trace(gate, x, check_trace=False)
    exported = torch.export.export(gate, (x,)).module()
    gate.alpha.data.fill_(1.0)
    assert torch.equal(traced(x), x) and torch.equal(exported(x), x)


def test_bf16_gate_gradient_is_accumulated_in_fp32():
    gate = GatedActivation(nn.GELU(), 4, init=0.5)
    x = torch.randn(4096, 4, dtype=torch.bfloat16, requires_grad=True)
    gate(x).float().sum().backward()
    exact = (x - nn.functional.gelu(x)).double().sum(0)  # the bf16 terms, summed exactly
    torch.testing.assert_close(gate.alpha.grad.double(), exact, rtol=1e-5, atol=0)  # a bf16 sum is off by ~1e-3


def test_shared_sites_cycle_and_reset():
    sites = [GatedActivation(nn.ReLU(), 4, init=v) for v in (0.0, 1.0)]
    shared = SharedGatedActivation(sites)
    x = -torch.ones(1, 4)
    assert torch.equal(shared(x), torch.zeros(1, 4))
    assert torch.equal(shared(x), x)
    shared.reset()
    assert torch.equal(shared(x), torch.zeros(1, 4))


def test_any_channel_dim_broadcasts_along_that_dim():
    """A (B, C, T) layout after a transpose, or channels in dim 2 of a 4-D tensor: gate c acts on index c only."""
    for dim, shape in ((1, (2, 3, 5)), (2, (2, 5, 3, 4))):
        gate = GatedActivation(nn.ReLU(), 3, channel_dim=dim)
        gate.alpha.data[1] = 1.0
        x = -torch.ones(shape)
        expected = torch.zeros(shape)
        expected.select(dim, 1).fill_(-1.0)
        assert torch.equal(gate(x), expected)


@pytest.mark.parametrize("kwargs, message", [({"kind": "bilinear"}, "Gate kind"), ({"channel_dim": -2}, "channel_dim")])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedActivation(nn.ReLU(), 4, **kwargs)


# ------------------------------------------------------------------------------------------ affine targets
@pytest.mark.parametrize("channel_dim, shape", [(-1, (3, 5, 6)), (1, (3, 6, 4, 4))])
def test_affine_target_is_exact_at_both_ends(channel_dim, shape):
    x = torch.randn(*shape) * 3
    slope, offset = torch.linspace(-1, 2, 6), torch.linspace(0.5, -0.5, 6)
    gate = GatedActivation(nn.GELU(), 6, channel_dim=channel_dim)
    gate.set_targets(slope, offset)
    view = (-1,) + (1,) * (len(shape) - 2) if channel_dim == 1 else (6,)
    assert torch.equal(gate(x), nn.functional.gelu(x))
    gate.alpha.data.fill_(1.0)
    assert torch.equal(gate(x), torch.addcmul(offset.view(view), x, slope.view(view)))
    gate.alpha.data.fill_(0.3)
    torch.testing.assert_close(gate(x), 0.3 * (slope.view(view) * x + offset.view(view))
                               + 0.7 * nn.functional.gelu(x))


def test_affine_glu_target_is_a_constant():
    u = torch.randn(4, 6)
    gate = GatedActivation(nn.SiLU(), 6, kind="glu", init=1.0)
    offset = torch.arange(6.0)
    gate.set_targets(offset=offset)
    assert torch.equal(gate(u), offset.expand(4, 6))
    with pytest.raises(ValueError, match="constant q"):
        gate.set_targets(slope=torch.full((6,), 2.0))
    assert torch.equal(gate.target_slope, torch.ones(6))


def test_default_targets_give_the_same_bits_and_flag():
    x = torch.randn(5, 6)
    gate = GatedActivation(nn.GELU(), 6, init=0.4)
    before = gate(x)
    gate.set_targets(torch.ones(6), torch.zeros(6))
    assert not gate._affine and torch.equal(gate(x), before)
    gate.set_targets(offset=torch.full((6,), 0.1))
    assert gate._affine and not torch.equal(gate(x), before)


@pytest.mark.parametrize("kind", ["elementwise", "glu"])
def test_affine_gradients_match_autograd_of_the_formula(kind):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    gate = GatedActivation(nn.GELU(), 6, kind=kind).double()
    gate.alpha.data = torch.rand(6, dtype=torch.float64)
    gate.set_targets(offset=torch.randn(6))
    if kind == "elementwise":
        gate.set_targets(slope=torch.randn(6))
    g = torch.randn(3, 7, 6, dtype=torch.float64)
    gate(x).backward(g)
    fused = (x.grad.clone(), gate.alpha.grad.clone())
    x.grad = gate.alpha.grad = None
    a, p, q = gate.alpha, gate.target_slope, gate.target_offset
    target = q.expand_as(x) if kind == "glu" else p * x + q
    (a * target + (1 - a) * nn.functional.gelu(x)).backward(g)
    torch.testing.assert_close(fused[0], x.grad)
    torch.testing.assert_close(fused[1], gate.alpha.grad)


def test_targets_are_saved_and_old_state_dicts_load():
    gate = GatedActivation(nn.ReLU(), 4, init=1.0)
    gate.set_targets(torch.full((4,), 0.5), torch.full((4,), 0.25))
    state = gate.state_dict()
    assert set(state) == {"alpha", "target_slope", "target_offset"}
    fresh = GatedActivation(nn.ReLU(), 4)
    fresh.load_state_dict(state)
    x = torch.randn(2, 4)
    assert fresh._affine and torch.equal(fresh(x), gate(x))
    old = GatedActivation(nn.ReLU(), 4)
    old.load_state_dict({"alpha": torch.ones(4)})  # format 1: gates only, default targets
    assert not old._affine and torch.equal(old(x), x)
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        gate.set_targets(torch.ones(3))


# ------------------------------------------------------------------------------------------ dtypes
CASTS = {
    "half()": lambda m: m.half(),
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "to(cpu, float16)": lambda m: m.to("cpu", torch.float16),
    "to(dtype=float64)": lambda m: m.to(dtype=torch.float64),
}


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_gates_stay_fp32_when_the_model_is_cast(cast):
    """Every gate kind (plain, shared, per expert) keeps alpha, its targets and its gradient in fp32, with the same
    values; the activation's own parameters (PReLU) follow the cast."""
    def gate(init: float) -> GatedActivation:
        return GatedActivation(nn.PReLU(4), 4, init=init)

    model = nn.ModuleDict({"plain": gate(0.1), "tied": SharedGatedActivation([gate(0.2), gate(0.3)]),
                           "experts": ExpertGatedActivation([gate(0.4), gate(0.5)])})
    gates = [m for m in model.modules() if isinstance(m, GatedActivation)]
    for g in gates:
        g.set_targets(torch.full((4,), 1.1), torch.full((4,), 0.1))
        g.alpha.grad = torch.full((4,), 0.7)
    before = [{k: t.clone() for k, t in g.state_dict().items()} for g in gates]
    CASTS[cast](model)
    dtype = model["plain"].act.weight.dtype
    assert dtype != torch.float32, "the activation's parameters follow the cast"
    for g, saved in zip(gates, before):
        assert {t.dtype for t in (g.alpha, g.alpha.grad, g.target_slope, g.target_offset)} == {torch.float32}
        assert all(torch.equal(t, saved[k]) for k, t in g.state_dict().items()), "the values are unchanged"
        x = torch.randn(3, 4, dtype=dtype)
        assert g(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["marian", "llama"])
def test_a_cast_model_computes_in_its_dtype_and_is_bit_exact_at_gate_zero(case, dtype, monkeypatch):
    """A model patched in fp32 and cast computes in the cast dtype; at gate 0 it gives the bits of the unpatched model
    cast alike, also through the interpolation itself (as on an accelerator, where the all-zero shortcut is off)."""
    torch.manual_seed(0)
    model, inputs = {**FAMILY_CASES, **GLU_FFN_CASES}[case]()
    reference = copy.deepcopy(model.eval()).to(dtype)
    patched = hl.patch_model(model, example_inputs=inputs).to(dtype)
    monkeypatch.setattr(GatedActivation, "_all_zero", lambda self: False)
    with torch.no_grad():
        expected = run(reference, inputs)
        assert torch.equal(run(patched, inputs), expected) and expected.dtype == dtype
    assert torch.equal(run(patched, inputs), expected), "the training path (autograd function) too"
    hl.set_linear(patched, 0.5)
    assert run(patched, inputs).dtype == dtype
    assert {g.alpha.dtype for _, g in hl.gated_modules(patched)} == {torch.float32}


# ------------------------------------------------------------------------------------------ higher derivatives
@pytest.mark.parametrize("kind", ["elementwise", "glu"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("channel_dim, shape", [(-1, (2, 3, 4)), (1, (2, 4, 3))])
def test_gate_function_has_exact_first_and_second_derivatives(kind, affine, channel_dim, shape):
    """gradcheck and gradgradcheck (float64) of the autograd function, at all-zero gates (its shortcut) and at random
    gates."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()
    targets = (torch.rand(4, dtype=torch.float64, generator=generator) + 0.5,
               torch.randn(4, dtype=torch.float64, generator=generator)) if affine else None
    if targets is not None and kind == "glu":
        targets = (torch.ones(4, dtype=torch.float64), targets[1])

    def gate(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:  # all_zero as GatedActivation decides it
        all_zero = not bool(alpha.detach().any())
        return _GateFunction.apply(x, alpha, nn.GELU(), channel_dim, kind == "glu", all_zero, targets, None)

    for alpha in (torch.zeros(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64, generator=generator)):
        assert torch.autograd.gradcheck(gate, (x, alpha.requires_grad_()))
        assert torch.autograd.gradgradcheck(gate, (x, alpha))


def _gradient_penalty(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """``|d loss / d inputs_embeds|^2`` with ``create_graph=True``, backpropagated into the parameters."""
    embeds = embeds.clone().requires_grad_()
    out = model(inputs_embeds=embeds)[0]  # logits, or BERT's last hidden state
    loss = (out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))).sum().pow(2)
    (grad,) = torch.autograd.grad(loss, embeds, create_graph=True)
    penalty = grad.pow(2).sum()
    penalty.backward()
    return penalty.detach()


def _plain_gate(x, alpha, act, channel_dim, glu, all_zero, affine, act_x):
    """The gate written out with plain autograd ops: the reference for ``_GateFunction``."""
    y = act(x) if act_x is None else act_x
    w = alpha.to(x.dtype)
    if channel_dim % x.dim() != x.dim() - 1:
        w = w.view(-1, *([1] * (x.dim() - 1 - channel_dim % x.dim())))
    target = torch.ones_like(x) if glu else x
    if affine is not None:
        slope, offset = (t.to(x.dtype).view_as(w) for t in affine)
        target = offset.expand_as(x) if glu else slope * x + offset
    return w * target + (1 - w) * y


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_a_gradient_penalty_through_a_patched_model(case, monkeypatch):
    """Double backward works: at gate 0 the penalty and every parameter gradient equal the unpatched model's; at random
    gates (affine targets included) they match the gate written out in plain autograd ops, gate gradients too."""
    torch.manual_seed(0)
    model, _ = {**FAMILY_CASES, **GLU_FFN_CASES}[case]()
    model = copy.deepcopy(model).eval().double()  # its own config: the case's config is shared with other tests
    model.set_attn_implementation("eager")  # torch's SDPA kernels have no double backward on the CPU
    embeds = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64)
    reference = copy.deepcopy(model)
    hl.patch_model(model)
    assert torch.equal(_gradient_penalty(model, embeds), _gradient_penalty(reference, embeds))
    named = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if not name.endswith("alpha"):
            torch.testing.assert_close(param.grad, named[name].grad, rtol=1e-10, atol=1e-12)
    generator = torch.Generator().manual_seed(1)
    for _, gate in hl.gated_modules(model):
        gate.alpha.data = torch.rand(gate.channels, generator=generator)
        gate.set_targets(offset=torch.randn(gate.channels, generator=generator) * 0.1)
    model.zero_grad()
    penalty = _gradient_penalty(model, embeds)
    grads = {name: param.grad for name, param in model.named_parameters()}  # None where unused (a pooler)
    model.zero_grad()
    monkeypatch.setattr(_GateFunction, "apply", _plain_gate)
    torch.testing.assert_close(penalty, _gradient_penalty(model, embeds), rtol=1e-10, atol=0)
    assert any(name.endswith("alpha") for name in grads)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, msg=name)  # the gates' fp32 gradients to fp32 rounding
