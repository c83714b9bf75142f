"""The traced record of one forward pass of a model: which tensor each torch operation read and wrote, and where
each activation call sits in that data flow.

Mechanism. :func:`record` runs the model once (the probe) under a :class:`torch.overrides.TorchFunctionMode` that
logs every torch function and tensor method called, with the tensors it read and wrote, and forward hooks on the
candidate activation modules, whose internals are not logged: each call of one becomes a single *site call* op.
A tensor is identified by ``(id(tensor), tensor._version)``, so in-place updates (``out += shortcut``) are new
values. Nothing is compiled or exported, so any model that runs eagerly can be recorded, data-dependent control
flow (MoE routing) included.

From the record, for every site call, :meth:`ModelGraph.region` reads the site's **FFN region**:

* backward from the activation input, through *structural* ops (views, indexing, casts, dropout, eval-mode
  batch norm, elementwise arithmetic), up to the **producer** projections (``linear``, ``matmul``, ``addmm``,
  convolutions, ``_grouped_mm`` with a weight that does not depend on the input); their data inputs are the
  FFN's inputs;
* forward from the activation output, through structural ops, up to the **consumer** projections; a product
  with another data-dependent tensor on the way is a **GLU**: its other operand (the value ``v`` of
  ``act(u) * v``) is followed backward in the same way, and it is **packed** when it comes from the same
  projection output as ``u`` (Phi-3 ``gate_up_proj``), **separate** when from another projection (LLaMA);
* any other op (attention, norms, pooling, other activations) bounds the region.

The region can be *replayed* (:meth:`ModelGraph.replay`): its ops are run again on new input values, the site
calls through whatever module now stands at the site (e.g. its gate). Patching uses this to find each site's
channel axis (a bump on one output channel of the producer reaches one index of that axis) and to verify that a
site at gate 1 makes its FFN affine (:func:`affine_defect`). The module imports nothing else of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

Key = tuple[int, int]
"""A tensor value in the record: ``(id(tensor), tensor._version)``."""


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or getattr(func, "_opname", None) or str(func)
    return name.rsplit(".", 1)[-1]


# Projections: ops that mix channels with a weight. The feature (output channel) dim of their result is last,
# except for convolutions (dim 1). A projection's weight is a tensor that does not depend on the model's input.
_CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_PROJECTIONS = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "addmm", "bmm", "baddbmm", "_grouped_mm",
                "einsum", *_CONV}
# Ops that keep every channel separate and are linear in each data input (products and quotients are linear in
# one operand at a time; the affinity check decides the rest).
_PRODUCTS = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"}
_STRUCTURAL = {
    "view", "reshape", "transpose", "permute", "contiguous", "clone", "to", "float", "half", "bfloat16", "double",
    "type", "type_as", "__getitem__", "chunk", "split", "tensor_split", "unbind", "narrow", "select", "unsqueeze",
    "squeeze", "flatten", "unflatten", "expand", "expand_as", "movedim", "swapaxes", "swapdims", "index_select",
    "gather", "cat", "concat", "concatenate", "stack", "repeat_interleave", "repeat", "add", "__add__", "__radd__",
    "add_", "__iadd__", "sub", "__sub__", "__rsub__", "sub_", "__isub__", "neg", "__neg__", "div", "__truediv__",
    "div_", "__itruediv__", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "batch_norm", "masked_fill", "masked_fill_", "__get__", "detach", "copy_", "pad", *_PRODUCTS,
}
_INDEXING = {"__getitem__", "index_select"}


@dataclass
class Op:
    """One recorded call: ``func(*args, **kwargs)``, with the tensors it read (``reads``, one key or None per leaf
    of ``(args, kwargs)``) and wrote (``writes``: its output leaves, then inputs it modified in place)."""

    index: int
    func: Callable[..., Any]
    leaves: list[Any]
    spec: Any
    reads: list[Optional[Key]]
    writes: list[Key]
    outputs: list[Any]
    site: Optional[str] = None
    """For a site call: the activation's module name."""
    call: int = 0
    """For a site call: the how-manieth call of that module in the pass."""
    mutated: tuple[int, ...] = ()
    """Positions in ``leaves`` of the tensors the op modified in place (written after its outputs)."""
    module: str = ""
    """Name of the innermost module of the recorded model running when the op was called ("" for the model)."""

    @property
    def name(self) -> str:
        return self.site or _name(self.func)

    def feature_dim(self) -> int:
        """The output-channel dim of a projection's result."""
        return 1 if _name(self.func) in _CONV else -1


@dataclass
class Region:
    """The FFN around one site call (see the module docstring). Keys name tensor values of the record."""

    site_op: Op
    ops: list[Op]
    """Every op of the region (site call included), in record order."""
    inputs: list[Key]
    """Data inputs: what the producers read, and values that enter from outside the FFN (additively or at a
    boundary op)."""
    outputs: list[Key]
    """What leaves the region: the tensors the consumer projections read, or values at a boundary."""
    producers: list[Op]
    consumers: list[Op]
    multiplier: Optional[Key] = None
    """GLU only: the value ``v`` that multiplies the activation output."""
    layout: str = "elementwise"
    """``elementwise``, ``packed-glu`` (``u`` and ``v`` from one projection output), ``glu`` (separate
    projections) or ``glu-other`` (``v`` is not a projection of the FFN input, e.g. another nonlinearity)."""
    bounded_by: list[str] = field(default_factory=list)
    """Names of the non-structural ops that bound the multiplier's path (``glu-other``)."""

    @property
    def kind(self) -> str:
        return "elementwise" if self.multiplier is None else "glu"


class ModelGraph:
    """The record of one forward pass (see the module docstring): ``ops`` in call order, the model's output
    leaves, and lookups from a tensor key to the op that wrote it and the ops that read it."""

    def __init__(self, ops: list[Op], output: Any, values: dict[Key, torch.Tensor]) -> None:
        self.ops = ops
        self.output = output
        self.values = values
        """Every recorded data value by key, as it was when written (in-place updates are new keys)."""
        self.writer: dict[Key, Op] = {}
        self.readers: dict[Key, list[Op]] = {}
        self._regions: dict[int, Region] = {}
        for op in ops:
            for key in op.reads:
                if key is not None:
                    self.readers.setdefault(key, []).append(op)
            for key in op.writes:
                self.writer[key] = op

    def weight(self, op: Op) -> Optional[torch.Tensor]:
        """The weight of a projection op: an input that does not depend on the data (a parameter), or one row of
        a stack of them picked by a data-dependent index (an expert's ``W[e]``); None if there is none (attention's
        ``q @ k``). For a stacked weight, the stack itself (3-D, experts first) is returned."""
        if _name(op.func) not in _PROJECTIONS or op.site is not None:
            return None
        weights, data = [], False
        for leaf, key in zip(op.leaves, op.reads):
            if not isinstance(leaf, torch.Tensor):
                continue
            if key is None:
                if leaf.dim() >= 2:
                    weights.append(leaf)
                continue
            writer = self.writer.get(key)
            stack = writer.leaves[0] if writer is not None and _name(writer.func) in _INDEXING else None
            if isinstance(stack, torch.Tensor) and writer.reads[0] is None and stack.dim() == 3:
                weights.append(stack)
            else:
                data = True
        return weights[0] if data and weights else None

    def kind(self, op: Op) -> str:
        """``site``, ``projection`` (channel mixing with a weight), ``structural`` or ``other``."""
        if op.site is not None:
            return "site"
        if self.weight(op) is not None:
            return "projection"
        return "structural" if _name(op.func) in _STRUCTURAL else "other"

    def site_calls(self, site: Optional[str] = None) -> list[Op]:
        """The recorded calls of one site (or of every site), in call order."""
        return [op for op in self.ops if op.site is not None and (site is None or op.site == site)]

    # ------------------------------------------------------------------------------------------ regions
    def _walk_back(self, start: Key, ops: dict[int, Op], inputs: list[Key], producers: list[Op],
                   bounds: list[str]) -> None:
        stack = [start]
        seen: set[Key] = set()
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            op = self.writer.get(key)
            kind = self.kind(op) if op is not None else None
            if kind in ("structural", "projection"):
                ops[op.index] = op
                if kind == "projection":
                    _add(producers, [op])
                    _add(inputs, [k for k in op.reads if k is not None])
                else:
                    stack.extend(k for k in op.reads if k is not None)
                continue
            if kind == "other":
                bounds.append(op.name)
            _add(inputs, [key])

    def region(self, site_op: Op) -> Region:
        """The FFN region of one site call (module docstring); computed once per call."""
        if site_op.index not in self._regions:
            self._regions[site_op.index] = self._region(site_op)
        return self._regions[site_op.index]

    def _region(self, site_op: Op) -> Region:
        ops: dict[int, Op] = {site_op.index: site_op}
        inputs: list[Key] = []
        producers: list[Op] = []
        self._walk_back(site_op.reads[0], ops, inputs, producers, [])
        outputs: list[Key] = []
        consumers: list[Op] = []
        multiplier: Optional[Key] = None
        v_producers: list[Op] = []
        bounds: list[str] = []
        inside: set[Key] = set(site_op.writes)
        stack = list(site_op.writes)
        while stack:
            key = stack.pop()
            readers = self.readers.get(key, [])
            if not readers:
                _add(outputs, [key])
            for op in readers:
                kind = self.kind(op)
                others = [k for k in op.reads if k is not None and k not in inside]
                product = kind == "structural" and _name(op.func) in _PRODUCTS and bool(others)
                # a broadcast data-dependent scale (squeeze-excite, attention weights) bounds the FFN, as does any
                # op that is not structural; a projection is a consumer
                if kind != "structural" or (
                        product and self.values[others[0]].shape != self.values[op.writes[0]].shape):
                    _add(outputs, [key])
                    if kind == "projection":
                        _add(consumers, [op])
                    continue
                if op.index in ops:
                    continue
                ops[op.index] = op
                if product and multiplier is None:
                    multiplier = others[0]
                    self._walk_back(multiplier, ops, inputs, v_producers, bounds)
                else:
                    _add(inputs, others)
                inside.update(op.writes)
                stack.extend(op.writes)
        layout = "elementwise"
        if multiplier is not None:
            if bounds:
                layout = "glu-other"
            elif any(op in producers for op in v_producers):
                layout = "packed-glu"
            else:
                layout = "glu"
        # the value path's producers count as producers of the FFN
        producers += [op for op in v_producers if op not in producers]
        inputs = [k for k in inputs if k not in inside]
        return Region(site_op, sorted(ops.values(), key=lambda op: op.index), inputs, outputs, producers,
                      consumers, multiplier, layout, bounds)

    # ------------------------------------------------------------------------------------------ replay
    def replay(self, region: Region, values: Mapping[Key, torch.Tensor],
               site_fn: Callable[[Op, torch.Tensor], torch.Tensor],
               edit: Optional[Mapping[Key, Callable[[torch.Tensor], torch.Tensor]]] = None) -> dict[Key, torch.Tensor]:
        """Run the region's ops again and return every value they wrote.

        Args:
            values: new values for some of the region's inputs; the others keep their recorded values.
            site_fn: computes a site call from its new input (e.g. the gate now standing at the site).
            edit: per written key, a function applied to the value as it is written (e.g. a bump on one channel).
        """
        env: dict[Key, torch.Tensor] = dict(values)
        edit = edit or {}
        for op in region.ops:
            leaves = [leaf if key is None else env[key] if key in env else self.values[key]
                      for leaf, key in zip(op.leaves, op.reads)]
            if op.site is not None:
                results = [site_fn(op, leaves[0])]
            else:
                if op.mutated:  # in place: work on copies, so that earlier values in env keep theirs
                    leaves = [leaf.clone() if i in op.mutated else leaf for i, leaf in enumerate(leaves)]
                args, kwargs = pytree.tree_unflatten(leaves, op.spec)
                out = op.func(*args, **kwargs)
                results = [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]
                results += [leaves[i] for i in op.mutated]
            for key, value in zip(op.writes, results):
                env[key] = edit[key](value) if key in edit else value
        return env


# ---------------------------------------------------------------------------------------------- recording
class _Recorder(TorchFunctionMode):
    def __init__(self, data: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.values: dict[Key, torch.Tensor] = {_key(t): t for t in data}
        self.paused = 0
        self.modules: list[str] = [""]
        """The names of the modules running now, outermost first."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        versions = [leaf._version if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
        reads = [_key(leaf) if isinstance(leaf, torch.Tensor) and _key(leaf) in self.values else None
                 for leaf in leaves]
        # an op that may work in place: keep the values it reads as they were
        before = {i: leaf.clone() for i, (leaf, key) in enumerate(zip(leaves, reads)) if key is not None} if (
            _in_place(func)) else {}
        out = func(*args, **kwargs)
        # an output that is an input itself, unchanged (eval-mode dropout returns its input) is no new value
        outputs = [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)
                   and not (_key(leaf) in reads and leaf._version == versions[reads.index(_key(leaf))])]
        mutated = tuple(i for i, (leaf, v) in enumerate(zip(leaves, versions))
                        if isinstance(leaf, torch.Tensor) and leaf._version != v)
        if any(r is not None for r in reads) and (outputs or mutated):
            written = outputs + [leaves[i] for i in mutated]
            for i in mutated:
                if i in before:
                    self.values[reads[i]] = before[i]
            self.add(Op(len(self.ops), func, leaves, spec, reads, [], [], mutated=mutated), written)
        return out

    def add(self, op: Op, outputs: list[torch.Tensor]) -> None:
        op.writes = [_key(t) for t in outputs]
        op.outputs = outputs
        op.module = self.modules[-1]
        for key, value in zip(op.writes, outputs):
            self.values[key] = value
        self.ops.append(op)


def _add(items: list, new: Iterable) -> None:
    """Append each of ``new`` that ``items`` does not hold yet (an ordered set)."""
    items.extend(item for item in new if item not in items)


def _in_place(func: Any) -> bool:
    name = _name(func)
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"


def _key(tensor: torch.Tensor) -> Key:
    return id(tensor), tensor._version


def record(model: nn.Module, run: Callable[[], Any], inputs: Any, sites: Mapping[str, nn.Module]) -> ModelGraph:
    """Run ``run()`` (one forward pass of ``model`` on ``inputs``) and record its data flow.

    Args:
        inputs: the pass's inputs (any nesting); their tensors are the data the record follows.
        sites: activation modules by name; each call of one is recorded as one site call op, its own ops are not.
    """
    recorder = _Recorder(t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))
    calls: dict[str, int] = {}
    handles = []

    def before(name: str, module: nn.Module, args: Any) -> None:
        recorder.paused += 1

    def after(name: str, module: nn.Module, args: Any, output: Any) -> None:
        recorder.paused -= 1
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not isinstance(output, torch.Tensor) or _key(x) not in recorder.values:
            return
        calls[name] = calls.get(name, 0) + 1
        recorder.add(Op(len(recorder.ops), module, [x], pytree.tree_flatten(((x,), {}))[1], [_key(x)], [], [],
                        site=name, call=calls[name] - 1), [output])

    names = {module: name for name, module in model.named_modules()}

    def enter(module: nn.Module, args: Any) -> None:
        if module in names:
            recorder.modules.append(names[module])

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if module in names and len(recorder.modules) > 1:
            recorder.modules.pop()

    inplace = [module for module in sites.values() if getattr(module, "inplace", False) is True]
    try:
        for module in inplace:  # an in-place activation would overwrite its input's value
            module.inplace = False
        handles.append(nn.modules.module.register_module_forward_pre_hook(enter))
        handles.append(nn.modules.module.register_module_forward_hook(leave))
        for name, module in sites.items():
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: before(n, m, a)))
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: after(n, m, a, o)))
        with recorder:
            output = run()
    finally:
        for handle in handles:
            handle.remove()
        for module in inplace:
            module.inplace = True
    return ModelGraph(recorder.ops, output, recorder.values)


def affine_defect(f: Callable[[list[torch.Tensor]], list[torch.Tensor]], inputs: list[torch.Tensor],
                  seed: int = 0) -> tuple[float, float]:
    """How far ``f`` is from affine around ``inputs``, relative to its dtype: ``(defect, tolerance)``.

    With random directions ``d``, ``e`` of the inputs' own scale, the defect is the largest of the additivity
    residual ``f(x+d+e) - f(x+d) - f(x+e) + f(x)`` and the homogeneity residual ``f(x+2d) - 2 f(x+d) + f(x)``
    (both 0 for an affine map). The tolerance is ``64 * eps(dtype) * scale``, with ``scale`` the largest magnitude
    of ``f``'s values and of its inputs' contributions (``|f(x+d)| + |f(x)|``).
    """
    generator = torch.Generator().manual_seed(seed)
    floats = [x for x in inputs if x.is_floating_point()]

    def direction() -> list[torch.Tensor]:
        out = []
        for x in inputs:
            if not x.is_floating_point():
                out.append(torch.zeros((), dtype=x.dtype))
                continue
            scale = float(x.detach().double().abs().mean()) + 1.0
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype) * scale
            out.append(noise.to(x.device))
        return out

    d, e = direction(), direction()

    def at(*shifts: list[torch.Tensor], times: float = 1.0) -> list[torch.Tensor]:
        shifted = [x if not x.is_floating_point() else x + times * sum(s[i] for s in shifts) if shifts else x
                   for i, x in enumerate(inputs)]
        return [y.double() for y in f(shifted)]

    base, fd, fe, fde, f2d = at(), at(d), at(e), at(d, e), at(d, times=2.0)
    defect = scale = 0.0
    for b, yd, ye, yde, y2d in zip(base, fd, fe, fde, f2d):
        if b.numel() == 0:
            continue
        defect = max(defect, float((yde - yd - ye + b).abs().max()), float((y2d - 2 * yd + b).abs().max()))
        scale = max(scale, float(yde.abs().max()), float(y2d.abs().max()), float(b.abs().max()))
    dtype = floats[0].dtype if floats else torch.float32
    return defect, 64 * torch.finfo(dtype).eps * max(scale, 1.0)
