"""Overhead of the gates: a patched model with every gate at 0 versus the same model unpatched, on CPU.

Model: a Marian shaped like Helsinki-NLP/opus-mt-en-de, i.e. with Transformer-base dimensions (d_model 512,
6 + 6 layers, 8 heads, FFN 2048; swish and the 58101-token vocabulary of opus-mt-en-de), randomly initialised;
both copies share the same weights. (The recipe's ``transformer-small`` preset is smaller: d_model 256, 3 + 3.)
Batch: 16 sentence pairs of 32 source and 32 target token ids.

* training step: ``model.train()``, forward with labels, backward, ``AdamW.step()`` (lr 0, so both copies
  and the gates stay as they are from one repetition to the next), ``zero_grad``;
* inference: ``model.eval()``, one teacher-forced forward pass under ``torch.inference_mode()``.

Repetitions of the two models are interleaved (the order alternates), so slow drifts of the machine hit both
alike; the reported ratio is the median over repetitions of patched time / unpatched time of the same
repetition (the ratio of the two medians is printed beside it). Targets: at most 1.05 for training, 1.03 for
inference. Exit status 1 when a target is missed.

Run from the repository root: ``python -m benchmarks.gate_overhead [--reps 11]
[--json results/gate_overhead/cpu.json]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers as tf

import hf_linearize as hl
from benchmarks.record import Record

TARGETS = {"training step": 1.05, "inference": 1.03}
BATCH, SOURCE_LEN, TARGET_LEN = 16, 32, 32


def marian_opus_mt_shape() -> tf.MarianMTModel:
    """A randomly initialised Marian with opus-mt-en-de's dimensions (Transformer base, swish)."""
    config = tf.MarianConfig(
        vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish",
        pad_token_id=58100, decoder_start_token_id=58100, max_position_embeddings=512,
    )
    return tf.MarianMTModel(config)


def batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, vocab - 1, (BATCH, SOURCE_LEN), generator=g),
        "attention_mask": torch.ones(BATCH, SOURCE_LEN, dtype=torch.long),
        "labels": torch.randint(0, vocab - 1, (BATCH, TARGET_LEN), generator=g),
    }


def training_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)

    def step() -> None:
        model.train()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            model(**inputs)

    return forward


def measure(base: Callable[[], None], patched: Callable[[], None], reps: int, warmup: int) -> dict[str, float]:
    """Interleaved timings; returns median seconds of each and the median paired ratio."""
    times: dict[str, list[float]] = {"base": [], "patched": []}
    for rep in range(warmup + reps):
        order = (("base", base), ("patched", patched)) if rep % 2 == 0 else (("patched", patched), ("base", base))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    ratios = [p / b for p, b in zip(times["patched"], times["base"])]
    base, patched = statistics.median(times["base"]), statistics.median(times["patched"])
    return {"base": base, "patched": patched, "ratio": statistics.median(ratios), "ratio_of_medians": patched / base}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11, help="timed repetitions of each model (default 11)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results there (seconds, ratios, targets)")
    args = parser.parse_args()
    record = Record()

    torch.manual_seed(0)
    base = marian_opus_mt_shape()
    patched = hl.patch_model(copy.deepcopy(base))
    inputs = batch(base.config.vocab_size)
    summary = hl.summary(patched)["total"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Marian shaped like opus-mt-en-de "
          "(Transformer base: d_model=512, 6+6 layers, FFN 2048), "
          f"vocab {base.config.vocab_size}; batch {BATCH} x ({SOURCE_LEN} source, {TARGET_LEN} target) tokens")
    print(f"patched: {len(list(hl.gated_modules(patched)))} gated sites, {summary['units']} units, all gates 0")
    print(f"{args.reps} interleaved repetitions after {args.warmup} warm-up\n")
    print(f"{'':<14} {'unpatched ms':>13} {'patched ms':>11} {'ratio':>7} {'target':>7}  (ratio of the medians)")
    results = {}
    for label, make in (("training step", training_step), ("inference", inference)):
        result = measure(make(base, inputs), make(patched, inputs), args.reps, args.warmup)
        passed = result["ratio"] <= TARGETS[label]
        results[label] = {**result, "target": TARGETS[label], "met": passed}
        print(f"{label:<14} {1e3 * result['base']:>13.1f} {1e3 * result['patched']:>11.1f} {result['ratio']:>7.3f} "
              f"{TARGETS[label]:>7.2f}  {'ok' if passed else 'MISSED':<6}  ({result['ratio_of_medians']:.3f})")
    record.save(args.json, threads=torch.get_num_threads(), reps=args.reps, warmup=args.warmup, results=results)
    return 0 if all(result["met"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
