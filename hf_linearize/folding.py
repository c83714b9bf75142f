"""Folding: turn the linear units of a patched model into a smaller, faster model that computes the same function.

An FFN ``y = W2 act(W1 x + b1) + b2`` whose units split into linear units ``L`` (gate >= 1 - ``linear_threshold``,
the rule of :func:`~hf_linearize.summary`) and nonlinear units ``N`` becomes::

    y = W2[:, N] gate_N(W1[N] x + b1[N]) + M x + m,    M = W2[:, L] W1[L],    m = W2[:, L] b1[L] + b2

A gated FFN ``y = W2 (g(u) * v) + b2`` (GLU site) folds the same way with the value projection ``v`` in place of
``W1``: a linear GLU unit is ``h_c = v_c``, and the rows of its gate projection are dropped.

Per site, the cheaper of two forms is kept (MACs per position, i.e. per token or pixel):

* ``"dense"``: ``M`` is one ``d_out x d_in`` matrix, when ``|L| (d_in + d_out) > d_in d_out``;
* ``"factorised"``: ``W2[:, L]`` and ``W1[L]`` stay as a low-rank pair (the units are only reordered, and the
  activation runs on ``N`` alone; with every unit linear, the pair without an activation);
* ``"affine"``: every unit linear and the dense map the cheaper: the whole FFN is one affine map;
* ``"unchanged"``: no unit linear: the original projections stay, and a gate whose values are all 0 becomes the
  bare activation again (no gate cost).

Nonlinear units keep their gate values: a unit with ``0 < a < 1`` stays in ``N`` and still computes
``a t(x) + (1 - a) act(x)`` with its linear target ``t``. A unit with ``1 - linear_threshold <= a < 1`` counts as
linear (``summary``'s rule; the trainer snaps such units to exactly 1) and folds as its target, which changes its
output by at most ``linear_threshold * |act(x) - t(x)|``.

Affine linear targets (``GatedActivation.set_targets``): a linear unit with target ``p x + q`` folds into
``M = W2[:, L] diag(p) W1[L]``, ``m = W2[:, L] (p b1[L] + q) + b2``; a GLU unit with constant target ``q`` into
``W2[:, L] diag(q) W_v[L]``.

**Where the projections come from: the traced data flow.** ``fold`` runs the gated model once (on
``example_inputs``, else on the probe it was patched with, :func:`~hf_linearize.probe_inputs.recorded_probe` of
``patch_state(model).probe``) under :func:`hf_linearize.dataflow.record`, the record patching reads its sites from,
and notes the tensors every module call read and returned. For each call of a gated site,
:meth:`~hf_linearize.dataflow.ModelGraph.region` gives its FFN (producer and consumer projections, GLU multiplier,
layout). From the site's input (and a GLU's multiplier) fold walks back, through ops that pass a value on unchanged
(casts, ``contiguous``, ``clone``, eval-mode dropout) and, for a packed GLU, one slice of the channel dim, to the
*module call* that produced it; from the site's output it walks forward, through the same ops and a GLU's product,
to the module call that reads it. Such a module folds when it is a per-position linear map holding only a weight and
a bias — ``nn.Linear`` (and subclasses), transformers ``Conv1D`` (GPT-2: weight ``[in, out]``, run as ``addmm``) or a
1x1 convolution (``nn.Conv1d/2d/3d``, timm ``ConvMlp``) — whose recorded output is ``W x + b`` computed from its own
parameters (its forward is exactly the projection), used by this FFN alone (no tied weights, called once per site
call), and when no other op reads the FFN's hidden values. A gated FFN is replaced as a whole: the innermost module
whose one argument passes unchanged to its projections and whose output is ``fc_out``'s (LLaMA ``mlp``, T5
``DenseReluDense``, timm ``GluMlp``/``SwiGLU``, Phi-3 ``mlp``). Fused MoE experts (transformers 5 experts modules
with 3-D ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``) are recognised from the stacked weights the site's
producer and consumer read, and checked on the experts module with a routing that visits every expert.

Sites are folded in the order the pass calls them, each from the modules that stand at the traced names at that
moment: in an MLP stack whose ``fc_out`` of one site is the ``fc_in`` of the next, the second site folds the
projection that the first one built. Anything else stays gated (form ``"gated"``) with the reason in
:func:`fold_report`: an activation shared by several call sites, a norm or other op between the projections, a
projection that is not a linear map of each position (a k x k convolution: CNN activations stay gated, since merging
convolutions across a linear unit grows the kernel, 3x3 o 3x3 -> 5x5, or is inexact at zero-padded borders),
activations with parameters (PReLU), a GLU computed by no module of its own.

**Experts.** Each expert folds on its own units, and the fused 3-D weights stay fused for the experts
implementation (``grouped_mm``, ``batched_mm``, ``eager``). The fused block keeps ``w`` units per expert: the most
nonlinear units of any expert, rounded up to whole 16-byte rows of the stacks (``grouped_mm`` needs them; ``w``
never exceeds ``I``). Every expert moves ``l = I - w`` of its linear units into a per-expert linear part
(factorised ``[E, l, H]``/``[E, H, l]`` stacks) and keeps the others in the block at gate 1; or, when
``2 l > H``, all its linear units go into one dense ``[E, H, H]`` stack ``M_e`` and the block is padded with zero
rows. Per routed token and expert that is ``3 w H + 2 l H`` (or ``3 w H + H^2``) MACs instead of ``3 I H``: never
more. With ``l = 0`` (some expert has no linear unit, or the rounding to whole rows takes them all) the experts stay
as they are (form ``"unchanged"``, with the reason).
:class:`FoldedExperts` computes the block through the original experts module and adds the linear part.

The folded projections are ordinary ``nn.Linear``/``nn.ConvNd`` modules inside :class:`FoldedInput` (the
nonlinear part plus the input carried through for ``M``), :class:`FoldedGluFFN` and :class:`FoldedExperts`; they
replace the original modules in place, so the folded model stays a transformers/timm model (``generate``,
``torch.compile`` and ``torch.export`` work; an experts module loops over its routed experts for the linear part).
Folding is exact in eval mode: a dropout that the owner applies between the projections (train mode only) would
also hit the carried input.

The folded model records its :class:`FoldState`: the report, the *plan* (which units were linear, which sites
kept gates, the form of each site) and the gated model's summary and path lengths. ``hub.save_pretrained`` writes a
folded model as the ``"folded"`` variant of the linearized checkpoint, and ``from_pretrained`` rebuilds it with
:func:`refold`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from . import dataflow
from .gates import ExpertGatedActivation, GatedActivation, SharedGatedActivation
from .patching import (
    FOLD_ATTR,
    STATE_ATTR,
    ExpertRouting,
    PatchState,
    _aliases,
    gate_wrappers,
    gated_modules,
    linear_units,
    patch_state,
    summary,
)
from .probe_inputs import (
    _call,
    _float_leaves,
    _model_name,
    _shapes,
    recorded_probe,
)

Projection = Union[nn.Linear, nn.modules.conv._ConvNd]
Key = dataflow.Key


# --------------------------------------------------------------------------------------------- folded modules
class FoldedInput(nn.Module):
    """Input side of a folded plain FFN, in place of its first projection (the site becomes ``nn.Identity``).

    ``proj`` computes ``[W1[N] x + b1[N], (factorised) W1[L] x + b1[L]]``; the output is
    ``cat([act_N(first nonlinear channels), the linear rows, (dense) x], channel_dim)`` for the new second
    projection ``[W2[:, N], W2[:, L] | M]`` to read.

    Args:
        proj: ``nn.Linear`` (channels last) or 1x1 convolution (channels first, ``channel_dim=1``).
        nonlinear: how many of ``proj``'s outputs are nonlinear units (they come first); at least 1.
        act: the activation of those units (a :class:`GatedActivation` where some of their gates are above 0).
        carry: append the FFN input itself (dense form).
    """

    def __init__(self, proj: Projection, nonlinear: int, act: nn.Module, carry: bool, channel_dim: int) -> None:
        super().__init__()
        self.proj, self.act = proj, act
        self.nonlinear, self.carry, self.channel_dim = nonlinear, carry, channel_dim

    def extra_repr(self) -> str:
        return f"nonlinear={self.nonlinear}, carry={self.carry}, channel_dim={self.channel_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)
        linear = z.shape[self.channel_dim] - self.nonlinear
        parts = [self.act(z.narrow(self.channel_dim, 0, self.nonlinear))]
        if linear:
            parts.append(z.narrow(self.channel_dim, self.nonlinear, linear))
        if self.carry:
            parts.append(x)
        return torch.cat(parts, self.channel_dim) if len(parts) > 1 else parts[0]


class FoldedGluFFN(nn.Module):
    """A folded gated FFN, in place of the whole FFN module: ``out(cat([g_N(u_N) * v_N, v_L, x]))``.

    ``proj`` computes ``[u_N, v_N, (factorised) v_L]`` in one matmul; ``gate`` is the nonlinear units' activation
    (a GLU :class:`GatedActivation` where some of their gates are above 0); ``carry`` appends ``x`` (dense form).
    """

    def __init__(self, proj: Projection, nonlinear: int, gate: nn.Module, carry: bool, out: Projection,
                 channel_dim: int) -> None:
        super().__init__()
        self.proj, self.gate, self.out = proj, gate, out
        self.nonlinear, self.carry, self.channel_dim = nonlinear, carry, channel_dim

    def extra_repr(self) -> str:
        return f"nonlinear={self.nonlinear}, carry={self.carry}, channel_dim={self.channel_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)
        n, dim = self.nonlinear, self.channel_dim
        parts = [self.gate(z.narrow(dim, 0, n)) * z.narrow(dim, n, n)]
        linear = z.shape[dim] - 2 * n
        if linear:
            parts.append(z.narrow(dim, 2 * n, linear))
        if self.carry:
            parts.append(x)
        return self.out(torch.cat(parts, dim) if len(parts) > 1 else parts[0])


class FoldedExperts(nn.Module):
    """A folded fused-experts module, in place of one (same call: ``(hidden_states [T, H], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, H]``): ``block(...) + sum_k w_k lin_e(x)`` over each token's routed experts ``e``.

    Args:
        block: the original experts module (same class and implementation) with its fused weights narrowed to the
            units each expert keeps nonlinear (padded to one width), or None when no expert keeps one.
        linear: the per-expert linear part, in the model's dtype: ``(lin_in [E, l, H_in], lin_out [E, H_out,
            l])`` (factorised: ``lin_e(x) = lin_out[e] lin_in[e] x``) or ``(dense [E, H_out, H_in],)``.
    Expert ids ``>= E`` (expert-parallel sentinels) contribute no linear part.
    """

    def __init__(self, block: Optional[nn.Module], linear: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.block = block
        self.linear = nn.ParameterList([nn.Parameter(t) for t in linear])

    def extra_repr(self) -> str:
        form = "dense" if len(self.linear) == 1 else f"factorised, {self.linear[0].shape[1]} linear units"
        return f"experts={self.linear[0].shape[0]}, linear part: {form}"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = (self.block(hidden_states, top_k_index, top_k_weights) if self.block is not None
               else torch.zeros_like(hidden_states))
        for expert in top_k_index.unique().tolist():
            if expert >= self.linear[0].shape[0]:
                continue
            token, k = torch.where(top_k_index == expert)
            y = hidden_states[token]
            for weight in self.linear:
                y = F.linear(y, weight[expert])
            out = out.index_add(0, token, (y * top_k_weights[token, k, None]).to(out.dtype))
        return out


# --------------------------------------------------------------------------------------------- report
@dataclass
class SiteFold:
    """How one gated site was folded. ``params``: parameters of the modules the site involves (projections and
    gates); ``macs``: multiply-accumulates per position (token or pixel; for an expert, per token routed to it) of
    its projections (0 for a site that stays gated)."""

    site: str
    form: str
    """``"affine"``, ``"dense"``, ``"factorised"``, ``"unchanged"`` or ``"gated"`` (not folded; see ``note``)."""
    units: int
    linear: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    note: str = ""


class FoldReport(dict):
    """:func:`fold_report` result: ``sites`` (name -> :class:`SiteFold` fields), ``total`` (``params_before``/
    ``params_after`` of the whole model, ``ffn_macs_before/after`` per position over the projections of the folded
    FFNs (each counted once; experts summed over experts), and ``flops_before/after`` of one forward on the check
    input when one was run). ``str()`` renders a table."""

    def __str__(self) -> str:
        rows = [(n, s["form"], s["units"], s["linear"], s["macs_before"], s["macs_after"], s["note"])
                for n, s in self["sites"].items()]
        width = max([len(r[0]) for r in rows] + [5])
        lines = [f"{'site':<{width}}  {'form':<10}  {'units':>6}  {'linear':>6}  {'MACs before':>11}  {'after':>9}"]
        lines += [f"{n:<{width}}  {f:<10}  {u:>6}  {lin:>6}  {mb:>11}  {ma:>9}{'  ' + note if note else ''}"
                  for n, f, u, lin, mb, ma, note in rows]
        t = self["total"]
        lines.append(f"params {t['params_before']:,} -> {t['params_after']:,}; FFN MACs per position "
                     f"{t['ffn_macs_before']:,} -> {t['ffn_macs_after']:,}")
        if t.get("flops_before"):
            lines.append(f"FLOPs of one probe forward {t['flops_before']:,} -> {t['flops_after']:,}")
        return "\n".join(lines)


@dataclass
class FoldState:
    """What ``fold`` records on the folded model (as ``model._hf_linearize_fold``)."""

    report: FoldReport
    plan: dict[str, Any]
    """What :func:`refold` needs to rebuild the folded structure from the gated architecture (JSON-ready):
    ``linear_units`` (site -> indices of its linear units), ``kept_gates`` (sites whose nonlinear units keep a
    gate because some of their gate values are above 0), ``affine_targets`` (sites with linear targets other
    than the default) and ``forms`` (site -> form, checked by :func:`refold`). The folded structure follows from
    these and the model's traced FFNs alone, never from weight values."""
    source: dict[str, Any]
    """The gated model's ``family``, ``linearize_config`` (dict), ``sites`` (name -> units), ``summary`` and
    ``path_length`` report (None where the family has no path graph), as measured at fold time."""


def is_folded(model: nn.Module) -> bool:
    return isinstance(getattr(model, FOLD_ATTR, None), FoldState)


def fold_report(model: nn.Module) -> FoldReport:
    """The :class:`FoldReport` of a model returned by :func:`fold`; ``ValueError`` for any other model."""
    return fold_state(model).report


def fold_state(model: nn.Module) -> FoldState:
    """The :class:`FoldState` of a model returned by :func:`fold`; ``ValueError`` for any other model."""
    if not is_folded(model):
        raise ValueError(f"{type(model).__name__} is not folded; this needs the model returned by fold(model).")
    return getattr(model, FOLD_ATTR)


# --------------------------------------------------------------------------------------------- projections
class _NoFold(Exception):
    """A site that stays gated; the message says why, in words."""


def _feature_dim(module: nn.Module) -> Optional[int]:
    """The output-channel dim of a per-position linear map (-1: ``nn.Linear``, ``Conv1D``; 1: 1x1 convolution),
    or None for any other module."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return -1
    if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed or module.groups != 1:
        return None
    pointwise = all(k == 1 and s == 1 and d == 1 for k, s, d in zip(module.kernel_size, module.stride, module.dilation))
    unpadded = module.padding == "valid" or not any(module.padding)
    return 1 if pointwise and unpadded else None


def _describe(module: nn.Module) -> str:
    """``"3x3 Conv2d (stride (2, 2), groups 8)"`` for a convolution, else the class name."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return type(module).__name__
    extra = ([f"stride {module.stride}"] if any(s != 1 for s in module.stride) else []) + (
        [f"groups {module.groups}"] if module.groups != 1 else [])
    kernel = "x".join(map(str, module.kernel_size))
    return f"{kernel} {type(module).__name__}" + (f" ({', '.join(extra)})" if extra else "")


def _matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [out, in], b [out])`` of a per-position linear map, in float64 (b = 0 without bias)."""
    weight = module.weight.detach().double()
    weight = weight.t() if isinstance(module, Conv1D) else weight.reshape(weight.shape[0], -1)
    bias = module.bias.detach().double() if module.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias


def _apply(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``W x + b`` along ``dim`` of ``x`` (float64)."""
    return F.linear(x.double().movedim(dim, -1), weight, bias).movedim(-1, dim)


def _projection(like: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Projection:
    """A new ``nn.Linear`` (or a 1x1 convolution, following ``like``) computing ``weight @ x + bias``, in ``like``'s
    dtype/device. A ``Conv1D`` becomes an ``nn.Linear``."""
    out_features, in_features = weight.shape
    factory = dict(device=like.weight.device, dtype=like.weight.dtype)
    if isinstance(like, nn.modules.conv._ConvNd):
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[like.weight.dim() - 3]
        proj: Projection = conv(in_features, out_features, 1, bias=bias is not None, **factory)
    else:
        proj = nn.Linear(in_features, out_features, bias=bias is not None, **factory)
    with torch.no_grad():
        proj.weight.copy_(weight.reshape(proj.weight.shape))
        if bias is not None:
            proj.bias.copy_(bias)
    return proj


def _tolerance(scale: torch.Tensor, dtype: torch.dtype, width: int) -> float:
    """Rounding allowance for a sum of ``width`` products whose magnitudes add up to ``scale``."""
    return 4 * math.sqrt(width) * torch.finfo(dtype).eps * max(float(scale.max()) if scale.numel() else 0.0, 1e-30)


def _linear_response(gate: GatedActivation, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 scale ``s`` and shift ``t`` of the linear ``units``: ``h_L = s * (W[L] x + b[L]) + t`` with ``W, b``
    the projection that carries them (``fc_in``, or the value projection of a GLU). A unit's linear target
    ``p x + q`` gives ``s = p, t = q``; a GLU unit's constant target ``q`` gives ``h = q v``: ``s = q, t = 0``. The
    default targets are the identity (``s = 1, t = 0``) and, for GLU units, ``h = 1 * v``."""
    ones, zeros = (torch.full((units.numel(),), value, dtype=torch.float64, device=units.device)
                   for value in (1.0, 0.0))
    targets = gate._affine_targets()
    if targets is None:
        return ones, zeros
    slope, offset = (t.detach().double()[units.to(t.device)].to(units.device) for t in targets)
    return (offset, zeros) if gate.kind == "glu" else (slope, offset)


def _shifted(gate: GatedActivation) -> bool:
    """Whether linear units of ``gate`` add a constant (an elementwise target ``p x + q`` other than ``x``): the
    folded projections then need a bias even where the original ones had none."""
    return gate.kind == "elementwise" and gate._affine_targets() is not None


def _kept_gate(gate: GatedActivation, alpha: torch.Tensor, offset: torch.Tensor, slope: torch.Tensor,
               affine: bool) -> GatedActivation:
    """A gate like ``gate`` (on its device) over ``alpha.numel()`` units with the given gate values and (when
    ``affine``) targets."""
    kept = GatedActivation(gate.act, int(alpha.numel()), gate.channel_dim, gate.kind).to(gate.alpha.device)
    with torch.no_grad():
        kept.alpha.copy_(alpha)
    if affine:
        kept.set_targets(None if gate.kind == "glu" else slope, offset)
    return kept


def _nonlinear_act(gate: GatedActivation, nonlinear: torch.Tensor) -> nn.Module:
    """The activation of the nonlinear units: the bare activation when all their gates are 0, else a gate that
    keeps their gate values and linear targets."""
    alpha = gate.alpha.detach()[nonlinear]
    if not bool(alpha.any()):
        return gate.act
    return _kept_gate(gate, alpha, gate.target_offset[nonlinear], gate.target_slope[nonlinear],
                      gate._affine_targets() is not None)


def _macs(*modules: nn.Module) -> int:
    """MACs per position of the per-position linear maps in ``modules``: the sizes of their weights (every
    parameter of 2 or more dims; an experts module's stacks count every expert)."""
    return sum(p.numel() for m in modules for p in m.parameters() if p.dim() >= 2)


def _bias(bias: torch.Tensor, present: bool) -> Optional[torch.Tensor]:
    """``bias`` where the folded projection has one, else None (``bias`` is then 0 by construction). Whether it has
    one depends on the structure alone (biases of the sources, shifted targets), never on values, so that
    :func:`refold` rebuilds the same modules from any weights."""
    return bias if present else None


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# --------------------------------------------------------------------------------------------- the trace
_PASS = frozenset({"contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "double", "type", "type_as",
                   "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})
"""Ops that hand a value on unchanged (at most a cast; dropout in eval mode): they may stand between an FFN's
projections and its site. Reshapes may not, since the folded hidden layer has another width."""
_SLICES = frozenset({"chunk", "split", "tensor_split", "split_with_sizes", "__getitem__", "narrow"})
"""Ops that take the ``u`` or ``v`` half of a packed GLU projection's output (a view of one channel range)."""


@dataclass(frozen=True)
class _Call:
    """One call of a module in the traced pass: per leaf of ``(args, kwargs)`` and of its output, the key of the
    data tensor it is (None for anything else)."""

    args: tuple[Optional[Key], ...]
    outputs: tuple[Optional[Key], ...]

    def only_arg(self) -> Optional[Key]:
        """The key of its one argument, when it was called with exactly one data tensor and nothing else."""
        return self.args[0] if len(self.args) == 1 else None

    def only_output(self) -> Optional[Key]:
        return self.outputs[0] if len(self.outputs) == 1 else None


@dataclass(frozen=True)
class FFN:
    """The FFN of one gated site, as the trace shows it (module names of the traced model).

    Attributes:
        layout: ``elementwise`` (``fc_out(act(fc_in x))``), ``glu`` (``fc_out(act(fc_in x) * fc_value x)``),
            ``packed-glu`` (``fc_in`` computes both; ``halves`` are the first channels of ``u`` and ``v`` in its
            output) or ``expert`` (``owner`` is a fused experts module).
        owner: GLU: the module that computes exactly this FFN (replaced whole); experts: the experts module.
        channel_dim: the dim of ``fc_in``'s output (and ``fc_out``'s input) that holds the units.
    """

    layout: str
    fc_in: str = ""
    fc_out: str = ""
    fc_value: str = ""
    halves: tuple[int, int] = (0, 0)
    owner: str = ""
    channel_dim: int = -1


class _Trace:
    """One recorded pass of a patched model in eval mode: its data flow (:class:`~hf_linearize.dataflow.ModelGraph`,
    every outermost gate module a site) and, per module, its calls (:class:`_Call`)."""

    def __init__(self, model: nn.Module, inputs: Any) -> None:
        self.model = model
        self.wrappers = dict(gate_wrappers(model))
        inside = tuple(name + "." for name in self.wrappers)
        modules = {name: m for name, m in model.named_modules() if name not in self.wrappers
                   and not name.startswith(inside)}
        pending: dict[str, list[list]] = {}
        raw: dict[str, list[tuple[list, list]]] = {}

        def leaves(tree: Any) -> list[Optional[tuple[torch.Tensor, Key]]]:  # the tensor kept alive: ids stay unique
            return [(t, dataflow._key(t)) if isinstance(t, torch.Tensor) else None for t in pytree.tree_leaves(tree)]

        def enter(name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
            pending.setdefault(name, []).append(leaves((args, kwargs)))

        def leave(name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            raw.setdefault(name, []).append((pending[name].pop(), leaves(output)))

        handles = []
        try:
            for name, module in modules.items():
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, n=name: enter(n, m, a, k), with_kwargs=True))
                handles.append(module.register_forward_hook(
                    lambda m, a, k, o, n=name: leave(n, m, a, k, o), with_kwargs=True))
            self.graph = dataflow.record(model, lambda: _call(model, inputs), inputs, self.wrappers)
        finally:
            for handle in handles:
                handle.remove()
        values = self.graph.values

        def keys(items: list) -> tuple[Optional[Key], ...]:
            return tuple(item[1] if item is not None and item[1] in values else None for item in items)

        self.calls: dict[str, list[_Call]] = {name: [_Call(keys(a), keys(o)) for a, o in calls]
                                              for name, calls in raw.items()}
        self._by_output: dict[Key, list[tuple[str, _Call]]] = {}
        self._by_input: dict[Key, list[tuple[str, _Call]]] = {}
        for name, calls in self.calls.items():
            for call in calls:
                if call.only_output() is not None:
                    self._by_output.setdefault(call.only_output(), []).append((name, call))
                if call.args and call.args[0] is not None:
                    self._by_input.setdefault(call.args[0], []).append((name, call))
        self._param_names = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
        owners: dict[int, set[int]] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(id(module))
        self._tied = {pid for pid, mods in owners.items() if len(mods) > 1}

    # ------------------------------------------------------------------------------------------ lookups
    def param_name(self, tensor: Optional[torch.Tensor]) -> Optional[str]:
        """The parameter (dotted name) whose storage ``tensor`` views, if any."""
        return None if tensor is None else self._param_names.get(tensor.untyped_storage().data_ptr())

    def _projection_call(self, index: dict, key: Key) -> Optional[tuple[str, _Call]]:
        """The innermost call of a per-position linear module (:func:`_feature_dim`) that returned (or read as its
        first argument) ``key``."""
        found = [(name, call) for name, call in index.get(key, [])
                 if _feature_dim(self.model.get_submodule(name)) is not None]
        return max(found, key=lambda item: item[0].count(".")) if found else None

    def _writer(self, key: Key, what: str) -> dataflow.Op:
        op = self.graph.writer.get(key)
        if op is None:
            raise _NoFold(f"{what} does not come from a projection of the model's input")
        return op

    def _op_between(self, op: dataflow.Op, where: str) -> _NoFold:
        """Why ``op`` (found between a site and a projection) stops the fold, in words."""
        weight = self.graph.weight(op)
        name = self.param_name(weight)
        if name is not None:
            module_name = name.rpartition(".")[0]
            return _NoFold(_not_a_projection(module_name, self.model.get_submodule(module_name), where))
        return _NoFold(f"the op {op.name!r} lies between {where}; only casts, contiguous/clone and eval-mode dropout "
                       "may (a norm or a residual add between the projections does not fold)")

    # ------------------------------------------------------------------------------------------ walks
    def hands_on(self, op: Optional[dataflow.Op]) -> bool:
        """Whether ``op`` is one of :data:`_PASS` applied to a data value (a dropout: one that left it unchanged)."""
        if op is None or op.name not in _PASS or op.reads[0] is None:
            return False
        values = self.graph.values
        return "dropout" not in op.name or torch.equal(values[op.writes[0]], values[op.reads[0]])

    def passes(self, start: Key, end: Key) -> bool:
        """Whether ``end`` is ``start`` handed on through :data:`_PASS` ops only."""
        while end != start:
            op = self.graph.writer.get(end)
            if not self.hands_on(op):
                return False
            end = op.reads[0]
        return True

    def walk_back(self, key: Key, slicing: bool, what: str
                  ) -> tuple[str, _Call, Optional[tuple[int, int]], list[dataflow.Op]]:
        """From ``key`` back through :data:`_PASS` ops (and, with ``slicing``, one slice of a channel range) to the
        call of the per-position linear module that produced it. Returns its name and call, ``(dim, first
        channel)`` of the slice (None without one) and the ops passed."""
        ops: list[dataflow.Op] = []
        sliced = None
        while True:
            found = self._projection_call(self._by_output, key)
            if found is not None:
                return found[0], found[1], sliced, ops
            op = self._writer(key, what)
            if self.hands_on(op):
                pass
            elif slicing and sliced is None and op.name in _SLICES and op.reads[0] is not None:
                sliced = _slice(op, key)
            else:
                raise self._op_between(op, f"{what} and its projection")
            ops.append(op)
            key = op.reads[0]

    def walk_forward(self, key: Key, multiplier: Optional[Key]
                     ) -> tuple[str, _Call, list[dataflow.Op]]:
        """From the site output ``key`` forward through :data:`_PASS` ops (and a GLU's product with
        ``multiplier``) to the call of the per-position linear module that reads it. Returns its name and call and
        the ops passed."""
        ops: list[dataflow.Op] = []
        product = None
        while True:
            found = self._projection_call(self._by_input, key)
            if found is not None and (multiplier is None or product is not None):
                return found[0], found[1], ops
            readers = self.graph.readers.get(key, [])
            if len(readers) != 1:
                raise _NoFold(f"the activation's output reaches {len(readers)} ops ({[r.name for r in readers][:4]}) "
                              "instead of one projection")
            op = readers[0]
            values = self.graph.values
            if self.hands_on(op) and op.reads[0] == key:
                pass
            elif (op.name in dataflow._PRODUCTS and multiplier is not None and product is None
                  and {k for k in op.reads if k is not None} == {key, multiplier}
                  and values[multiplier].shape == values[op.writes[0]].shape == values[key].shape):
                product = op
            else:
                raise self._op_between(op, "the activation and its output projection")
            ops.append(op)
            key = op.writes[0]

    # ------------------------------------------------------------------------------------------ checks
    def check_projection(self, name: str, call: _Call) -> nn.Module:
        """The module ``name`` if its traced call was exactly ``W x + b`` from its own weight and bias, by this FFN
        alone; ``_NoFold`` otherwise."""
        module = self.model.get_submodule(name)
        extra = [n for n, _ in module.named_parameters() if n not in ("weight", "bias")] + list(
            n for n, _ in module.named_children())
        if extra:
            raise _NoFold(f"{name} ({type(module).__name__}) holds more than a weight and a bias ({extra[:3]})")
        tied = [n for n, p in module.named_parameters() if id(p) in self._tied]
        if tied:
            raise _NoFold(f"{name}.{tied[0]} is tied to another module's parameter")
        x_key, y_key = call.only_arg(), call.only_output()
        if x_key is None or y_key is None:
            raise _NoFold(f"{name} is called with or returns more than one tensor")
        x, y = self.graph.values[x_key], self.graph.values[y_key]
        weight, bias = _matrix(module)
        dim = _feature_dim(module)
        expected = _apply(weight, bias, x, dim)
        scale = _apply(weight.abs(), bias.abs(), x.abs(), dim)
        error = float((y.double() - expected).abs().max()) if y.shape == expected.shape else math.inf
        if not error <= _tolerance(scale, y.dtype, weight.shape[1]):
            raise _NoFold(f"{name} ({type(module).__name__}) does not compute W x + b from its own weight and bias "
                          f"(difference {error:.3g} on the trace input): its forward does more than the projection")
        return module

    def closed(self, keys: list[Key], ops: list[dataflow.Op], read_once: Key) -> None:
        """``_NoFold`` unless only ``ops`` read the FFN's hidden values ``keys``, and one op (the output
        projection's) reads ``read_once``."""
        allowed = {op.index for op in ops}
        for key in keys:
            other = [r for r in self.graph.readers.get(key, []) if r.index not in allowed]
            if other:
                raise _NoFold(f"a {other[0].name} op also reads the FFN's hidden values, which folding changes")
        if len(self.graph.readers.get(read_once, [])) != 1:
            raise _NoFold("the output projection's input is read by other ops too, which folding changes")


def _slice(op: dataflow.Op, key: Key) -> tuple[int, int]:
    """``(dim, first channel)`` of the output ``key`` of a slicing op, a view of one channel range of its input;
    ``_NoFold`` for any other slice (an interleaved or multi-dim one)."""
    source, out = op.leaves[0], op.outputs[op.writes.index(key)]
    differ = [d for d in range(out.dim()) if out.dim() == source.dim() and out.shape[d] != source.shape[d]]
    same_view = (out.dim() == source.dim() and out.stride() == source.stride()
                 and out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr())
    if len(differ) == 1 and same_view:
        dim = differ[0]
        delta = out.storage_offset() - source.storage_offset()
        first = delta // source.stride(dim)
        if delta == first * source.stride(dim) and 0 <= first <= source.shape[dim] - out.shape[dim]:
            return dim, first
    raise _NoFold(f"the GLU's {op.name} does not take one contiguous channel range of its projection's output")


def _not_a_projection(name: str, module: nn.Module, where: str) -> str:
    why = f"{name} ({_describe(module)}) is not a per-position linear map with only a weight and a bias"
    if isinstance(module, nn.modules.conv._ConvNd):
        return (f"{why}: merging convolutions across linear units would grow the kernel (3x3 o 3x3 is 5x5), mix "
                "strides or be inexact at zero-padded borders, so this CNN activation stays gated")
    return f"{why} (between {where})"


# --------------------------------------------------------------------------------------------- FFNs of sites
def _ancestors(name: str) -> list[str]:
    """Every module above ``name``, deepest first ("" is the model)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _call_ffn(trace: _Trace, op: dataflow.Op, gate: GatedActivation) -> FFN:
    """The :class:`FFN` of one recorded call of a gated site; ``_NoFold`` when it does not fold."""
    graph = trace.graph
    region = graph.region(op)
    for proj in region.producers + region.consumers:
        name = trace.param_name(graph.weight(proj))
        module = trace.model.get_submodule(name.rpartition(".")[0]) if name else None
        if isinstance(module, nn.modules.conv._ConvNd) and _feature_dim(module) is None:
            raise _NoFold(_not_a_projection(name.rpartition(".")[0], module, "the projections"))
    if not region.consumers:
        readers = [r.name for r in graph.readers.get(op.writes[0], [])]
        raise _NoFold(f"no projection reads the activation's output (it reaches {readers[:3] or 'the model output'})")
    glu, packed = region.multiplier is not None, region.layout == "packed-glu"
    u_name, u_call, u_slice, u_ops = trace.walk_back(op.reads[0], packed, "the activation")
    v_name, v_call, v_slice, v_ops = u_name, u_call, None, []
    if glu:
        v_name, v_call, v_slice, v_ops = trace.walk_back(region.multiplier, packed, "the GLU's value")
        if packed != (u_name == v_name) or packed != (u_slice is not None and v_slice is not None):
            raise _NoFold(f"the GLU's gate and value come from {u_name} and {v_name} in a way that is neither one "
                          "packed projection nor two separate ones")
    d_name, d_call, d_ops = trace.walk_forward(op.writes[0], region.multiplier)
    if d_name in (u_name, v_name):
        raise _NoFold(f"{d_name} projects both into and out of the activation")
    modules = {name: trace.check_projection(name, call) for name, call in
               ((u_name, u_call), (v_name, v_call), (d_name, d_call))}
    x = graph.values[op.reads[0]]
    dim = _feature_dim(modules[u_name]) % x.dim()
    if len({_feature_dim(m) for m in modules.values()}) != 1 or dim != gate.channel_dim % x.dim():
        raise _NoFold("the projections' channel dims differ from the site's")
    units = gate.channels
    halves = (0, 0)
    if packed:
        (u_dim, u_first), (v_dim, v_first) = u_slice, v_slice
        if {u_dim, v_dim} != {dim} or abs(u_first - v_first) < units:
            raise _NoFold("the packed GLU's halves overlap or lie along another dim")
        halves = (u_first, v_first)
    elif graph.values[u_call.only_output()].shape[dim] != units or (
            glu and graph.values[v_call.only_output()].shape[dim] != units):
        raise _NoFold(f"the projections' widths differ from the site's {units} units")
    d_in = d_call.only_arg()
    hidden = [u_call.only_output(), v_call.only_output(), *op.writes]
    hidden += [k for o in u_ops + v_ops + d_ops for k in o.writes]
    trace.closed([k for k in hidden if k != d_in], [op, *u_ops, *v_ops, *d_ops], d_in)
    if not glu:
        return FFN("elementwise", u_name, d_name, channel_dim=_feature_dim(modules[u_name]))
    owner = _glu_owner(trace, [u_call.only_arg(), v_call.only_arg()], d_call.only_output(),
                       [u_name, v_name, d_name, op.site])
    return FFN(region.layout, u_name, d_name, "" if packed else v_name, halves, owner,
               _feature_dim(modules[u_name]))


def _glu_owner(trace: _Trace, inputs: list[Key], output: Key, names: list[str]) -> str:
    """The innermost module (not the model) above every one of ``names`` that is called with one tensor, which
    passes unchanged to the GLU's projections (``inputs``), and returns the output projection's ``output``, passed on
    unchanged; ``_NoFold`` when there is none."""
    common = set(_ancestors(names[0])).intersection(*map(_ancestors, names[1:]))
    for name in sorted(common - {""}, key=lambda n: -n.count(".")):
        for call in trace.calls.get(name, []):
            x, y = call.only_arg(), call.only_output()
            if x is not None and y is not None and all(trace.passes(x, k) for k in inputs) and trace.passes(output, y):
                return name
    raise _NoFold("no module of its own computes exactly this gated FFN (one tensor in, the output projection's "
                  "result out), so it cannot be replaced as a whole")


def _experts_ffn(trace: _Trace, name: str, container: ExpertGatedActivation) -> FFN:
    """The :class:`FFN` of a fused experts site; ``_NoFold`` unless the experts module holds exactly
    ``gate_up_proj`` and ``down_proj`` stacks, the traced site reads and feeds them, and the module computes
    ``down_e(g_e(gate_e x) * up_e x)`` summed over each token's routed experts with their weights."""
    model, graph = trace.model, trace.graph
    owner = next((n for n, m in model.named_modules() for hook in m._forward_pre_hooks.values()
                  if isinstance(hook, ExpertRouting) and (f"{n}.{hook.path}" if n else hook.path) == name), None)
    if owner is None:
        raise _NoFold("no experts module routes this expert gate")
    experts = model.get_submodule(owner)
    gate_params = {id(p) for p in container.parameters()}
    params = {n: p for n, p in experts.named_parameters() if id(p) not in gate_params}
    if set(params) != {"gate_up_proj", "down_proj"} or any(p.dim() != 3 for p in params.values()):
        raise _NoFold(f"the experts module {owner} ({type(experts).__name__}) holds {sorted(params)}, not exactly "
                      "the 3-D gate_up_proj and down_proj stacks")
    for op in graph.site_calls(name):
        region = graph.region(op)
        read = ({trace.param_name(graph.weight(p)) for p in region.producers},
                {trace.param_name(graph.weight(c)) for c in region.consumers})
        if read != ({f"{owner}.gate_up_proj"}, {f"{owner}.down_proj"}) or region.layout != "packed-glu":
            raise _NoFold(f"the traced experts FFN ({region.layout}, reading {read}) is not act(gate) * up of "
                          f"{owner}.gate_up_proj halves into {owner}.down_proj")
    _check_experts(experts, container, owner)
    return FFN("expert", owner=owner)


def _expert_matrices(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` of a fused experts module (``is_transposed`` stacks
    turned around)."""
    gate_up, down = (p.detach().double() for p in (experts.gate_up_proj, experts.down_proj))
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


def _check_experts(experts: nn.Module, container: ExpertGatedActivation, owner: str) -> None:
    """Run ``experts`` on random tokens routed to every expert and compare with the formula (``_NoFold`` if it
    differs or the call fails)."""
    gate_up, down = _expert_matrices(experts)
    count, units = len(container.experts), container.experts[0].channels
    if gate_up.shape[:2] != (count, 2 * units) or down.shape != (count, gate_up.shape[2], units):
        raise _NoFold(f"{owner}'s stacks {tuple(gate_up.shape)}, {tuple(down.shape)} do not fit {count} experts of "
                      f"{units} units")
    dtype, device = experts.gate_up_proj.dtype, experts.gate_up_proj.device
    generator = torch.Generator().manual_seed(0)
    tokens, top_k = 2 * count, min(2, count)
    hidden = torch.randn(tokens, gate_up.shape[2], generator=generator).to(device, dtype)
    index = ((torch.arange(tokens)[:, None] + torch.arange(top_k)[None]) % count).to(device)
    weights = (torch.rand(tokens, top_k, generator=generator) + 0.5).to(device, dtype)
    try:
        got = experts(hidden, index, weights).double()
    except Exception as error:  # any failure means the module is not the fused-experts call fold knows
        raise _NoFold(f"{owner} does not run as a fused experts module (hidden, top_k_index, top_k_weights): "
                      f"{type(error).__name__}: {error}") from None
    expected, scale = torch.zeros_like(got), torch.zeros_like(got)
    for e in range(count):
        token, k = torch.where(index == e)
        x = hidden[token].double()
        u, v = (x @ gate_up[e, i * units:(i + 1) * units].T for i in (0, 1))
        h = container.experts[e](u.to(dtype)).double() * v
        w = weights[token, k, None].double()
        expected.index_add_(0, token, w * (h @ down[e].T))
        scale.index_add_(0, token, w.abs() * (h.abs() @ down[e].abs().T))
    error = float((got - expected).abs().max())
    if not error <= _tolerance(scale, dtype, max(gate_up.shape[2], units)):
        raise _NoFold(f"{owner} does not compute down_e(act(gate_e x) * up_e x) from the [gate; up] halves of "
                      f"gate_up_proj (difference {error:.3g}): its experts implementation is one fold does not know")


def trace_ffns(model: nn.Module, inputs: Any) -> list[tuple[str, Union[FFN, str]]]:
    """Trace a patched ``model`` once on ``inputs`` (eval mode, no gradients) and describe the FFN of every site:
    ``(name of the gate module standing at the site, FFN or why it stays gated)``, sites in the order the pass
    first calls them (sites that did not run last)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            trace = _Trace(model, inputs)
            order = {op.site: op.index for op in reversed(trace.graph.site_calls())}
            wrappers = sorted(trace.wrappers.items(), key=lambda item: order.get(item[0], math.inf))
            return [(name, _site_ffn(trace, name, module)) for name, module in wrappers]
    finally:
        model.train(was_training)


def _site_ffn(trace: _Trace, name: str, module: nn.Module) -> Union[FFN, str]:
    """The :class:`FFN` of the gate module ``name`` (the same at each of its calls), or why it stays gated."""
    calls = trace.graph.site_calls(name)
    try:
        if not calls:
            raise _NoFold("the site did not run on the trace input")
        if isinstance(module, SharedGatedActivation):
            raise _NoFold(f"one activation module called at {len(module.sites)} places (a gate per call): a shared "
                          "activation stays gated")
        if isinstance(module, ExpertGatedActivation):
            return _experts_ffn(trace, name, module)
        if next(module.act.parameters(), None) is not None:
            raise _NoFold(f"the activation {type(module.act).__name__} has parameters of its own")
        ffns = {_call_ffn(trace, op, module) for op in calls}
        if len(ffns) > 1:
            raise _NoFold(f"the site is called at {len(calls)} places with different projections")
        ffn = ffns.pop()
        for used in (ffn.fc_in, ffn.fc_value, ffn.fc_out, ffn.owner):
            if used and len(trace.calls[used]) != len(calls):
                raise _NoFold(f"{used} is called {len(trace.calls[used])} times in a pass and the site "
                              f"{len(calls)} times: it also serves outside this FFN")
        return ffn
    except _NoFold as reason:
        return str(reason)


# --------------------------------------------------------------------------------------------- folding
def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at every name of the module that stands at ``name``."""
    for alias in _aliases(root, root.get_submodule(name)):
        parent_name, _, attr = alias.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def _current(root: nn.Module, name: str) -> nn.Module:
    """The per-position linear module standing at ``name`` now (the original, or one that folding an earlier site
    of an MLP stack put there); ``_NoFold`` when an earlier fold replaced it by something else."""
    module = root.get_submodule(name)
    if _feature_dim(module) is None:
        raise _NoFold(f"{name} became a {type(module).__name__} when an earlier site folded")
    return module


def _fold_ffn(folded: nn.Module, site: str, gate: GatedActivation, linear: torch.Tensor, ffn: FFN) -> SiteFold:
    """Fold one elementwise or GLU site of ``folded`` in place (``linear``: its linear-unit mask)."""
    glu, units = ffn.layout != "elementwise", gate.channels
    fc_in, fc_out = _current(folded, ffn.fc_in), _current(folded, ffn.fc_out)
    value = _current(folded, ffn.fc_value) if ffn.fc_value else fc_in
    owner = folded.get_submodule(ffn.owner) if glu else None
    before = (owner,) if glu else (fc_in, gate, fc_out)
    params_before, macs_before = _params(*before), _macs(*before)
    w_in, b_in = _matrix(fc_in)
    w_val, b_val = _matrix(value)
    if ffn.layout == "packed-glu":
        u, v = ffn.halves
        w_in, b_in, w_val, b_val = w_in[u:u + units], b_in[u:u + units], w_val[v:v + units], b_val[v:v + units]
    w_out, b_out = _matrix(fc_out)
    in_bias, out_bias, shifted = fc_in.bias is not None or value.bias is not None, fc_out.bias is not None, \
        _shifted(gate)
    nonlinear_idx, linear_idx = (~linear).nonzero().flatten(), linear.nonzero().flatten()
    n, n_linear = nonlinear_idx.numel(), linear_idx.numel()
    scale, shift = _linear_response(gate, linear_idx)
    w_lin = scale[:, None] * w_val[linear_idx]                   # diag(s) W[L]
    b_lin = scale * b_val[linear_idx] + shift                    # s * b[L] + t
    w2_lin = w_out[:, linear_idx]                                # W2[:, L]
    d_in, d_out = w_lin.shape[1], w_out.shape[0]
    dense = n_linear * (d_in + d_out) > d_in * d_out
    if n_linear == 0:
        form = "unchanged"
        act = _nonlinear_act(gate, nonlinear_idx)
        _replace(folded, site, act)
        after: tuple[nn.Module, ...] = (owner,) if glu else (fc_in, act, fc_out)
    elif n == 0 and dense:
        form = "affine"
        affine = _projection(fc_out, w2_lin @ w_lin,
                             _bias(w2_lin @ b_lin + b_out, out_bias or in_bias or shifted))
        after = (affine,)
        _place(folded, ffn, site, glu, (nn.Identity(), affine), affine)
    elif n == 0:
        form = "factorised"
        first = _projection(fc_in, w_lin, _bias(b_lin, in_bias or shifted))
        second = _projection(fc_out, w2_lin, _bias(b_out, out_bias))
        pair = nn.Sequential(first, second)
        after = (pair,)
        _place(folded, ffn, site, glu, (first, second), pair)
    else:
        form = "dense" if dense else "factorised"
        act = _nonlinear_act(gate, nonlinear_idx)
        rows_w = [w_in[nonlinear_idx]] + ([w_val[nonlinear_idx]] if glu else [])
        rows_b = [b_in[nonlinear_idx]] + ([b_val[nonlinear_idx]] if glu else [])
        if dense:   # out reads [h_N, x]: [W2[:, N], M], bias m
            out_w, out_b = torch.cat([w_out[:, nonlinear_idx], w2_lin @ w_lin], 1), w2_lin @ b_lin + b_out
        else:       # out reads [h_N, h_L]: the units reordered
            rows_w.append(w_lin)
            rows_b.append(b_lin)
            out_w, out_b = torch.cat([w_out[:, nonlinear_idx], w2_lin], 1), b_out
        proj = _projection(fc_in, torch.cat(rows_w), _bias(torch.cat(rows_b), in_bias or (shifted and not dense)))
        out = _projection(fc_out, out_w, _bias(out_b, out_bias or (dense and (in_bias or shifted))))
        if glu:
            folded_ffn = FoldedGluFFN(proj, n, act, dense, out, ffn.channel_dim)
            after = (folded_ffn,)
            _place(folded, ffn, site, glu, (), folded_ffn)
        else:
            folded_in = FoldedInput(proj, n, act, dense, ffn.channel_dim)
            after = (folded_in, out)
            _place(folded, ffn, site, glu, (folded_in, out), None)
    return SiteFold(site=site, form=form, units=units, linear=n_linear, params_before=params_before,
                    params_after=_params(*after), macs_before=macs_before, macs_after=_macs(*after))


def _place(folded: nn.Module, ffn: FFN, site: str, glu: bool, plain: tuple[nn.Module, ...],
           whole: Optional[nn.Module]) -> None:
    """Put the folded modules in: a GLU's ``whole`` in place of its owner; else ``plain`` = (the module for
    ``fc_in``, the one for ``fc_out``), and the site becomes ``nn.Identity``."""
    if glu:
        _replace(folded, ffn.owner, whole)
        return
    _replace(folded, ffn.fc_in, plain[0])
    _replace(folded, site, nn.Identity())
    _replace(folded, ffn.fc_out, plain[1])


def _fold_experts(folded: nn.Module, site: str, container: ExpertGatedActivation, linear: dict[str, torch.Tensor],
                  ffn: FFN) -> list[SiteFold]:
    """Fold a fused experts site of ``folded`` in place (module docstring, "Experts"); one :class:`SiteFold` per
    expert gate (``<site>.experts.<e>``)."""
    experts = folded.get_submodule(ffn.owner)
    gates = list(container.experts)
    names = [f"{site}.experts.{e}" for e in range(len(gates))]
    masks = [linear[name].cpu() for name in names]
    counts = [int(m.sum()) for m in masks]
    gate_up, down = _expert_matrices(experts)
    units, hidden = gates[0].channels, gate_up.shape[2]
    # units per expert left in the fused block: the most nonlinear units of any expert, in whole 16-byte rows where
    # the stacks have them (grouped_mm needs them); ``moved`` linear units of each expert leave the block
    align = math.gcd(units, max(16 // experts.gate_up_proj.element_size(), 1))
    width = -(-(units - min(counts)) // align) * align
    moved = units - width
    dense = 2 * moved > hidden
    macs_before = 3 * units * hidden

    def report(form: str, macs_after: int, gated: int, note: str = "") -> list[SiteFold]:
        return [SiteFold(site=name, form=form, units=units, linear=count, params_before=macs_before + units,
                         params_after=macs_after + gated, macs_before=macs_before, macs_after=macs_after, note=note)
                for name, count in zip(names, counts)]

    if moved == 0:  # the fused block keeps its width: nothing shrinks
        kept = any(bool(g.alpha.detach().any()) for g in gates)
        if not kept:
            _bare_experts(experts, container)
        note = ""
        if min(counts) == 0 < max(counts):
            note = "an expert without linear units keeps the fused experts at their width; the linear units stay gated"
        elif min(counts):
            note = (f"the fused block keeps whole 16-byte rows of {align} units: {units - min(counts)} nonlinear units "
                    f"round up to all {units}; the linear units stay gated")
        return report("unchanged", macs_before, units if kept else 0, note)
    blocks, parts, alphas, offsets = [], [], [], []
    for e, (gate, mask) in enumerate(zip(gates, masks)):
        out = mask.nonzero().flatten().to(gate_up.device)
        out = out if dense else out[:moved]
        block = torch.tensor(sorted(set(range(units)) - set(out.tolist())), dtype=torch.long)
        scale, _ = _linear_response(gate, out)
        w_v, w_d = scale[:, None] * gate_up[e, units:][out], down[e][:, out]
        parts.append([w_d @ w_v] if dense else [w_v, w_d])
        alpha = gate.alpha.detach().cpu()[block].clone()
        alpha[mask[block]] = 1.0  # a linear unit left in the block computes exactly its target
        pad = width - block.numel()
        alphas.append(torch.cat([alpha, alpha.new_zeros(pad)]))
        offsets.append(torch.cat([gate.target_offset.detach().cpu()[block], torch.ones(pad)]))
        blocks.append(block)
    factory = dict(dtype=experts.gate_up_proj.dtype, device=experts.gate_up_proj.device)
    stacks = tuple(torch.stack([p[i] for p in parts]).to(**factory) for i in range(len(parts[0])))
    kept = any(bool(a.any()) for a in alphas)
    if width:
        _narrow_experts(experts, container, gate_up, down, blocks, width, alphas if kept else None, offsets,
                        any(g._affine_targets() is not None for g in gates))
    _replace(folded, ffn.owner, FoldedExperts(experts if width else None, stacks))
    form = ("dense" if dense else "factorised") if width else ("affine" if dense else "factorised")
    return report(form, 3 * width * hidden + sum(s[0].numel() for s in stacks), width if width and kept else 0)


def _bare_experts(experts: nn.Module, container: ExpertGatedActivation) -> None:
    """Put the bare activation back into ``experts`` (all its gates are 0) and drop its routing hook."""
    path = _relative_path(experts, container)
    _replace(experts, path, container.act)
    for key, hook in list(experts._forward_pre_hooks.items()):
        if isinstance(hook, ExpertRouting):
            del experts._forward_pre_hooks[key]


def _relative_path(root: nn.Module, module: nn.Module) -> str:
    """The name of ``module`` below ``root``."""
    return next(name for name, m in root.named_modules() if m is module)


def _narrow_experts(experts: nn.Module, container: ExpertGatedActivation, gate_up: torch.Tensor, down: torch.Tensor,
                    blocks: list[torch.Tensor], width: int, alphas: Optional[list[torch.Tensor]],
                    offsets: list[torch.Tensor], affine: bool) -> None:
    """Narrow the fused stacks of ``experts`` in place to ``width`` units per expert, its ``blocks`` units first
    (zero rows as padding), and give it gates with ``alphas`` and target ``offsets`` (None: the bare activation,
    no routing hook)."""
    units = gate_up.shape[1] // 2
    new_gate_up = gate_up.new_zeros(gate_up.shape[0], 2 * width, gate_up.shape[2])
    new_down = down.new_zeros(down.shape[0], down.shape[1], width)
    for e, block in enumerate(blocks):
        k = block.numel()
        new_gate_up[e, :k], new_gate_up[e, width:width + k] = gate_up[e, block], gate_up[e, units + block]
        new_down[e, :, :k] = down[e][:, block]
    if getattr(experts, "is_transposed", False):
        new_gate_up, new_down = new_gate_up.transpose(1, 2), new_down.transpose(1, 2)
    factory = dict(dtype=experts.gate_up_proj.dtype, device=experts.gate_up_proj.device)
    experts.gate_up_proj = nn.Parameter(new_gate_up.to(**factory).contiguous())
    experts.down_proj = nn.Parameter(new_down.to(**factory).contiguous())
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = width
    if alphas is None:
        _bare_experts(experts, container)
        return
    ones = torch.ones(width)
    gates = [_kept_gate(container.experts[0], alpha, offset, ones, affine) for alpha, offset in zip(alphas, offsets)]
    _replace(experts, _relative_path(experts, container), ExpertGatedActivation(gates))


def _fold_inputs(model: nn.Module, state: PatchState, example_inputs: Any) -> Any:
    """``example_inputs``, else the probe the model was patched with (:func:`recorded_probe`); ``ValueError`` when
    none can be built."""
    if example_inputs is not None:
        return example_inputs
    try:
        return recorded_probe(model, state.probe)
    except ValueError:
        raise ValueError(
            f"fold cannot build an input for {_model_name(model)}: it was patched without a recorded probe and no "
            "default input fits it. fold traces the model once to find each FFN's projections (verify=False does "
            "not avoid that); pass example_inputs= (one small batch the model accepts)."
        ) from None


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _run_counted(model: nn.Module, inputs: Any) -> tuple[list[torch.Tensor], int]:
    """Every floating-point output tensor of one eval-mode forward, and its FLOPs."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with torch.no_grad(), _eval(model), counter:
        out = _float_leaves(_call(model, inputs))
    return out, counter.get_total_flops()


def _grouped_mm_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``torch._grouped_mm`` (fused MoE experts), which ``FlopCounterMode`` does not count: 2 per
    multiply-add, every row of ``a`` times its group's ``[K, N]`` matrix (``a`` 2-D with offsets, ``b`` 3-D), or a
    batched ``[G, M, K] @ [G, K, N]``."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * math.prod(a_shape) * b_shape[-1]


def _low_precision(tensor: torch.Tensor) -> bool:
    """A floating tensor coarser than fp32 (bf16, fp16, fp8)."""
    return tensor.is_floating_point() and torch.finfo(tensor.dtype).eps > torch.finfo(torch.float32).eps


def _fp32_reference(model: nn.Module, inputs: Any) -> Optional[list[torch.Tensor]]:
    """The gated ``model``'s floating outputs on ``inputs`` computed in fp32 (by a copy of ``model`` and of the
    inputs' floating tensors cast to fp32), when ``model`` holds bf16/fp16 tensors; None for a model of fp32 or
    wider, whose outputs are their own reference. Costs an fp32 copy of the model while it runs."""
    if not any(_low_precision(t) for t in itertools.chain(model.parameters(), model.buffers())):
        return None
    reference = copy.deepcopy(model).float()
    return _run_counted(reference, pytree.tree_map_only(torch.Tensor, lambda t: t.float() if _low_precision(t) else t,
                                                        inputs))[0]


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 (0 where both are the same infinity; a NaN on one side counts as infinite)."""
    a, b = a.double(), b.double()
    return float(torch.where(a == b, 0.0, (a - b).abs()).nan_to_num(math.inf).max()) if a.numel() else 0.0


def _check_outputs(expected: list[torch.Tensor], got: list[torch.Tensor],
                   reference: Optional[list[torch.Tensor]] = None) -> None:
    """``RuntimeError`` unless every output tensor of the folded model (``got``) matches the gated model's.

    Without ``reference`` (a model of fp32 or wider): within 1e-4 of the output's scale. With ``reference``, the
    gated model's outputs computed in fp32 (a bf16/fp16 model): the gated outputs differ from it by their ordinary
    rounding, ``noise`` (measured, max over the tensor); the folded outputs may differ from it by at most
    ``2 * noise + max(1e-4, eps) * scale``, ``eps`` the machine epsilon of the output's dtype: the two models round
    alike (measured: 0.6 to 1.3 times the gated model's difference), and one rounding of the output on top. A
    wrongly folded unit fails unless its effect on the output is within the dtype's own rounding on this input.
    """
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        raise RuntimeError(f"fold changed the model's outputs: {len(expected)} tensors before, {len(got)} after, "
                           "or shapes differ. Please report it; meanwhile use the gated model.")
    for i, (a, b) in enumerate(zip(expected, got)):
        exact = a if reference is None else reference[i]
        noise, error = _max_difference(a, exact), _max_difference(b, exact)
        finite = exact[exact.isfinite()]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        allowed = 2 * noise + max(1e-4, torch.finfo(a.dtype).eps) * max(scale, 1e-6)
        if error > allowed:
            rounding = "" if reference is None else f", the gated model's own rounding {noise:.3g}"
            raise RuntimeError(
                f"fold changed the model's output (output tensor {i}: max abs difference {error:.3g} at output scale "
                f"{scale:.3g}{rounding}, allowed {allowed:.3g}); a traced FFN was folded wrongly. Please report it; "
                "meanwhile use the gated model, or leave the site out with exclude_modules= when patching."
            )


def _source(model: nn.Module) -> dict[str, Any]:
    from .core_map import path_length_report

    try:
        path_length: Optional[dict[str, Any]] = path_length_report(model)
    except NotImplementedError:
        path_length = None
    state = patch_state(model)
    return {"family": state.family, "linearize_config": state.config.to_dict(),
            "sites": {name: gate.channels for name, gate in gated_modules(model)}, "summary": dict(summary(model)),
            "path_length": path_length, "probe": state.probe}


# --------------------------------------------------------------------------------------------- public API
def reader_projections(model: nn.Module, example_inputs: Any = None) -> dict[str, Optional[nn.Module]]:
    """Per gated site (as :func:`~hf_linearize.gated_modules` names it), the ``nn.Linear`` or ``nn.Conv2d`` (1x1) that
    reads its FFN hidden layer, from one traced pass (on ``example_inputs``, else the model's probe); None where
    the trace finds none that folds (CNNs, MLPs with a norm inside, experts, ``Conv1D`` readers). ``ValueError`` as
    :func:`fold` when no input can be built."""
    inputs = _fold_inputs(model, patch_state(model), example_inputs)
    ffns = dict(trace_ffns(model, inputs))
    readers: dict[str, Optional[nn.Module]] = {}
    for name, _ in gated_modules(model):
        ffn = ffns.get(name)
        reader = model.get_submodule(ffn.fc_out) if isinstance(ffn, FFN) and ffn.fc_out else None
        readers[name] = reader if isinstance(reader, (nn.Linear, nn.Conv2d)) else None
    return readers


@torch.no_grad()
def refold(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Fold a freshly patched ``model`` (any weights) into the structure that ``plan`` (:attr:`FoldState.plan`)
    describes, for loading folded weights into it: linear units get gate 1, the nonlinear units of ``kept_gates``
    sites a placeholder gate of 0.25 (nonlinear under any ``linear_threshold``; the loaded weights bring their real
    values), all others 0; ``affine_targets`` sites a placeholder target (it decides which projections get biases).
    The model is traced on its recorded probe. Totals in ``plan["total"]`` that folding does not recompute (the
    check forward's FLOPs, a measured ``generate_speedup``) are copied into the new report. ``ValueError`` when the
    plan names sites the model lacks, or when a site folds into another form than ``plan["forms"]`` records."""
    gates = dict(gated_modules(model))
    unknown = sorted(set(plan["linear_units"]) - set(gates))
    if unknown:
        raise ValueError(f"The fold plan names sites this model does not have: {unknown[:5]}.")
    for name, gate in gates.items():
        gate.alpha.zero_()
        if name in plan["kept_gates"]:
            gate.alpha.fill_(0.25)
        if name in plan.get("affine_targets", ()):
            gate.set_targets(offset=torch.full((gate.channels,), 0.5))
        gate.alpha[torch.tensor(plan["linear_units"].get(name, []), dtype=torch.long)] = 1.0
    folded = fold(model, verify=False)
    report = fold_report(folded)
    differ = {name: (form, report["sites"][name]["form"]) for name, form in plan.get("forms", {}).items()
              if report["sites"].get(name, {}).get("form") != form}
    if differ:
        raise ValueError(f"Refolding gives other forms than the plan records (site: (planned, now)): "
                         f"{dict(list(differ.items())[:5])}; the checkpoint was folded by another version of "
                         "hf_linearize or from another architecture.")
    for key, value in plan.get("total", {}).items():  # measurements the plan carries (FLOPs, a measured speed-up)
        report["total"].setdefault(key, value)
    return folded


def fold(model: nn.Module, example_inputs: Any = None, verify: bool = True) -> nn.Module:
    """A folded copy of the patched ``model``: same function, linear units merged away. ``model`` is untouched.

    Args:
        model: a model patched with :func:`~hf_linearize.patch_model` (and not folded).
        example_inputs: input (tensor, tuple or dict) for the trace that finds each FFN's projections and for the
            check; default: the probe ``model`` was patched with (:func:`~hf_linearize.probe_inputs.recorded_probe`).
        verify: run the gated and the folded model on that input (eval mode) and raise ``RuntimeError`` if any of
            their floating-point outputs differ by more than 1e-4 of its scale; also counts both forwards' FLOPs
            for :func:`fold_report`.

    Returns the folded model (same class, in the input's train/eval mode; fold is exact in eval mode).
    ``fold_report(folded)`` gives per site its units, linear units, form, parameters and MACs, and for a site that
    stays gated the reason. The folded model is no longer a *patched* model: its gates are fixed, and ``summary``,
    ``set_linear``, the path-length functions and ``save_pretrained`` refuse it (its sites no longer hold their
    original units, so their answers would be wrong; ask them of the gated model).
    :func:`~hf_linearize.gated_modules` still lists the gates that remain (nonlinear units with a gate above 0, and
    sites that stay gated). Raises ``ValueError`` for an unpatched or an already-folded model, and when no input can
    be built (pass ``example_inputs``); the trace's own error when the model fails on ``example_inputs``.
    """
    if is_folded(model):
        raise ValueError("This model is already folded; fold the gated model it came from (fold returns a copy and "
                         "leaves its input untouched).")
    state = patch_state(model)
    inputs = _fold_inputs(model, state, example_inputs)
    linear = linear_units(model)
    try:
        ffns = trace_ffns(model, inputs)
    except Exception as error:
        if example_inputs is not None:
            raise
        raise ValueError(f"fold's trace of {_model_name(model)} failed on its recorded probe input (shape "
                         f"{_shapes(inputs)}): {type(error).__name__}: {error}. Pass example_inputs= (one small batch "
                         "the model accepts).") from error
    folded = copy.deepcopy(model)
    delattr(folded, STATE_ATTR)
    sites: dict[str, SiteFold] = {}
    involved: list[str] = []
    for name, ffn in ffns:
        wrapper = folded.get_submodule(name)
        if isinstance(ffn, FFN):
            try:
                if ffn.layout == "expert":
                    done = _fold_experts(folded, name, wrapper, linear, ffn)
                else:
                    done = [_fold_ffn(folded, name, wrapper, linear[name], ffn)]
                involved += [ffn.owner] if ffn.owner else [ffn.fc_in, ffn.fc_out]
            except _NoFold as reason:
                ffn = str(reason)
        if not isinstance(ffn, FFN):
            done = [SiteFold(site=gate_name, form="gated", units=gate.channels,
                             linear=int(linear[gate_name].sum()), params_before=_params(gate),
                             params_after=_params(gate), macs_before=0, macs_after=0, note=ffn)
                    for gate_name, gate in _gates_below(wrapper, name)]
        sites.update((s.site, s) for s in done)
    distinct = list(dict.fromkeys(involved))
    total = dict(params_before=_params(model), params_after=_params(folded),
                 ffn_macs_before=sum(_macs(model.get_submodule(n)) for n in distinct),
                 ffn_macs_after=sum(_macs(folded.get_submodule(n)) for n in distinct))
    if verify:
        expected, total["flops_before"] = _run_counted(model, inputs)
        got, total["flops_after"] = _run_counted(folded, inputs)
        _check_outputs(expected, got, _fp32_reference(model, inputs))
    order = [name for name, _ in gated_modules(model)]
    report = FoldReport(sites={n: {k: v for k, v in vars(sites[n]).items() if k != "site"} for n in order},
                        total=total)
    plan = {"linear_units": {name: mask.nonzero().flatten().tolist() for name, mask in linear.items()},
            "kept_gates": [name for name, gate in gated_modules(model)
                           if bool(gate.alpha.detach()[~linear[name]].any())],
            "affine_targets": [name for name, gate in gated_modules(model) if gate._affine_targets() is not None],
            "forms": {name: report["sites"][name]["form"] for name in order}}
    setattr(folded, FOLD_ATTR, FoldState(report, plan, _source(model)))
    return folded


def _gates_below(wrapper: nn.Module, name: str) -> list[tuple[str, GatedActivation]]:
    """The gates of one gate module, named as :func:`~hf_linearize.gated_modules` names them."""
    return [(f"{name}.{sub}" if sub else name, gate) for sub, gate in wrapper.named_modules()
            if isinstance(gate, GatedActivation)]
