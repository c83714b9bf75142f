"""Gate modules: per-channel interpolation between an activation and a linear map.

These modules know nothing about models or training; `patching.py` places them.

Two kinds of site:

* ``"elementwise"`` (ReLU, GELU, SiLU, ... FFN/MLP/conv activations)::

      y_c = a_c * (p_c * x_c + q_c) + (1 - a_c) * act(x_c)

  ``a_c = 0`` is the original activation bit for bit, ``a_c = 1`` is exactly the affine map ``p_c x + q_c``.
  The default target ``p = 1, q = 0`` is the identity (the paper's gate; for ReLU it is PReLU with slope
  ``a_c``); calibration (`calibration.py`) fits ``p, q`` to data, so that a linearized unit of a pretrained model
  is its best linear replacement instead of ``x``.

* ``"glu"`` (the gate activation of a gated FFN ``h = act(u) * v``: T5 v1.1/mT5 ``wi_0``/``wi_1``,
  timm ``GluMlp``/``SwiGLUPacked``/``SwiGLU``)::

      g_c = a_c * q_c + (1 - a_c) * act(u_c),     h_c = g_c * v_c

  Interpolating ``act(u)`` toward the identity would leave the bilinear product ``u_c * v_c``, which is not
  linear. Interpolating toward a constant ``q_c`` (default 1) instead makes a fully gated unit ``h_c = q_c v_c``:
  a linear function of the FFN input, whose gate-projection row is no longer used.

The targets are buffers ``target_slope`` (``p``; unused by GLU sites) and ``target_offset`` (``q``), fp32, shape
``[channels]``, saved with the gates. While they hold their defaults the target is computed as ``x`` (or 1)
itself, so today's gates and older checkpoints, which have no target tensors, give the same bits.

Both are computed with ``torch.lerp``, which is exact at both ends (weight 0 returns ``act(x)``, weight 1
returns the target), so a fresh patch changes no output bit and a linear unit is exactly linear.

Cost. When every gate of a site is 0 and the gate lives on the CPU, the site returns ``act(x)`` itself and skips
the interpolation (the same bits; on an accelerator the check would stall the device, and a traced or compiled
graph must serve any gate values, so there the interpolation always runs). With gradients on, the gate is one
autograd node (`_GateFunction`) that saves only ``x`` and recomputes ``act(x)`` in its backward, instead of
keeping ``act(x)`` alive as a plain ``lerp`` would; the gate gradient is accumulated in fp32 whatever the input
dtype. (Activations with parameters of their own, such as PReLU, keep plain autograd.) A backward that builds a graph
of its own (``torch.autograd.grad(..., create_graph=True)``: gradient penalties, double backward) recomputes the gate
with plain differentiable ops instead, so higher derivatives work; ordinary training keeps the memory-saving path.

Dtypes. A gate's ``alpha``, ``target_slope`` and ``target_offset`` are fp32 whatever the model is cast to
(``model.half()``, ``model.to(torch.bfloat16)``, ``from_pretrained(..., dtype=...)``): casts move them to the new
device but keep their dtype. The gate mixes in the input's dtype (``alpha`` cast to it), so its output has the
model's dtype, and a gate of 0 stays bit-exact.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

GateKind = Literal["elementwise", "glu"]


def _reduce_dims(ndim: int, channel_dim: int) -> list[int]:
    """Every dimension of an ``ndim``-dimensional input except its channel dimension."""
    channel = channel_dim % ndim
    return [d for d in range(ndim) if d != channel]


class _GateFunction(torch.autograd.Function):
    """``lerp(act(x), target, w)`` with ``target = p x + q`` (elementwise) or ``q`` (glu), ``w`` = ``alpha`` cast
    to ``x.dtype`` and shaped to broadcast along ``channel_dim``; ``affine=None`` is the default target ``x``/1.

    Forward: exactly `GatedActivation`'s no-grad computation. Backward: ``act(x)`` is recomputed from the saved
    ``x``; ``d/dx = (1 - w) act'(x) + w p [elementwise]``, ``d/dalpha_c = sum over all but the channel dim of
    g * (target - act(x))``, accumulated in fp32 or wider. The targets get no gradient. Under ``create_graph=True``
    (grad mode on in the backward) the gradients are computed by autograd through the gate recomputed with plain
    ops, differentiable again (the ``alpha`` gradient then sums in the input's dtype).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, act: nn.Module, channel_dim: int, glu: bool,
                all_zero: bool, affine: Optional[tuple[torch.Tensor, torch.Tensor]],
                act_x: Optional[torch.Tensor]) -> torch.Tensor:
        w = _broadcast_weight(alpha, x, channel_dim)
        ctx.save_for_backward(x, alpha)
        ctx.act, ctx.channel_dim, ctx.glu, ctx.all_zero, ctx.affine = act, channel_dim, glu, all_zero, affine
        return _mix(act(x) if act_x is None else act_x, x, w, glu, all_zero, affine, channel_dim)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, alpha = ctx.saved_tensors
        need_x, need_alpha = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: the gradients must be differentiable themselves
            inputs = [t for t, need in ((x, need_x), (alpha, need_alpha)) if need]
            out = _mix(ctx.act(x), x, _broadcast_weight(alpha, x, ctx.channel_dim), ctx.glu, False, ctx.affine,
                       ctx.channel_dim)
            grads = iter(torch.autograd.grad(out, inputs, g, create_graph=True))
            return (next(grads) if need_x else None, next(grads) if need_alpha else None, *[None] * 6)
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(need_x)
            y = ctx.act(x_leaf)
        grad_x = grad_alpha = None
        if need_alpha:
            distance = _target(x, ctx.glu, ctx.affine, ctx.channel_dim) - y.detach()
            accumulate = torch.promote_types(g.dtype, torch.float32)
            grad_alpha = distance.mul_(g).sum(_reduce_dims(x.dim(), ctx.channel_dim), dtype=accumulate)
            grad_alpha = grad_alpha.reshape(alpha.shape).to(alpha.dtype)
        if need_x:
            w = _broadcast_weight(alpha, x, ctx.channel_dim)
            (grad_x,) = torch.autograd.grad(y, x_leaf, g if ctx.all_zero else g * (1.0 - w))
            if not (ctx.all_zero or ctx.glu):
                slope = w if ctx.affine is None else w * _broadcast_weight(ctx.affine[0], x, ctx.channel_dim)
                grad_x = grad_x.addcmul_(g, slope)
        return grad_x, grad_alpha, None, None, None, None, None, None


def _broadcast_weight(alpha: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """A per-channel ``[C]`` tensor cast to ``x.dtype`` and shaped to broadcast along ``channel_dim`` of ``x``."""
    w = alpha.to(x.dtype)
    dim = channel_dim % x.dim()
    if dim != x.dim() - 1:
        w = w.view(-1, *([1] * (x.dim() - 1 - dim)))
    return w


def _target(x: torch.Tensor, glu: bool, affine: Optional[tuple[torch.Tensor, torch.Tensor]],
            channel_dim: int) -> torch.Tensor:
    """The linear target of every unit: ``x`` or ``p x + q`` (elementwise), 1 or ``q`` (glu)."""
    if affine is None:
        return x.new_ones(()) if glu else x
    slope, offset = (_broadcast_weight(t, x, channel_dim) for t in affine)
    return offset if glu else torch.addcmul(offset, x, slope)


def _mix(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, glu: bool, all_zero: bool,
         affine: Optional[tuple[torch.Tensor, torch.Tensor]] = None, channel_dim: int = -1) -> torch.Tensor:
    """``lerp(y, target, w)``; ``y`` itself when every weight is 0 (the same bits as the lerp)."""
    if all_zero:
        return y
    return torch.lerp(y, _target(x, glu, affine, channel_dim), w)


class GatedActivation(nn.Module):
    """Wrap one activation call site with a gate tensor ``alpha`` of shape ``[channels]``, values in [0, 1].

    Args:
        act: the original activation module (called on the input; never in place).
        channels: number of units (size of the channel dimension).
        channel_dim: the input dim that holds the channels: ``-1`` for (B, T, C) or (B, ..., C) inputs, ``1`` for
            (B, C, H, W) or (B, C, T) inputs; any other dim counts from 0.
        kind: ``"elementwise"`` or ``"glu"`` (see module docstring).
        init: initial gate value of every unit.
    """

    def __init__(
        self, act: nn.Module, channels: int, channel_dim: int = -1, kind: GateKind = "elementwise", init: float = 0.0
    ) -> None:
        super().__init__()
        if kind not in ("elementwise", "glu"):
            raise ValueError(f"Gate kind must be 'elementwise' or 'glu'; got {kind!r}.")
        if not isinstance(channel_dim, int) or channel_dim < -1:
            raise ValueError(f"channel_dim must be -1 (channels last) or a dim counted from 0; got {channel_dim!r}.")
        self.act = act
        self.channel_dim = channel_dim
        self.kind: GateKind = kind
        self.alpha = nn.Parameter(torch.full((channels,), float(init), dtype=torch.float32))
        self.register_buffer("target_slope", torch.ones(channels, dtype=torch.float32))
        self.register_buffer("target_offset", torch.full((channels,), self.default_offset, dtype=torch.float32))
        self._affine = False  # False while the targets hold their defaults: the target is then x (or 1) itself

    @property
    def channels(self) -> int:
        return self.alpha.numel()

    @property
    def default_offset(self) -> float:
        """``q`` of the default target: 0 (elementwise, target ``x``) or 1 (glu, target 1)."""
        return 1.0 if self.kind == "glu" else 0.0

    @torch.no_grad()
    def set_targets(self, slope: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None) -> None:
        """Set the linear targets ``p`` (``slope``) and ``q`` (``offset``), each ``[channels]``; ``None`` keeps the
        current values. Only units with ``alpha > 0`` change the output. A GLU site's slope must stay 1."""
        for name, value in (("target_slope", slope), ("target_offset", offset)):
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.shape != (self.channels,) or not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be a finite tensor of shape ({self.channels},); got "
                                 f"{tuple(value.shape)}.")
            getattr(self, name).copy_(value)
        if self.kind == "glu" and not bool((self.target_slope == 1).all()):
            self.target_slope.fill_(1.0)
            raise ValueError("A GLU unit's linear target is a constant q (h = q v): set only its offset.")
        self._sync_affine()

    def _sync_affine(self) -> None:
        self._affine = not (bool((self.target_slope == 1).all())
                            and bool((self.target_offset == self.default_offset).all()))

    def _apply(self, fn, recurse: bool = True) -> "GatedActivation":
        """``Module._apply`` (``.to``, ``.half()``, ``.cuda()``, ...) with the gate's own tensors kept fp32: they go
        to the device ``fn`` sends them to, never to another floating dtype; ``act`` is converted as usual."""
        if recurse:
            for module in self.children():
                module._apply(fn)

        def keep_fp32(tensor: torch.Tensor) -> torch.Tensor:
            out = fn(tensor)
            if out.is_floating_point() and out.dtype != torch.float32:
                return tensor.detach().to(out.device, torch.float32)
            return out

        return super()._apply(keep_fp32, recurse=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Checkpoints written before affine targets existed (format 1) hold only alpha: keep the default targets.
        for name in ("target_slope", "target_offset"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if any(t.dtype != torch.float32 for t in (self.alpha, self.target_slope, self.target_offset)):
            self._apply(lambda t: t, recurse=False)  # fp32 again where a loader set another dtype (older checkpoints)
        self._sync_affine()

    def _affine_targets(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return (self.target_slope, self.target_offset) if self._affine else None

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_dim={self.channel_dim}, kind={self.kind!r}"

    def _all_zero(self) -> bool:
        """True when every gate is 0 and checking costs no device sync (CPU, not compiling: a compiled graph must
        keep the interpolation for other gate values)."""
        return (self.alpha.device.type == "cpu" and not torch.compiler.is_compiling()
                and not bool(self.alpha.detach().any()))

    def forward(self, x: torch.Tensor, act_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gated activation of ``x``; ``act_x``, when given, is ``act(x)`` as the caller computed it (without
        gradient): :class:`ExpertGatedActivation` computes it once for all experts' rows, so that gates at 0
        reproduce the fused call bit for bit."""
        if x.shape[self.channel_dim] != self.channels:
            raise RuntimeError(
                f"Gated activation expects {self.channels} channels in dim {self.channel_dim}, got input of shape "
                f"{tuple(x.shape)}. The model's width changed after patching; patch it again."
            )
        glu = self.kind == "glu"
        tracing = torch.jit.is_tracing()
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad)
        affine = self._affine_targets()
        if needs_grad and not tracing and next(self.act.parameters(), None) is None:
            return _GateFunction.apply(x, self.alpha, self.act, self.channel_dim, glu, self._all_zero(), affine,
                                       act_x)
        # Plain ops: without gradients; in a traced graph (valid for any gate values); or for an activation with
        # parameters of its own (PReLU), whose gradients autograd must see.
        all_zero = not (needs_grad or tracing) and self._all_zero()
        return _mix(self.act(x) if act_x is None else act_x, x, _broadcast_weight(self.alpha, x, self.channel_dim),
                    glu, all_zero, affine, self.channel_dim)


class SharedGatedActivation(nn.Module):
    """One activation instance that its parent calls at several places (e.g. torchvision ResNet's ``relu``).

    Each call site gets its own :class:`GatedActivation` in ``sites``; the k-th call inside one forward of
    the parent uses ``sites[k]``. The parent's forward pre-hook (installed by the patcher) calls
    :meth:`reset` so the count restarts on every parent call.
    """

    def __init__(self, sites: list[GatedActivation]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self._calls = 0

    @property
    def act(self) -> nn.Module:
        return self.sites[0].act

    def reset(self) -> None:
        self._calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        site = self.sites[self._calls % len(self.sites)]
        self._calls += 1
        return site(x)


class ExpertGatedActivation(nn.Module):
    """One activation instance that a fused mixture-of-experts module calls on the tokens of all its experts at
    once (transformers 5 ``grouped_mm``/``batched_mm``) or once per expert (``eager``).

    Each expert gets its own :class:`GatedActivation` in ``experts`` (named ``<name>.experts.<e>``), so a unit is
    one channel of one expert and its gate acts on that expert's tokens only. Before each call of the experts
    module, its forward pre-hook (installed by the patcher) tells :meth:`route` which expert each input row
    belongs to (``rows``, shape ``[rows]``, int) or, for the eager layout, the experts in call order (``order``).
    """

    def __init__(self, experts: list[GatedActivation]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self._rows: Optional[torch.Tensor] = None
        self._order: Optional[list[int]] = None
        self._calls = 0

    @property
    def act(self) -> nn.Module:
        return self.experts[0].act

    def route(self, rows: Optional[torch.Tensor] = None, order: Optional[list[int]] = None) -> None:
        """Set the routing of the next call(s): an expert id per input row, or the experts in call order."""
        self._rows, self._order, self._calls = rows, order, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._order is not None:
            if self._calls >= len(self._order):
                raise RuntimeError(f"Expert activation called {self._calls + 1} times for {len(self._order)} routed "
                                   "experts; the experts module's routing changed after patching. Patch it again.")
            expert = self._order[self._calls]
            self._calls += 1
            return self.experts[expert](x)
        if self._rows is None or self._rows.shape[0] != x.shape[0]:
            raise RuntimeError("Expert activation called without the routing of its experts module (or with "
                               f"{x.shape[0]} rows for {None if self._rows is None else self._rows.shape[0]} routed); "
                               "call the experts module, not its activation, or patch the model again.")
        with torch.no_grad():  # act on all rows at once, as the experts module does: bit-exact at gate 0
            out = self.act(x)
        for expert in self._rows.unique().tolist():
            if expert >= len(self.experts):  # expert-parallel sentinel rows: left as the experts module has them
                continue
            index = (self._rows == expert).nonzero().squeeze(1)
            rows = self.experts[expert](x.index_select(0, index), out.index_select(0, index))
            out = out.index_copy(0, index, rows)
        return out
