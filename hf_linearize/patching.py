"""One-call patching: put a :class:`~hf_linearize.gates.GatedActivation` on every FFN/MLP activation site.

``patch_model`` finds the sites (family default, or ``LinearizeConfig.target_modules``), runs one probe forward
pass in eval mode to learn each site's channel count and layout and to detect activation instances that are
called at several places, and swaps the gates in. ``unpatch`` puts the original modules back.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .config import LinearizeConfig, Pattern
from .families import (
    ACTIVATION_TYPES,
    FamilySpec,
    find_family,
    glu_kind,
    is_activation_like,
)
from .gates import GatedActivation, SharedGatedActivation
from .probe_inputs import _call, _model_name, _shapes, default_example_inputs

STATE_ATTR = "_hf_linearize"
FOLD_ATTR = "_hf_linearize_fold"
"""Set by :func:`hf_linearize.fold` on the folded model, which is no longer patched (its gates are fixed)."""
_FOLDED = ("{} is a folded model (hf_linearize.fold): its linear units are merged away and its gates fixed. Use the "
           "gated model it was folded from.")


@dataclass
class PatchState:
    """What ``patch_model`` records on the model (as ``model._hf_linearize``)."""

    config: LinearizeConfig
    family: str
    inplace: dict[str, bool] = field(default_factory=dict)
    """Original ``inplace`` flag of each wrapped activation, restored by ``unpatch``."""


# --------------------------------------------------------------------------------------------- selection
def matches(name: str, pattern: Pattern) -> bool:
    """PEFT-style selector: a regex fully matches ``name``, or ``name`` equals / ends with ``.`` + a suffix."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in pattern)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _select_sites(model: nn.Module, config: LinearizeConfig, family: FamilySpec) -> list[str]:
    target = config.target_modules if config.target_modules is not None else family.target_modules
    selected = []
    for name, module in model.named_modules():
        if not name or matches(name, config.exclude_modules):
            continue
        if target is not None:
            if not matches(name, target):
                continue
            if list(module.children()) or isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
                raise ValueError(
                    f"target_modules={target!r} matched {name!r} ({type(module).__name__}), which is not an "
                    "activation. Select activation modules only, e.g. 'activation_fn' or r'.*\\.mlp\\.act'."
                )
            selected.append(name)
        elif isinstance(module, ACTIVATION_TYPES) or (
            is_activation_like(module) and glu_kind(_parent(model, name)[0]) == "glu"
        ):
            selected.append(name)
    if not selected:
        found = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and is_activation_like(m)]
        what = f"target_modules={target!r}" if target is not None else "the generic activation-type rule"
        raise ValueError(
            f"No activation site to gate: {what} (family {family.name!r}, exclude_modules="
            f"{config.exclude_modules!r}) matched nothing. Activation-like modules in this model: "
            f"{found[:20] or 'none'}{' ...' if len(found) > 20 else ''}. Pass target_modules naming some of them."
        )
    return selected


# --------------------------------------------------------------------------------------------- probing
@dataclass
class _SiteCalls:
    """Calls of one activation instance, grouped by the forward call of its parent module."""

    per_parent_call: list[list[tuple[tuple[int, ...], int]]] = field(default_factory=list)
    """[parent call][k-th call inside it] -> (input shape, channel dim)."""


_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _channel_dim(producer: Optional[nn.Module], shape: tuple[int, ...]) -> int:
    """Channel dimension of an activation input, from the last parametrised layer run before it."""
    if isinstance(producer, _CHANNELS_FIRST) or (
        isinstance(producer, nn.LayerNorm) and type(producer).__name__.endswith("2d")
    ):
        return 1
    if isinstance(producer, (nn.Linear, nn.LayerNorm)) or len(shape) != 4:
        return -1
    return 1


def _probe(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, _SiteCalls]:
    calls: dict[str, _SiteCalls] = {name: _SiteCalls() for name in names}
    last_producer: list[Optional[nn.Module]] = [None]
    handles = []

    def remember_producer(module: nn.Module, args: Any, output: Any) -> None:
        last_producer[0] = module

    def new_parent_call(name: str, module: nn.Module, args: Any) -> None:
        calls[name].per_parent_call.append([])

    def record_site(name: str, module: nn.Module, args: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError(f"Activation {name!r} is not called with a tensor; it cannot be gated.")
        shape = tuple(args[0].shape)
        groups = calls[name].per_parent_call
        if not groups:
            groups.append([])
        groups[-1].append((shape, _channel_dim(last_producer[0], shape)))

    try:
        for module in model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                handles.append(module.register_forward_hook(remember_producer))
        for name in names:
            parent, _ = _parent(model, name)
            if parent is not model:
                handles.append(parent.register_forward_pre_hook(functools.partial(new_parent_call, name)))
            handles.append(model.get_submodule(name).register_forward_pre_hook(functools.partial(record_site, name)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if example_inputs is not None:
                    _call(model, example_inputs)
                else:
                    _probe_with_default_inputs(model)
        finally:
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _probe_with_default_inputs(model: nn.Module) -> None:
    """Run the probe on :func:`default_example_inputs`; a failure inside the model becomes a ``ValueError`` that
    names the model and the input tried and asks for ``example_inputs`` (never a bare assertion from the model)."""
    inputs = default_example_inputs(model)
    try:
        _call(model, inputs)
    except Exception as error:
        raise ValueError(
            f"The probe forward pass of {_model_name(model)} failed on the example input built for it (shape "
            f"{_shapes(inputs)}): {type(error).__name__}: {error}. The model's input could not be inferred; pass "
            "example_inputs= (one small batch the model accepts) to patch_model."
        ) from error


class _ResetSharedCalls:
    """Forward pre-hook on a parent module: restart the call count of its shared gated activation."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __call__(self, module: nn.Module, args: Any) -> None:
        getattr(module, self.attr).reset()


# --------------------------------------------------------------------------------------------- public API
def patch_model(
    model: nn.Module, config: Optional[LinearizeConfig] = None, example_inputs: Any = None
) -> nn.Module:
    """Gate every FFN/MLP activation of ``model`` in place and return it.

    Args:
        model: a ``transformers.PreTrainedModel``, a timm model, or any ``nn.Module``.
        config: which sites and how the gates start; default ``LinearizeConfig()``.
        example_inputs: input for one probe forward pass (tensor, tuple of args, or dict of kwargs);
            built automatically for HF and timm models.

    With ``gate_init=0`` (the default) the patched model computes exactly what it computed before.
    Raises ``TypeError``/``ValueError`` (model unchanged) for a non-module, a model that is already patched,
    or a selection that matches no activation.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model expects a torch.nn.Module; got {type(model).__name__}.")
    if hasattr(model, FOLD_ATTR):
        raise ValueError(_FOLDED.format(type(model).__name__))
    if is_patched(model):
        raise ValueError(
            "This model is already patched; patching twice is not allowed. Use gated_modules(model) to reach "
            "its gates, or unpatch(model) first to start again."
        )
    config = config if config is not None else LinearizeConfig()
    if not isinstance(config, LinearizeConfig):
        raise TypeError(f"config must be a LinearizeConfig; got {type(config).__name__}.")
    family = find_family(model)
    names = _select_sites(model, config, family)
    calls = _probe(model, names, example_inputs)
    never_called = [n for n in names if not calls[n].per_parent_call]
    if len(never_called) == len(names):
        raise ValueError(f"None of the selected activations {names[:5]} ran in the probe forward pass.")
    if never_called:
        warnings.warn(f"Not gated, since they did not run in the probe forward pass: {never_called}.", stacklevel=2)

    plan = []
    for name in names:
        groups = [g for g in calls[name].per_parent_call if g]
        if not groups:
            continue
        if any(g != groups[0] for g in groups):
            raise ValueError(
                f"Activation {name!r} is called with a different number of inputs or shapes on different calls "
                f"of its parent; exclude it with exclude_modules=[{name!r}]."
            )
        plan.append((name, groups[0]))

    state = PatchState(config=config, family=family.name)
    for name, site_calls in plan:
        parent, attr = _parent(model, name)
        act = getattr(parent, attr)
        if getattr(act, "inplace", False):
            state.inplace[name] = True
            act.inplace = False
        kind = glu_kind(parent)
        gates = [
            GatedActivation(act, shape[dim], channel_dim=dim, kind=kind, init=config.gate_init)
            for shape, dim in site_calls
        ]
        if len(gates) == 1:
            setattr(parent, attr, gates[0])
        else:
            setattr(parent, attr, SharedGatedActivation(gates))
            parent.register_forward_pre_hook(_ResetSharedCalls(attr))
    setattr(model, STATE_ATTR, state)
    return model


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, STATE_ATTR, None), PatchState)


def patch_state(model: nn.Module) -> PatchState:
    """The :class:`PatchState` of a patched model; ``ValueError`` if it was never patched."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, PatchState) and hasattr(model, FOLD_ATTR):
        raise ValueError(_FOLDED.format(type(model).__name__))
    if not isinstance(state, PatchState):
        raise ValueError(f"{type(model).__name__} is not patched; call hf_linearize.patch_model(model) first.")
    return state


def gated_modules(model: nn.Module) -> Iterator[tuple[str, GatedActivation]]:
    """Yield ``(name, gate)`` for every gated site, in module order; ``gate.alpha`` has shape ``[channels]``.

    A shared activation called at k places yields k gates, named ``<name>.sites.<i>``.
    """
    for name, module in model.named_modules():
        if isinstance(module, GatedActivation):
            yield name, module


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original activation modules and return the model.

    Raises ``ValueError`` (model unchanged) unless every gate is exactly 0, since otherwise the model's
    function would change.
    """
    state = patch_state(model)
    moved = [(n, int((g.alpha != 0).sum())) for n, g in gated_modules(model) if bool((g.alpha != 0).any())]
    if moved:
        total = sum(k for _, k in moved)
        raise ValueError(
            f"Cannot unpatch: {total} unit(s) in {len(moved)} gated layer(s) have a gate != 0 (first: {moved[0][0]}),"
            " so removing the gates would change the model. Zero them first (e.g. `for _, g in "
            "gated_modules(model): g.alpha.data.zero_()`) or keep the patched model."
        )
    wrappers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside_shared = wrappers and name.startswith(wrappers[-1][0] + ".")
        if isinstance(module, (GatedActivation, SharedGatedActivation)) and not inside_shared:
            wrappers.append((name, module))
    for name, module in wrappers:
        parent, attr = _parent(model, name)
        act = module.act
        if state.inplace.get(name):
            act.inplace = True
        setattr(parent, attr, act)
        for key, hook in list(parent._forward_pre_hooks.items()):
            if isinstance(hook, _ResetSharedCalls) and hook.attr == attr:
                del parent._forward_pre_hooks[key]
    delattr(model, STATE_ATTR)
    return model


Selection = Union[float, Mapping[str, Union[float, torch.Tensor]]]


@torch.no_grad()
def set_linear(model: nn.Module, selection: Selection, seed: int = 0) -> int:
    """Force chosen units to exactly linear (gate = 1). Returns how many of them became linear: units that were
    linear already (gate >= 1 - ``linear_threshold``) are set to exactly 1 but not counted.

    ``selection`` is a fraction in [0, 1] applied to every gated layer (that many units, chosen at random with
    ``seed``), or a mapping from gated-module name (as yielded by :func:`gated_modules`) to a fraction or to a
    boolean mask of shape ``[channels]``.
    """
    gates = dict(gated_modules(model))
    if not gates:
        raise ValueError("set_linear needs a patched model; call patch_model(model) first.")
    if not isinstance(selection, Mapping):
        selection = {name: selection for name in gates}
    unknown = sorted(set(selection) - set(gates))
    if unknown:
        raise KeyError(f"Not gated module name(s) {unknown[:5]}; names come from gated_modules(model).")
    generator = torch.Generator().manual_seed(seed)
    already_linear = linear_units(model)
    count = 0
    for name, choice in selection.items():
        alpha = gates[name].alpha
        if isinstance(choice, torch.Tensor):
            if choice.dtype != torch.bool or choice.shape != alpha.shape:
                raise ValueError(f"Mask for {name!r} must be a bool tensor of shape {tuple(alpha.shape)}.")
            mask = choice.to(alpha.device)
        else:
            if isinstance(choice, bool) or not isinstance(choice, (int, float)) or not 0 <= choice <= 1:
                raise ValueError(f"Fraction for {name!r} must be a number in [0, 1]; got {choice!r}.")
            mask = torch.zeros(alpha.numel(), dtype=torch.bool)
            mask[torch.randperm(alpha.numel(), generator=generator)[: round(choice * alpha.numel())]] = True
            mask = mask.to(alpha.device)
        alpha[mask] = 1.0
        count += int((mask & ~already_linear[name].to(mask.device)).sum())
    return count


class GateSummary(dict):
    """``summary`` result: ``{"layers": {name: {"units", "linear", "nonlinear"}}, "total": {...}}``.

    ``str()`` renders it as a table.
    """

    def __str__(self) -> str:
        rows = [(name, v["units"], v["linear"], v["nonlinear"]) for name, v in self["layers"].items()]
        total = self["total"]
        rows.append(("TOTAL", total["units"], total["linear"], total["nonlinear"]))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'layer':<{width}}  {'units':>7}  {'linear':>7}  {'nonlinear':>9}"]
        lines += [f"{n:<{width}}  {u:>7}  {lin:>7}  {nl:>9}" for n, u, lin, nl in rows]
        lines.insert(-1, "-" * len(lines[0]))
        return "\n".join(lines)


def linear_units(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per gated site (as :func:`gated_modules` names it), the bool mask ``[channels]`` of its linear units:
    gate >= 1 - ``linear_threshold``. The one rule that ``summary`` and ``fold`` share."""
    threshold = patch_state(model).config.linear_threshold
    return {name: gate.alpha.detach() >= 1.0 - threshold for name, gate in gated_modules(model)}


def summary(model: nn.Module) -> GateSummary:
    """Per gated layer: units, linear units (gate >= 1 - ``linear_threshold``) and nonlinear units, plus totals."""
    layers = {}
    for name, mask in linear_units(model).items():
        linear = int(mask.sum())
        layers[name] = {"units": mask.numel(), "linear": linear, "nonlinear": mask.numel() - linear}
    total = {key: sum(v[key] for v in layers.values()) for key in ("units", "linear", "nonlinear")}
    total["nonlinear_fraction"] = total["nonlinear"] / total["units"] if total["units"] else 0.0
    return GateSummary(family=patch_state(model).family, layers=layers, total=total)
