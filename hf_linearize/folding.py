"""Folding: turn the linear units of a patched model into a smaller, faster model that computes the same function.

An FFN ``y = W2 act(W1 x + b1) + b2`` whose units split into linear units ``L`` (gate >= 1 - ``linear_threshold``,
the rule of :func:`~hf_linearize.summary`) and nonlinear units ``N`` becomes::

    y = W2[:, N] gate_N(W1[N] x + b1[N]) + M x + m,    M = W2[:, L] W1[L],    m = W2[:, L] b1[L] + b2

A gated FFN ``y = W2 (g(u) * v) + b2`` (GLU site) folds the same way with the value projection ``v`` in place of
``W1``: a linear GLU unit is ``h_c = v_c``, and the rows of its gate projection are dropped.

Per site, the cheaper of two forms is kept (MACs per position, i.e. per token or pixel):

* ``"dense"``: ``M`` is one ``d_out x d_in`` matrix, when ``|L| (d_in + d_out) > d_in d_out``;
* ``"factorised"``: ``W2[:, L]`` and ``W1[L]`` stay as a low-rank pair (the units are only reordered, and the
  activation runs on ``N`` alone);
* ``"affine"``: every unit linear: the whole FFN is one affine map;
* ``"unchanged"``: no unit linear: the original projections stay, and a gate whose values are all 0 becomes the
  bare activation again (no gate cost).

Nonlinear units keep their gate values: a unit with ``0 < a < 1`` stays in ``N`` and still computes
``a t(x) + (1 - a) act(x)`` with its linear target ``t``. A unit with ``1 - linear_threshold <= a < 1`` counts as
linear (``summary``'s rule; the trainer snaps such units to exactly 1) and folds as its target, which changes its
output by at most ``linear_threshold * |act(x) - t(x)|``. A site that no :class:`~hf_linearize.families.FoldRule` of
its family fits (CNNs, MLPs with a norm between their projections, shared activations) stays gated, with the reason
in :func:`fold_report`.

Affine linear targets (``GatedActivation.set_targets``): a linear unit with target ``p x + q`` folds into
``M = W2[:, L] diag(p) W1[L]``, ``m = W2[:, L] (p b1[L] + q) + b2``; a GLU unit with constant target ``q`` into
``W2[:, L] diag(q) W_v[L]``.

The folded projections are ordinary ``nn.Linear``/``nn.Conv2d`` modules inside :class:`FoldedInput` (the
nonlinear part plus the input carried through for ``M``) and :class:`FoldedGluFFN`; they replace the original
modules in place, so the folded model stays a transformers/timm model (``generate``, ``torch.compile`` and
``torch.export`` work). Folding is exact in eval mode: a dropout that the owner applies between the projections
(train mode only) would also hit the carried input.

The folded model records its :class:`FoldState`: the report, the *plan* (which units were linear, which sites
kept gates) and the gated model's summary and path lengths. ``hub.save_pretrained`` writes a folded model as the
``"folded"`` variant of the linearized checkpoint, and ``from_pretrained`` rebuilds it with :func:`refold`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .families import FamilySpec, FoldRule, family_by_name
from .gates import GatedActivation
from .patching import (
    FOLD_ATTR,
    STATE_ATTR,
    gated_modules,
    linear_units,
    patch_state,
    summary,
)
from .probe_inputs import _call, default_example_inputs

Projection = Union[nn.Linear, nn.Conv2d]


# --------------------------------------------------------------------------------------------- folded modules
class FoldedInput(nn.Module):
    """Input side of a folded plain FFN, in place of its first projection (the site becomes ``nn.Identity``).

    ``proj`` computes ``[W1[N] x + b1[N], (factorised) W1[L] x + b1[L]]``; the output is
    ``cat([act_N(first nonlinear channels), the linear rows, (dense) x], channel_dim)`` for the new second
    projection ``[W2[:, N], W2[:, L] | M]`` to read.

    Args:
        proj: ``nn.Linear`` (channels last) or 1x1 ``nn.Conv2d`` (channels first, ``channel_dim=1``).
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


# --------------------------------------------------------------------------------------------- report
@dataclass
class SiteFold:
    """How one gated site was folded. ``params``: parameters of the modules the site involves (projections and
    gates); ``macs``: multiply-accumulates per position (token or pixel) of its projections (0 for a site that
    stays gated, whose projections fold does not know)."""

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
    ``params_after`` of the whole model, ``ffn_macs_before/after`` per position summed over sites, and
    ``flops_before/after`` of one forward on the probe input when one was run). ``str()`` renders a table."""

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
    gate because some of their gate values are above 0) and ``affine_targets`` (sites with linear targets other
    than the default)."""
    source: dict[str, Any]
    """The gated model's ``family``, ``linearize_config`` (dict), ``sites`` (name -> units), ``summary`` and
    ``path_length`` report (None where the family has no path graph), as measured at fold time."""


def is_folded(model: nn.Module) -> bool:
    return isinstance(getattr(model, FOLD_ATTR, None), FoldState)


def fold_report(model: nn.Module) -> FoldReport:
    """The :class:`FoldReport` of a model returned by :func:`fold`; ``ValueError`` for any other model."""
    return fold_state(model).report


# --------------------------------------------------------------------------------------------- math
def _matrix(proj: Projection) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [out, in], b [out])`` of a Linear or 1x1 conv, in float64 (b = 0 without bias)."""
    weight = proj.weight.detach().double().reshape(proj.weight.shape[0], -1)
    bias = proj.bias.detach().double() if proj.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias


def _projection(like: Projection, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Projection:
    """A new Linear (or 1x1 conv, following ``like``) computing ``weight @ x + bias``, in ``like``'s dtype/device."""
    out_features, in_features = weight.shape
    factory = dict(device=like.weight.device, dtype=like.weight.dtype)
    if isinstance(like, nn.Conv2d):
        proj: Projection = nn.Conv2d(in_features, out_features, 1, bias=bias is not None, **factory)
    else:
        proj = nn.Linear(in_features, out_features, bias=bias is not None, **factory)
    with torch.no_grad():
        proj.weight.copy_(weight.reshape(proj.weight.shape))
        if bias is not None:
            proj.bias.copy_(bias)
    return proj


def _linear_response(gate: GatedActivation, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 scale ``s`` and shift ``t`` of the linear ``units``: ``h_L = s * (W[L] x + b[L]) + t`` with ``W, b``
    the projection that carries them (``fc_in``, or the value projection of a GLU). A unit's linear target
    ``p x + q`` gives ``s = p, t = q``; a GLU unit's constant target ``q`` gives ``h = q v``: ``s = q, t = 0``. The
    default targets are the identity (``s = 1, t = 0``) and, for GLU units, ``h = 1 * v``."""
    ones, zeros = (torch.full((units.numel(),), value, dtype=torch.float64) for value in (1.0, 0.0))
    targets = gate._affine_targets()
    if targets is None:
        return ones, zeros
    slope, offset = (t.detach().double()[units.to(t.device)].to(units.device) for t in targets)
    return (offset, zeros) if gate.kind == "glu" else (slope, offset)


def _shifted(gate: GatedActivation) -> bool:
    """Whether linear units of ``gate`` add a constant (an elementwise target ``p x + q`` other than ``x``): the
    folded projections then need a bias even where the original ones had none."""
    return gate.kind == "elementwise" and gate._affine_targets() is not None


def _nonlinear_act(gate: GatedActivation, nonlinear: torch.Tensor) -> nn.Module:
    """The activation of the nonlinear units: the bare activation when all their gates are 0, else a gate that
    keeps their gate values and linear targets."""
    alpha = gate.alpha.detach()[nonlinear]
    if not bool(alpha.any()):
        return gate.act
    kept = GatedActivation(gate.act, int(nonlinear.numel()), gate.channel_dim, gate.kind)
    with torch.no_grad():
        kept.alpha.copy_(alpha)
    kept.set_targets(gate.target_slope[nonlinear], gate.target_offset[nonlinear])
    return kept


def _weights(*modules: nn.Module) -> int:
    """MACs per position of the Linear / 1x1-conv projections among ``modules`` (their weights' sizes)."""
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def _bias(bias: torch.Tensor, present: bool) -> Optional[torch.Tensor]:
    """``bias`` where the folded projection has one, else None (``bias`` is then 0 by construction). Whether it has
    one depends on the structure alone (biases of the sources, shifted targets), never on values, so that
    :func:`refold` rebuilds the same modules from any weights."""
    return bias if present else None


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# --------------------------------------------------------------------------------------------- one site
class _NoFold(Exception):
    """A site that stays gated; the message says why."""


_NO_RULE = "no fold rule fits this site"


def _is_projection(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.groups == 1 and module.padding in ((0, 0), "valid"))


def _get(owner: nn.Module, path: str) -> nn.Module:
    try:
        return owner.get_submodule(path)
    except AttributeError:
        raise _NoFold(f"no {path!r} next to the site") from None


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def _owner_name(site: str, rule: FoldRule) -> Optional[str]:
    if site == rule.site:
        return ""
    return site[: -len(rule.site) - 1] if site.endswith("." + rule.site) else None


def _fits(model: nn.Module, site: str, gate: GatedActivation, rule: FoldRule) -> str:
    """Owner name when ``rule`` describes ``site``; ``_NoFold`` otherwise."""
    owner_name = _owner_name(site, rule)
    if owner_name is None or rule.glu != (gate.kind == "glu"):
        raise _NoFold(_NO_RULE)
    if rule.glu and not owner_name:
        raise _NoFold("the gated FFN is the model itself, which cannot be replaced")
    owner = model.get_submodule(owner_name) if owner_name else model
    for path in (rule.fc_in, rule.fc_out) + ((rule.fc_value,) if rule.fc_value else ()):
        if not _is_projection(_get(owner, path)):
            raise _NoFold(f"{path!r} is {type(_get(owner, path)).__name__}, not a Linear or 1x1 conv")
    for path in rule.identity:
        if not isinstance(_get(owner, path), nn.Identity):
            raise _NoFold(f"{path!r} between the projections is {type(_get(owner, path)).__name__}, not Identity")
    if next(gate.act.parameters(), None) is not None:
        raise _NoFold(f"the activation {type(gate.act).__name__} has parameters of its own")
    fc_in, fc_out = _get(owner, rule.fc_in), _get(owner, rule.fc_out)
    rows = fc_in.weight.shape[0] // (2 if rule.glu and rule.fc_value is None else 1)
    if rows != gate.channels or fc_out.weight.shape[1] != gate.channels:
        raise _NoFold(f"the projections' widths ({rows}, {fc_out.weight.shape[1]}) differ from the site's "
                      f"{gate.channels} units")
    return owner_name


def _find_rule(model: nn.Module, site: str, gate: GatedActivation,
               family: FamilySpec) -> tuple[Optional[FoldRule], str]:
    """``(rule, owner name)`` of the first fold rule that fits ``site``, else ``(None, why it stays gated)``."""
    reasons = []
    for rule in family.fold_rules:
        try:
            return rule, _fits(model, site, gate, rule)
        except _NoFold as reason:
            reasons.append(str(reason))
    return None, "; ".join(dict.fromkeys(r for r in reasons if r != _NO_RULE)) or family.fold_note


def reader_projection(model: nn.Module, site: str, gate: GatedActivation) -> Optional[nn.Module]:
    """The projection (``nn.Linear`` or 1x1 conv) that reads the FFN hidden layer of gated ``site``, by the first
    fold rule of the model's family that fits it; None when none fits (CNNs, MLPs with a norm inside)."""
    rule, owner_name = _find_rule(model, site, gate, family_by_name(patch_state(model).family))
    if rule is None:
        return None
    return (model.get_submodule(owner_name) if owner_name else model).get_submodule(rule.fc_out)


def _ffn_matrices(owner: nn.Module, rule: FoldRule, units: int) -> dict[str, torch.Tensor]:
    """float64 ``w_in, b_in`` (the site's input projection: ``W1``, or a GLU's gate ``u``), ``w_val, b_val`` (what a
    linear unit passes on: ``W1`` again, or a GLU's value ``v``) and ``w_out, b_out`` (``W2``)."""
    fc_in = owner.get_submodule(rule.fc_in)
    w_in, b_in = _matrix(fc_in)
    w_val, b_val = _matrix(owner.get_submodule(rule.fc_value)) if rule.fc_value else (w_in, b_in)
    if rule.glu and rule.fc_value is None:  # fc_in packs [u, v] (or [v, u]) halves
        half = rule.gate_half(owner)
        u, v = slice(half * units, (half + 1) * units), slice((1 - half) * units, (2 - half) * units)
        w_in, b_in, w_val, b_val = w_in[u], b_in[u], w_val[v], b_val[v]
    w_out, b_out = _matrix(owner.get_submodule(rule.fc_out))
    return dict(w_in=w_in, b_in=b_in, w_val=w_val, b_val=b_val, w_out=w_out, b_out=b_out)


def _fold_site(model: nn.Module, site: str, gate: GatedActivation, linear: torch.Tensor,
               family: FamilySpec) -> SiteFold:
    """Fold one site of ``model`` in place (``linear``: its linear-unit mask) and say what was done."""
    units, n_linear = gate.channels, int(linear.sum())
    record = dict(site=site, units=units, linear=n_linear)
    rule, owner_name = _find_rule(model, site, gate, family)
    if rule is None:
        alpha = _params(gate)
        return SiteFold(form="gated", params_before=alpha, params_after=alpha, macs_before=0, macs_after=0,
                        note=owner_name, **record)
    owner = model.get_submodule(owner_name) if owner_name else model
    prefix = owner_name + "." if owner_name else ""
    fc_in, fc_out = owner.get_submodule(rule.fc_in), owner.get_submodule(rule.fc_out)
    value = owner.get_submodule(rule.fc_value) if rule.fc_value else fc_in
    params_before = _params(*((owner,) if rule.glu else (fc_in, gate, fc_out)))
    macs_before = _weights(*{fc_in, value, fc_out})
    in_had_bias, out_had_bias = fc_in.bias is not None or value.bias is not None, fc_out.bias is not None
    shifted = _shifted(gate)

    m = _ffn_matrices(owner, rule, units)
    nonlinear_idx = (~linear).nonzero().flatten().to(m["w_in"].device)
    linear_idx = linear.nonzero().flatten().to(m["w_in"].device)
    n = nonlinear_idx.numel()
    scale, shift = _linear_response(gate, linear_idx)
    w_lin = scale[:, None] * m["w_val"][linear_idx]              # diag(s) W[L]
    b_lin = scale * m["b_val"][linear_idx] + shift               # s * b[L] + t
    w2_lin = m["w_out"][:, linear_idx]                           # W2[:, L]
    d_in, d_out = w_lin.shape[1], m["w_out"].shape[0]

    if n_linear == 0:
        form = "unchanged"
        act = _nonlinear_act(gate, nonlinear_idx)
        _set(owner, rule.site, act)
        after: tuple[nn.Module, ...] = (owner,) if rule.glu else (fc_in, act, fc_out)
    elif n == 0:
        form = "affine"
        affine = _projection(fc_out, w2_lin @ w_lin,
                             _bias(w2_lin @ b_lin + m["b_out"], out_had_bias or in_had_bias or shifted))
        if rule.glu:
            _set(model, owner_name, affine)
        else:
            _set(model, prefix + rule.fc_in, nn.Identity())
            _set(model, prefix + rule.site, nn.Identity())
            _set(model, prefix + rule.fc_out, affine)
        after = (affine,)
    else:
        dense = n_linear * (d_in + d_out) > d_in * d_out
        form = "dense" if dense else "factorised"
        act = _nonlinear_act(gate, nonlinear_idx)
        rows_w = [m["w_in"][nonlinear_idx]] + ([m["w_val"][nonlinear_idx]] if rule.glu else [])
        rows_b = [m["b_in"][nonlinear_idx]] + ([m["b_val"][nonlinear_idx]] if rule.glu else [])
        if dense:   # out reads [h_N, x]: [W2[:, N], M], bias m
            out_w, out_b = torch.cat([m["w_out"][:, nonlinear_idx], w2_lin @ w_lin], 1), w2_lin @ b_lin + m["b_out"]
        else:       # out reads [h_N, h_L]: the units reordered
            rows_w.append(w_lin)
            rows_b.append(b_lin)
            out_w, out_b = torch.cat([m["w_out"][:, nonlinear_idx], w2_lin], 1), m["b_out"]
        proj = _projection(fc_in, torch.cat(rows_w), _bias(torch.cat(rows_b), in_had_bias or (shifted and not dense)))
        out = _projection(fc_out, out_w, _bias(out_b, out_had_bias or (dense and (in_had_bias or shifted))))
        if rule.glu:
            folded_ffn = FoldedGluFFN(proj, n, act, dense, out, gate.channel_dim)
            _set(model, owner_name, folded_ffn)
            after = (folded_ffn,)
        else:
            folded_in = FoldedInput(proj, n, act, dense, gate.channel_dim)
            _set(model, prefix + rule.fc_in, folded_in)
            _set(model, prefix + rule.site, nn.Identity())
            _set(model, prefix + rule.fc_out, out)
            after = (folded_in, out)
    return SiteFold(form=form, params_before=params_before, params_after=_params(*after),
                    macs_before=macs_before, macs_after=_weights(*after), **record)


# --------------------------------------------------------------------------------------------- public API
def main_output(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: itself, else ``logits``, else ``last_hidden_state``, else the first item."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


@torch.no_grad()
def _run_counted(model: nn.Module, inputs: Any) -> tuple[torch.Tensor, int]:
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            out = main_output(_call(model, inputs))
    finally:
        model.train(was_training)
    return out, counter.get_total_flops()


def fold_state(model: nn.Module) -> FoldState:
    """The :class:`FoldState` of a model returned by :func:`fold`; ``ValueError`` for any other model."""
    if not is_folded(model):
        raise ValueError(f"{type(model).__name__} is not folded; this needs the model returned by fold(model).")
    return getattr(model, FOLD_ATTR)


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


@torch.no_grad()
def refold(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Fold a freshly patched ``model`` (any weights) into the structure that ``plan`` (:attr:`FoldState.plan`)
    describes, for loading folded weights into it: linear units get gate 1, the nonlinear units of ``kept_gates``
    sites a placeholder gate of 0.25 (nonlinear under any ``linear_threshold``; the loaded weights bring their real
    values), all others 0; ``affine_targets`` sites a placeholder target (it decides which projections get biases).
    Totals in ``plan["total"]`` that folding does not recompute (the check forward's FLOPs, a measured
    ``generate_speedup``) are copied into the new report."""
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
    for key, value in plan.get("total", {}).items():  # measurements the plan carries (FLOPs, a measured speed-up)
        fold_report(folded)["total"].setdefault(key, value)
    return folded


def fold(model: nn.Module, example_inputs: Any = None, verify: bool = True) -> nn.Module:
    """A folded copy of the patched ``model``: same function, linear units merged away. ``model`` is untouched.

    Args:
        model: a model patched with :func:`~hf_linearize.patch_model` (and not folded).
        example_inputs: input for one check forward pass (tensor, tuple or dict); built automatically for HF and
            timm models, as for ``patch_model``.
        verify: run the gated and the folded model on that input (eval mode) and raise ``RuntimeError`` if their
            main outputs differ by more than 1e-4 of the output scale (a fold rule that does not describe the
            model); also counts both forwards' FLOPs for :func:`fold_report`. Skipped when no input can be built.

    Returns the folded model (same class, in the input's train/eval mode; fold is exact in eval mode).
    ``fold_report(folded)`` gives per site its units, linear units, form, parameters and MACs. The folded model is
    no longer a *patched* model: its gates are fixed, and ``summary``, ``set_linear``, the path-length functions and
    ``save_pretrained`` refuse it (its sites no longer hold their original units, so their answers would be wrong;
    ask them of the gated model). :func:`~hf_linearize.gated_modules` still lists the gates that remain (nonlinear
    units with a gate above 0, and sites that stay gated). Raises ``ValueError`` for an unpatched or an
    already-folded model.
    """
    if is_folded(model):
        raise ValueError("This model is already folded; fold the gated model it came from (fold returns a copy and "
                         "leaves its input untouched).")
    state = patch_state(model)
    family = family_by_name(state.family)
    linear = linear_units(model)
    folded = copy.deepcopy(model)
    delattr(folded, STATE_ATTR)
    sites = [_fold_site(folded, name, gate, linear[name], family) for name, gate in list(gated_modules(folded))]
    total = dict(params_before=_params(model), params_after=_params(folded),
                 ffn_macs_before=sum(s.macs_before for s in sites), ffn_macs_after=sum(s.macs_after for s in sites))
    if verify:
        if example_inputs is None:
            try:
                example_inputs = default_example_inputs(model)
            except ValueError:
                example_inputs = None
        if example_inputs is not None:
            expected, total["flops_before"] = _run_counted(model, example_inputs)
            got, total["flops_after"] = _run_counted(folded, example_inputs)
            error = float((got.double() - expected.double()).abs().max())
            scale = float(expected.double().abs().max())
            if error > 1e-4 * max(scale, 1e-6):
                raise RuntimeError(
                    f"fold changed the model's output (max abs difference {error:.3g} at output scale {scale:.3g}); "
                    f"a fold rule of family {family.name!r} does not describe this model. Please report it; "
                    "meanwhile use the gated model."
                )
    report = FoldReport(sites={s.site: {k: v for k, v in vars(s).items() if k != "site"} for s in sites},
                        total=total)
    plan = {"linear_units": {name: mask.nonzero().flatten().tolist() for name, mask in linear.items()},
            "kept_gates": [name for name, gate in gated_modules(model)
                           if bool(gate.alpha.detach()[~linear[name]].any())],
            "affine_targets": [name for name, gate in gated_modules(model) if gate._affine_targets() is not None]}
    setattr(folded, FOLD_ATTR, FoldState(report, plan, _source(model)))
    return folded
