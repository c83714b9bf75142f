"""LinearizeTrainer / LinearizeMixin: the prior in compute_loss, schedule, budget, logging, optimizer groups,
checkpoint and exact resume, bf16 autocast, gradient accumulation, and a 2-process DDP run (slow)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import transformers as tf
from conftest import free_port, run_subprocess
from torch import nn
from trainer_cases import budget_config, tiny_marian, training_args, translation_data

import hf_linearize as hl
from hf_linearize.trainer import (
    LINEARIZE_STATE_NAME,
    LinearizePlainTrainer,
    LinearizeTrainer,
    move_gates_to_own_group,
)

TRAINING_KEYS = {"linearize/task_loss", "linearize/prior", "linearize/lambda", "linearize/nonlinear_fraction",
                 "linearize/linear_units", "linearize/newly_linear", "linearize/apl_normalized",
                 "linearize/apl_unnormalized"}


def gates(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: gate.alpha.detach().clone() for name, gate in hl.gated_modules(model)}


def gates_params(model: nn.Module) -> list[nn.Parameter]:
    return [gate.alpha for _, gate in hl.gated_modules(model)]


def train_logs(trainer: tf.Trainer) -> list[dict[str, Any]]:
    """The per-step training logs (not the end-of-training summary)."""
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def marian_trainer(tmp_path: Path, config: hl.LinearizeConfig, dropout: float = 0.0, **args: Any) -> LinearizeTrainer:
    return LinearizeTrainer(model=tiny_marian(config, dropout=dropout), args=training_args(tmp_path, **args),
                            train_dataset=translation_data())


class GateRecorder(tf.TrainerCallback):
    """Gate values after every optimizer step, keyed by ``global_step``."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = gates(model)


class StopAt(tf.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class MLPClassifier(nn.Module):
    """A model outside the families: ``forward(x, labels)`` returns the mean cross-entropy and the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def mlp_classifier(config: hl.LinearizeConfig) -> MLPClassifier:
    torch.manual_seed(0)
    example = {"x": torch.zeros(1, 8), "labels": torch.zeros(1, dtype=torch.long)}
    return hl.patch_model(MLPClassifier(), config, example_inputs=example)


def classification_data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    labels = (x[:, :3] * x[:, 3:6]).argmax(-1)
    return [{"x": xi, "labels": yi} for xi, yi in zip(x, labels)]


def plain_args(output_dir: Path, **overrides: Any) -> tf.TrainingArguments:
    return training_args(output_dir, tf.TrainingArguments, **overrides)


# ------------------------------------------------------------------------------------------------- the prior
def test_large_lambda_linearizes_most_units_and_loss_stays_finite(tmp_path):
    trainer = marian_trainer(tmp_path, hl.LinearizeConfig(prior_lambda=5.0, gate_lr=0.05), max_steps=60)
    result = trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 60 and all(TRAINING_KEYS <= set(entry) for entry in logs)
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["linearize/task_loss"]) for entry in logs)
    assert logs[0]["linearize/prior"] == 5.0  # lambda * mean(1 - a) with every gate at 0
    baseline = marian_trainer(tmp_path / "baseline", hl.LinearizeConfig(), max_steps=1)  # same data, no prior
    baseline.train()
    assert logs[0]["linearize/task_loss"] == pytest.approx(train_logs(baseline)[0]["loss"], rel=1e-6)
    final = logs[-1]
    assert final["linearize/nonlinear_fraction"] <= 0.1
    assert sum(entry["linearize/newly_linear"] for entry in logs) == final["linearize/linear_units"]
    assert final["linearize/apl_normalized"] < logs[0]["linearize/apl_normalized"]
    assert final["linearize/apl_unnormalized"] < logs[0]["linearize/apl_unnormalized"]
    reg = trainer.linearize_callback.regularizer
    for alpha, linear in zip(reg.alphas, reg.tracker.masks):  # projected into [0, 1]; linear units exactly 1
        assert bool(((alpha >= 0) & (alpha <= 1)).all()) and bool((alpha[linear] == 1.0).all())
    assert result.metrics["linearize/nonlinear_fraction"] == final["linearize/nonlinear_fraction"]
    assert math.isfinite(result.metrics["linearize/task_loss"])


def test_zero_lambda_changes_no_gate(tmp_path):
    trainer = marian_trainer(tmp_path, hl.LinearizeConfig(prior_lambda=0.0, gate_lr=0.05), max_steps=10)
    before = gates(trainer.model)
    weights = trainer.model.model.encoder.layers[0].fc1.weight.detach().clone()
    trainer.train()
    assert all(torch.equal(a, before[name]) for name, a in gates(trainer.model).items())
    assert not torch.equal(trainer.model.model.encoder.layers[0].fc1.weight, weights)  # the rest did train
    assert all(entry["linearize/prior"] == 0.0 and entry["linearize/lambda"] == 0.0 for entry in train_logs(trainer))


@pytest.mark.parametrize("start", [8, 0.4])
def test_start_point_and_warmup_are_honoured(tmp_path, start):
    """Update k uses lambda(k); the log at global_step k + 1 reports it. Gates are held before the start."""
    config = hl.LinearizeConfig(prior_lambda=2.0, prior_start=start, prior_warmup=4, gate_lr=0.05)
    trainer = marian_trainer(tmp_path, config, max_steps=20)
    recorder = GateRecorder()
    trainer.add_callback(recorder)
    initial = gates(trainer.model)
    trainer.train()
    lambdas = {entry["step"] - 1: entry["linearize/lambda"] for entry in train_logs(trainer)}
    assert [lambdas[k] for k in range(12)] == [0.0] * 8 + [0.5, 1.0, 1.5, 2.0]
    for step in range(1, 9):
        assert all(torch.equal(recorder.after[step][n], initial[n]) for n in initial), step
    assert any(not torch.equal(recorder.after[9][n], initial[n]) for n in initial)


def test_gates_freeze_after_the_freeze_point(tmp_path):
    config = hl.LinearizeConfig(prior_lambda=2.0, freeze_gates_after=6, gate_lr=0.05)
    trainer = marian_trainer(tmp_path, config, max_steps=12)
    recorder = GateRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    frozen = recorder.after[6]
    assert any(float(alpha.max()) > 0 for alpha in frozen.values())
    for step in range(7, 13):
        assert all(torch.equal(recorder.after[step][n], frozen[n]) for n in frozen), step
    assert [entry["linearize/lambda"] for entry in train_logs(trainer)] == [2.0] * 6 + [0.0] * 6


def test_budget_lands_on_a_nonlinear_fraction_target(tmp_path):
    config = hl.LinearizeConfig(prior_lambda=0.5, budget_target=0.5, budget_gain=0.1, gate_lr=0.02)
    trainer = marian_trainer(tmp_path, config, max_steps=100)
    result = trainer.train()
    metrics = result.metrics
    assert abs(metrics["linearize/nonlinear_fraction"] - 0.5) <= 0.02
    assert abs(metrics["linearize/budget_error"]) <= 0.02 and metrics["linearize/budget_target"] == 0.5
    reached = metrics["linearize/budget_reached_step"]
    assert 0 < reached < 100
    logs = train_logs(trainer)
    assert logs[reached]["linearize/budget_error"] == pytest.approx(logs[reached]["linearize/nonlinear_fraction"] - 0.5)
    assert [entry["linearize/lambda"] for entry in logs[:3]] == pytest.approx([0.5, 0.5 * math.exp(0.1),
                                                                              0.5 * math.exp(0.2)])
    assert logs[-1]["linearize/lambda"] == 0.0  # at the target the prior is off


def test_normalized_apl_budget_is_measured_on_the_path_graph(tmp_path):
    config = hl.LinearizeConfig(prior_lambda=0.5, budget_target=1.2, budget_metric="normalized_apl", gate_lr=0.05)
    trainer = marian_trainer(tmp_path, config, max_steps=40)
    trainer.train()
    controller = trainer.linearize_callback.regularizer.controller
    last = train_logs(trainer)[-1]
    assert controller.last_measured == pytest.approx(hl.average_path_length(trainer.model))
    assert last["linearize/budget_error"] == pytest.approx(last["linearize/apl_normalized"] - 1.2)
    assert last["linearize/apl_normalized"] <= 1.2  # reached (no quota here: lockstep gates may overshoot)


# ------------------------------------------------------------------------------------------------- plumbing
def test_gates_get_their_own_parameter_group(tmp_path):
    trainer = marian_trainer(tmp_path, hl.LinearizeConfig(gate_lr=0.07), weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    gate_ids = {id(a) for a in gates_params(trainer.model)}
    *model_groups, gate_group = optimizer.param_groups
    assert {id(p) for p in gate_group["params"]} == gate_ids
    assert gate_group["lr"] == 0.07 and gate_group["weight_decay"] == 0.0
    assert not any(id(p) in gate_ids for group in model_groups for p in group["params"])
    assert {group["weight_decay"] for group in model_groups} == {0.1, 0.0}
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_gate_group_without_gate_lr_uses_the_model_learning_rate():
    model = tiny_marian()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    move_gates_to_own_group(optimizer, gates_params(model), lr=3e-4)
    assert optimizer.param_groups[-1]["lr"] == 3e-4
    with pytest.raises(ValueError, match="Only 0 of 4 gate parameters are in the optimizer"):
        move_gates_to_own_group(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), gates_params(model), 1.0)


def test_evaluation_loss_has_no_prior(tmp_path):
    trainer = marian_trainer(tmp_path, hl.LinearizeConfig(prior_lambda=100.0), max_steps=2)
    trainer.train()
    eval_loss = trainer.evaluate(translation_data(8, seed=1))["eval_loss"]
    model = trainer.model.eval()
    batch = {k: torch.stack([row[k] for row in translation_data(8, seed=1)]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        assert eval_loss == pytest.approx(model(**batch).loss.item(), rel=1e-5)


@pytest.mark.parametrize("case", ["marian", "mlp"])
def test_prior_weight_does_not_depend_on_gradient_accumulation(tmp_path, case):
    """The prior's step is the same for 1 x 4 and 2 x 2 (SGD, where a prior counted twice would show); the
    scaled-loss path (``compute_loss_func``) is covered by the timm test below."""
    config = hl.LinearizeConfig(prior_lambda=8.8, gate_lr=1.0)

    def final_gates(accumulation: int) -> dict[str, torch.Tensor]:
        args = dict(max_steps=3, per_device_train_batch_size=4 // accumulation,
                    gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.1,
                    lr_scheduler_type="constant", max_grad_norm=0.0)
        if case == "marian":
            trainer = marian_trainer(tmp_path / str(accumulation), config, **args)
        else:
            trainer = LinearizePlainTrainer(model=mlp_classifier(config),
                                            args=plain_args(tmp_path / str(accumulation), **args),
                                            train_dataset=classification_data())
        assert not trainer._loss_is_scaled_for_ga(num_items_in_batch=4)
        trainer.train()
        return gates(trainer.model)

    once, accumulated = final_gates(1), final_gates(2)
    assert min(float(alpha.min()) for alpha in once.values()) > 0.2  # the prior alone adds lambda / N * lr = 0.1
    # to every gate per step; a prior counted twice under accumulation would add 0.2
    for name in once:
        torch.testing.assert_close(accumulated[name], once[name], atol=1e-3, rtol=0)


def test_marian_task_loss_is_a_mean_under_gradient_accumulation(tmp_path):
    """Marian ignores num_items_in_batch (family ``mean_task_loss``): the logged loss must not grow with accumulation."""
    def first_loss(accumulation: int) -> float:
        trainer = marian_trainer(tmp_path / str(accumulation), hl.LinearizeConfig(), max_steps=1, logging_steps=1,
                                 per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation)
        assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        return train_logs(trainer)[0]["loss"]

    assert first_loss(2) == pytest.approx(first_loss(1), rel=1e-3)


class AuxiliaryClassifier(MLPClassifier):
    """An MLP classifier plus a gated auxiliary branch that only the loss uses, not the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x, labels)
        return {"loss": out["loss"] + self.aux(x).pow(2).mean(), "logits": out["logits"]}


def test_site_off_the_path_graph_adds_nothing_to_the_logged_path_length(tmp_path):
    """A gated site on no input-to-logits path (an auxiliary branch only the loss uses) adds 0: the logged APL is
    the classifier's chain of two gated layers."""
    torch.manual_seed(0)
    example = {"x": torch.zeros(1, 8), "labels": torch.zeros(1, dtype=torch.long)}
    model = hl.patch_model(AuxiliaryClassifier(), hl.LinearizeConfig(prior_lambda=1.0, gate_lr=0.05),
                           example_inputs=example)
    trainer = LinearizePlainTrainer(model=model, args=plain_args(tmp_path, max_steps=2, logging_steps=1),
                                    train_dataset=classification_data())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "linearize/apl_normalized" in entry]
    assert logged and logged[-1]["linearize/apl_normalized"] == pytest.approx(hl.average_path_length(model))
    assert hl.path_length_report(model)["layers"]["aux.1"]["calls"] == 0


def test_plain_trainer_on_a_timm_model_with_compute_loss_func(tmp_path):
    """The scaled-loss path: with ``compute_loss_func`` the Trainer does not divide the loss by the micro-batch
    count, so the prior must be divided instead. 1 x 4 and 2 x 2 then give the same gates (SGD: a prior counted
    once per micro-batch would move every gate twice as far)."""
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]
    units = 2 * 4 * 192  # two blocks, MLP width 4 x 192
    config = hl.LinearizeConfig(prior_lambda=0.1 * units, gate_lr=1.0)  # the prior alone: +0.1 per gate per step

    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch

    def train(accumulation: int) -> LinearizePlainTrainer:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2, img_size=32)
        hl.patch_model(model, config)
        args = plain_args(tmp_path / str(accumulation), max_steps=3, label_names=["labels"], optim="sgd",
                          learning_rate=0.01, lr_scheduler_type="constant", max_grad_norm=0.0,
                          per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation)
        trainer = LinearizePlainTrainer(model=model, args=args, train_dataset=data, compute_loss_func=cross_entropy)
        assert trainer._loss_is_scaled_for_ga(num_items_in_batch=None)
        trainer.train()
        return trainer

    once, accumulated = train(1), train(2)
    assert hl.summary(once.model)["total"]["units"] == units
    logs = train_logs(accumulated)
    assert len(logs) == 3 and all(TRAINING_KEYS <= set(entry) for entry in logs)
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert logs[0]["linearize/prior"] == pytest.approx(config.prior_lambda)  # every gate at 0: lambda * mean(1)
    first, second = gates(once.model), gates(accumulated.model)
    assert min(float(alpha.min()) for alpha in first.values()) > 0.2  # 3 steps of +0.1 from the prior
    for name in first:  # a prior counted twice would put these 0.3 apart
        torch.testing.assert_close(second[name], first[name], atol=1e-3, rtol=0)


def test_bf16_autocast_keeps_fp32_gates(tmp_path):
    trainer = marian_trainer(tmp_path, hl.LinearizeConfig(prior_lambda=1.0, gate_lr=0.05), max_steps=5, bf16=True)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    for alpha in gates_params(trainer.model):
        assert alpha.dtype == torch.float32 and bool(torch.isfinite(alpha).all()) and bool(alpha.any())
    assert all(math.isfinite(entry["loss"]) for entry in train_logs(trainer))


# ------------------------------------------------------------------------------------------------- checkpoints
def test_resume_is_exact(tmp_path):
    """20 steps straight = 6 steps | resume, 6 more | resume, 8 more. Budget, warm-up, snapping and dropout are in
    play: at step 6 lambda is mid-way up its ramp and the controller's growth, at step 12 the quota of linear
    units is filled and frozen and the controller holds the prior off."""
    config = budget_config()
    straight = marian_trainer(tmp_path / "straight", config, dropout=0.1)
    straight.train()

    linear_units, logs = [], {}
    for part, (resume, stop) in enumerate([(None, 6), (True, 12), (True, None)]):
        trainer = LinearizeTrainer(model=tiny_marian(config, dropout=0.1, seed=part),  # the checkpoint's weights win
                                   args=training_args(tmp_path / "parts", save_strategy="steps", save_steps=6),
                                   train_dataset=translation_data())
        if stop is not None:
            trainer.add_callback(StopAt(stop))
        trainer.train(resume_from_checkpoint=resume)
        linear_units.append(trainer.linearize_callback.regularizer.tracker.linear_units)
        logs.update({entry["step"]: entry for entry in train_logs(trainer)})
    assert (tmp_path / "parts" / "checkpoint-6" / LINEARIZE_STATE_NAME).is_file()
    assert linear_units == [0, 53, 53]  # 53 = 88 - floor(0.4 * 88): the quota

    assert all(torch.equal(a, b) for a, b in zip(gates_params(trainer.model), gates_params(straight.model)))
    reg, ref = trainer.linearize_callback.regularizer, straight.linearize_callback.regularizer
    assert reg.controller.state_dict() == ref.controller.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(reg.tracker.masks, ref.tracker.masks))
    for entry in train_logs(straight):
        again = logs[entry["step"]]
        for key in TRAINING_KEYS - {"linearize/task_loss"}:
            assert again[key] == entry[key], (entry["step"], key)
        assert again["linearize/task_loss"] == pytest.approx(entry["linearize/task_loss"], rel=1e-6)


def test_saved_model_is_a_linearized_checkpoint(tmp_path):
    trainer = marian_trainer(tmp_path, hl.LinearizeConfig(prior_lambda=5.0, gate_lr=0.05), max_steps=30)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    assert {"config.json", "linearize_config.json", "model.safetensors", "README.md", "training_args.bin"} <= {
        p.name for p in (tmp_path / "final").iterdir()}
    loaded = hl.from_pretrained(tmp_path / "final")
    assert all(torch.equal(a, b) for a, b in zip(gates_params(loaded), gates_params(trainer.model)))
    assert hl.summary(loaded)["total"] == hl.summary(trainer.model)["total"]


# ------------------------------------------------------------------------------------------------- errors
def test_errors_say_what_to_do(tmp_path):
    model = tf.MarianMTModel(tiny_marian().config)
    with pytest.raises(ValueError, match="not patched; call hf_linearize.patch_model"):
        LinearizeTrainer(model=model, args=training_args(tmp_path))
    with pytest.raises(ValueError, match=r"differs from the model's patching settings in \['gate_init'\]"):
        LinearizeTrainer(model=tiny_marian(), args=training_args(tmp_path),
                         linearize_config=hl.LinearizeConfig(gate_init=0.5))
    plain = tf.Seq2SeqTrainer(model=tiny_marian(), args=training_args(tmp_path / "plain", max_steps=2, save_steps=2,
                                                                       save_strategy="steps"),
                              train_dataset=translation_data())
    plain.train()
    trainer = marian_trainer(tmp_path / "plain", hl.LinearizeConfig(), max_steps=4)
    with pytest.raises(FileNotFoundError, match="was not written by a LinearizeTrainer"):
        trainer.train(resume_from_checkpoint=True)


def test_apl_budget_on_a_model_outside_the_families(tmp_path):
    """Its path graph is traced from its forward pass: an APL budget trains, and path lengths are logged."""
    apl_budget = hl.LinearizeConfig(budget_target=1.0, budget_metric="normalized_apl")
    trainer = LinearizePlainTrainer(model=mlp_classifier(apl_budget),
                                    args=plain_args(tmp_path, max_steps=2, logging_steps=1),
                                    train_dataset=classification_data())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "linearize/apl_normalized" in entry]
    assert logged and 0.0 <= logged[-1]["linearize/apl_normalized"] <= 2.0


def test_linearize_config_override_is_used_and_recorded(tmp_path):
    model = tiny_marian()
    config = hl.LinearizeConfig(prior_lambda=3.0)
    trainer = LinearizeTrainer(model=model, args=training_args(tmp_path, max_steps=1), linearize_config=config,
                               train_dataset=translation_data())
    trainer.train()
    assert train_logs(trainer)[0]["linearize/lambda"] == 3.0
    assert hl.patching.patch_state(model).config is config


# ------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_processes_keep_identical_gates(tmp_path):
    """``accelerate launch --multi_gpu`` with 2 CPU processes (gloo): every rank ends with the same gates."""
    script = Path(__file__).parent / "scripts" / "ddp_train.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), str(tmp_path)]
    done = run_subprocess(command, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [(r["world_size"], r["wrapper"]) for r in ranks] == [(2, "DistributedDataParallel")] * 2
    assert ranks[0]["gates"].keys() == ranks[1]["gates"].keys()
    for name, alpha in ranks[0]["gates"].items():
        assert torch.equal(alpha, ranks[1]["gates"][name]), name
    assert ranks[0]["linear_units"] == ranks[1]["linear_units"] > 0
    assert ranks[0]["logs"] == ranks[1]["logs"]
    first = next(entry for entry in ranks[0]["logs"] if "linearize/task_loss" in entry)
    assert first["linearize/task_loss"] < 1.2 * math.log(64)  # a mean over both ranks, not their sum
