"""Tests for `hf_linearize.path_length`: golden case, hand formulas, exact reference DP, huge graphs, errors."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from hf_linearize.path_length import PathGraph, apl, node_contributions


def close(got: float, want: float, rel: float = 1e-12) -> bool:
    return math.isclose(got, float(want), rel_tol=rel, abs_tol=1e-300)


def exact_apl(g: PathGraph, normalized: bool) -> Fraction:
    """Reference in exact arithmetic, by a different DP: path counts as Python ints, no logs, no p(v).

    Unnormalized: N(v) = number of unit paths input -> v (including v's unit), S(v) = their summed length;
    a prefix reaching v's predecessors (sum N(u) of them) extends to w_v units, k_v of them nonlinear.
    Normalized: forward probabilities with Fractions, APL = sum p(v) * (k/w + c).
    """
    order = g.validate()
    value = [Fraction(k) / w + Fraction(c) for k, w, c in zip(g.nonlinear, g.widths, g.costs)]
    if normalized:
        p = [Fraction(0)] * len(g)
        p[g.input] = Fraction(1)
        for v in order:
            for s in g.succ[v]:
                p[s] += p[v] / len(g.succ[v])
        return sum((pv * val for pv, val in zip(p, value)), Fraction(0))
    n_paths = [0] * len(g)
    s_len = [Fraction(0)] * len(g)
    for v in order:
        w = g.widths[v]
        n_in = 1 if v == g.input else sum(n_paths[u] for u in g.pred[v])
        s_in = sum((s_len[u] for u in g.pred[v]), Fraction(0))
        n_paths[v] = n_in * w
        s_len[v] = s_in * w + n_in * w * value[v]
    return s_len[g.output] / n_paths[g.output]


def random_graph(rng: random.Random, n: int, costs: bool = True) -> PathGraph:
    """Random DAG on n nodes (0 = input, n-1 = output) with every node on an input-to-output path;
    some nodes get a constant cost unless ``costs`` is False."""
    cost = (lambda: rng.choice([0.0, 0.5, 0.25])) if costs else (lambda: 0.0)
    g = PathGraph()
    ids = [g.input]
    for i in range(1, n):
        if rng.random() < 0.3:
            ids.append(g.add_node(f"m{i}", cost=cost()))
        else:
            w = rng.randint(1, 6)
            ids.append(g.add_layer(f"l{i}", w, rng.randint(0, w), cost=cost()))
    edges = set()
    for i in range(1, n):
        edges.add((rng.randrange(i), i))  # every node has a predecessor -> reachable from the input
    for i in range(n - 1):
        edges.add((i, rng.randrange(i + 1, n)))  # every node has a successor -> reaches the output
    for _ in range(n):
        a, b = sorted(rng.sample(range(n), 2))
        edges.add((a, b))
    for a, b in sorted(edges):
        g.add_edge(ids[a], ids[b])
    g.set_output(ids[-1])
    return g


# --- golden case ---------------------------------------------------------------------------------
def golden(nonlinear: int = 4) -> PathGraph:
    g = PathGraph()
    layers = [g.add_layer(f"fc{i}", 4, nonlinear) for i in range(4)]
    g.set_output(g.residual(g.input, layers, "output"))
    return g


def test_golden_case():
    g = golden()
    assert close(apl(g, normalized=False), 1024 / 257)  # 256 of 257 paths meet 4 nonlinear units
    assert close(apl(g, normalized=True), 2.0)  # skip 1/2 (length 0), branch 1/2 (length 4)
    assert exact_apl(g, False) == Fraction(1024, 257) and exact_apl(g, True) == 2
    contrib_u, contrib_n = node_contributions(g, normalized=False), node_contributions(g, normalized=True)
    for i in range(4):
        assert close(contrib_u[f"fc{i}"], 256 / 257) and close(contrib_n[f"fc{i}"], 0.5)
    assert contrib_u["input"] == contrib_u["output"] == contrib_n["input"] == contrib_n["output"] == 0.0


def test_contributions_sum_to_apl():
    rng = random.Random(1)
    for _ in range(20):
        g = random_graph(rng, rng.randint(2, 25))
        for normalized in (True, False):
            contrib = node_contributions(g, normalized)
            assert list(contrib) == g.names
            assert close(math.fsum(contrib.values()), apl(g, normalized))
            assert all(c >= 0 for c in contrib.values())


# --- hand formulas -------------------------------------------------------------------------------
def test_mlp_chain():
    widths, ks = [3, 8, 5, 1, 16], [1, 8, 0, 1, 7]
    g = PathGraph()
    x = g.chain(g.input, *(g.add_layer(f"fc{i}", w, k) for i, (w, k) in enumerate(zip(widths, ks))))
    g.set_output(g.chain(x, g.add_node("output")))
    want = sum(Fraction(k, w) for w, k in zip(widths, ks))  # a chain has one node path: both forms agree
    assert close(apl(g, True), want) and close(apl(g, False), want)
    assert exact_apl(g, False) == exact_apl(g, True) == want


def test_residual_stack():
    # Block i: fork at x_i into a chain of layers (widths w_ij, k_ij nonlinear) and an identity skip,
    # merged into x_{i+1}. Blocks are independent choices, so with f_i = sum_j k_ij / w_ij:
    #   normalized:   APL = sum_i 1/2 * f_i
    #   unnormalized: APL = sum_i W_i / (W_i + 1) * f_i,  W_i = prod_j w_ij  (branch paths vs 1 skip path)
    blocks = [[(4, 4), (2, 1)], [(7, 3)], [(3, 0), (5, 5), (2, 2)], [(1, 1)]]
    g = PathGraph()
    x = g.input
    for i, block in enumerate(blocks):
        x = g.residual(x, [g.add_layer(f"b{i}.l{j}", w, k) for j, (w, k) in enumerate(block)], f"b{i}.add")
    g.set_output(x)
    f = [sum(Fraction(k, w) for w, k in block) for block in blocks]
    big_w = [math.prod(w for w, _ in block) for block in blocks]
    assert close(apl(g, True), sum(fi / 2 for fi in f))
    assert close(apl(g, False), sum(Fraction(wi, wi + 1) * fi for wi, fi in zip(big_w, f)))


def test_residual_with_downsample_skip():
    # Skip holds a linear downsample of width 6: skip paths 6, branch paths 4 * 3 = 12.
    g = PathGraph()
    branch = [g.add_layer("conv1", 4, 2), g.add_layer("conv2", 3, 3)]
    g.set_output(g.residual(g.input, branch, "add", skip=[g.add_layer("down", 6, 0)]))
    f = Fraction(2, 4) + Fraction(3, 3)
    assert close(apl(g, True), f / 2)
    assert close(apl(g, False), Fraction(12, 18) * f)


def encoder_decoder(w_e1=2, k_e1=1, w_e2=4, k_e2=3, w1=3, k1=2, w2=5, k2=5) -> PathGraph:
    """input -> E1 -> E2 -> enc;  decoder layer j: r_{j-1} -> ca_j, enc -> ca_j (cross-attention),
    FFN residual ca_j -> F_j -> r_j, ca_j -> r_j;  r_0 = input, output = r_2."""
    g = PathGraph()
    enc = g.chain(g.input, g.add_layer("E1", w_e1, k_e1), g.add_layer("E2", w_e2, k_e2), g.add_node("enc"))
    r = g.input
    for j, (w, k) in enumerate([(w1, k1), (w2, k2)], start=1):
        ca = g.chain(r, g.add_node(f"ca{j}"))
        g.add_edge(enc, ca)
        r = g.residual(ca, [g.add_layer(f"F{j}", w, k)], f"r{j}")
    g.set_output(r)
    return g


def test_encoder_decoder():
    w_e, u_e = 2 * 4, Fraction(1, 2) + Fraction(3, 4)
    w1, f1, w2, f2 = 3, Fraction(2, 3), 5, Fraction(5, 5)
    g = encoder_decoder()
    # Normalized: input forks 1/2 to E1 and 1/2 to ca1; enc forks 1/4 to ca1 and 1/4 to ca2;
    # p(ca1) = 3/4 -> F1 gets 3/8; p(r1) = 3/4 -> ca2 gets 3/4 + 1/4 = 1 -> F2 gets 1/2.
    assert close(apl(g, True), u_e / 2 + Fraction(3, 8) * f1 + f2 / 2)
    # Unnormalized, node paths by their unit counts:
    #   input -> ca1 -> ... -> r2:        (1 + w1)(1 + w2)
    #   input -> E -> enc -> ca1 -> ...:  W_E (1 + w1)(1 + w2)
    #   input -> E -> enc -> ca2 -> ...:  W_E (1 + w2)
    n = (1 + w_e) * (1 + w1) * (1 + w2) + w_e * (1 + w2)
    p_e = Fraction(w_e * ((1 + w1) * (1 + w2) + (1 + w2)), n)
    p_f1 = Fraction((1 + w_e) * w1 * (1 + w2), n)
    p_f2 = Fraction(((1 + w_e) * (1 + w1) + w_e) * w2, n)
    want = p_e * u_e + p_f1 * f1 + p_f2 * f2
    assert close(apl(g, False), want)
    contrib = node_contributions(g, False)
    assert close(contrib["E1"], p_e / 2) and close(contrib["F1"], p_f1 * f1) and close(contrib["F2"], p_f2 * f2)


def test_costs():
    # A softmax-like map node of cost 0.5 inside the branch, LayerNorm of cost 1 on the output.
    g = PathGraph()
    merge = g.residual(g.input, [g.add_layer("fc", 2, 1), g.add_node("softmax", cost=0.5)], "add")
    g.set_output(g.chain(merge, g.add_node("norm", cost=1.0)))
    assert close(apl(g, True), Fraction(1, 2) * (Fraction(1, 2) + Fraction(1, 2)) + 1)
    assert close(apl(g, False), Fraction(2, 3) * (Fraction(1, 2) + Fraction(1, 2)) + 1)


# --- properties ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_matches_exact_reference(seed):
    rng = random.Random(seed)
    g = random_graph(rng, rng.randint(2, 40))
    for normalized in (True, False):
        assert close(apl(g, normalized), exact_apl(g, normalized), rel=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_linearizing_never_increases_apl(seed):
    rng = random.Random(100 + seed)
    g = random_graph(rng, rng.randint(3, 30))
    before = {nz: apl(g, nz) for nz in (True, False)}
    for _ in range(20):
        candidates = [v for v in range(len(g)) if g.nonlinear[v] >= 1]
        if not candidates:
            break
        v = rng.choice(candidates)
        g.set_nonlinear(v, g.nonlinear[v] - 1)
        for nz in (True, False):
            after = apl(g, nz)
            assert after <= before[nz]
            before[nz] = after


def test_fully_linear_is_zero():
    g = random_graph(random.Random(7), 30, costs=False)
    for v in range(len(g)):
        g.set_nonlinear(v, 0)
    assert apl(g, True) == 0.0 and apl(g, False) == 0.0
    assert set(node_contributions(g, False).values()) == {0.0}


# --- huge path counts ----------------------------------------------------------------------------
def test_huge_residual_stack():
    # 24 residual blocks around one all-nonlinear layer of width 4096: 4097**24 unit paths.
    d, layers = 4096, 24
    g = PathGraph()
    x = g.input
    for i in range(layers):
        x = g.residual(x, [g.add_layer(f"l{i}", d, d)], f"add{i}")
    g.set_output(x)
    assert close(apl(g, False), layers * d / (d + 1))
    assert close(apl(g, True), layers / 2)


@pytest.mark.parametrize("depth", [24, 300])  # 4096**300 = 2**3600 overflows a float
def test_huge_parallel_chains(depth):
    # Two chains of width-4096 all-nonlinear layers, depth and depth - 1, from input to output.
    # Unit paths: 4096**depth vs 4096**(depth-1), so p(long) = 4096 / 4097.
    d = 4096
    g = PathGraph()
    out = g.add_node("output")
    for name, n in (("a", depth), ("b", depth - 1)):
        g.add_edge(g.chain(g.input, *(g.add_layer(f"{name}{i}", d, d) for i in range(n))), out)
    g.set_output(out)
    got = apl(g, False)
    assert math.isfinite(got)
    assert close(got, (depth * d + (depth - 1)) / (d + 1), rel=1e-12)
    assert close(apl(g, True), (2 * depth - 1) / 2)


# --- errors --------------------------------------------------------------------------------------
def test_invalid_nodes():
    g = PathGraph()
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        g.add_layer("a", 0)
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        g.add_layer("a", 2.0)
    with pytest.raises(ValueError, match="nonlinear=5 is out of range"):
        g.add_layer("a", 4, 5)
    with pytest.raises(ValueError, match="nonlinear=-1 is out of range"):
        g.add_layer("a", 4, -1)
    with pytest.raises(ValueError, match="cost=-0.5 is out of range"):
        g.add_node("a", cost=-0.5)
    with pytest.raises(ValueError, match="already used"):
        g.add_node("input")
    with pytest.raises(ValueError, match="non-empty string"):
        g.add_node("")
    a = g.add_layer("a", 4, 2)
    with pytest.raises(ValueError, match="nonlinear=4.5 is out of range"):
        g.set_nonlinear(a, 4.5)
    with pytest.raises(ValueError, match="Unknown node id"):
        g.add_edge(a, 99)


def test_invalid_edges():
    g = PathGraph()
    a = g.add_node("a")
    g.add_edge(g.input, a)
    with pytest.raises(ValueError, match="already exists"):
        g.add_edge(g.input, a)
    with pytest.raises(ValueError, match="Self-loop"):
        g.add_edge(a, a)
    with pytest.raises(ValueError, match="enters the input"):
        g.add_edge(a, g.input)
    with pytest.raises(ValueError, match="branch must hold at least one node"):
        g.residual(a, [], "add")


def test_invalid_structure():
    g = PathGraph()
    a, b, c = g.add_node("a"), g.add_node("b"), g.add_node("c")
    g.chain(g.input, a, b, c)
    with pytest.raises(ValueError, match="No output node"):
        apl(g)
    g.set_output(c)
    g.add_edge(c, a)
    with pytest.raises(ValueError, match="cycle; nodes on it or downstream of it: 'a', 'b', 'c'"):
        apl(g)

    g = PathGraph()
    out = g.chain(g.input, g.add_node("out"))
    g.set_output(out)
    g.add_edge(g.add_node("orphan"), out)
    with pytest.raises(ValueError, match="not reachable from the input: 'orphan'"):
        node_contributions(g)

    g = PathGraph()
    out = g.chain(g.input, g.add_node("out"))
    g.chain(g.input, g.add_layer("dead_end", 3, 1))
    g.set_output(out)
    with pytest.raises(ValueError, match="not able to reach the output: 'dead_end'"):
        apl(g, normalized=False)
