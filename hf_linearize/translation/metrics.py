"""Corpus-level translation metrics with the `sacrebleu` package (no `evaluate` download needed)."""

from __future__ import annotations

from typing import Sequence

import sacrebleu


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    """sacreBLEU (13a tokenization) and chrF of detokenized ``hypotheses`` against one reference each.

    Also the mean hypothesis and reference lengths in whitespace words, so truncated outputs show up.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    if not references:
        raise ValueError("No references to score against.")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf.corpus_score(list(hypotheses), [list(references)]).score,
        "bleu_signature": str(bleu.get_signature()),
        "mean_hypothesis_words": sum(len(h.split()) for h in hypotheses) / len(hypotheses),
        "mean_reference_words": sum(len(r.split()) for r in references) / len(references),
    }
