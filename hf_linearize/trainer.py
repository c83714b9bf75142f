"""`LinearizeTrainer`: train a patched model with the sparsity prior toward linearity.

Thin glue from `transformers.Trainer` hooks to :class:`hf_linearize.sparsity.GateRegularizer`. The settings
(prior, schedule, budget, ``gate_lr``, threshold) come from the model's `LinearizeConfig`
(``patch_model(model, config)``) or from the trainer's ``linearize_config=`` argument.

=======================================  =========================================================================
hook                                     what it does
=======================================  =========================================================================
``compute_loss`` (training only)         task loss + ``lambda(step) * mean(1 - a)`` over all gated units
``on_pre_optimizer_step`` (callback)     after gradient clipping: zero the gradients of frozen units / held gates
``on_optimizer_step`` (callback)         re-pin frozen units, snap ``a >= 1 - eps`` to exactly 1, clamp into
                                         [0, 1], update the budget controller
``log``                                  adds the ``linearize/*`` metrics to every training log and the summary
``create_optimizer``                     the gates get a parameter group of their own: ``gate_lr``, no weight decay
``_save_checkpoint`` / ``train``         ``linearize_state.pt`` in every checkpoint, restored on resume
``_save``                                the linearized checkpoint format (:func:`hf_linearize.hub.save_pretrained`)
=======================================  =========================================================================

``step`` is ``TrainerState.global_step``, the number of optimizer steps completed. Fractional schedule
positions are fractions of ``state.max_steps``.

Loss scaling. The Trainer divides the loss of each micro-batch by the number of gradient-accumulation
micro-batches unless that loss is already normalised over the whole accumulated batch (``num_items_in_batch``,
``compute_loss_func``); the prior is divided by the micro-batch count exactly when the Trainer does not do it,
so every optimizer step gets the prior's gradient once, whatever ``gradient_accumulation_steps`` is. Under
data parallelism each rank adds the same prior and gradients are averaged, so it also counts once. The logged
``linearize/task_loss`` is the Trainer's ``loss`` minus the prior term, so it follows the Trainer's convention.

Task loss (transformers 5.x): the Trainer takes the loss of any model whose ``forward`` has ``**kwargs`` as
normalised by ``num_items_in_batch``, but Marian, BART, mBART, M2M100, Pegasus, Blenderbot, PLBart, FSMT and T5
compute a plain mean and ignore it, so their task loss would not be divided under gradient accumulation and
would be multiplied by the world size under DDP. For families marked ``mean_task_loss`` in the family table
(and no ``compute_loss_func``) the trainer sets ``model_accepts_loss_kwargs = False``, which gives the plain
mean everywhere.

Distributed. Under DDP every rank holds whole gates; the gates' gradients are all-reduced with the rest, so the
gates stay identical on all ranks. Under FSDP2 (Accelerate's plugin with ``fsdp_version: 2``) each gate is a
``DTensor`` sharded on dim 0; `hf_linearize.sparsity` gathers the gates wherever it needs more than one unit
(snapping with the quota, masks, counts), so that masks, budget controller and ``linearize_state.pt`` are global
and the same on every rank, and the prior's gradient reaches each shard once. The path graph is traced when the
trainer is built (before any sharding); the logged APLs use the gathered counts. When the trainer is built under
FSDP2 it also makes an embedding that encoder and decoder share in separate modules one module (torch shards a tied
parameter only within one FSDP group; `_group_tied_embeddings`) and keeps a meta-device skeleton of the model.
``save_model`` and checkpoints write the linearized format (transformers and timm models) from the state dict
Accelerate gathers on the main process, loaded into a copy of that skeleton (`_unsharded_copy`); `full_model`
gives the same plain copy to a script's final save. DeepSpeed (any ZeRO stage), FSDP1, and an FSDP request that
Accelerate does not honour (on CPU) are refused when the trainer is built (`_check_backend`). Both backends were
checked with 2 gloo processes on CPU (tests/test_trainer.py, tests/test_distributed.py).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate.utils import parse_flag_from_env
from torch import nn
from transformers import (
    Seq2SeqTrainer,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from . import hub
from .config import LinearizeConfig
from .core_map import traced_structure
from .families import family_by_name
from .patching import gated_modules, is_patched, patch_model, patch_state
from .path_length import PathGraph, apl
from .sparsity import GateRegularizer, gate_stats, linear_counts
from .traced_graph import TracedStructure

__all__ = [
    "LINEARIZE_STATE_NAME",
    "LinearizeCallback",
    "LinearizeMixin",
    "LinearizePlainTrainer",
    "LinearizeTrainer",
    "move_gates_to_own_group",
]

logger = logging.get_logger(__name__)

LINEARIZE_STATE_NAME = "linearize_state.pt"
"""File in every checkpoint directory: `GateRegularizer.state_dict()` (linear-unit masks, controller state)."""

PATCHING_FIELDS = ("target_modules", "exclude_modules", "gate_init", "linear_threshold")
"""`LinearizeConfig` fields fixed by patching; a ``linearize_config=`` override must keep the model's values."""


def patch_for_training(model: nn.Module, config: LinearizeConfig) -> LinearizeConfig:
    """Patch ``model`` with ``config`` and return ``config``. A model patched already (a linearized checkpoint from
    :func:`~hf_linearize.from_pretrained`, e.g. a baseline to fine-tune late) keeps its gates, targets and patching
    settings; the returned config takes those from the model and everything else (prior, schedule, budget) from
    ``config``: pass it to the trainer as ``linearize_config=``."""
    if not is_patched(model):
        patch_model(model, config)
        return config
    return dataclasses.replace(config, **{f: getattr(patch_state(model).config, f) for f in PATCHING_FIELDS})


class LinearizeCallback(TrainerCallback):
    """The gate logic around every optimizer step, and the numbers that `LinearizeMixin` logs.

    Holds the `GateRegularizer` of the current ``train()`` call: built in ``on_train_begin`` (once
    ``state.max_steps`` is known) and loaded from ``resume_state`` (a checkpoint's ``linearize_state.pt``) when
    that is set. `LinearizeMixin` creates, registers and drives it; it is not meant to be added on its own.
    """

    def __init__(self, config: LinearizeConfig) -> None:
        self.config = config
        self.regularizer: Optional[GateRegularizer] = None
        self.resume_state: Optional[dict[str, Any]] = None
        self._structure: Optional[TracedStructure] = None
        self._sites: list[str] = []
        self._lambda = 0.0
        self._reset_window()
        self._run_prior, self._run_steps = 0.0, 0

    # --------------------------------------------------------------------------------------- Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        gates = list(gated_modules(model))
        if not gates:
            raise ValueError("The model has no gates; call hf_linearize.patch_model(model) before training.")
        measure = None
        if self.config.budget_target is not None and self.config.budget_metric == "normalized_apl":
            measure = self._normalized_apl
        self._sites = [name for name, _ in gates]
        self.regularizer = GateRegularizer.from_config([gate.alpha for _, gate in gates], self.config,
                                                       total_steps=state.max_steps, measure=measure)
        if self.resume_state is not None:
            self.regularizer.load_state_dict(self.resume_state)
        self._reset_window()
        self._run_prior, self._run_steps = 0.0, 0

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        reg = self._require()
        step = state.global_step
        self._lambda = reg.lambda_at(step)
        with torch.no_grad():
            prior = float(reg.loss(step))  # this update's prior term, before the optimizer moves the gates
        self._window_prior += prior
        self._window_steps += 1
        self._run_prior += prior
        self._run_steps += 1
        reg.before_step(step)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._window_newly += int(self._require().after_step(state.global_step)["newly_linear"])

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        controller = self.regularizer.controller if self.regularizer is not None else None
        if controller is not None:
            step = controller.reached_step
            reached = "never reached" if step is None else f"reached at step {step}"
            error = "not measured" if controller.error is None else f"final error {controller.error:+.4f}"
            logger.info(f"Budget {self.config.budget_metric} = {controller.target}: {reached}, {error}.")

    # --------------------------------------------------------------------------------------- for the mixin
    def trace(self, model: nn.Module) -> None:
        """Trace the path-graph structure of the (still unwrapped) ``model`` once, before a backend such as FSDP shards
        it; the logged path lengths and an APL budget then need only the gate counts. A model that cannot be traced
        logs no path lengths (warned here), and an APL budget on it raises ``NotImplementedError``."""
        apl_budget = self.config.budget_target is not None and self.config.budget_metric == "normalized_apl"
        try:
            self._structure = traced_structure(model)
        except NotImplementedError as err:
            if apl_budget:
                raise NotImplementedError(
                    f"A normalized_apl budget needs the model's path graph: {err} Use budget_metric="
                    "'nonlinear_fraction' for this model."
                ) from None
            logger.warning(f"Not logging path lengths: {err}")

    def prior_loss(self, step: int) -> torch.Tensor:
        """The prior term of update ``step`` (0-dim fp32 tensor, differentiable in the gates)."""
        return self._require().loss(step)

    def window_metrics(self, loss: float) -> dict[str, float]:
        """Metrics of the optimizer steps since the last log (empty if none), then start a new window.

        ``loss`` is the Trainer's logged loss over the same steps (task + prior), so
        ``linearize/task_loss = loss - linearize/prior``; both are means over the window.
        """
        if self.regularizer is None or self._window_steps == 0:
            return {}
        prior = self._window_prior / self._window_steps
        metrics = {
            "linearize/task_loss": loss - prior,
            "linearize/prior": prior,
            "linearize/lambda": self._lambda,
            "linearize/newly_linear": self._window_newly,
            **self._state_metrics(),
        }
        self._reset_window()
        return metrics

    def run_metrics(self, train_loss: float) -> dict[str, float]:
        """End-of-training summary: mean task loss of this ``train()`` call and the final gate, path-length and
        budget state (``linearize/budget_reached_step`` only when the target was reached)."""
        if self.regularizer is None:
            return {}
        metrics = self._state_metrics()
        if self._run_steps:
            metrics["linearize/task_loss"] = train_loss - self._run_prior / self._run_steps
        if self.regularizer.controller is not None:
            metrics["linearize/budget_target"] = self.regularizer.controller.target
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self._require().state_dict()

    # --------------------------------------------------------------------------------------- internals
    def _require(self) -> GateRegularizer:
        if self.regularizer is None:
            raise RuntimeError("The linearization prior is built when training starts; call trainer.train() first.")
        return self.regularizer

    def _reset_window(self) -> None:
        self._window_prior, self._window_steps, self._window_newly = 0.0, 0, 0

    def _state_metrics(self) -> dict[str, float]:
        reg = self._require()
        stats = gate_stats(reg.alphas, reg.eps)
        metrics: dict[str, float] = {
            "linearize/nonlinear_fraction": stats["nonlinear_fraction"],
            "linearize/linear_units": stats["linear_units"],
            **self._apl_metrics(),
        }
        controller = reg.controller
        if controller is not None and controller.error is not None:
            metrics["linearize/budget_error"] = controller.error
            if controller.reached_step is not None:
                metrics["linearize/budget_reached_step"] = controller.reached_step
        return metrics

    def _apl_metrics(self) -> dict[str, float]:
        """Both APL forms, or nothing for a model without a path graph (warned by `trace`)."""
        if self._structure is None:
            return {}
        graph = self._path_graph()
        return {"linearize/apl_normalized": apl(graph, normalized=True),
                "linearize/apl_unnormalized": apl(graph, normalized=False)}

    def _path_graph(self) -> PathGraph:
        """The traced path graph with the current nonlinear counts of the regularizer's gates (over all shards)."""
        reg = self._require()
        linear = linear_counts(reg.alphas, reg.eps)
        sites = {name: (a.numel(), a.numel() - n) for name, a, n in zip(self._sites, reg.alphas, linear)}
        return self._structure.graph(sites, 0.0)

    def _normalized_apl(self) -> float:
        return apl(self._path_graph(), normalized=True)


def _load_state(checkpoint: Union[str, os.PathLike]) -> dict[str, Any]:
    """The regularizer state saved in a checkpoint directory by `LinearizeMixin`."""
    path = Path(checkpoint) / LINEARIZE_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {checkpoint} was not written by a LinearizeTrainer, so the linear units and the "
            "budget controller cannot be restored. Resume from a checkpoint of a LinearizeTrainer run, or start a "
            "new run from its weights (hf_linearize.hub.from_pretrained)."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def move_gates_to_own_group(optimizer: torch.optim.Optimizer, gates: list[nn.Parameter], lr: float) -> None:
    """Take ``gates`` out of the optimizer's parameter groups and give them a group of their own with learning
    rate ``lr`` and no weight decay (groups left empty are dropped). Call before the first step."""
    ids = {id(p) for p in gates}
    moved = sum(id(p) in ids for group in optimizer.param_groups for p in group["params"])
    if moved != len(ids):
        raise ValueError(
            f"Only {moved} of {len(ids)} gate parameters are in the optimizer. Keep the gates trainable "
            "(requires_grad=True) and use an optimizer built from model.parameters(), or pass your own optimizer "
            "through Trainer(optimizers=...) with the gates in it."
        )
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
    optimizer.add_param_group({"params": list(gates), "lr": lr, "weight_decay": 0.0})


class LinearizeMixin:
    """Adds the linearization prior to a `transformers.Trainer` class: ``class T(LinearizeMixin, Trainer)``.

    Keyword argument besides the Trainer's own:
        linearize_config: replaces the model's `LinearizeConfig` for training and is recorded on the model (so
            checkpoints carry it); its patching fields (target_modules, exclude_modules, gate_init,
            linear_threshold) must equal the model's.

    Attributes:
        linearize_config: the settings in use.
        linearize_callback: the `LinearizeCallback`; ``linearize_callback.regularizer`` is the run's
            `GateRegularizer` (gate tensors, linear-unit tracker, budget controller) once ``train()`` started.
    """

    def __init__(self, *args: Any, linearize_config: Optional[LinearizeConfig] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fsdp_requested = self.args.fsdp_plugin_args is not None or parse_flag_from_env("ACCELERATE_USE_FSDP")
        _check_backend(self.accelerator.state, fsdp_requested, self.args.use_cpu)
        state = patch_state(self.model)
        if linearize_config is not None:
            if not isinstance(linearize_config, LinearizeConfig):
                raise TypeError(f"linearize_config must be a LinearizeConfig; got {type(linearize_config).__name__}.")
            differ = [f for f in PATCHING_FIELDS if getattr(linearize_config, f) != getattr(state.config, f)]
            if differ:
                raise ValueError(
                    f"linearize_config differs from the model's patching settings in {differ}. Start from the "
                    "model's config: dataclasses.replace(hf_linearize.patching.patch_state(model).config, "
                    "prior_lambda=..., ...)."
                )
            state.config = linearize_config
        self.linearize_config: LinearizeConfig = state.config
        if family_by_name(state.family).mean_task_loss and self.compute_loss_func is None:
            self.model_accepts_loss_kwargs = False
        self.linearize_callback = LinearizeCallback(self.linearize_config)
        self.linearize_callback.trace(self.model)
        self.add_callback(self.linearize_callback)
        self._skeleton: Optional[nn.Module] = None
        if self.is_fsdp_enabled:  # before Accelerate shards the model (in train/evaluate/predict)
            _group_tied_embeddings(self.model)
            self._skeleton = _meta_skeleton(self.model)

    def full_model(self) -> Optional[nn.Module]:
        """The trained model as a plain module with whole tensors, to save, fold or evaluate on one process.

        Without FSDP: the unwrapped model itself, on every rank. Under FSDP2 this is a collective (every rank must
        call it, in the same order): the full state dict is gathered (``accelerator.get_state_dict``), and the main
        process gets a new model holding it (`_unsharded_copy`: the model's class and structure, gates, patch state
        and generation config, every parameter and buffer as trained); the other ranks get ``None``. The copy is
        independent of the training run: changing it changes nothing in the sharded model."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self._skeleton is None:
            return model
        state_dict = self.accelerator.get_state_dict(self.model)
        return _unsharded_copy(self._skeleton, model, state_dict) if self.accelerator.is_main_process else None

    def train(
        self,
        resume_from_checkpoint: Union[str, bool, None] = None,
        trial: Any = None,
        ignore_keys_for_eval: Optional[list[str]] = None,
    ) -> Any:
        """`Trainer.train`; on resume the gates' linear-unit masks and budget controller come back too
        (``FileNotFoundError`` first if the checkpoint has no ``linearize_state.pt``)."""
        checkpoint = resume_from_checkpoint or None
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: Trainer.train raises its own error
        self.linearize_callback.resume_state = _load_state(checkpoint) if checkpoint is not None else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Any]]:
        """The Trainer's loss plus, in training mode, the prior term (see the module docstring for its scaling).
        Evaluation losses are the task loss alone."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        prior = self.linearize_callback.prior_loss(self.state.global_step)
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            prior = prior / self.current_gradient_accumulation_steps
        loss = loss + prior
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Optional[Union[torch.Tensor, int]]) -> bool:
        """Whether `Trainer.training_step` leaves this loss undivided by the micro-batch count (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the gates moved into their own group (``gate_lr`` or the model's learning
        rate, no weight decay). An optimizer passed to the Trainer is used as it is."""
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if created:
            gates = [gate.alpha for _, gate in gated_modules(model if model is not None else self.model)]
            lr = self.linearize_config.gate_lr if self.linearize_config.gate_lr is not None else self.args.learning_rate
            move_gates_to_own_group(optimizer, gates, lr)
        return optimizer

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the ``linearize/*`` metrics to training logs (those with ``loss``) and to the end-of-training
        summary (``train_loss``), so the Trainer's log history and every tracker get them."""
        if "loss" in logs:
            logs.update(self.linearize_callback.window_metrics(logs["loss"]))
        elif "train_loss" in logs:
            logs.update(self.linearize_callback.run_metrics(logs["train_loss"]))
        super().log(logs, start_time)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.linearize_callback.state_dict(), folder / LINEARIZE_STATE_NAME)
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write the linearized checkpoint format (weights with gates, ``linearize_config.json``, model card,
        tokenizer) plus ``training_args.bin``, for transformers and timm models. Under FSDP2 the Trainer passes the
        ``state_dict`` it gathered on every rank (full on the main process); the main process saves an unsharded
        copy of the model holding it (`_unsharded_copy`, as `full_model` builds it). Models `hf_linearize.hub`
        cannot save keep the Trainer's own format."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        plain = model if self._skeleton is None else self._skeleton  # FSDP2 changes a timm model's class
        if self.is_distributed_loading_by_transformers or hub.backend(plain) is None:
            super()._save(output_dir, state_dict=state_dict)
            return
        if not self.args.should_save:
            return
        if self._skeleton is not None:
            model = _unsharded_copy(self._skeleton, model, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        hub.save_pretrained(model, output_dir, tokenizer=tokenizer)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


SUPPORTED_BACKENDS = "DDP (accelerate launch --multi_gpu) or FSDP2 (recipes/configs/accelerate/fsdp2.yaml)"
"""The distributed backends `LinearizeMixin` trains with, named in its refusals."""


def _check_backend(state: Any, fsdp_requested: bool, use_cpu: bool = False) -> None:
    """Refuse, before any step, a backend the gate logic would be silently wrong under. ``state`` is the trainer's
    ``accelerator.state``; ``fsdp_requested``: the launch or the training arguments ask for FSDP; ``use_cpu``: the
    training arguments' (named in the FSDP refusal: it keeps Accelerate on the CPU even on a GPU machine).

    * DeepSpeed, any ZeRO stage: under Accelerate it steps the optimizer inside ``backward``, before the trainer's
      pre-step hook can zero the gradients of frozen units or hold the gates, and ZeRO keeps fp32 master copies of
      the parameters that the trainer's projection, snapping and re-pinning never reach (the next step overwrites
      them: on CPU, a ZeRO-2 run's gates left [0, 1] from step 8). ZeRO-3 also partitions every gate, so the prior
      and the counts would see a fraction of the units per rank.
    * FSDP1 flattens the gates into its ``FlatParameter`` shards: the same effect as ZeRO-3.
    * FSDP requested but not enabled: Accelerate enables FSDP only on accelerator devices; on a CPU-only machine
      every process of the launch would train its own model.
    """
    deepspeed = getattr(state, "deepspeed_plugin", None)
    if deepspeed is not None:
        partitions = "; ZeRO-3 also partitions the gates" if deepspeed.zero_stage == 3 else ""
        raise ValueError(
            f"LinearizeTrainer does not support DeepSpeed (here ZeRO-{deepspeed.zero_stage}): DeepSpeed steps the "
            "optimizer inside backward, before the trainer can zero the gradients of frozen gate units, and keeps "
            "fp32 master weights that the gates' clamping to [0, 1], snapping and freezing do not reach"
            f"{partitions}, so the gates would silently go wrong. Train with {SUPPORTED_BACKENDS} instead."
        )
    fsdp = getattr(state, "fsdp_plugin", None)
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise ValueError(
            f"LinearizeTrainer does not support FSDP version {fsdp.fsdp_version}: it flattens the gates into "
            f"FlatParameter shards. Train with {SUPPORTED_BACKENDS} instead (fsdp_version: 2 in the Accelerate config, "
            "or --fsdp_version 2)."
        )
    if fsdp_requested and fsdp is None:
        on_cpu = (" The training arguments set use_cpu (--use_cpu true, or use_cpu: true in a recipe config such "
                  "as recipes/configs/synthetic.yaml), which keeps Accelerate on the CPU: pass --use_cpu false to "
                  "shard on GPUs.") if use_cpu else ""
        raise RuntimeError(
            f"FSDP was requested, but Accelerate did not enable it (distributed type {state.distributed_type.value}, "
            f"device {state.device}): it enables FSDP only on accelerator devices (GPU, NPU, XPU, ...), so each "
            "process would train a model of its own. On CPU train with DDP (accelerate launch --multi_gpu "
            f"--num_processes N with --cpu or ACCELERATE_USE_CPU=true); use FSDP on GPUs.{on_cpu}"
        )


def _group_tied_embeddings(model: nn.Module) -> None:
    """Make ``model`` shardable by Accelerate's FSDP2 wrapping despite tied embeddings, or refuse it.

    torch (>= 2.13) requires every module that holds a tied parameter to be in one FSDP group, and Accelerate groups
    only the input and output embeddings (``get_input_embeddings``/``get_output_embeddings``). Encoder-decoder
    models that share one embedding between encoder, decoder and output (Marian, BART, T5) hold it in separate
    modules; ``model.set_input_embeddings(model.get_input_embeddings())`` (transformers' own API) puts the one
    embedding module in every place that shares it, as transformers 4 built these models. That changes no
    parameter, computation or state-dict key. A parameter still held by other modules raises ``ValueError``."""
    if _foreign_ties(model) and hasattr(model, "set_input_embeddings"):
        model.set_input_embeddings(model.get_input_embeddings())
        logger.info("FSDP2: the encoder, decoder and shared input embeddings are now one module (they shared one "
                    "weight in separate modules, which torch cannot shard); parameters and results are unchanged.")
    ties = _foreign_ties(model)
    if ties:
        raise ValueError(
            f"{type(model).__name__} ties parameters across modules that FSDP2 cannot put in one group "
            f"({'; '.join(' = '.join(names) for names in ties[:3])}): torch refuses a tied parameter that two FSDP "
            "groups see, and Accelerate groups only the input and output embeddings. Untie them before training "
            "(e.g. tie_word_embeddings=False in the model's config), or train with DDP (accelerate launch "
            "--multi_gpu)."
        )


def _foreign_ties(model: nn.Module) -> list[list[str]]:
    """Groups of distinct modules (by name) that hold one parameter, except the input and output embeddings (which
    Accelerate shards together)."""
    embeddings = {id(getattr(model, f"get_{side}_embeddings", lambda: None)()) for side in ("input", "output")}
    holders: dict[int, dict[int, str]] = {}  # parameter -> {module: its first name}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), {}).setdefault(id(module), name)
    return [list(modules.values()) for modules in holders.values()
            if len(modules) > 1 and not modules.keys() <= embeddings]


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of the (not yet sharded) ``model`` whose parameters and persistent buffers lie on the meta device:
    its class, submodules (aliases and tied parameters included), gates, patch state and every other attribute,
    with no tensor memory. Non-persistent buffers (not in the state dict, e.g. rotary frequencies) are copied."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or id(tensor) in memo or name in module._non_persistent_buffers_set:
                continue
            meta = tensor.detach().to("meta")
            memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _unsharded_copy(skeleton: nn.Module, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of the FSDP2-sharded ``model`` that holds ``state_dict`` (its full state dict, as
    ``accelerator.get_state_dict`` gathers it on the main process): a copy of its ``skeleton`` (`_meta_skeleton`, taken
    before sharding) with every tensor of ``state_dict`` assigned (strict: a missing or unexpected key raises),
    parameters tied as in ``model``, and ``model``'s current generation config. Works for any model class."""
    replica = copy.deepcopy(skeleton)
    tied: dict[int, list[str]] = {}
    for name, param in replica.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    # a gathered tensor may view a larger (padded) buffer, which safetensors refuses to save: give it its own memory
    state_dict = {k: t if t.untyped_storage().nbytes() == t.nbytes else t.clone() for k, t in state_dict.items()}
    replica.load_state_dict(state_dict, strict=True, assign=True)
    for first, *others in tied.values():  # assign gave every name a parameter of its own: tie them again
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(replica.get_submodule(owner), attr, replica.get_parameter(first))
    if getattr(model, "generation_config", None) is not None:
        replica.generation_config = copy.deepcopy(model.generation_config)
    return replica


class LinearizeTrainer(LinearizeMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with the linearization prior (see the module docstring)."""


class LinearizePlainTrainer(LinearizeMixin, Trainer):
    """`transformers.Trainer` with the linearization prior, for encoders, classifiers and timm models."""
