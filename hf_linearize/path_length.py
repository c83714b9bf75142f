"""Average path length (APL): expected number of nonlinear units met on an input-to-output path.

Model-independent part: the graph type `PathGraph` and the two dynamic programs `apl` and
`node_contributions`. Family-specific builders read a patched model and describe it with a `PathGraph`.

Graph
-----
A DAG with one input node and one output node. A node is a *layer of units*: ``width`` units
(``w >= 1``), of which ``nonlinear`` count 1 (``0 <= k <= w``; may be fractional, e.g. a soft count)
and the rest are linear and count 0. A *map node* (`PathGraph.add_node`) is a pass-through of width 1
with no units (input, output, a residual merge, an attention output...). Any node may carry a constant
``cost >= 0`` added each time a path passes it (an ungated nonlinearity: softmax, LayerNorm).
An edge ``u -> v`` is a dense map: every unit of ``u`` connects to every unit of ``v``.

A *unit path* picks one unit in every node of an input-to-output node path ``P``; there are
``prod_{v in P} w_v`` of them, and a unit path's length is the number of nonlinear units on it plus the
costs of its nodes. Averaged over the ``prod w`` unit paths of one node path, node ``v`` adds

    value(v) = k_v / w_v + c_v,

so for both forms ``APL = sum_v p(v) * value(v)`` where ``p(v)`` is the probability that the random path
passes node ``v``, and ``p(v) * value(v)`` is node ``v``'s contribution. Linear units stay distinct paths
(they enter ``w``), they only count 0, so lowering any ``k_v`` never raises either APL.

Unnormalized APL (all unit paths equally likely)
    A node path ``P`` has probability ``prod_{v in P} w_v / N`` with ``N`` the total number of unit paths.
    ``N`` explodes (4096**24 for 24 layers of width 4096), so nothing is ever summed in linear scale:

    * forward, in topological order: ``log F(v) = log w_v + logsumexp_{u in pred(v)} log F(u)``, where
      ``F(v)`` counts the unit paths from the input through ``v`` (``F(input) = w_input``). At every
      merge ``v`` the share ``r(u, v) = F(u) / sum_{u' in pred(v)} F(u')`` is computed from the
      max-shifted terms of that same logsumexp, so it is exact to rounding and never overflows.
    * backward, in reverse topological order: ``p(output) = 1``, ``p(u) = sum_{v in succ(u)} p(v) r(u, v)``.

    Equivalently: the path is drawn backward from the output, and at every merge it steps to predecessor
    ``u`` with probability proportional to the number of unit paths reaching ``u``.

Normalized APL (equal branches at every fork)
    The path is drawn *forward from the input*: at every node with out-degree ``d`` it takes each outgoing
    edge with probability ``1 / d``, whatever the widths. ``p(input) = 1`` and, in topological order,
    ``p(v) = sum_{u in pred(v)} p(u) / outdeg(u)``. Within a node the path is uniform over the units,
    hence the ``k / w``. Only these fractions matter, not the path counts. Examples: a residual fork sends
    1/2 to the skip and 1/2 to the branch; an encoder output feeding the cross-attention of ``n`` decoder
    layers (and nothing else) sends ``1 / n`` to each.

Both passes are O(V + E) with a few float operations per edge; paths are never enumerated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

__all__ = ["PathGraph", "apl", "node_contributions"]


def _check_number(what: str, value: float, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number; got {value!r}.")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number; got {value!r}.") from None
    if not (math.isfinite(x) and low <= x <= high):
        raise ValueError(f"{what}={value!r} is out of range; it must lie in [{low}, {high}].")
    return x


class PathGraph:
    """A DAG of unit layers and map nodes from ``input`` to an output chosen with `set_output`.

    Nodes are ints (ids in insertion order) with unique names. Everything is checked when added, the
    global structure (acyclic, every node on an input-to-output path) by `validate`, which `apl` and
    `node_contributions` call. The per-node lists (``names``, ``widths``, ``nonlinear``, ``costs``,
    ``succ``, ``pred``; indexed by id) are for reading; change a count with `set_nonlinear`.
    """

    def __init__(self, input_name: str = "input") -> None:
        self.names: list[str] = []
        self.widths: list[int] = []
        self.nonlinear: list[float] = []
        self.costs: list[float] = []
        self.succ: list[list[int]] = []
        self.pred: list[list[int]] = []
        self._ids: dict[str, int] = {}
        self._edges: set[tuple[int, int]] = set()
        self.input: int = self.add_node(input_name)
        self.output: Optional[int] = None

    def __len__(self) -> int:
        return len(self.names)

    # --- construction ----------------------------------------------------------------------------
    def add_layer(self, name: str, width: int, nonlinear: float = 0, cost: float = 0.0) -> int:
        """Add a layer of ``width`` units of which ``nonlinear`` (in [0, width]) are nonlinear; return its id."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"Node name must be a non-empty string; got {name!r}.")
        if name in self._ids:
            raise ValueError(f"Node name {name!r} is already used (node {self._ids[name]}).")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"Node {name!r}: width must be an int >= 1; got {width!r}.")
        k = _check_number(f"Node {name!r}: nonlinear", nonlinear, 0.0, width)
        c = _check_number(f"Node {name!r}: cost", cost, 0.0, math.inf)
        node = len(self.names)
        self._ids[name] = node
        self.names.append(name)
        self.widths.append(width)
        self.nonlinear.append(k)
        self.costs.append(c)
        self.succ.append([])
        self.pred.append([])
        return node

    def add_node(self, name: str, cost: float = 0.0) -> int:
        """Add a pass-through map node (width 1, no units), e.g. a residual merge; return its id."""
        return self.add_layer(name, 1, 0, cost)

    def add_edge(self, u: int, v: int) -> None:
        """Add the dense map ``u -> v``."""
        for node in (u, v):
            self._check_id(node)
        if u == v:
            raise ValueError(f"Self-loop on node {self.names[u]!r}: the graph must be acyclic.")
        if v == self.input:
            raise ValueError(f"Edge {self.names[u]!r} -> {self.names[v]!r} enters the input node.")
        if (u, v) in self._edges:
            raise ValueError(f"Edge {self.names[u]!r} -> {self.names[v]!r} already exists.")
        self._edges.add((u, v))
        self.succ[u].append(v)
        self.pred[v].append(u)

    def chain(self, src: int, *nodes: int) -> int:
        """Add edges ``src -> nodes[0] -> nodes[1] -> ...``; return the last node (``src`` if none)."""
        for node in nodes:
            self.add_edge(src, node)
            src = node
        return src

    def residual(self, src: int, branch: Sequence[int], name: str, skip: Sequence[int] = ()) -> int:
        """Residual block: fork at ``src`` into the chained ``branch`` nodes and the ``skip`` (identity if
        empty, else chained nodes, e.g. a downsample), merged by a new map node ``name``; return the merge."""
        if not branch:
            raise ValueError(f"Residual {name!r}: the branch must hold at least one node.")
        merge = self.add_node(name)
        self.add_edge(self.chain(src, *branch), merge)
        self.add_edge(self.chain(src, *skip), merge)
        return merge

    def set_output(self, node: int) -> None:
        """Mark ``node`` as the output."""
        self._check_id(node)
        self.output = node

    def set_nonlinear(self, node: int, nonlinear: float) -> None:
        """Change a node's nonlinear count (in [0, width]), e.g. after the gates moved."""
        self._check_id(node)
        name = self.names[node]
        self.nonlinear[node] = _check_number(f"Node {name!r}: nonlinear", nonlinear, 0.0, self.widths[node])

    def _check_id(self, node: int) -> None:
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < len(self.names):
            raise ValueError(f"Unknown node id {node!r}; ids are ints returned by add_layer/add_node.")

    # --- validation ------------------------------------------------------------------------------
    def validate(self) -> list[int]:
        """Check the global structure and return the nodes in topological order.

        Raises ValueError if no output is set, the graph has a cycle, or a node is not reachable from the
        input or cannot reach the output.
        """
        if self.output is None:
            raise ValueError("No output node: call set_output(node).")
        n = len(self.names)
        indeg = [len(p) for p in self.pred]
        order = [v for v in range(n) if indeg[v] == 0]
        for v in order:  # Kahn's algorithm; `order` grows while iterated
            for s in self.succ[v]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    order.append(s)
        if len(order) < n:
            stuck = [self.names[v] for v in range(n) if indeg[v] > 0]
            raise ValueError(f"The graph has a cycle; nodes on it or downstream of it: {self._few(stuck)}.")
        for label, start, edges in (("reachable from the input", self.input, self.succ),
                                    ("able to reach the output", self.output, self.pred)):
            seen = [False] * n
            seen[start] = True
            stack = [start]
            while stack:
                for s in edges[stack.pop()]:
                    if not seen[s]:
                        seen[s] = True
                        stack.append(s)
            missing = [self.names[v] for v in range(n) if not seen[v]]
            if missing:
                raise ValueError(f"Every node must lie on an input-to-output path; not {label}: {self._few(missing)}.")
        return order

    @staticmethod
    def _few(names: list[str]) -> str:
        shown = ", ".join(repr(x) for x in names[:5])
        return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# --- dynamic programs ----------------------------------------------------------------------------
def _pass_probabilities(graph: PathGraph, normalized: bool) -> list[float]:
    """p(v): probability that the random input-to-output path passes node v (see module docstring)."""
    order = graph.validate()
    succ, pred = graph.succ, graph.pred
    p = [0.0] * len(order)
    if normalized:
        p[graph.input] = 1.0
        for v in order:
            if succ[v]:
                share = p[v] / len(succ[v])
                for s in succ[v]:
                    p[s] += share
        return p
    log_f = [0.0] * len(order)  # log of the number of unit paths from the input through v
    shares: list[list[float]] = [[] for _ in order]  # shares[v][i] = F(pred[v][i]) / sum_u F(u)
    for v in order:
        preds = pred[v]
        log_w = math.log(graph.widths[v])
        if not preds:  # the input
            log_f[v] = log_w
        elif len(preds) == 1:
            log_f[v] = log_w + log_f[preds[0]]
            shares[v] = [1.0]
        else:
            top = max(log_f[u] for u in preds)
            terms = [math.exp(log_f[u] - top) for u in preds]
            total = math.fsum(terms)
            log_f[v] = log_w + top + math.log(total)
            shares[v] = [t / total for t in terms]
    p[graph.output] = 1.0
    for v in reversed(order):
        for u, r in zip(pred[v], shares[v]):
            p[u] += p[v] * r
    return p


def node_contributions(graph: PathGraph, normalized: bool = True) -> dict[str, float]:
    """Each node's expected number of nonlinear units (plus cost) met by the path, by node name.

    ``p(v) * (nonlinear_v / width_v + cost_v)``; the values sum to ``apl(graph, normalized)``.
    """
    p = _pass_probabilities(graph, normalized)
    return {
        name: pv * (k / w + c)
        for name, pv, k, w, c in zip(graph.names, p, graph.nonlinear, graph.widths, graph.costs)
    }


def apl(graph: PathGraph, normalized: bool = True) -> float:
    """Average path length of ``graph``: normalized (equal branches at forks) or over all unit paths."""
    return math.fsum(node_contributions(graph, normalized).values())
