"""Time graph construction + both APL forms for a 12+12-layer encoder-decoder (d=1024, FFN 4096).

Transformer model used (every sub-block is a residual fork at the stream node, merged by a map node):
  * attention sub-block: one width-d linear layer (the attention output; no gated units);
  * FFN sub-block: one width-4096 layer whose nonlinear count comes from random gates;
  * the input forks into the encoder and the decoder embedding; the encoder output enters the
    cross-attention layer of every decoder layer.

Run from the repository root: python -m benchmarks.apl_speed
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from hf_linearize.path_length import PathGraph, apl

D_MODEL, D_FF, LAYERS = 1024, 4096, 12
TARGET_MS = 50.0
LINEAR_THRESHOLD = 1e-3


def random_gates(rng: np.random.Generator) -> np.ndarray:
    """Gate values in [0, 1] for one FFN, with a random share of units fully linear (gate 1)."""
    gates = rng.random(D_FF)
    gates[rng.random(D_FF) < rng.random()] = 1.0
    return gates


def build(gates: list[np.ndarray]) -> PathGraph:
    """Encoder-decoder graph; ``gates`` holds the FFN gates of the LAYERS encoder then LAYERS decoder layers."""
    nonlinear = iter(int((g < 1.0 - LINEAR_THRESHOLD).sum()) for g in gates)
    g = PathGraph()

    def ffn(x: int, prefix: str) -> int:
        return g.residual(x, [g.add_layer(f"{prefix}.ffn.act", D_FF, next(nonlinear))], f"{prefix}.ffn.add")

    x = g.input
    for i in range(LAYERS):
        x = g.residual(x, [g.add_layer(f"enc.{i}.attn", D_MODEL)], f"enc.{i}.attn.add")
        x = ffn(x, f"enc.{i}")
    enc_out = x
    x = g.input
    for i in range(LAYERS):
        x = g.residual(x, [g.add_layer(f"dec.{i}.self_attn", D_MODEL)], f"dec.{i}.self_attn.add")
        cross = g.add_layer(f"dec.{i}.cross_attn", D_MODEL)
        g.add_edge(enc_out, cross)
        x = g.residual(x, [cross], f"dec.{i}.cross_attn.add")
        x = ffn(x, f"dec.{i}")
    g.set_output(x)
    return g


def main(repeats: int = 50) -> None:
    rng = np.random.default_rng(0)
    gates = [random_gates(rng) for _ in range(2 * LAYERS)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        g = build(gates)
        normalized, unnormalized = apl(g, normalized=True), apl(g, normalized=False)
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    edges = sum(len(s) for s in g.succ)
    print(f"encoder-decoder {LAYERS}+{LAYERS} layers, d={D_MODEL}, FFN {D_FF}: {len(g)} nodes, {edges} edges")
    print(f"normalized APL = {normalized:.6f}, unnormalized APL = {unnormalized:.6f}")
    print(f"build + both APL forms: median {ms:.3f} ms over {repeats} runs "
          f"({ms / TARGET_MS:.4f} of the {TARGET_MS:.0f} ms target)")


if __name__ == "__main__":
    main()
