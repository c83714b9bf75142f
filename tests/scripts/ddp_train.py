"""Train the tiny Marian with LinearizeTrainer on every rank of an ``accelerate launch`` run; write what each
rank ends with to ``<out>/rank<k>.pt`` (gates, world size, model wrapper, linear units, linearize log entries).

Usage: ``accelerate launch --multi_gpu --num_processes 2 ... tests/scripts/ddp_train.py OUT`` with the tests
folder on PYTHONPATH (tests/test_trainer.py::test_ddp_two_processes_keep_identical_gates does this on CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from trainer_cases import budget_config, tiny_marian, training_args, translation_data

import hf_linearize as hl
from hf_linearize.trainer import LinearizeTrainer


def main(out: Path) -> None:
    model = tiny_marian(budget_config(), dropout=0.1)
    trainer = LinearizeTrainer(model=model, args=training_args(out, max_steps=20, per_device_train_batch_size=2),
                               train_dataset=translation_data())
    trainer.train()
    logs = [{k: v for k, v in entry.items() if k.startswith("linearize/")} for entry in trainer.state.log_history]
    torch.save({"gates": {name: gate.alpha.detach() for name, gate in hl.gated_modules(model)},
                "world_size": trainer.accelerator.num_processes,
                "wrapper": type(trainer.model_wrapped).__name__,
                "linear_units": trainer.linearize_callback.regularizer.tracker.linear_units,
                "logs": logs},
               out / f"rank{trainer.accelerator.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
