"""LinearizeTrainer beyond DDP: FSDP2 through Accelerate's FSDP plugin with 2 gloo CPU processes against DDP (gates,
masks, budget, logs), its saved checkpoint and its resume; the translation recipe under the FSDP2 config against
DDP; a timm model's checkpoints under FSDP2; every gate operation and the model-level counts on DTensor shards; and
the refusals of DeepSpeed, FSDP1, an FSDP request that Accelerate does not honour on CPU and ties FSDP2 cannot
shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import accelerate
import pytest
import torch
import transformers.trainer
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from conftest import FAMILY_CASES, GLU_FFN_CASES, free_port, load_script, run, run_subprocess
from torch import nn
from trainer_cases import tiny_marian, training_args, translation_data

import hf_linearize as hl
from hf_linearize.hub import read_checkpoint_metadata
from hf_linearize.trainer import LinearizeTrainer, _group_tied_embeddings, _meta_skeleton, _unsharded_copy

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "scripts"
FSDP2_CONFIG = TESTS.parent / "recipes" / "configs" / "accelerate" / "fsdp2.yaml"
FSDP2_FLAGS = ["--config_file", str(FSDP2_CONFIG)]
RECIPE = TESTS.parent / "recipes" / "translate_wmt.py"
DDP_FLAGS = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"]


def _pythonpath() -> str:
    """PYTHONPATH for the scripts: the tests folder (conftest, trainer_cases, tiny_models) before the caller's."""
    return os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])


def _launch(flags: list[str], *args: str | Path, **env: str) -> subprocess.CompletedProcess:
    """``accelerate launch FLAGS tests/scripts/distributed_train.py ARGS`` on 2 CPU processes; fails the test with
    the output's tail unless it exits 0."""
    # Accelerate and TrainingArguments built in this process write ACCELERATE_*/FSDP_* variables into os.environ;
    # a launch must see only its own flags.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    environment = {**inherited, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "HF_HUB_OFFLINE": "1", "PYTHONPATH": _pythonpath(), **env}
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--main_process_port", str(free_port()),
               str(SCRIPTS / "distributed_train.py"), *map(str, args)]
    done = run_subprocess(command, env=environment)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _train_logs(rank: dict) -> dict[int, dict]:
    """The per-step training logs by step (not the end-of-training summary)."""
    return {entry["step"]: entry for entry in rank["logs"] if "loss" in entry}


def _same_on_every_rank(runs: list[dict]) -> None:
    """Every rank ends with the same whole gates, masks, controller, counts and logs."""
    first, second = runs
    assert all(torch.equal(first["gates"][name], second["gates"][name]) for name in first["gates"])
    assert all(torch.equal(a, b) for a, b in zip(first["masks"], second["masks"]))
    assert (first["controller"], first["linear_units"], first["logs"]) == (
        second["controller"], second["linear_units"], second["logs"])


def _reloads_exactly(out: Path, *folders: str) -> nn.Module:
    """Each checkpoint folder under ``out`` reloads with ``hl.from_pretrained`` bit for bit against the full state
    dict the run gathered (``state_dict.pt``); returns the first one, reloaded."""
    gathered = torch.load(out / "state_dict.pt", weights_only=True)
    models = [hl.from_pretrained(out / folder) for folder in folders]
    for folder, model in zip(folders, models):
        reloaded = model.state_dict()
        assert reloaded.keys() == gathered.keys(), folder
        assert all(torch.equal(reloaded[k], gathered[k]) for k in gathered), folder
    return models[0]


@pytest.mark.slow
def test_fsdp2_trains_like_ddp_saves_exactly_and_resumes(tmp_path):
    """The same 12 steps of a budget run on the synthetic corpus (snapping, freezing and the controller's quota all
    act at step 7) under DDP and under FSDP2 (Accelerate's plugin, recipes/configs/accelerate/fsdp2.yaml; gates
    sharded on dim 0), then FSDP2 resumed from its step-6 checkpoint."""
    tokenizer = tmp_path / "tokenizer"
    load_script(SCRIPTS / "distributed_train.py").train_tokenizer(tokenizer)
    _launch(DDP_FLAGS, tokenizer, tmp_path / "ddp", ACCELERATE_USE_CPU="true")
    _launch(FSDP2_FLAGS, tokenizer, tmp_path / "fsdp")
    _launch(FSDP2_FLAGS, tokenizer, tmp_path / "resumed", tmp_path / "fsdp" / "checkpoint-6")
    ddp, fsdp, resumed = _ranks(tmp_path / "ddp"), _ranks(tmp_path / "fsdp"), _ranks(tmp_path / "resumed")

    def setups(runs: list[dict]) -> list[tuple[str, str, int]]:
        return [(r["backend"], r["wrapper"], r["world_size"]) for r in runs]

    assert setups(ddp) == [("MULTI_CPU", "DistributedDataParallel", 2)] * 2
    assert setups(fsdp) == setups(resumed) == [("FSDP", "FSDPMarianMTModel", 2)] * 2
    assert {p for r in fsdp + resumed for p in r["placements"].values()} == {"(Shard(dim=0),)"}
    for runs in (ddp, fsdp, resumed):
        _same_on_every_rank(runs)

    # FSDP2 = DDP to fp32 rounding, with the same linear units and budget state
    (d, f), (r, _) = (ddp[0], fsdp[0]), resumed
    assert d["linear_units"] == f["linear_units"] == 512  # the quota: 1024 - floor(0.5 * 1024), filled at step 7
    assert all(torch.equal(a, b) for a, b in zip(d["masks"], f["masks"]))
    assert d["controller"] == f["controller"] and f["controller"]["reached_step"] == 7
    for name, alpha in d["gates"].items():
        torch.testing.assert_close(f["gates"][name], alpha)
    ddp_logs, fsdp_logs = _train_logs(d), _train_logs(f)
    assert sorted(fsdp_logs) == list(range(1, 13))
    for step, entry in fsdp_logs.items():
        assert entry["linearize/linear_units"] == ddp_logs[step]["linearize/linear_units"], step
        assert entry["linearize/apl_normalized"] == ddp_logs[step]["linearize/apl_normalized"], step
        assert entry["linearize/task_loss"] == pytest.approx(ddp_logs[step]["linearize/task_loss"], rel=1e-5), step

    # the saved model and the checkpoints are linearized checkpoints that reload bit for bit
    _reloads_exactly(tmp_path / "fsdp", "final", "checkpoint-12")
    at_six = dict(hl.gated_modules(hl.from_pretrained(tmp_path / "fsdp" / "checkpoint-6")))
    assert all(bool((gate.alpha < 1).all()) for gate in at_six.values())  # saved before the first snap

    # resumed at step 6 = the run straight through, exactly
    assert r["step"] == f["step"] == 12
    assert all(torch.equal(r["gates"][name], alpha) for name, alpha in f["gates"].items())
    assert all(torch.equal(a, b) for a, b in zip(r["masks"], f["masks"]))
    assert r["controller"] == f["controller"]
    resumed_logs = _train_logs(r)  # steps 1-6 come back from the checkpoint's trainer state
    assert sorted(resumed_logs) == list(range(1, 13))
    for step, entry in resumed_logs.items():
        straight = fsdp_logs[step]
        assert entry.keys() == straight.keys(), step
        for key in entry.keys() - {"loss", "linearize/task_loss"}:
            assert entry[key] == straight[key], (step, key)
        for key in ("loss", "linearize/task_loss"):
            assert entry[key] == pytest.approx(straight[key], rel=1e-6), (step, key)


@pytest.mark.slow
def test_translation_recipe_under_fsdp2_like_ddp(tmp_path):
    """recipes/translate_wmt.py under ``accelerate launch --config_file recipes/configs/accelerate/fsdp2.yaml`` with 2
    CPU processes on the synthetic corpus, and the same command under DDP: its Marian shares one embedding between
    encoder, decoder and output (the trainer makes it one module for FSDP2). 12 steps of a budget run that fills its
    quota at step 7; then the recipe translates, reports and saves ``final/`` from the gathered model. Both runs
    start from one saved model and tokenizer (the recipe's own tokenizer training is not deterministic)."""
    script = load_script(SCRIPTS / "distributed_train.py")
    tokenizer, start = tmp_path / "tokenizer", tmp_path / "start"
    script.train_tokenizer(tokenizer)
    script.save_initial_translator(tokenizer, start)
    command = ["--recipe", RECIPE, "--config", TESTS.parent / "recipes" / "configs" / "synthetic.yaml",
               "--model_name_or_path", start, "--eval_before_training", "false", "--synthetic_train_size", "400",
               "--synthetic_eval_size", "16", "--max_steps", "12", "--per_device_train_batch_size", "8",
               "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "6", "--num_beams", "2",
               "--max_new_tokens", "16", "--prior_start", "0", "--prior_warmup", "4", "--prior_lambda", "0.5",
               "--budget_target", "0.5", "--budget_gain", "0.3", "--gate_lr", "0.2", "--overwrite_output_dir", "true"]
    _launch(DDP_FLAGS, *command, "--output_dir", tmp_path / "ddp", ACCELERATE_USE_CPU="true")
    fsdp_run = _launch(FSDP2_FLAGS, *command, "--output_dir", tmp_path / "fsdp", "--use_cpu", "false")
    assert "are now one module" in fsdp_run.stderr  # the shared embedding, grouped for FSDP2 and said so
    ddp, fsdp = _ranks(tmp_path / "ddp"), _ranks(tmp_path / "fsdp")
    assert [(r["backend"], r["wrapper"]) for r in ddp + fsdp] == (
        [("MULTI_CPU", "DistributedDataParallel")] * 2 + [("FSDP", "FSDPMarianMTModel")] * 2)
    assert {p for r in fsdp for p in r["placements"].values()} == {"(Shard(dim=0),)"}
    _same_on_every_rank(ddp)
    _same_on_every_rank(fsdp)
    (d, f) = ddp[0], fsdp[0]
    assert d["linear_units"] == f["linear_units"] == 512 and f["controller"]["reached_step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(d["masks"], f["masks"]))
    for name, alpha in d["gates"].items():
        torch.testing.assert_close(f["gates"][name], alpha)

    # final/ holds the gathered model; results.json counts every unit, not one rank's shard
    reloaded = _reloads_exactly(tmp_path / "fsdp", "final")
    assert all(torch.equal(gate.alpha, f["gates"][name]) for name, gate in hl.gated_modules(reloaded))
    assert reloaded.lm_head.weight is reloaded.model.shared.weight  # the recipe's tied model
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("ddp", "fsdp")}
    total = {"units": 1024, "linear": 512, "nonlinear": 512, "nonlinear_fraction": 0.5}
    assert results["fsdp"]["summary"]["total"] == hl.summary(reloaded)["total"] == total
    assert results["fsdp"]["summary"] == results["ddp"]["summary"]
    assert results["fsdp"]["path_length"] == results["ddp"]["path_length"]
    assert results["fsdp"]["path_length"]["normalized_apl"] == hl.average_path_length(reloaded)
    assert results["fsdp"]["settings"]["world_size"] == 2 and results["fsdp"]["train"]["steps"] == 12
    for key in ("linearize/linear_units", "linearize/apl_normalized"):
        assert [e[key] for e in results["fsdp"]["log_history"] if key in e] == [
            e[key] for e in results["ddp"]["log_history"] if key in e], key


@pytest.mark.slow
def test_timm_model_under_fsdp2_saves_linearized_checkpoints(tmp_path):
    """A timm ViT under FSDP2 (Accelerate's plugin, one FSDP group: timm names no layer class to wrap): ``final/``
    (``save_model``) and the checkpoints are linearized timm checkpoints that reload bit for bit."""
    _launch(FSDP2_FLAGS, "--timm", tmp_path)
    runs = _ranks(tmp_path)
    assert [(r["backend"], r["wrapper"]) for r in runs] == [("FSDP", "FSDPVisionTransformer")] * 2
    assert {p for r in runs for p in r["placements"].values()} == {"(Shard(dim=0),)"}
    _same_on_every_rank(runs)
    reloaded = _reloads_exactly(tmp_path, "final", "checkpoint-12")
    assert type(reloaded).__module__.startswith("timm.")
    assert {read_checkpoint_metadata(tmp_path / folder)["backend"] for folder in ("final", "checkpoint-6")} == {"timm"}
    assert all(torch.equal(gate.alpha, runs[0]["gates"][name]) for name, gate in hl.gated_modules(reloaded))


@pytest.mark.slow
def test_gate_operations_on_dtensor_shards():
    """Prior and its gradient, projection, snapping (with a quota chosen across shards), the linear-unit tracker and
    the regularizer with a budget: on FSDP2-style shards (uneven, one empty) the same as on whole tensors. And
    ``summary``, ``linear_units`` and the path lengths of a ``fully_shard``-ed model count all units on every rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(SCRIPTS / "dtensor_gates.py")]
    done = run_subprocess(command, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_is_refused_at_start(tmp_path, monkeypatch, stage):
    """Under Accelerate DeepSpeed steps inside backward and keeps fp32 masters the gate logic does not reach: refused
    when the trainer is built, naming the backends that work. Runs without deepspeed installed: the accelerator
    state reports a DeepSpeed plugin, and the Trainer's DeepSpeed set-up (which needs the package) is skipped."""
    monkeypatch.setattr(accelerate.state.AcceleratorState, "deepspeed_plugin",
                        property(lambda self: DeepSpeedPlugin(zero_stage=stage)))
    monkeypatch.setattr(transformers.trainer, "propagate_args_to_deepspeed", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match=rf"does not support DeepSpeed \(here ZeRO-{stage}\).*Train with DDP .* or "
                                         r"FSDP2 \(recipes/configs/accelerate/fsdp2.yaml\)"):
        LinearizeTrainer(model=tiny_marian(), args=training_args(tmp_path), train_dataset=translation_data())


def test_fsdp1_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerate.state.AcceleratorState, "fsdp_plugin",
                        FullyShardedDataParallelPlugin(fsdp_version=1), raising=False)
    with pytest.raises(ValueError, match="does not support FSDP version 1.*fsdp_version: 2"):
        LinearizeTrainer(model=tiny_marian(), args=training_args(tmp_path), train_dataset=translation_data())


def test_fsdp_that_accelerate_does_not_enable_is_refused(tmp_path, monkeypatch):
    """``accelerate launch --use_fsdp`` on a CPU-only machine: Accelerate leaves FSDP off and every process would
    train alone."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="FSDP was requested, but Accelerate did not enable it.*train with DDP.*"
                                           "set use_cpu.*pass --use_cpu false"):
        LinearizeTrainer(model=tiny_marian(), args=training_args(tmp_path), train_dataset=translation_data())


@pytest.mark.parametrize("case", ["marian", "bart", "t5"])
def test_fsdp2_groups_a_shared_embedding(case):
    """The one embedding that transformers 5 holds in three modules (shared, encoder, decoder; the output ties to it
    too) becomes one module, which torch can shard in one FSDP group, with the same state-dict keys and outputs."""
    model, inputs = FAMILY_CASES[case]()
    hl.patch_model(model.eval())
    before, keys = run(model, inputs), list(model.state_dict())
    encoder, decoder = model.get_encoder(), model.get_decoder()
    assert encoder.embed_tokens is not decoder.embed_tokens
    _group_tied_embeddings(model)
    assert encoder.embed_tokens is decoder.embed_tokens is model.get_input_embeddings()
    assert model.get_output_embeddings().weight is encoder.embed_tokens.weight and list(model.state_dict()) == keys
    torch.testing.assert_close(run(model, inputs), before, rtol=0, atol=0)


def test_fsdp2_refuses_a_tie_it_cannot_group():
    model = FAMILY_CASES["marian"]()[0]
    layers = model.model.encoder.layers
    layers[1].fc1.weight = layers[0].fc1.weight
    with pytest.raises(ValueError, match=r"ties parameters across modules that FSDP2 cannot put in one group \("
                                         r"model\.encoder\.layers\.0\.fc1 = model\.encoder\.layers\.1\.fc1\).*"
                                         r"tie_word_embeddings=False.*or train with DDP"):
        _group_tied_embeddings(model)


@pytest.mark.parametrize("case", ["marian", "llama", "timm_vit"])
def test_unsharded_copy_is_the_model_rebuilt_from_its_state_dict(case):
    """What the main process saves under FSDP2: the model's meta-device skeleton (taken before sharding) holding the
    gathered state dict is the model again (class, gates, ties, non-persistent buffers such as LLaMA's rotary
    frequencies, the current generation config), for transformers and timm models alike."""
    model, inputs = {**FAMILY_CASES, **GLU_FFN_CASES}[case]()
    hl.patch_model(model.eval())
    hl.set_linear(model, 0.5, seed=1)
    skeleton = _meta_skeleton(model)
    assert all(t.is_meta for t in skeleton.state_dict().values())
    if hasattr(model, "generation_config"):
        model.generation_config.num_beams = 3  # changed after the skeleton was taken
    copy = _unsharded_copy(skeleton, model, {k: v.clone() for k, v in model.state_dict().items()})
    assert type(copy) is type(model) and copy is not model
    assert getattr(copy, "generation_config", None) is None or copy.generation_config.num_beams == 3
    assert not any(t.is_meta for t in [*copy.parameters(), *copy.buffers()])
    assert {n for n, _ in copy.named_parameters()} == {n for n, _ in model.named_parameters()}  # ties kept
    assert hl.summary(copy) == hl.summary(model)
    torch.testing.assert_close(run(copy.eval(), inputs), run(model, inputs), rtol=0, atol=0)
