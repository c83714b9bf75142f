"""Speed of folded models: gated versus ``hl.fold``-ed, side by side, on CPU in fp32.

Model: a randomly initialised Marian with Transformer-base dimensions (d_model 512, 6 + 6 layers, 8 heads, FFN 2048,
swish) and an 8k vocabulary. Per density of linear FFN units (0, 50, 75, 90, 100%, random units per layer with
``set_linear``) the gated model and its folded copy are timed on:

* FFN blocks: the 12 FFN blocks (``fc2(act(fc1(x)))`` of every layer) on 512 tokens;
* forward: one teacher-forced forward pass, 8 sentence pairs of 32 source and 32 target tokens;
* generate: beam-4 ``generate`` of 32 source sentences (24 tokens), forced to 16 new tokens.

FLOP ratios of forward and generate are counted on the same forward and on a 4-sentence generate (the ratio per
token does not depend on the batch).

Vision rows: timm ``resnet18`` (its activations stay gated: nothing folds) and ``vit_tiny_patch16_224``, at 90%
linear units, a forward pass on 8 images of 224x224.

Repetitions of the two models alternate (the order too), so slow drifts of a shared machine hit both alike; each
ratio is the median over repetitions of gated time / folded time of the same repetition (``measure`` of
``benchmarks.gate_overhead``). Beside each measured speed-up the FLOP ratio (gated FLOPs / folded FLOPs, counted
by ``torch.utils.flop_counter`` on the same workload; the FFN row from the fold report's MACs) is printed.
Targets at 90%: FFN >= 4.5x, forward >= 1.6x, generate >= 1.2x; at 0% the folded model at most 1.03x slower.

Run from the repository root: ``python -m benchmarks.fold_speed [--reps 3] [--threads 1 2] [--densities 0 0.9]
[--no_vision] [--json results/fold_speed/cpu.json]``. ``--json`` writes every printed row (speed-ups, FLOP ratios,
median times in ms, parameter counts), the settings, the load average before and after, and the wall time: the
README's tables are that file (``tests/test_readme.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import transformers as tf
from torch.utils.flop_counter import FlopCounterMode

import hf_linearize as hl
from benchmarks.gate_overhead import measure
from benchmarks.record import Record

DENSITIES = (0.0, 0.5, 0.75, 0.9, 1.0)
TARGETS = {0.9: {"ffn": 4.5, "forward": 1.6, "generate": 1.2}, 0.0: {"ffn": 1 / 1.03, "forward": 1 / 1.03,
                                                                       "generate": 1 / 1.03}}
FFN_TOKENS, BATCH, SOURCE_LEN, TARGET_LEN, GEN_SENTENCES, GEN_SOURCE_LEN, GEN_TOKENS = 512, 8, 32, 32, 32, 24, 16


def marian_base(vocab: int = 8000) -> tf.MarianMTModel:
    config = tf.MarianConfig(
        vocab_size=vocab, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish",
        pad_token_id=vocab - 1, eos_token_id=0, decoder_start_token_id=vocab - 1, max_position_embeddings=256,
    )
    return tf.MarianMTModel(config).eval()


def _ids(rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(1, vocab - 1, (rows, length), generator=torch.Generator().manual_seed(seed))


def workloads(model: torch.nn.Module, sentences: int = GEN_SENTENCES) -> dict[str, Callable[[], Any]]:
    """The three timed calls of a Marian (module docstring), their inputs on the model's device (hidden states in
    its dtype)."""
    vocab, device = model.config.vocab_size, model.device
    hidden = torch.randn(FFN_TOKENS, model.config.d_model, generator=torch.Generator().manual_seed(0)).to(device,
                                                                                                         model.dtype)
    layers = list(model.model.encoder.layers) + list(model.model.decoder.layers)
    forward_inputs = {"input_ids": _ids(BATCH, SOURCE_LEN, vocab, 1).to(device),
                      "decoder_input_ids": _ids(BATCH, TARGET_LEN, vocab, 2).to(device)}
    source = _ids(sentences, GEN_SOURCE_LEN, vocab, 3).to(device)

    def ffn() -> list[torch.Tensor]:
        return [layer.fc2(layer.activation_fn(layer.fc1(hidden))) for layer in layers]

    def forward() -> Any:
        return model(**forward_inputs).logits

    def generate() -> torch.Tensor:
        return model.generate(input_ids=source, num_beams=4, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                              do_sample=False, early_stopping=False)

    return {"ffn": ffn, "forward": forward, "generate": generate}


def flops(fn: Callable[[], Any]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            fn()
    return run


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compare(gated: Callable[[], Any], folded: Callable[[], Any], reps: int, warmup: int) -> dict[str, float]:
    """Speed-up of ``folded`` over ``gated``: median paired gated/folded ratio, and both medians in ms."""
    result = measure(timed(gated), timed(folded), reps, warmup)
    return {"speedup": 1 / result["ratio"], "gated_ms": 1e3 * result["base"], "folded_ms": 1e3 * result["patched"]}


def marian_rows(densities: list[float], threads: list[int], reps: int, warmup: int) -> list[dict[str, Any]]:
    """One row per density and thread count (printed as a table as it is measured); ``met`` is False where a
    target of ``TARGETS`` was missed."""
    torch.manual_seed(0)
    base = marian_base()
    rows = []
    print(f"Marian d=512, 6+6 layers, FFN 2048, vocab {base.config.vocab_size}: FFN blocks on {FFN_TOKENS} tokens; "
          f"forward on {BATCH} x ({SOURCE_LEN}+{TARGET_LEN}) tokens; beam-4 generate of {GEN_SENTENCES} sentences, "
          f"{GEN_TOKENS} new tokens\n")
    print("| threads | linear | params gated -> folded | FFN blocks x (FLOPs x) | forward x (FLOPs x) "
          "| generate x (FLOPs x) | gated ms (FFN / fwd / gen) |")
    print("|---|---|---|---|---|---|---|")
    gated = hl.patch_model(base)
    for density in densities:
        for _, gate in hl.gated_modules(gated):
            gate.alpha.data.zero_()
        hl.set_linear(gated, density, seed=0)
        folded = hl.fold(gated)
        report = hl.fold_report(folded)
        work_gated, work_folded = workloads(gated), workloads(folded)
        with torch.inference_mode():
            same = torch.equal(work_gated["generate"](), work_folded["generate"]())
        flop_ratio = {"ffn": report["total"]["ffn_macs_before"] / report["total"]["ffn_macs_after"]}
        small_gated, small_folded = workloads(gated, sentences=4), workloads(folded, sentences=4)
        for key in ("forward", "generate"):
            flop_ratio[key] = flops(small_gated[key]) / flops(small_folded[key])
        for n in threads:
            torch.set_num_threads(n)
            cells, gated_ms = [], []
            row: dict[str, Any] = {"threads": n, "linear": density, "params_gated": params(gated),
                                   "params_folded": params(folded), "generate_identical": same, "met": True}
            for key in ("ffn", "forward", "generate"):
                result = compare(work_gated[key], work_folded[key], reps, warmup)
                target = TARGETS.get(density, {}).get(key)
                missed = target is not None and result["speedup"] < target
                row["met"] &= not missed
                row[key] = {**result, "flop_ratio": flop_ratio[key]}
                cells.append(f"{result['speedup']:.2f} ({flop_ratio[key]:.2f}){' MISSED' if missed else ''}")
                gated_ms.append(f"{result['gated_ms']:.0f}")
            rows.append(row)
            print(f"| {n} | {density:.0%} | {params(gated) / 1e6:.1f}M -> {params(folded) / 1e6:.1f}M | "
                  + " | ".join(cells) + f" | {' / '.join(gated_ms)} |" + ("" if same else " generate DIFFERS"),
                  flush=True)
    return rows


def vision_rows(threads: list[int], reps: int, warmup: int) -> list[dict[str, Any]]:
    """One row per timm model and thread count, at 90% linear units (printed as it is measured)."""
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    print("\n| model (90% linear) | threads | params gated -> folded | forward x (FLOPs x) | gated ms |")
    print("|---|---|---|---|---|")
    rows = []
    for name in ("resnet18", "vit_tiny_patch16_224"):
        torch.manual_seed(0)
        gated = hl.patch_model(timm.create_model(name, pretrained=False).eval())
        hl.set_linear(gated, 0.9, seed=0)
        folded = hl.fold(gated)
        flop_ratio = flops(lambda: gated(images)) / flops(lambda: folded(images))
        for n in threads:
            torch.set_num_threads(n)
            result = compare(lambda: gated(images), lambda: folded(images), reps, warmup)
            rows.append({"model": name, "threads": n, "linear": 0.9, "params_gated": params(gated),
                         "params_folded": params(folded), "forward": {**result, "flop_ratio": flop_ratio}})
            print(f"| {name} | {n} | {params(gated) / 1e6:.2f}M -> {params(folded) / 1e6:.2f}M | "
                  f"{result['speedup']:.2f} ({flop_ratio:.2f}) | {result['gated_ms']:.0f} |", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each model (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="torch thread counts to measure (default: 1 and all cores)")
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES),
                        help="fractions of linear FFN units (default: 0 0.5 0.75 0.9 1)")
    parser.add_argument("--no_vision", action="store_true", help="skip the ResNet-18 and ViT-Tiny rows")
    parser.add_argument("--json", type=Path, help="also write every row, the settings and the wall time there")
    args = parser.parse_args()
    record = Record()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores; {args.reps} interleaved repetitions after "
          f"{args.warmup} warm-up; speed-up = median of gated/folded time (FLOP ratio in brackets)\n")
    marian = marian_rows(args.densities, args.threads, args.reps, args.warmup)
    vision = [] if args.no_vision else vision_rows(args.threads, args.reps, args.warmup)
    wall = record.save(args.json, reps=args.reps, warmup=args.warmup, marian=marian, vision=vision)
    print(f"\nwall time {wall:.0f} s")
    return 0 if all(row["met"] for row in marian) else 1


if __name__ == "__main__":
    sys.exit(main())
