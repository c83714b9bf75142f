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
from . import dataflow
from .families import (
    ACTIVATION_TYPES,
    NOT_GATED_BY_DEFAULT,
    FamilySpec,
    behaves_like_activation,
    find_family,
    in_head,
    is_activation_like,
)
from .gates import ExpertGatedActivation, GatedActivation, GateKind, SharedGatedActivation
from .probe_inputs import _call, _model_name, _shapes, default_example_inputs, input_spec
from .sparsity import whole_tensors

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
    probe: Optional[dict[str, Any]] = None
    """The probe input's spec (:func:`~hf_linearize.probe_inputs.input_spec`: names, shapes, dtypes; no data),
    saved with checkpoints so that loading probes the same way."""
    layouts: dict[str, list[str]] = field(default_factory=dict)
    """Per gated activation module, the layout of each of its call sites (:attr:`SiteLayout.layout`)."""
    path_structure: Any = field(default=None, repr=False, compare=False)
    """The traced path-graph structure (:class:`~hf_linearize.traced_graph.TracedStructure`), built on first use."""


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
        elif not in_head(name) and (isinstance(module, ACTIVATION_TYPES) or (
                not isinstance(module, NOT_GATED_BY_DEFAULT) and behaves_like_activation(module))):
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
class SiteLayout:
    """What the probe's data flow says about one call of an activation module (see :mod:`hf_linearize.dataflow`).

    Attributes:
        name: the activation module's name.
        kind: ``"elementwise"`` or ``"glu"`` (its output multiplies a value ``v``: ``act(u) * v``).
        layout: ``elementwise``, ``glu`` (separate projections), ``packed-glu`` (``u`` and ``v`` halves of one
            projection) or ``glu-other`` (``v`` is not a linear map of the FFN input); ``expert-`` prefixed for a
            fused MoE experts module.
        channel_dim: the input dim that holds the units (-1: last; else a dim counted from 0).
        channels: number of units.
        experts: for a fused MoE experts module, ``(module name, number of experts)``.
    """

    name: str
    kind: GateKind
    layout: str
    channel_dim: int
    channels: int
    experts: Optional[tuple[str, int]] = None


def _channel_dim(graph: dataflow.ModelGraph, region: dataflow.Region) -> Optional[int]:
    """The dim of the site input that holds its units, read from the data flow; None when nothing tells.

    With a producer projection: a bump on one of its output channels must reach exactly one index of that dim of
    the site input. Else, with a consumer projection: a bump on one index of the site output along that dim must
    reach exactly one channel of the consumer's input (its contracted dim)."""
    site_in, site_out = region.site_op.reads[0], region.site_op.writes[0]
    x = graph.values[site_in]
    producer = next((op for op in region.producers if op.writes), None)
    consumer = next((op for op in region.consumers), None)
    recorded = lambda op, v: graph.values[op.writes[0]]  # noqa: E731 - the site's own recorded output
    candidates = {d for d in range(x.dim()) if x.shape[d] > 1}
    if producer is not None:
        out = graph.values[producer.writes[0]]
        feature = producer.feature_dim() % out.dim()
        found, reached = set(candidates), False
        for c in sorted({0, out.shape[feature] // 2, out.shape[feature] - 1}):
            diff = _bump_reach(graph, region, producer.writes[0], feature, c, site_in, recorded)
            if diff is not None:
                reached = True
                found &= {d for d in range(x.dim()) if _indices(diff, d) == 1}
        if reached and len(found) == 1:
            return _as_channel_dim(found.pop(), x.dim())
    if consumer is not None:
        key = next(k for k in consumer.reads if k in region.outputs)
        contracted = consumer.feature_dim() % graph.values[key].dim()
        found = {d for d in candidates
                 if (diff := _bump_reach(graph, region, site_out, d, 0, key, recorded)) is not None
                 and _indices(diff, contracted) == 1}
        if len(found) == 1:
            return _as_channel_dim(found.pop(), x.dim())
    return None


def _as_channel_dim(dim: int, ndim: int) -> int:
    """A gate's ``channel_dim``: -1 for the last dim, else the dim counted from 0."""
    return -1 if dim == ndim - 1 else dim


def _indices(diff: torch.Tensor, dim: int) -> int:
    """How many indices along ``dim`` hold a nonzero entry of ``diff``."""
    return int(diff.movedim(dim, 0).flatten(1).any(1).sum())


def _bump_reach(graph: dataflow.ModelGraph, region: dataflow.Region, key: dataflow.Key, dim: int, index: int,
                observe: dataflow.Key, site_fn) -> Optional[torch.Tensor]:
    """Where a bump on ``index`` of ``dim`` of the value ``key`` shows in the value ``observe`` (a bool mask), or
    None when it does not reach it."""
    def bump(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.select(dim, index).add_(1.0 + t.select(dim, index).abs())
        return t

    env = graph.replay(region, {}, site_fn, edit={key: bump})
    if observe not in env:
        return None
    diff = env[observe] != graph.values[observe]
    return diff if bool(diff.any()) else None


def _layout(graph: dataflow.ModelGraph, op: dataflow.Op, owners: Mapping[int, str]) -> SiteLayout:
    """The :class:`SiteLayout` of one recorded site call."""
    region = graph.region(op)
    x = graph.values[op.reads[0]]
    dim = _channel_dim(graph, region)
    if dim is None:  # no producer projection to learn it from: channels first for images, else last
        dim = 1 if x.dim() == 4 else -1
    experts = None
    for producer in region.producers:
        weight = graph.weight(producer)
        stacked = weight is not None and weight.dim() == 3 and producer.feature_dim() == -1  # not a conv kernel
        if stacked and weight.untyped_storage().data_ptr() in owners:
            experts = (owners[weight.untyped_storage().data_ptr()], int(weight.shape[0]))
    layout = ("expert-" if experts else "") + region.layout
    return SiteLayout(op.site, region.kind, layout, dim, int(x.shape[dim]), experts)


def _probe(model: nn.Module, names: list[str], example_inputs: Any
           ) -> tuple[dataflow.ModelGraph, dict[str, list[list[SiteLayout]]], Any]:
    """Run the probe once and record its data flow. Returns the record, per site the layouts of its calls grouped
    by call of the site's scope (the common parent of every name it has; see :func:`_scope_name`), and the
    inputs."""
    inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
    modules = {name: model.get_submodule(name) for name in names}
    groups: dict[str, list[list[int]]] = {name: [] for name in names}
    counts: dict[str, int] = {name: 0 for name in names}
    handles = []

    def new_scope_call(name: str, module: nn.Module, args: Any) -> None:
        groups[name].append([])

    def record_call(name: str, module: nn.Module, args: Any) -> None:
        if not groups[name]:
            groups[name].append([])
        groups[name][-1].append(counts[name])
        counts[name] += 1

    try:
        for name in names:
            scope = _scope_name(model, name)
            if scope:
                handles.append(model.get_submodule(scope).register_forward_pre_hook(
                    functools.partial(new_scope_call, name)))
            handles.append(modules[name].register_forward_pre_hook(functools.partial(record_call, name)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                graph = dataflow.record(model, lambda: _call(model, inputs), inputs, modules)
        except Exception as error:
            if example_inputs is not None:
                raise
            raise ValueError(
                f"The probe forward pass of {_model_name(model)} failed on the example input built for it (shape "
                f"{_shapes(inputs)}): {type(error).__name__}: {error}. The model's input could not be inferred; "
                "pass example_inputs= (one small batch the model accepts) to patch_model."
            ) from error
        finally:
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    owners = {p.untyped_storage().data_ptr(): name.rpartition(".")[0] for name, p in model.named_parameters()}
    layouts: dict[str, list[list[SiteLayout]]] = {}
    for name in names:
        calls = graph.site_calls(name)
        if len(calls) != counts[name]:
            raise ValueError(
                f"Activation {name!r} is called on a value that does not depend on the model's input, so its units "
                f"are not FFN units; exclude it with exclude_modules=[{name!r}]."
            )
        layouts[name] = [[_layout(graph, calls[i], owners) for i in group] for group in groups[name] if group]
    return graph, layouts, inputs


def _aliases(model: nn.Module, module: nn.Module) -> list[str]:
    """Every name under which ``module`` is registered in ``model`` (one instance may stand at several places)."""
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is module and name]


def _scope_name(model: nn.Module, name: str) -> str:
    """The module whose every forward call restarts the count of ``name``'s calls ("" for the model): the deepest
    common parent of all the names of that activation instance."""
    parents = [alias.split(".")[:-1] for alias in _aliases(model, model.get_submodule(name))]
    common = []
    for parts in zip(*parents):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


class _ResetSharedCalls:
    """Forward pre-hook on a site's scope: restart the call count of its shared gated activation (at ``path``
    below the scope)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, module: nn.Module, args: Any) -> None:
        module.get_submodule(self.path).reset()


# --------------------------------------------------------------------------------------------- public API
def patch_model(
    model: nn.Module, config: Optional[LinearizeConfig] = None, example_inputs: Any = None, *, verify: bool = True
) -> nn.Module:
    """Gate every FFN/MLP activation of ``model`` in place and return it.

    Args:
        model: a ``transformers.PreTrainedModel``, a timm model, or any ``nn.Module``.
        config: which sites and how the gates start; default ``LinearizeConfig()``.
        example_inputs: input for one probe forward pass (tensor, tuple of args, or dict of kwargs);
            built automatically for HF and timm models (:func:`~hf_linearize.probe_inputs.default_example_inputs`).
        verify: check every site on the probe input (:func:`verify_patch`). ``False`` skips the check, which
            costs about one forward pass plus a few replays of each FFN; a wrongly gated site then goes unnoticed.

    Sites come from the probe's data flow (:mod:`hf_linearize.dataflow`): each call of an activation instance
    gets its own gate; its kind (elementwise, or GLU when its output multiplies a value ``v``) and channel axis
    are read from the producer and consumer projections, and a fused MoE experts module gets one gate per expert
    and channel.

    With ``gate_init=0`` (the default) the patched model computes exactly what it computed before.
    Raises ``TypeError``/``ValueError`` (model unchanged) for a non-module, a model that is already patched,
    a selection that matches no activation, or a site that fails verification (the error names the site, its
    layout and the reason, and how to exclude it).
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
    graph, layouts, inputs = _probe(model, names, example_inputs)
    never_called = [n for n in names if not layouts[n]]
    if len(never_called) == len(names):
        raise ValueError(f"None of the selected activations {names[:5]} ran in the probe forward pass.")
    if never_called:
        warnings.warn(f"Not gated, since they did not run in the probe forward pass: {never_called}.", stacklevel=2)
    plan = {}
    for name in names:
        groups = layouts[name]
        if not groups:
            continue
        if groups[0][0].experts is not None:  # one gate per expert, however often the experts module calls it
            groups = [[call] for group in groups for call in group]
        if any(len(g) != len(groups[0]) or any(_differ(a, b) for a, b in zip(g, groups[0])) for g in groups):
            raise ValueError(
                f"Activation {name!r} is called with a different number of inputs, shapes or layouts on different "
                f"calls of its parent; exclude it with exclude_modules=[{name!r}]."
            )
        plan[name] = groups[0]
    _refuse_unsupported(plan)
    state = PatchState(config=config, family=family.name, probe=input_spec(inputs))
    for name, site_calls in plan.items():
        _gate_site(model, name, site_calls, config, state)
        state.layouts[name] = [call.layout for call in site_calls]
    setattr(model, STATE_ATTR, state)
    if verify:
        try:
            verify_patch(model, graph, inputs)
        except Exception:
            for _, gate in gated_modules(model):
                gate.alpha.data.zero_()
            unpatch(model)  # the model is left as it came
            raise
    return model


def verify_patch(model: nn.Module, graph: dataflow.ModelGraph, inputs: Any) -> None:
    """Check every gated site of a freshly patched model on the probe input; ``ValueError`` naming the first site
    that fails.

    1. With every gate at 0 the model's output is bit-identical to the recorded probe output.
    2. With one site's gates at 1 (every other site unchanged), its FFN region (:mod:`hf_linearize.dataflow`),
       replayed on the recorded values, is affine in the region's inputs: homogeneity and additivity residuals
       within ``64 * eps(dtype)`` of the output scale (:func:`~hf_linearize.dataflow.affine_defect`).
    3. For fused MoE experts, the experts module is affine in its input with all of a site's gates at 1, and
       setting one expert's gates to 1 changes only the tokens routed to that expert.

    Runs in eval mode without gradients; the gates and the training mode are restored afterwards.
    """
    saved = {name: gate.alpha.detach().clone() for name, gate in gated_modules(model)}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _, gate in gated_modules(model):
                gate.alpha.zero_()
            _verify_sites(model, graph, inputs)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, gate in gated_modules(model):
                gate.alpha.copy_(saved[name])


def _verify_sites(model: nn.Module, graph: dataflow.ModelGraph, inputs: Any) -> None:
    """:func:`verify_patch`'s checks, run without gradients with every gate at 0."""
    captured: dict[str, tuple] = {}
    handles = [experts.register_forward_pre_hook(
        lambda m, a, k, n=name: captured.setdefault(n, (a, k)), with_kwargs=True)
        for name, experts in _experts_modules(model).items()]
    try:
        output = _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    expected = [t for t in torch.utils._pytree.tree_leaves(graph.output) if isinstance(t, torch.Tensor)]
    got = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    if len(got) != len(expected) or any(not torch.equal(a, b) for a, b in zip(got, expected)):
        raise ValueError("The patched model's output differs from the unpatched one with every gate at 0; patching "
                         "changed the model. Please report it; pass exclude_modules= to leave sites out meanwhile.")
    for name in {op.site for op in graph.site_calls()}:
        site = model.get_submodule(name)
        calls = graph.site_calls(name)
        if isinstance(site, ExpertGatedActivation):
            _verify_experts(name, site, model, captured)
            continue
        for op in calls:
            gate = site if isinstance(site, GatedActivation) else site.sites[op.call % len(site.sites)]
            region = graph.region(op)
            data = [k for k in region.inputs if graph.values[k].is_floating_point()]

            def run(values: list[torch.Tensor], region=region, data=data, gate=gate) -> list[torch.Tensor]:
                env = graph.replay(region, dict(zip(data, values)), lambda call, x: gate(x))
                return [env.get(k, graph.values[k]) for k in region.outputs]

            gate.alpha.fill_(1.0)
            try:
                defect, tolerance = dataflow.affine_defect(run, [graph.values[k] for k in data])
            finally:
                gate.alpha.zero_()
            if not defect <= tolerance:
                raise ValueError(
                    f"Site {name!r} (call {op.call}, layout {_layout_of(gate, region)}) fails verification: with its "
                    f"gates at 1 its FFN is not affine in its input (defect {defect:.3g} > tolerance {tolerance:.3g}; "
                    f"region ops: {[o.name for o in region.ops][:12]}). Exclude it with exclude_modules=[{name!r}]."
                )


def _layout_of(gate: GatedActivation, region: dataflow.Region) -> str:
    return f"{region.layout}, channel_dim {gate.channel_dim}, {gate.channels} channels"


def _experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fused experts modules that hold an :class:`ExpertGatedActivation`, by name."""
    return {name: module for name, module in model.named_modules()
            if any(isinstance(h, ExpertRouting) for h in module._forward_pre_hooks.values())}


def _verify_experts(name: str, site: ExpertGatedActivation, model: nn.Module, captured: dict[str, tuple]) -> None:
    owner = next((n for n in captured if name.startswith(n + ".")), None)
    if owner is None:
        raise ValueError(f"Expert site {name!r}: its experts module did not run in the probe; exclude it with "
                         f"exclude_modules=[{name!r}].")
    experts = model.get_submodule(owner)
    args, kwargs = captured[owner]
    hidden, rest = args[0], args[1:]
    index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)

    def run(values: list[torch.Tensor]) -> list[torch.Tensor]:
        return [experts(values[0], *rest, **kwargs)]

    base = run([hidden])[0]
    try:
        for gate in site.experts:
            gate.alpha.fill_(1.0)
        defect, tolerance = dataflow.affine_defect(run, [hidden])
        if not defect <= tolerance:
            raise ValueError(
                f"Expert site {name!r} (layout expert-{site.experts[0].kind}) fails verification: with its gates at 1 "
                f"the experts module is not affine in its input (defect {defect:.3g} > tolerance {tolerance:.3g}). "
                f"Exclude it with exclude_modules=[{name!r}].")
        for gate in site.experts:
            gate.alpha.zero_()
        for expert, gate in enumerate(site.experts):
            gate.alpha.fill_(1.0)
            changed = (run([hidden])[0] != base).flatten(1).any(1)
            gate.alpha.zero_()
            if bool((changed & ~(index == expert).any(-1)).any()):
                raise ValueError(
                    f"Expert site {name!r}: the gates of expert {expert} changed tokens not routed to it; the "
                    "experts module orders its rows in a way the gate does not know. Exclude it with "
                    f"exclude_modules=[{name!r}] or set config._experts_implementation to 'eager'.")
    finally:
        for gate in site.experts:
            gate.alpha.zero_()


def _differ(a: SiteLayout, b: SiteLayout) -> bool:
    return (a.kind, a.layout, a.channel_dim, a.channels, a.experts) != (b.kind, b.layout, b.channel_dim, b.channels,
                                                                         b.experts)


def _refuse_unsupported(plan: Mapping[str, list[SiteLayout]]) -> None:
    """A ``ValueError`` for a site that no gate can make linear, before anything is changed."""
    for name, calls in plan.items():
        for layout in calls:
            if layout.layout.endswith("glu-other"):
                raise ValueError(
                    f"Activation {name!r} (layout {layout.layout}) cannot be gated: its output is multiplied by a "
                    "value that is not a linear map of the FFN's input (it passes through a nonlinearity), so no gate "
                    f"value makes the unit linear. Exclude it with exclude_modules=[{name!r}]."
                )


def _gate_site(model: nn.Module, name: str, site_calls: list[SiteLayout], config: LinearizeConfig,
               state: PatchState) -> None:
    """Put the gate(s) of one activation instance at every name it has."""
    act = model.get_submodule(name)
    if getattr(act, "inplace", False):
        state.inplace[name] = True
        act.inplace = False
    first = site_calls[0]
    scope = _scope_name(model, name)
    if first.experts is not None:
        experts_name, count = first.experts
        experts = model.get_submodule(experts_name)
        gate: nn.Module = ExpertGatedActivation([
            GatedActivation(act, first.channels, first.channel_dim, first.kind, config.gate_init) for _ in range(count)
        ])
        experts.register_forward_pre_hook(ExpertRouting(_relative(experts_name, name)), with_kwargs=True)
    else:
        gates = [GatedActivation(act, c.channels, channel_dim=c.channel_dim, kind=c.kind, init=config.gate_init)
                 for c in site_calls]
        gate = gates[0] if len(gates) == 1 else SharedGatedActivation(gates)
    aliases = _aliases(model, act)
    for alias in aliases:
        parent, attr = _parent(model, alias)
        setattr(parent, attr, gate)
    if isinstance(gate, SharedGatedActivation):
        model.get_submodule(scope).register_forward_pre_hook(_ResetSharedCalls(_relative(scope, aliases[0])))


def _relative(owner: str, name: str) -> str:
    """``name`` as a path below the module ``owner`` ("" is the model)."""
    return name[len(owner) + 1:] if owner else name


class ExpertRouting:
    """Forward pre-hook on a fused experts module (transformers 5 ``@use_experts_implementation``): hand its
    :class:`~hf_linearize.gates.ExpertGatedActivation` the expert of every row it will see.

    The row order follows the module's ``config._experts_implementation``: ``grouped_mm`` sorts the
    ``(token, k)`` pairs by expert, ``batched_mm`` keeps them token-major, ``eager`` (or None) calls the
    activation once per routed expert in increasing order. Other implementations raise ``RuntimeError``.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        gate = module.get_submodule(self.path)
        index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
        implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
        experts = len(gate.experts)
        if implementation in (None, "eager"):
            gate.route(order=[e for e in index.unique().tolist() if e < experts])
        elif implementation == "grouped_mm":
            gate.route(rows=torch.sort(index.reshape(-1)).values)
        elif implementation == "batched_mm":
            gate.route(rows=index.reshape(-1))
        else:
            raise RuntimeError(
                f"Gated experts of {type(module).__name__} support the 'eager', 'grouped_mm' and 'batched_mm' "
                f"implementations, not {implementation!r}; set model.config._experts_implementation to one of them "
                "(or load with experts_implementation='grouped_mm')."
            )


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


def gate_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost gate modules of ``model`` by name, in module order: a :class:`SharedGatedActivation` or
    :class:`ExpertGatedActivation` container, or a lone :class:`GatedActivation` (what stands where an activation
    stood)."""
    wrappers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = wrappers and name.startswith(wrappers[-1][0] + ".")
        if isinstance(module, (GatedActivation, SharedGatedActivation, ExpertGatedActivation)) and not inside:
            wrappers.append((name, module))
    return wrappers


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
    for name, module in gate_wrappers(model):
        act = module.act
        if state.inplace.get(name):
            act.inplace = True
        for alias in _aliases(model, module):
            parent, attr = _parent(model, alias)
            setattr(parent, attr, act)
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, (_ResetSharedCalls, ExpertRouting)):
                del module._forward_pre_hooks[key]
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
    gate >= 1 - ``linear_threshold``. The one rule that ``summary`` and ``fold`` share.

    Each mask is a whole plain tensor, also for gates sharded by FSDP2 (a ``DTensor`` ``alpha`` is gathered with
    ``full_tensor()``): then this is a collective, which every rank must call, in the same order as the others."""
    threshold = patch_state(model).config.linear_threshold
    gates = dict(gated_modules(model))
    alphas = whole_tensors([gate.alpha.detach() for gate in gates.values()])
    return {name: alpha >= 1.0 - threshold for name, alpha in zip(gates, alphas)}


def summary(model: nn.Module) -> GateSummary:
    """Per gated layer: units, linear units (gate >= 1 - ``linear_threshold``) and nonlinear units, plus totals.

    Counts are over all units of each gate, also when FSDP2 shards the gates; then, as for `linear_units`, every
    rank must call it."""
    layers = {}
    for name, mask in linear_units(model).items():
        linear = int(mask.sum())
        layers[name] = {"units": mask.numel(), "linear": linear, "nonlinear": mask.numel() - linear}
    total = {key: sum(v[key] for v in layers.values()) for key in ("units", "linear", "nonlinear")}
    total["nonlinear_fraction"] = total["nonlinear"] / total["units"] if total["units"] else 0.0
    return GateSummary(family=patch_state(model).family, layers=layers, total=total)
