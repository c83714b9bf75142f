"""Train with LinearizeTrainer on every rank of an ``accelerate launch`` run (DDP, or FSDP2 through Accelerate's FSDP
plugin) and write what each rank ends with to ``<out>/rank<k>.pt`` (`record`): the backend, the gates' placements,
the whole gates (gathered with ``full_tensor`` under FSDP), the linear-unit masks, the budget controller and the
``linearize/*`` logs; rank 0 also writes the model's full state dict (as ``accelerator.get_state_dict`` gathers it)
to ``<out>/state_dict.pt``.

Two modes, both run by tests/test_distributed.py with the tests folder on PYTHONPATH:

* ``accelerate launch <backend flags> tests/scripts/distributed_train.py TOKENIZER OUT [CHECKPOINT]``: a tiny
  untied Marian on the synthetic corpus (`main`), saved to ``<out>/final``, with checkpoints every ``SAVE_STEPS``
  steps. ``TOKENIZER``: a folder with the tokenizer of `train_tokenizer` (trained once, before the launch: training
  it is not deterministic); ``CHECKPOINT`` resumes from that checkpoint directory.
* ``accelerate launch <backend flags> tests/scripts/distributed_train.py --timm OUT``: the same for a tiny timm ViT
  on random images (`main_timm`, no resuming).
* ``accelerate launch <backend flags> tests/scripts/distributed_train.py --recipe RECIPE [ARGS ...]``: the recipe
  script itself with its arguments (`run_recipe`); the records go to its ``output_dir`` when the recipe gathers its
  final model (``trainer.full_model()``).

FSDP on CPU: Accelerate 1.15 turns its FSDP plugin on only for accelerator devices (``AcceleratorState`` makes a
run FSDP only from ``MULTI_GPU``/``MULTI_NPU``/...; a CPU run stays ``MULTI_CPU``, i.e. DDP, or, launched without
``--cpu``, ``NO``: one independent run per process). When the launch asks for FSDP and there is no GPU,
`allow_fsdp_on_cpu` makes Accelerate take the gloo CPU processes for a multi-device run: from there on, Accelerate's
FSDP2 preparation (``fully_shard``), state-dict gathering, FSDP checkpointing and the Trainer run unchanged.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import transformers as tf
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from trainer_cases import training_args

import hf_linearize as hl
from hf_linearize.arguments import load_yaml
from hf_linearize.trainer import LinearizeMixin, LinearizePlainTrainer, LinearizeTrainer
from hf_linearize.translation.synthetic import synthetic_pairs
from hf_linearize.translation.tokenizer import train_shared_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 12
SAVE_STEPS = 6
PAIRS = 64
CONFIG = hl.LinearizeConfig(prior_lambda=0.5, prior_warmup=4, budget_target=0.5, budget_gain=0.3, gate_lr=0.2)
"""A budget run: lambda ramps up over 4 steps and grows; units snap, freeze and fill the quota within 12 steps."""


def allow_fsdp_on_cpu() -> None:
    """Let Accelerate run its FSDP plugin on gloo CPU processes (see the module docstring); the device stays the
    CPU (``ACCELERATE_TORCH_DEVICE``)."""
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
        "gloo", DistributedType.MULTI_GPU)


def train_tokenizer(folder: Path) -> None:
    """Train the recipe's shared Unigram tokenizer (120 pieces) on the corpus and save it to ``folder``."""
    train_shared_tokenizer((text for pair in synthetic_pairs(PAIRS) for text in pair), 120).save_pretrained(folder)


def corpus(tokenizer: tf.PreTrainedTokenizerFast) -> list[dict[str, list[int]]]:
    """`PAIRS` pairs of the synthetic English -> German corpus, tokenized as the translation recipe does."""
    pairs = synthetic_pairs(PAIRS)
    sources = tokenizer([s for s, _ in pairs], max_length=32, truncation=True)["input_ids"]
    targets = tokenizer(text_target=[t for _, t in pairs], max_length=32, truncation=True)["input_ids"]
    return [{"input_ids": s, "attention_mask": [1] * len(s), "labels": t} for s, t in zip(sources, targets)]


def translator_config(tokenizer: tf.PreTrainedTokenizerFast, tied: bool) -> tf.MarianConfig:
    """The recipe's transformer-tiny preset for ``tokenizer``, as recipes/translate_wmt.py configures it. ``tied``:
    one embedding shared by encoder, decoder and output (the recipe's model); else one per stack and output."""
    ties = {} if tied else dict(tie_word_embeddings=False, share_encoder_decoder_embeddings=False)
    return tf.MarianConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                           forced_eos_token_id=tokenizer.eos_token_id, **ties,
                           **load_yaml(ROOT / "recipes" / "configs" / "presets" / "transformer-tiny.yaml"))


def tiny_translator(tokenizer: tf.PreTrainedTokenizerFast) -> tf.MarianMTModel:
    """`translator_config`'s untied model, patched with `CONFIG` (the recipe test covers the tied one)."""
    torch.manual_seed(0)
    return hl.patch_model(tf.MarianMTModel(translator_config(tokenizer, tied=False)), CONFIG)


def save_initial_translator(tokenizer_dir: Path, folder: Path) -> None:
    """Save the recipe's tied model (not patched, seed 0) with the tokenizer in ``tokenizer_dir`` to ``folder``: a
    start for ``--model_name_or_path`` that every run shares (the recipe would train a tokenizer of its own)."""
    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    tf.MarianMTModel(translator_config(tokenizer, tied=True)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def fsdp_on_cpu() -> bool:
    """The launch asks for FSDP and there is no GPU: then `allow_fsdp_on_cpu` is applied."""
    return os.environ.get("ACCELERATE_USE_FSDP") == "true" and not torch.cuda.is_available()


def record(trainer: LinearizeMixin, out: Path) -> None:
    """Write what this rank ends with to ``out/rank<k>.pt`` and, on rank 0, the full state dict to
    ``out/state_dict.pt`` (see the module docstring). A collective under FSDP: every rank must call it."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # gathered on every rank: a collective
    gates = list(hl.gated_modules(trainer.model))
    reg = trainer.linearize_callback.regularizer
    if trainer.accelerator.is_main_process:
        torch.save(state_dict, out / "state_dict.pt")
    logs = [{k: v for k, v in entry.items() if k.startswith("linearize/") or k in ("step", "loss")}
            for entry in trainer.state.log_history]
    torch.save({"backend": trainer.accelerator.distributed_type.value,
                "world_size": trainer.accelerator.num_processes,
                "wrapper": type(trainer.model_wrapped).__name__,
                "placements": {name: str(gate.alpha.placements) if isinstance(gate.alpha, DTensor) else "whole"
                               for name, gate in gates},
                "gates": {name: (gate.alpha.full_tensor() if isinstance(gate.alpha, DTensor) else gate.alpha).detach()
                          for name, gate in gates},
                "masks": [m.clone() for m in reg.tracker.masks],
                "controller": reg.controller.state_dict(),
                "linear_units": reg.tracker.linear_units,
                "step": trainer.state.global_step,
                "logs": logs},
               out / f"rank{trainer.accelerator.process_index}.pt")


def launch_args(out: Path, **overrides: Any) -> tf.TrainingArguments:
    """`training_args` for `MAX_STEPS` steps of 4 examples per rank with a checkpoint every `SAVE_STEPS`; on CPU
    DDP (``use_cpu``: ``MULTI_CPU``, gloo), or FSDP through `allow_fsdp_on_cpu` (applied here) when the launch asks
    for it."""
    on_cpu = fsdp_on_cpu()
    if on_cpu:
        allow_fsdp_on_cpu()
    return training_args(out, max_steps=MAX_STEPS, per_device_train_batch_size=4, save_strategy="steps",
                         save_steps=SAVE_STEPS, use_cpu=not on_cpu, **overrides)


def train_and_record(trainer: LinearizeMixin, out: Path, checkpoint: Optional[str] = None) -> None:
    """Train (resuming from ``checkpoint`` when given), save the model to ``out/final`` and `record`."""
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(out / "final"))
    record(trainer, out)


def main(tokenizer_dir: Path, out: Path, checkpoint: Optional[str]) -> None:
    args = launch_args(out)
    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = tiny_translator(tokenizer)
    trainer = LinearizeTrainer(model=model, args=args, train_dataset=corpus(tokenizer), processing_class=tokenizer,
                               data_collator=tf.DataCollatorForSeq2Seq(tokenizer, model=model))
    train_and_record(trainer, out, checkpoint)


def main_timm(out: Path) -> None:
    """A 2-block timm ViT (32 x 32 images, 3 classes, 2 x 768 gated units) patched with `CONFIG`, on 64 random
    images, with LinearizePlainTrainer and a ``compute_loss_func`` (timm models return bare logits)."""
    args = launch_args(out, label_names=["labels"])
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2, img_size=32)
    hl.patch_model(model, CONFIG)
    g = torch.Generator().manual_seed(0)
    images = [{"x": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 3)} for i in range(64)]

    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, labels)

    train_and_record(LinearizePlainTrainer(model=model, args=args, train_dataset=images,
                                           compute_loss_func=cross_entropy), out)


def run_recipe(recipe: Path, args: list[str]) -> None:
    """Run the ``recipe`` script with ``args`` as ``accelerate launch recipe args`` would (FSDP on CPU when the
    launch asks for it); `record` each rank's state into the recipe's ``output_dir`` when it calls
    ``trainer.full_model()`` for its final save."""
    if fsdp_on_cpu():
        allow_fsdp_on_cpu()
    gather = LinearizeMixin.full_model

    def recorded(trainer: LinearizeMixin) -> Optional[torch.nn.Module]:
        record(trainer, Path(trainer.args.output_dir))
        return gather(trainer)

    LinearizeMixin.full_model = recorded
    sys.argv = [str(recipe), *args]
    runpy.run_path(str(recipe), run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1] == "--recipe":
        run_recipe(Path(sys.argv[2]), sys.argv[3:])
    elif sys.argv[1] == "--timm":
        main_timm(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
