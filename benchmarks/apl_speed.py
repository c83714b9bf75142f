"""Time `average_path_length` (both forms) on a real patched 12+12-layer Marian (d=1024, FFN 4096).

Each call reads the gates (one vectorised count per gate), fills them into the model's traced path-graph structure
and runs the dynamic program; the target is well under 50 ms per call. Building and patching the model, and the one
traced forward pass of the first call (its structure is kept on the patch state), take a few seconds and are not
timed.

Run from the repository root: ``python -m benchmarks.apl_speed [--repeats 50] [--json results/apl_speed/cpu.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers as tf

import hf_linearize as hl
from benchmarks.record import Record
from hf_linearize.core_map import average_path_length, model_graph

D_MODEL, D_FF, LAYERS = 1024, 4096, 12
TARGET_MS = 50.0


def build_model() -> torch.nn.Module:
    config = tf.MarianConfig(
        vocab_size=128, pad_token_id=0, decoder_start_token_id=0, d_model=D_MODEL, encoder_layers=LAYERS,
        decoder_layers=LAYERS, encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=D_FF,
        decoder_ffn_dim=D_FF, max_position_embeddings=64,
    )
    model = hl.patch_model(tf.MarianMTModel(config).eval())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, gate in hl.gated_modules(model):  # random gates, a random share of each layer exactly linear
            gate.alpha.copy_(torch.rand(gate.channels, generator=generator))
            gate.alpha[torch.rand(gate.channels, generator=generator) < torch.rand((), generator=generator)] = 1.0
    return model


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of each form (default 50)")
    parser.add_argument("--json", type=Path, help="also write the medians there")
    args = parser.parse_args()
    record, repeats = Record(), args.repeats
    model = build_model()
    torch.set_num_threads(1)
    graph = model_graph(model)
    print(f"Marian {LAYERS}+{LAYERS} layers, d={D_MODEL}, FFN {D_FF}: {len(graph)} graph nodes, "
          f"{sum(len(s) for s in graph.succ)} edges")
    print(f"normalized APL = {average_path_length(model, True):.6f}, "
          f"unnormalized APL = {average_path_length(model, False):.6f}")
    medians = {}
    for label, fn in (
        ("average_path_length(normalized=True) ", lambda: average_path_length(model, True)),
        ("average_path_length(normalized=False)", lambda: average_path_length(model, False)),
        ("both forms                           ", lambda: (average_path_length(model, True),
                                                           average_path_length(model, False))),
    ):
        ms = medians[label.strip()] = median_ms(fn, repeats)
        print(f"{label}: median {ms:.3f} ms over {repeats} runs "
              f"({ms / TARGET_MS:.4f} of the {TARGET_MS:.0f} ms target)")
    record.save(args.json, repeats=repeats, threads=1, graph_nodes=len(graph), median_ms=medians, target_ms=TARGET_MS)


if __name__ == "__main__":
    main()
