"""Tiny models, synthetic data and Trainer arguments shared by tests/test_trainer.py and tests/scripts/ddp_train.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import transformers as tf
from conftest import FAMILY_CASES

import hf_linearize as hl

VOCAB = 64


def tiny_marian(config: Optional[hl.LinearizeConfig] = None, dropout: float = 0.0, seed: int = 0) -> tf.MarianMTModel:
    """The conftest Marian (2 + 2 layers, 88 gated units) with ``dropout``, patched with ``config``."""
    torch.manual_seed(seed)
    model_config = FAMILY_CASES["marian"]()[0].config
    model_config.dropout = dropout
    torch.manual_seed(seed)
    return hl.patch_model(tf.MarianMTModel(model_config), config)


def budget_config() -> hl.LinearizeConfig:
    """A budget run on `tiny_marian`: lambda ramps up over 4 steps and grows; around step 9 the quota of 53 linear
    units (nonlinear fraction 0.4) fills and the controller switches the prior off."""
    return hl.LinearizeConfig(prior_lambda=0.5, prior_warmup=4, budget_target=0.4, budget_gain=0.2, gate_lr=0.15)


def translation_data(n: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` pairs of 8 source and 6 target token ids; the target is a fixed function of the source."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(3, VOCAB, (n, 8), generator=g)
    target = (source[:, :6] * 7) % (VOCAB - 3) + 3
    return [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": t} for s, t in zip(source, target)]


def training_args(
    output_dir: Union[str, Path], args_class: type[tf.TrainingArguments] = tf.Seq2SeqTrainingArguments, **overrides: Any
) -> tf.TrainingArguments:
    """CPU, deterministic, no trackers, a log every step and no checkpoints unless ``overrides`` say so."""
    defaults = dict(
        output_dir=str(output_dir), max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    return args_class(**{**defaults, **overrides})
