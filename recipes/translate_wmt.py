"""Train or fine-tune a translation Transformer with linearization gates; report BLEU next to the surviving nonlinearity.

    accelerate launch recipes/translate_wmt.py --config recipes/configs/demo.yaml [--flag value ...]

Outputs in ``output_dir``: the linearized checkpoint (``final/``, its ``generation_config.json`` holding the decoding
settings the recipe translated with), ``results.json``, ``plots/*.png``,
``translations/{validation,test}.txt`` and the model card (``final/README.md``); with ``--fold true`` also the
folded checkpoint (``final_folded/``) and its comparison with the gated model (``results.json`` ``folded``).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    MarianConfig,
    MarianMTModel,
    PreTrainedTokenizerFast,
    Seq2SeqTrainingArguments,
    set_seed,
)

import hf_linearize as hl
from hf_linearize.arguments import LinearizeArguments, OneShotArguments, load_yaml, parse_with_config
from hf_linearize.hub import LINEARIZE_CONFIG_NAME
from hf_linearize.preflight import RunArguments, check_files, check_hub, check_output_dir
from hf_linearize.trainer import patch_for_training
from hf_linearize.interruption import train_or_exit
from hf_linearize.run_outputs import write_run_outputs
from hf_linearize.translation.data import (
    filter_pairs,
    load_hub,
    load_jsonl,
    load_moses,
    load_synthetic,
)
from hf_linearize.translation.metrics import translation_scores
from hf_linearize.translation.tokenizer import train_shared_tokenizer

logger = logging.getLogger("translate_wmt")
PRESETS = Path(__file__).resolve().parent / "configs" / "presets"


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "pretrained seq2seq checkpoint (late), or a linearized checkpoint folder (gates and targets kept)"})
    preset: Optional[str] = field(default=None, metadata={"help": "from scratch: transformer-tiny|mini|small|base"})
    tokenizer_model: str = field(default="unigram", metadata={"help": "from scratch: unigram or bpe"})
    vocab_size: int = field(default=8000, metadata={"help": "from scratch: shared vocabulary size"})
    source_prefix: str = field(default="", metadata={"help": "e.g. 'translate English to German: ' for T5"})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default="wmt16", metadata={"help": "Hub dataset, or 'synthetic'"})
    dataset_config_name: Optional[str] = "de-en"
    data_dir: Optional[str] = field(default=None, metadata={"help": "Moses-style {split}.{lang}[.gz] files"})
    test_split: Optional[str] = field(default=None, metadata={"help": "file prefix used as test, e.g. test_2016_flickr"})
    train_file: Optional[str] = field(default=None, metadata={"help": "JSON lines"})
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    source_lang: str = "en"
    target_lang: str = "de"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    synthetic_train_size: int = 20000
    synthetic_eval_size: int = 500
    max_words: int = field(default=100, metadata={"help": "drop training pairs with a longer side"})
    max_source_length: int = 128
    max_target_length: int = 128


@dataclass
class EvalArguments:
    num_beams: int = 4
    max_new_tokens: int = field(default=200, metadata={"help": "generation limit; hits are reported"})
    eval_before_training: bool = field(default=True, metadata={"help": "score a pretrained model before training"})
    score_splits: str = field(default="validation,test", metadata={
        "help": "comma-separated splits to translate and score (validation, test)"})
    fold: bool = field(default=False, metadata={"help": "also save the folded model (final_folded/) and compare it"})

    def __post_init__(self) -> None:
        unknown = set(self.score_splits.split(",")) - {"validation", "test"}
        if unknown:
            raise ValueError(f"--score_splits {self.score_splits!r} names {sorted(unknown)}; use validation and/or "
                             "test, comma-separated.")


def load_corpus(data: DataArguments) -> datasets.DatasetDict:
    if data.data_dir:
        corpus = load_moses(data.data_dir, data.source_lang, data.target_lang, data.test_split)
    elif data.train_file:
        files = {s: f for s, f in (("train", data.train_file), ("validation", data.validation_file),
                                   ("test", data.test_file)) if f}
        corpus = load_jsonl(files, data.source_lang, data.target_lang)
    elif data.dataset_name == "synthetic":
        corpus = load_synthetic(data.synthetic_train_size, data.synthetic_eval_size)
    else:
        corpus = load_hub(data.dataset_name, data.dataset_config_name, data.source_lang, data.target_lang)
    train, dropped = filter_pairs(datasets.DatasetDict(train=corpus["train"]), data.max_words)
    logger.info("Dropped %d of %d training pairs (empty, or a side over %d words).", dropped["train"],
                len(corpus["train"]), data.max_words)
    if not len(train["train"]):
        raise ValueError(f"No training pairs: {len(corpus['train'])} read from the training data, and every one has "
                         f"an empty side or a side over --max_words {data.max_words} words. Check the training "
                         "files (--data_dir / --train_file).")
    empty = [split for split in ("validation", "test") if split in corpus and not len(corpus[split])]
    if empty:
        raise ValueError(f"The {' and '.join(empty)} data hold no pairs; check the files, or leave them out.")
    corpus["train"] = train["train"]
    for split, limit in (("train", data.max_train_samples), ("validation", data.max_eval_samples),
                         ("test", data.max_eval_samples)):
        if limit is not None and split in corpus:
            corpus[split] = corpus[split].select(range(min(limit, len(corpus[split]))))
    return corpus


def build_model(args: ModelArguments, corpus: datasets.DatasetDict, training: Seq2SeqTrainingArguments):
    """A pretrained checkpoint, or a preset Marian-style model with a tokenizer trained on the training data."""
    if args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        if (Path(args.model_name_or_path) / LINEARIZE_CONFIG_NAME).is_file():  # linearized: its gates and targets
            return hl.from_pretrained(args.model_name_or_path), tokenizer
        return AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path), tokenizer
    preset = PRESETS / f"{args.preset}.yaml"  # checked by check_inputs
    tokenizer_dir = Path(training.output_dir) / "tokenizer"
    with training.main_process_first(desc="train tokenizer"):  # a resumed run keeps its tokenizer
        fresh = training.resume_from_checkpoint is None or not (tokenizer_dir / "tokenizer.json").is_file()
        if fresh and training.local_process_index == 0:
            texts = (text for pair in zip(corpus["train"]["source"], corpus["train"]["target"]) for text in pair)
            train_shared_tokenizer(texts, args.vocab_size, args.tokenizer_model).save_pretrained(tokenizer_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    config = MarianConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                          forced_eos_token_id=tokenizer.eos_token_id, **load_yaml(preset))
    return MarianMTModel(config), tokenizer


def tokenize(corpus: datasets.DatasetDict, tokenizer, model_args: ModelArguments, data: DataArguments,
             training: Seq2SeqTrainingArguments) -> datasets.DatasetDict:
    def encode(batch: dict[str, list[str]]) -> dict[str, Any]:
        encoded = tokenizer([model_args.source_prefix + s for s in batch["source"]],
                            max_length=data.max_source_length, truncation=True)
        encoded["labels"] = tokenizer(text_target=batch["target"], max_length=data.max_target_length,
                                      truncation=True)["input_ids"]
        return encoded

    with training.main_process_first(desc="tokenize"):
        return corpus.map(encode, batched=True, remove_columns=["source", "target"], desc="Tokenizing")


def set_decoding(model, evaluation: EvalArguments) -> None:
    """Put the recipe's decoding settings into ``model.generation_config``: the recipe translates with them (beam
    ``num_beams``, at most ``max_new_tokens``, the model's own length penalty), and the saved checkpoint's
    ``generation_config.json`` records them, so ``model.generate(**tokenizer(sources, padding=True, ...))`` on it
    translates as the recipe did.

    The limit is ``max_length = max_new_tokens + 1`` (an encoder-decoder's ``max_length`` counts the decoder start
    token), not ``max_new_tokens``, and lives in the config, not in ``predict``'s keyword arguments: after its first
    batch ``Seq2SeqTrainer`` fills unset config fields with defaults (``max_length`` 20), and a ``max_new_tokens``
    next to that would clash with it.
    """
    generation = model.generation_config
    generation.num_beams, generation.max_length = evaluation.num_beams, evaluation.max_new_tokens + 1
    generation.max_new_tokens = None


def translate(trainer: hl.LinearizeTrainer, dataset: datasets.Dataset, tokenizer) -> tuple[list[str], int]:
    """Translations of ``dataset`` with the model's generation config (:func:`set_decoding`; all ranks take part and
    get all outputs), and how many of them stopped at the length limit instead of at end-of-sentence."""
    output = trainer.predict(dataset)
    # Under DDP, even batches repeat samples from the start of the dataset at the end; drop them.
    ids = torch.as_tensor(output.predictions)[: len(dataset)]
    ids = torch.where(ids < 0, tokenizer.pad_token_id, ids)
    # generate pads finished beams with the pad or the end-of-sentence token: an output hit the limit iff it has
    # no end-of-sentence token at all.
    stopped = (ids == tokenizer.eos_token_id).any(dim=1)
    return tokenizer.batch_decode(ids, skip_special_tokens=True), int((~stopped).sum())


def score(trainer, corpus, encoded, tokenizer, evaluation, out_dir: Optional[Path]) -> dict[str, dict[str, Any]]:
    """BLEU/chrF of the ``score_splits`` (validation, test); writes translations to ``out_dir`` when given."""
    results = {}
    for split in evaluation.score_splits.split(","):
        if split not in corpus:
            continue
        hypotheses, truncated = translate(trainer, encoded[split], tokenizer)
        results[split] = {**translation_scores(hypotheses, corpus[split]["target"]), "hit_max_new_tokens": truncated}
        if out_dir is not None and trainer.is_world_process_zero():
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{split}.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
        logger.info("%s: BLEU %.2f chrF %.2f", split, results[split]["bleu"], results[split]["chrf"])
    return results


def compare_folded(gated, folded, corpus, encoded, tokenizer, batch_size: int) -> dict[str, Any]:
    """The test (else validation) split translated by the gated and by the folded model, batch by batch with the two
    alternating (each with the decoding settings :func:`set_decoding` put in its config): each one's generate time,
    the speed-up, the fraction of identical translations, and the folded model's BLEU/chrF."""
    split = "test" if "test" in encoded else "validation"
    hypotheses: dict[str, list[str]] = {"gated": [], "folded": []}
    seconds = {"gated": 0.0, "folded": 0.0}
    for start in range(0, len(encoded[split]), batch_size):
        batch = tokenizer.pad({"input_ids": encoded[split][start:start + batch_size]["input_ids"]}, return_tensors="pt")
        for name, model in (("gated", gated), ("folded", folded)):
            began = time.perf_counter()
            with torch.inference_mode():
                ids = model.generate(**batch.to(model.device))
            seconds[name] += time.perf_counter() - began
            hypotheses[name] += tokenizer.batch_decode(ids, skip_special_tokens=True)
    same = sum(a == b for a, b in zip(hypotheses["gated"], hypotheses["folded"])) / max(len(hypotheses["gated"]), 1)
    return {"split": split, "fold_report": dict(hl.fold_report(folded)["total"]), "generate_seconds": seconds,
            "generate_speedup": seconds["gated"] / seconds["folded"], "identical_translations": same,
            "scores": translation_scores(hypotheses["folded"], corpus[split]["target"])}


FSDP_UNTRAINED = ("under FSDP2 the Trainer translates only once train() has sharded the model together with its "
                  "optimizer (transformers issue 39961)")


def can_score_untrained(trainer: hl.LinearizeTrainer, skipped: str) -> bool:
    """Whether ``trainer`` can translate before training: not under FSDP2 (`FSDP_UNTRAINED`), where ``skipped``
    (what the run leaves out) is logged as a warning."""
    if trainer.is_fsdp_enabled:
        logger.warning("Skipping %s: %s. Score the model in a run without FSDP (one process, or DDP).", skipped,
                       FSDP_UNTRAINED)
    return not trainer.is_fsdp_enabled


def check_inputs(model_args: ModelArguments, data: DataArguments, run: RunArguments,
                 training: Seq2SeqTrainingArguments) -> None:
    """The validation pass before anything is built (:mod:`hf_linearize.preflight`): output folder and resume,
    Hub settings, the preset, the data files; ``ValueError`` naming the flag and the fix."""
    check_output_dir(training, run.overwrite_output_dir)
    check_hub(training)
    if not model_args.model_name_or_path:
        if not model_args.preset:
            raise ValueError("Give --model_name_or_path (pretrained) or --preset (from scratch, e.g. "
                             "transformer-small).")
        if not (PRESETS / f"{model_args.preset}.yaml").is_file():
            raise ValueError(f"Unknown --preset {model_args.preset!r}; available: "
                             f"{sorted(p.stem for p in PRESETS.glob('*.yaml'))}.")
    if data.data_dir and not Path(data.data_dir).is_dir():
        raise ValueError(f"--data_dir {data.data_dir} is not a folder; give the folder of the Moses-style "
                         "{split}.{lang}[.gz] files.")
    check_files([("train_file", data.train_file), ("validation_file", data.validation_file),
                 ("test_file", data.test_file)])


def main() -> None:
    try:  # bad inputs: one line and exit 1, before any corpus, tokenizer or model is built
        model_args, data_args, lin_args, eval_args, one_shot_args, run_args, training = parse_with_config(
            (ModelArguments, DataArguments, LinearizeArguments, EvalArguments, OneShotArguments, RunArguments,
             Seq2SeqTrainingArguments))
        check_inputs(model_args, data_args, run_args, training)
        linearize_config = lin_args.to_config()
        corpus = load_corpus(data_args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"{Path(__file__).name}: error: {error}")
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        level=logging.INFO if training.should_log else logging.WARNING)
    if training.resume_from_checkpoint:
        logger.info("Resuming from %s", training.resume_from_checkpoint)
    set_seed(training.seed)
    model, tokenizer = build_model(model_args, corpus, training)
    set_decoding(model, eval_args)
    linearize_config = patch_for_training(model, linearize_config)
    encoded = tokenize(corpus, tokenizer, model_args, data_args, training)
    trainer = hl.LinearizeTrainer(
        model=model, args=training, train_dataset=encoded["train"], eval_dataset=encoded.get("validation"),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer,
        linearize_config=linearize_config)

    output_dir = Path(training.output_dir)
    results: dict[str, Any] = {"settings": {"model": asdict(model_args), "data": asdict(data_args),
                                            "linearize": linearize_config.to_dict(), "eval": asdict(eval_args),
                                            "one_shot": asdict(one_shot_args),
                                            "world_size": training.world_size, "seed": training.seed}}
    if trainer.is_fsdp_enabled and not one_shot_args.train:
        sys.exit(f"{Path(__file__).name}: error: --train false scores the one-shot model without training, and "
                 f"{FSDP_UNTRAINED}; run it without FSDP (one process, or DDP).")
    if model_args.model_name_or_path and eval_args.eval_before_training and can_score_untrained(
            trainer, "the scores before training (--eval_before_training)"):
        results["before_training"] = {"scores": score(trainer, corpus, encoded, tokenizer, eval_args, None),
                                      "path_length": hl.path_length_report(model)}
    if one_shot_args.one_shot_budget is not None:
        # teacher forced: the collated pairs carry labels, from which the decoder inputs are built
        results["one_shot"] = one_shot_args.linearize(model, encoded["train"], trainer.data_collator,
                                                      training.per_device_eval_batch_size,
                                                      progress=trainer.is_world_process_zero())
        # without training, the final scores below are the one-shot scores
        if one_shot_args.train and can_score_untrained(trainer, "the one-shot model's scores before training"):
            results["one_shot"]["scores"] = score(trainer, corpus, encoded, tokenizer, eval_args, None)
    if one_shot_args.fit_targets:
        results["fit_targets"] = one_shot_args.fit(model, encoded["train"], trainer.data_collator,
                                                   training.per_device_eval_batch_size,
                                                   progress=trainer.is_world_process_zero())
    train_result = train_or_exit(trainer, training.resume_from_checkpoint) if one_shot_args.train else None
    scores = score(trainer, corpus, encoded, tokenizer, eval_args, output_dir / "translations")
    if one_shot_args.one_shot_budget is not None and not one_shot_args.train:
        results["one_shot"]["scores"] = scores
    report = hl.path_length_report(model)
    results.update(scores=scores, path_length=report, summary=dict(hl.summary(model)),
                   train=train_result and {"loss": train_result.training_loss, "steps": trainer.state.global_step,
                                           "epochs": trainer.state.epoch,
                                           "runtime_s": train_result.metrics.get("train_runtime")},
                   log_history=trainer.state.log_history)
    headline = scores.get("test") or scores.get("validation") or {}
    trainer.accelerator.wait_for_everyone()
    final_model = trainer.full_model()  # on every rank: under FSDP it gathers the sharded model onto rank 0
    if trainer.is_world_process_zero():
        card = dict(metrics={k: headline[k] for k in ("bleu", "chrf") if k in headline},
                    dataset=data_args.dataset_name if not data_args.data_dir else Path(data_args.data_dir).name,
                    language=[data_args.source_lang, data_args.target_lang],
                    base_model=model_args.model_name_or_path, model_name=output_dir.name)
        if training.push_to_hub:  # saves output_dir/final, then uploads it with its card
            hl.push_to_hub(final_model, training.hub_model_id or output_dir.name, save_directory=output_dir / "final",
                           token=training.hub_token, private=training.hub_private_repo, tokenizer=tokenizer, **card)
        else:
            hl.save_pretrained(final_model, output_dir / "final", tokenizer=tokenizer, **card)
        if eval_args.fold:  # same function, linear units merged away: saved next to the gated model
            folded = hl.fold(final_model.eval())
            results["folded"] = compare_folded(final_model, folded, corpus, encoded, tokenizer,
                                               training.per_device_eval_batch_size)
            hl.fold_report(folded)["total"]["generate_speedup"] = results["folded"]["generate_speedup"]
            hl.save_pretrained(folded, output_dir / "final_folded", tokenizer=tokenizer,
                               **dict(card, model_name=output_dir.name + "-folded"))
            logger.info("folded: generate %.2fx faster, %.0f%% identical translations",
                        results["folded"]["generate_speedup"], 100 * results["folded"]["identical_translations"])
        write_run_outputs(output_dir, results, trainer.state.log_history if train_result else None,
                          f"BLEU {headline.get('bleu', math.nan):.2f}  chrF {headline.get('chrf', math.nan):.2f}")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
