"""Gate modules: per-channel interpolation between an activation and a linear map.

These modules know nothing about models or training; `patching.py` places them.

Two kinds of site:

* ``"elementwise"`` (ReLU, GELU, SiLU, ... FFN/MLP/conv activations)::

      y_c = a_c * x_c + (1 - a_c) * act(x_c)

  ``a_c = 0`` is the original activation bit for bit, ``a_c = 1`` is exactly the identity.
  For ReLU this is PReLU with slope ``a_c``.

* ``"glu"`` (the gate activation of a gated FFN ``h = act(u) * v``: T5 v1.1/mT5 ``wi_0``/``wi_1``,
  timm ``GluMlp``/``SwiGluPacked``/``SwiGLU``)::

      g_c = a_c * 1 + (1 - a_c) * act(u_c),     h_c = g_c * v_c

  Interpolating ``act(u)`` toward the identity would leave the bilinear product ``u_c * v_c``, which is not
  linear. Interpolating toward the constant 1 instead makes a fully gated unit ``h_c = v_c``: a linear
  function of the FFN input, whose gate-projection row is no longer used.

Both are computed with ``torch.lerp``, which is exact at both ends (weight 0 returns ``act(x)``, weight 1
returns the target), so a fresh patch changes no output bit and a linear unit is exactly linear.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

GateKind = Literal["elementwise", "glu"]


class GatedActivation(nn.Module):
    """Wrap one activation call site with a gate tensor ``alpha`` of shape ``[channels]``, values in [0, 1].

    Args:
        act: the original activation module (called on the input; never in place).
        channels: number of units (size of the channel dimension).
        channel_dim: ``-1`` for (B, T, C) or (B, ..., C) inputs, ``1`` for (B, C, H, W) inputs.
        kind: ``"elementwise"`` or ``"glu"`` (see module docstring).
        init: initial gate value of every unit.
    """

    def __init__(
        self, act: nn.Module, channels: int, channel_dim: int = -1, kind: GateKind = "elementwise", init: float = 0.0
    ) -> None:
        super().__init__()
        if kind not in ("elementwise", "glu"):
            raise ValueError(f"Gate kind must be 'elementwise' or 'glu'; got {kind!r}.")
        if channel_dim not in (-1, 1):
            raise ValueError(f"channel_dim must be -1 (channels last) or 1 (channels first); got {channel_dim}.")
        self.act = act
        self.channel_dim = channel_dim
        self.kind: GateKind = kind
        self.alpha = nn.Parameter(torch.full((channels,), float(init), dtype=torch.float32))

    @property
    def channels(self) -> int:
        return self.alpha.numel()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_dim={self.channel_dim}, kind={self.kind!r}"

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.to(x.dtype)
        if self.channel_dim == 1 and x.dim() > 2:
            a = a.view(-1, *([1] * (x.dim() - 2)))
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.channel_dim] != self.channels:
            raise RuntimeError(
                f"Gated activation expects {self.channels} channels in dim {self.channel_dim}, got input of shape "
                f"{tuple(x.shape)}. The model's width changed after patching; patch it again."
            )
        y = self.act(x)
        target = x if self.kind == "elementwise" else x.new_ones(())
        return torch.lerp(y, target, self._weight(x))


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
