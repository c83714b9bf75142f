"""hf_linearize.interruption: Ctrl-C during training saves a checkpoint after the step and stops; resuming from it
ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_linearize.interruption import SaveOnInterrupt

ROOT = Path(__file__).resolve().parents[1]


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        prediction = self.linear(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(prediction, labels), "logits": prediction}


class Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.sin(torch.arange(4.0) + i)
        return {"x": x, "labels": x.sum()}


class CtrlCAt(TrainerCallback):
    """Sends this process a SIGINT at the end of step ``step``, as a Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def _trainer(out: Path, *callbacks: TrainerCallback) -> Trainer:
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=8, learning_rate=0.1,
                             save_strategy="no", report_to="none", use_cpu=True, seed=0, logging_steps=100)
    return Trainer(model=Regression(), args=args, train_dataset=Data(), callbacks=list(callbacks))


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_model(tmp_path, capsys):
    interrupt = SaveOnInterrupt()
    previous = signal.getsignal(signal.SIGINT)
    trainer = _trainer(tmp_path / "run", CtrlCAt(3), interrupt)
    trainer.train()
    assert interrupt.stopped_at == 3 == trainer.state.global_step
    assert (tmp_path / "run" / "checkpoint-3").is_dir(), "saved although save_strategy is 'no'"
    assert signal.getsignal(signal.SIGINT) is previous, "the handler is restored after training"
    assert "saving a checkpoint after this step" in capsys.readouterr().err
    hint = interrupt.resume_hint(str(tmp_path / "run"))
    assert hint.startswith(f"Interrupted at step 3; the checkpoint is in {tmp_path / 'run'}/checkpoint-3.")
    assert hint.endswith("--resume_from_checkpoint true")

    resumed = _trainer(tmp_path / "run", SaveOnInterrupt())
    resumed.train(resume_from_checkpoint=True)
    straight = _trainer(tmp_path / "straight")
    straight.train()
    assert resumed.state.global_step == 8
    assert torch.equal(resumed.model.linear.weight, straight.model.linear.weight)


@pytest.mark.slow
def test_ctrl_c_in_the_recipe_prints_how_to_resume(tmp_path):
    """The translation recipe under a real SIGINT: exit 130, the resume command, and resuming finishes the run."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "recipes" / "translate_wmt.py"), "--config",
               str(ROOT / "recipes" / "configs" / "synthetic.yaml"), "--output_dir", str(out),
               "--synthetic_train_size", "3000", "--synthetic_eval_size", "8", "--max_steps", "400",
               "--logging_steps", "1", "--max_new_tokens", "8", "--num_beams", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        for line in process.stdout:  # the first training log line: training has begun
            if "'loss'" in line:
                break
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 130, output[-3000:]
    assert "Resume with:" in output and "--resume_from_checkpoint true" in output, output[-3000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (out / "results.json").exists()
    resume = [*command, "--resume_from_checkpoint", "true", "--max_steps", str(int(checkpoints[0].name[11:]) + 2)]
    done = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming from {checkpoints[0]}" in done.stderr
    assert json.loads((out / "results.json").read_text())["train"]["steps"] == int(resume[-1])


def test_the_hint_under_several_processes_names_the_launch_command(monkeypatch):
    """A worker's own command line lacks ``accelerate launch``/``torchrun``: the hint says to rerun the launch."""
    interrupt = SaveOnInterrupt()
    interrupt.stopped_at = 7
    monkeypatch.setenv("WORLD_SIZE", "2")
    hint = interrupt.resume_hint("out/run")
    assert "out/run/checkpoint-7" in hint and "launch command again with --resume_from_checkpoint true" in hint
    assert sys.executable not in hint
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert interrupt.resume_hint("out/run").endswith(" --resume_from_checkpoint true") and sys.executable in \
        interrupt.resume_hint("out/run")
