"""Train one shared source/target subword vocabulary with `tokenizers` and wrap it for transformers."""

from __future__ import annotations

from typing import Iterable, Literal

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_shared_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, model: Literal["unigram", "bpe"] = "unigram"
) -> PreTrainedTokenizerFast:
    """A SentencePiece-style (Metaspace) Unigram or BPE tokenizer over source and target text together.

    Ids: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2; every encoded sequence ends with ``</s>``. ``decode`` returns
    detokenized text, ready for sacreBLEU.
    """
    specials = [SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["eos_token"], SPECIAL_TOKENS["unk_token"]]
    if model == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          unk_token=SPECIAL_TOKENS["unk_token"], show_progress=False)
    elif model == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"Tokenizer model must be 'unigram' or 'bpe'; got {model!r}.")
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos = SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
