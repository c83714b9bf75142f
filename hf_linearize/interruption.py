"""Ctrl-C during training leaves a checkpoint to resume from, instead of losing the run.

`SaveOnInterrupt` is a `TrainerCallback`: the first SIGINT lets the current optimizer step finish, then the Trainer
saves a checkpoint (``output_dir/checkpoint-STEP``, with the gates' training state) and stops; a second SIGINT quits
at once. Under several processes every rank stops at the same step: the request is all-reduced once per step.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

logger = logging.getLogger(__name__)


class SaveOnInterrupt(TrainerCallback):
    """Turns SIGINT during ``Trainer.train`` into "save a checkpoint after this step, then stop".

    After ``train`` returns, :attr:`stopped_at` is the global step it stopped at (``None``: not interrupted) and
    :meth:`resume_hint` the line to print. The handler is installed from ``on_train_begin`` to ``on_train_end``
    (main thread only) and the previous one restored.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: Optional[int] = None
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second Ctrl-C: quit now
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("\nInterrupted: saving a checkpoint after this step, then stopping (Ctrl-C again quits at once).",
              file=sys.stderr, flush=True)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.requested, self.stopped_at = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        requested = self.requested
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(requested)])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def resume_hint(self, output_dir: str) -> str:
        """``Interrupted at step N; the checkpoint is in DIR. Resume with: COMMAND --resume_from_checkpoint true``
        (this process's command line; under several processes, whose worker command lines lack the launcher, the
        launch command to rerun)."""
        step = self.stopped_at
        where = f"Interrupted at step {step}; the checkpoint is in {output_dir}/checkpoint-{step}."
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return f"{where} Resume by running your launch command again with --resume_from_checkpoint true."
        command = shlex.join([sys.executable, *sys.argv])
        return f"{where} Resume with:\n  {command} --resume_from_checkpoint true"


def train_or_exit(trainer: Trainer, resume_from_checkpoint: Union[str, bool, None] = None) -> TrainOutput:
    """``trainer.train(resume_from_checkpoint=...)`` with :class:`SaveOnInterrupt`: after a Ctrl-C the checkpoint is
    saved, the main process prints :meth:`SaveOnInterrupt.resume_hint` to stderr and every process exits with status
    130 (``SystemExit``); otherwise the ``TrainOutput``."""
    interrupt = SaveOnInterrupt()
    trainer.add_callback(interrupt)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if interrupt.stopped_at is not None:
        if trainer.is_world_process_zero():
            print(interrupt.resume_hint(trainer.args.output_dir), file=sys.stderr)
        sys.exit(130)
    return result
