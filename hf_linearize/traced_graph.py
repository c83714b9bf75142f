"""The path graph of any patched model, read from one recorded forward pass of the model itself.

:func:`trace_structure` runs the model once on its probe input (the spec ``patch_model`` stored,
:func:`~hf_linearize.probe_inputs.recorded_probe`) under :func:`hf_linearize.dataflow.record`, with every gate,
norm and ungated activation module recorded as one op. It follows the *path data*: the values that depend on the
model's main input (``input_ids``, ``pixel_values``, ``input_features``, ...; masks, position ids and decoder
inputs are not path inputs, so a decoder is on a path from its first cross-attention on). Each op on the path
data is one of:

* **linear**: views, casts, dropout, batch norm, sums, pooling by averaging, embeddings, and any product or
  projection (``linear``, GPT-2's ``addmm``, convolutions, ``matmul``) with one path operand: an edge;
* a **gated site**: a layer node of its units, named as :func:`~hf_linearize.gated_modules` names it. A GLU's
  product ``g(u) * v`` belongs to its site (the value path ``v`` enters the site node);
* fused **MoE experts** (``ExpertGatedActivation``): a map node ``<experts>:route`` that forks into one layer node
  per expert (``…experts.<e>``), each taken with equal probability (uniform over experts: the graph describes the
  layer, not one input's routing). The router (``softmax``, ``topk``) is a side branch of cost nodes that joins
  the experts' output at the product with the routing weights, like a squeeze-excite gate;
* **attention**: ``scaled_dot_product_attention``, or a product ``P @ v`` whose ``P`` comes from a ``softmax``,
  is one layer node of its value channels (the input width of the projection that reads it), with cost
  ``ungated_cost``. The score side (``q @ k^T``, masks, the softmax, query/key norms inside the attention module)
  belongs to it;
* a **norm** (LayerNorm/RMSNorm/GroupNorm modules and functions): a map node with cost ``ungated_cost``;
* a **merge**: a sum, concatenation or product of path values from different nodes (a residual addition, the
  squeeze-excite product): a map node;
* any **other nonlinearity** (an ungated activation, ``sigmoid``, ``softmax`` outside attention, ``max_pool``,
  ``topk``, ...): cost ``ungated_cost``; a layer node of its channels when a projection reads it (an FFN
  activation excluded from gating keeps its layer), else a map node;
* a **linear hidden layer**: a projection whose output reaches another projection or a norm through linear ops
  only (ConvNeXt's depthwise ``conv_dw``, a stem convolution), and a **projection shortcut** (a projection on the
  skip of a residual, ResNet's ``downsample``): layer nodes of their output channels with 0 nonlinear units.

Edges are the linear ops between nodes (deduplicated: a dense map). The graph output is the model's main output
(``logits``, else ``last_hidden_state``, else the first output); ops inside task heads
(:data:`~hf_linearize.families.HEAD_MODULES`) that are not gated count as linear, so the output is the last
hidden state for Transformers and the logits for CNNs. Nodes on no input-to-output path are left out. These
rules give the graphs of :mod:`hf_linearize.path_length`'s conventions; the tests compare them with hand-built
graphs of every family.

The recorded structure does not depend on the gate values, so it is built once per patched model and kept on
its patch state; each call of :func:`path_graph` only fills in the current nonlinear counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from . import dataflow
from .families import ACTIVATION_TYPES, NOT_GATED_BY_DEFAULT, behaves_like_activation, in_head, is_norm
from .gates import ExpertGatedActivation, GatedActivation
from .path_length import PathGraph
from .probe_inputs import _call, main_output

Sites = Mapping[str, tuple[int, int]]
"""Gated site name -> (units, nonlinear units)."""

# Inputs that carry no path: masks, positions, decoder inputs (the decoder joins at its cross-attention), labels.
_NOT_PATH_INPUT = ("mask", "position", "decoder_", "token_type", "labels", "cache", "past_", "use_", "output_")
_NORM_FUNCS = {"layer_norm", "rms_norm", "group_norm", "instance_norm", "local_response_norm"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax"}
_ATTENTION = {"scaled_dot_product_attention"}
# Ops that are linear in each of their tensor operands (a product of two path values is bilinear: a merge).
_MULTILINEAR = {*dataflow._PROJECTIONS, *dataflow._PRODUCTS, "div", "__truediv__", "div_", "__itruediv__",
                "baddbmm", "addmm", "addbmm", "bilinear"}
# Further ops that are linear in their path operand (sums of their operands when there are several).
_LINEAR = {*dataflow._STRUCTURAL, "mean", "sum", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
           "adaptive_avg_pool2d", "adaptive_avg_pool3d", "roll", "embedding", "index_add", "index_add_", "index_copy",
           "index_copy_", "scatter", "scatter_", "scatter_add", "scatter_add_", "index_put", "index_put_",
           "__setitem__", "where", "interpolate", "cumsum", "flip", "t", "tile", "diagonal", "pixel_shuffle",
           "pixel_unshuffle", "unfold", "fold", "split_with_sizes",
           "tril", "triu", "masked_scatter", "sum_to_size", "fill_diagonal_", "__rtruediv__"}
# Ops whose result does not depend on the values they read (new tensors shaped like their input).
_CONSTANT = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full",
             "zero_", "fill_", "rand_like", "randn_like"}
_STRUCTURAL_ONLY = dataflow._STRUCTURAL - dataflow._PRODUCTS - {"add", "__add__", "__radd__", "add_", "__iadd__",
                                                                  "sub", "__sub__", "__rsub__", "sub_", "__isub__",
                                                                  "cat", "concat", "concatenate", "stack"}


@dataclass
class _Node:
    name: str
    width: int = 1
    cost: bool = False
    """Whether the node carries ``ungated_cost``."""
    site: Optional[str] = None
    """The gated site whose nonlinear count the node shows."""
    layer: bool = False
    """A layer node (units), else a map node."""


@dataclass
class TracedStructure:
    """The path graph of a patched model without its counts: nodes, edges (by index) and the output node."""

    nodes: list[_Node] = field(default_factory=list)
    edges: set[tuple[int, int]] = field(default_factory=set)
    output: int = 0

    def site_nodes(self) -> dict[str, list[int]]:
        """Per gated site, its nodes' ids in :meth:`graph` (several for a module reused at several depths)."""
        out: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            if node.site is not None:
                out.setdefault(node.site, []).append(i)
        return out

    def off_path(self, sites: Sites) -> list[str]:
        """The gated sites on no path from the main input to the main output (an auxiliary head, a computation the
        model drops): they add nothing to either APL."""
        placed = {node.site for node in self.nodes}
        return [name for name in sites if name not in placed]

    def graph(self, sites: Sites, ungated_cost: float) -> PathGraph:
        """The :class:`PathGraph` with the nonlinear counts ``sites`` (by name; sites off every path are left out)."""
        graph = PathGraph()  # its node ids are the indices of self.nodes: the input is node 0, the rest in order
        for node in self.nodes[1:]:
            cost = ungated_cost if node.cost else 0.0
            if node.site is not None:
                units, nonlinear = sites[node.site]
                graph.add_layer(node.name, units, nonlinear, cost)
            elif node.layer and node.width > 1:
                graph.add_layer(node.name, node.width, 0, cost)
            else:
                graph.add_node(node.name, cost)
        for u, v in sorted(self.edges, key=lambda e: (e[1], e[0])):
            graph.add_edge(u, v)
        graph.set_output(self.output)
        return graph


def _func(op: dataflow.Op) -> str:
    return dataflow._name(op.func)


def _recorded_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules recorded as one op each: gates (an experts' gate as a whole), norms and ungated activations."""
    out: dict[str, nn.Module] = {}
    inside: Optional[str] = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        if isinstance(module, (ExpertGatedActivation, GatedActivation)):
            out[name], inside = module, name + "."
        elif name and (is_norm(module) or (not list(module.children()) and (
                isinstance(module, ACTIVATION_TYPES + NOT_GATED_BY_DEFAULT) and not isinstance(module, nn.Identity)
                or behaves_like_activation(module)))):
            out[name], inside = module, name + "."
    return out


def _path_inputs(inputs: Any) -> dict[str, torch.Tensor]:
    """The main inputs by name: a tensor, the first of positional inputs, or the keyword inputs that are not masks,
    positions, decoder inputs or labels."""
    if isinstance(inputs, tuple):
        inputs = inputs[0] if inputs else None
    if isinstance(inputs, torch.Tensor):
        return {"x": inputs}
    if not isinstance(inputs, Mapping):
        return {}
    return {name: t for name, t in inputs.items()
            if isinstance(t, torch.Tensor) and not any(part in name for part in _NOT_PATH_INPUT)}


class _Builder:
    """One pass over the record, in call order, assigning each path value the set of nodes it depends on linearly."""

    def __init__(self, graph: dataflow.ModelGraph, modules: Mapping[str, nn.Module]) -> None:
        self.graph, self.modules = graph, modules
        self.structure = TracedStructure([_Node("input")])
        self.src: dict[dataflow.Key, frozenset[int]] = {}
        self.used_names: dict[str, int] = {}
        self.path: set[dataflow.Key] = set()
        self.cores: set[int] = set()
        """Attention ops (``P @ v``, SDPA): one node each."""
        self.absorbed: dict[int, None] = {}
        """Ops of attention score sides: linear inside their attention's node."""
        self.glu_products: dict[int, int] = {}
        """Index of a GLU's product op -> index of its site op."""
        self.site_nodes: dict[int, list[int]] = {}
        self.entry: dict[int, int] = {}
        """Site op index -> the node its other inputs enter (the site's node; the route node of experts)."""
        self.base: dict[int, frozenset[int]] = {}
        """Cost-only nodes computed from one value alone (``x.pow(2)``, ``sigmoid(x)``) -> that value's sources."""
        self.experts: dict[str, tuple[int, list[int]]] = {}

    # ---------------------------------------------------------------------------------------------- nodes
    def node(self, name: str, preds: frozenset[int], **kwargs: Any) -> int:
        name = "model" + name if name.startswith(":") else name
        count = self.used_names.get(name, 0)
        self.used_names[name] = count + 1
        self.structure.nodes.append(_Node(name if count == 0 else f"{name}:{count}", **kwargs))
        index = len(self.structure.nodes) - 1
        self.structure.edges.update((p, index) for p in preds)
        return index

    def channels(self, op: dataflow.Op, key: dataflow.Key) -> int:
        """Width of a value as a layer: the feature size the first projection reading it sees (through views),
        else the output features of a projection, heads x head dim of an attention output, dim 1 of another 4-D+
        value (channels first), else its last dim."""
        found = self.first_projection(key, through_norms=False)
        if found is not None:
            reader, read = found
            value = self.graph.values[read]
            return int(value.shape[1] if _func(reader) in dataflow._CONV else value.shape[-1])
        value = self.graph.values[key]
        if self.graph.kind(op) == "projection":
            return int(value.shape[op.feature_dim()])
        if op.index in self.cores and value.dim() == 4:
            return int(value.shape[1] * value.shape[-1])  # heads x head dim
        return int(value.shape[1] if value.dim() >= 4 else value.shape[-1])

    def first_projection(self, key: dataflow.Key, through_norms: bool
                         ) -> Optional[tuple[dataflow.Op, dataflow.Key]]:
        """The first projection that reads ``key`` through views, casts and dropout (and, with ``through_norms``,
        norms), with the value it reads; None when there is none."""
        stack, seen = [key], set()
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            for reader in self.graph.readers.get(k, []):
                if reader.index in self.absorbed:
                    continue
                func = _func(reader)
                norm = func in _NORM_FUNCS or reader.site is not None and is_norm(self.modules[reader.site])
                if norm and through_norms or reader.site is None and func in _STRUCTURAL_ONLY:
                    stack.extend(reader.writes)
                elif reader.site is None and self.graph.kind(reader) == "projection":
                    return reader, k
        return None

    # ---------------------------------------------------------------------------------------------- passes
    def path_reads(self, op: dataflow.Op) -> list[dataflow.Key]:
        return [k for k in op.reads if k is not None and k in self.path]

    def find_paths(self, inputs: list[dataflow.Key]) -> None:
        """The path values: written by an op that reads one (integers only through views of the ids)."""
        self.path.update(inputs)
        for op in self.graph.ops:
            if self.path_reads(op) and _func(op) not in _CONSTANT:
                structural = _func(op) in _LINEAR and op.site is None
                self.path.update(key for key, value in zip(op.writes, op.outputs)
                                 if value.is_floating_point() or value.is_complex() or structural)

    def mark(self) -> None:
        """Find the GLU products and the attention cores (with their score sides) before the main pass."""
        for op in self.graph.ops:
            reads = self.path_reads(op)
            if not reads:
                continue
            if op.site is not None and isinstance(self.modules[op.site], (GatedActivation, ExpertGatedActivation)):
                region = self.graph.region(op)
                product = next((other for other in region.ops if other.index > op.index
                                and region.multiplier in other.reads and _func(other) in dataflow._PRODUCTS), None)
                if product is not None:
                    self.glu_products[product.index] = op.index
                if isinstance(self.modules[op.site], ExpertGatedActivation):
                    self.absorb_routing(op)
            elif op.site is None and op.index not in self.absorbed:
                func = _func(op)
                if func in _ATTENTION:
                    score = [k for k in op.reads[:2] if k is not None and k in self.path]
                elif func in _MULTILINEAR and len(reads) >= 2:
                    score = [k for k in reads if self.softmax_side(k)]
                else:
                    continue
                if score:
                    self.cores.add(op.index)
                    self.absorb(op.module, score)

    def source_op(self, key: dataflow.Key, stop_at_fork: bool = False) -> Optional[dataflow.Op]:
        """The op that made ``key``, looking back through linear one-input ops (views, casts, dropout, scaling): the
        first op on the way that is not one (a softmax, a projection, a recorded module...). With ``stop_at_fork``,
        None as soon as a value on the way is also read by another op."""
        while not stop_at_fork or len(self.graph.readers.get(key, [])) == 1:
            op = self.graph.writer.get(key)
            if op is None:
                return None
            reads = self.path_reads(op)
            if (op.site is not None or op.index in self.cores or self.graph.kind(op) == "projection"
                    or _func(op) not in _LINEAR or len(reads) != 1):
                return op
            key = reads[0]
        return None

    def softmax_side(self, key: dataflow.Key) -> bool:
        """Whether ``key`` comes from a softmax (function or ``nn.Softmax``) through linear one-input ops."""
        op = self.source_op(key)
        return op is not None and (_func(op) in _SOFTMAX if op.site is None else
                                   isinstance(self.modules[op.site], nn.Softmax))

    def absorb(self, scope: str, keys: list[dataflow.Key]) -> None:
        """Mark the ops that computed ``keys`` inside module ``scope`` (attention scores, MoE routing weights) as
        linear parts of the node that uses them; the walk stops at gates and at ops outside the scope."""
        stack = list(keys)
        while stack:
            op = self.graph.writer.get(stack.pop())
            if op is None or op.index in self.absorbed or op.site is not None and isinstance(
                    self.modules[op.site], (GatedActivation, ExpertGatedActivation)):
                continue
            inside = op.module == scope or op.module.startswith(scope + ".") if scope else (
                _func(op) in _LINEAR | _MULTILINEAR | _SOFTMAX)
            if not inside:
                continue
            self.absorbed[op.index] = None
            stack.extend(self.path_reads(op))

    def absorb_routing(self, site_op: dataflow.Op) -> None:
        """Fused experts: the products of their output with routing weights belong to the experts, and the router
        that computed the weights (inside the MoE block, the experts module's parent) to their route node."""
        scope = site_op.module
        reached = set(site_op.writes)
        for op in self.graph.ops[site_op.index + 1:]:
            if not (op.module == scope or op.module.startswith(scope + ".")):
                continue
            reads = self.path_reads(op)
            if not any(k in reached for k in reads):
                continue
            reached.update(op.writes)
            rest = [k for k in reads if k not in reached]
            if rest and _func(op) in _MULTILINEAR and op.index not in self.glu_products:
                self.glu_products[op.index] = site_op.index
                self.absorb(scope.rpartition(".")[0], rest)

    def run(self, inputs: Mapping[str, dataflow.Key], output: dataflow.Key) -> TracedStructure:
        self.find_paths(list(inputs.values()))
        self.mark()
        for name, key in inputs.items():  # one map node per main input: a dual encoder forks into its towers
            self.src[key] = frozenset({self.node(name, frozenset({0}))})
        for op in self.graph.ops:
            reads = self.path_reads(op)
            if reads:
                self.visit(op, reads)
        if output not in self.src:
            raise NotImplementedError(
                "The model's main output does not depend on its main input in the recorded forward pass, so it has "
                "no path graph; please report the model (its main input and output are chosen by name: "
                "input_ids/pixel_values/input_features/...; logits/last_hidden_state).")
        self.structure.output = self.node("output", self.src[output])
        return self._pruned()

    def write(self, op: dataflow.Op, src: frozenset[int]) -> None:
        for key in op.writes:
            if key in self.path:
                self.src[key] = src

    def visit(self, op: dataflow.Op, reads: list[dataflow.Key]) -> None:
        func = _func(op)
        src = frozenset().union(*(self.src[k] for k in reads))
        if op.index in self.absorbed:
            return self.write(op, src)
        if op.index in self.glu_products:  # a GLU's value, or routing weights: inputs of the site's entry node
            site = self.glu_products[op.index]
            nodes = self.site_nodes[site]
            self.structure.edges.update((p, self.entry[site]) for p in src if p not in nodes)
            return self.write(op, frozenset(nodes))
        if op.site is not None and isinstance(self.modules[op.site], (GatedActivation, ExpertGatedActivation)):
            return self.visit_gate(op, src)
        if in_head(op.site or op.module):
            return self.write(op, src)
        if op.index in self.cores:
            node = self.node(op.module or func, src, cost=True, layer=True, width=self.channels(op, op.writes[0]))
            return self.write(op, frozenset({node}))
        if op.site is not None:
            if is_norm(self.modules[op.site]):
                return self.write(op, frozenset({self.node(op.site, src, cost=True)}))
            return self.visit_other(op, src, name=op.site)
        if func in _NORM_FUNCS:
            return self.write(op, frozenset({self.node(f"{op.module}:norm", src, cost=True)}))
        if func in _MULTILINEAR or func in _LINEAR:
            sources = [self.src[k] for k in reads]
            if len(reads) == 1 or all(s == sources[0] for s in sources):
                if func in _MULTILINEAR and len(reads) >= 2:  # x * x: nonlinear
                    return self.visit_other(op, src)
                if self.graph.kind(op) == "projection" and self.first_projection(op.writes[0], True) is not None:
                    # a linear hidden layer: its output reaches another projection (through views and norms)
                    hidden = self.node(f"{op.module}:{func}", src, layer=True,
                                       width=self.channels(op, op.writes[0]))
                    return self.write(op, frozenset({hidden}))
                return self.write(op, src)
            return self.visit_merge(op, reads, func in _MULTILINEAR)
        return self.visit_other(op, src)

    def visit_gate(self, op: dataflow.Op, src: frozenset[int]) -> None:
        module = self.modules[op.site]
        if isinstance(module, GatedActivation):
            node = self.node(op.site, src, site=op.site, layer=True)
            self.site_nodes[op.index], self.entry[op.index] = [node], node
            return self.write(op, frozenset({node}))
        if op.site not in self.experts:
            route = self.node(f"{op.site}:route", src, cost=True)
            nodes = [self.node(f"{op.site}.experts.{e}", frozenset({route}), site=f"{op.site}.experts.{e}",
                               layer=True) for e in range(len(module.experts))]
            self.experts[op.site] = (route, nodes)
        route, nodes = self.experts[op.site]
        self.structure.edges.update((p, route) for p in src)
        self.site_nodes[op.index], self.entry[op.index] = nodes, route
        return self.write(op, frozenset(nodes))

    def visit_merge(self, op: dataflow.Op, reads: list[dataflow.Key], product: bool) -> None:
        sources = [self.src[k] for k in reads]
        if product and len(sources) == 2:  # x * g(x) with g ungated nonlinear ops on x alone (x / |x|, x * sigmoid(x))
            for x, g in (sources, sources[::-1]):
                if len(g) == 1 and self.base.get(next(iter(g))) == x:
                    return self.visit_other(op, x)
        preds: set[int] = set()
        for key, source in zip(reads, sources):
            others = frozenset().union(*(s for s in sources if s is not source))
            if len(source) == 1 and self._projected_skip(key) and self._is_ancestor(next(iter(source)), others):
                shortcut = self.node(f"{op.module}:shortcut", source, layer=True,
                                     width=self.channels(self.graph.writer[key], key))
                preds.add(shortcut)
            else:
                preds |= source
        merge = self.node(f"{op.module}:{'mul' if product else 'add'}", frozenset(preds))
        self.write(op, frozenset({merge}))

    def _projected_skip(self, key: dataflow.Key) -> bool:
        """Whether ``key`` comes from a projection through linear one-input ops, after the last value on its way
        that something else reads too (a fork): a projection on the skip of a residual."""
        op = self.source_op(key, stop_at_fork=True)
        return op is not None and op.site is None and op.index not in self.cores and self.graph.kind(
            op) == "projection"

    def _is_ancestor(self, node: int, of: frozenset[int]) -> bool:
        preds: dict[int, set[int]] = {}
        for u, v in self.structure.edges:
            preds.setdefault(v, set()).add(u)
        stack, seen = list(of), set()
        while stack:
            v = stack.pop()
            if v == node:
                return True
            if v not in seen:
                seen.add(v)
                stack.extend(preds.get(v, ()))
        return False

    def visit_other(self, op: dataflow.Op, src: frozenset[int], name: Optional[str] = None) -> None:
        hidden = bool(op.writes) and self.first_projection(op.writes[0], through_norms=False) is not None
        width = self.channels(op, op.writes[0]) if hidden else 1
        node = self.node(name or f"{op.module}:{_func(op)}", src, cost=True, layer=hidden, width=width)
        single = next(iter(src)) if len(src) == 1 else None
        self.base[node] = self.base.get(single, src) if single is not None and not hidden else src
        self.write(op, frozenset({node}))

    def _pruned(self) -> TracedStructure:
        """Drop the nodes on no input-to-output path and renumber (order kept: it is topological)."""
        structure = self.structure
        preds: dict[int, set[int]] = {}
        for u, v in structure.edges:
            preds.setdefault(v, set()).add(u)
        keep, stack = set(), [structure.output]
        while stack:
            v = stack.pop()
            if v not in keep:
                keep.add(v)
                stack.extend(preds.get(v, ()))
        order = sorted(keep)
        new = {old: i for i, old in enumerate(order)}
        return TracedStructure([structure.nodes[i] for i in order],
                               {(new[u], new[v]) for u, v in structure.edges if u in keep and v in keep},
                               new[structure.output])


@torch.no_grad()
def trace_structure(model: nn.Module, inputs: Any) -> TracedStructure:
    """Record one forward pass of the patched ``model`` on ``inputs`` and read its path-graph structure."""
    modules = _recorded_modules(model)
    was_training = model.training
    model.eval()
    try:
        graph = dataflow.record(model, lambda: _call(model, inputs), inputs, modules)
    finally:
        model.train(was_training)
    data = {name: dataflow._key(t) for name, t in _path_inputs(inputs).items()}
    output = dataflow._key(main_output(graph.output))
    return _Builder(graph, modules).run(data, output)
