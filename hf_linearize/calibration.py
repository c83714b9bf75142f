"""Post-training linearization: calibrate per-unit statistics on data, fit each unit's best linear replacement,
and linearize the units that cost least, to a budget, in one shot.

A unit of a trained network that is sent to the identity ``x`` usually breaks the network: a GELU unit that is
mostly off is far better approximated by a small slope and an offset. :func:`calibrate` streams calibration
batches through a patched model and accumulates, per gated unit, the first and second moments of its input ``x``
and of its current output ``z`` (``act(x)`` while the gate is 0) in fp64. :func:`linearize_one_shot` then fits

* ``target="affine"``: the least-squares ``z ≈ p x + q`` (``p = Cov(x, z) / Var(x)``, ``q = E z - p E x``; a
  unit with constant input gets ``p = 0``, ``q = E z``); a GLU site's linear target is a constant, ``q = E z``;
* ``target="identity"``: the paper's ``p = 1, q = 0`` (GLU: ``q = 1``),

scores each unit by the expected squared change of the FFN output its linearization causes, and sets the
lowest-scoring units to exactly linear (gate 1, target ``p x + q``) until the budget is met. Linear units stay
exactly linear, so APL counts them as 0 and :func:`~hf_linearize.fold` folds them; a unit with ``p = 0`` is
pruned with its mean kept as a bias (FLAP-style structured pruning).

Scores (``score=``), each the predicted squared output error of linearizing one unit:

* ``"residual"`` (the baseline): ``E[(z - p x - q)^2] * ||W_out[:, c]||^2``, the residual of the fit times the
  squared norm of the unit's column in the projection that reads it (found in the traced data flow, as ``fold``
  finds it: :func:`~hf_linearize.folding.reader_projections`; units whose reader is unknown, such as CNN
  activations, weigh 1).
* ``"sensitivity"`` (needs ``calibrate(..., sensitivity=True)``): first order in the error of the *model output*.
  Calibration also back-propagates a random Gaussian projection ``r . y`` of the main output ``y`` (logits or last
  hidden state) and records ``w = g^2`` per unit and position, ``g`` being the gradient at the unit's output, so
  ``E_r[(r . J e)^2] = sum of g^2 e^2``. The fit is the ``w``-weighted least squares (it spends its accuracy where
  the output is sensitive) and the score is ``sum over positions of w (z - p x - q)^2``. Ranked globally, this
  also decides how the budget spreads over layers.

Compensation: :func:`reconstruct` then re-fits, site by site, the projection that reads each site so that the
linearized model's FFN outputs match the model before linearization (least squares on calibration data, as
SparseGPT, Frantar & Alistarh 2023, does for pruning). ``benchmarks/one_shot.py`` measures all of these on the real
MiniLM.

Bounded memory (:func:`one_shot` and :func:`reconstruct` with ``blockwise=True``, the default). The repeated
transformer blocks are found in the module tree (:func:`find_blocks`: BERT ``encoder.layer``, LLaMA
``model.layers``, GPT-2 ``transformer.h``, the encoder and the decoder layers of Marian/BART) and the work runs in
three phases, none of which copies the model:

1. *Measure, globally* (:func:`calibrate`). The budget ranks units of all layers against each other, and the
   sensitivity score is a gradient of the model output, which depends on every later block. So the statistics of
   all units are measured first, on the unchanged model, batch by batch: exactly the statistics, ranking and fits
   of the whole-model path. The sensitivity backward pass runs each block under activation checkpointing: the
   forward pass keeps only the blocks' inputs, and the backward pass recomputes one block at a time, its units'
   inputs and outputs meeting their gradients there (hooks), so it holds the graph of one block, not of the model.
2. *Decide, globally*: the units to linearize and their targets, from those statistics (:func:`linearize_one_shot`'s
   ranking, unchanged).
3. *Linearize and compensate, block by block*, as SparseGPT does: the inputs of each group's first block are
   captured for every batch with a forward pre-hook (the "catcher": positional and keyword arguments, e.g. the
   attention mask, rotary embeddings or, for a decoder block, the encoder output as cross-attention input). For
   each block in turn: a copy of that one block is kept as the reference (it shares the weights that do not
   change), the block's units are linearized, the projection reading each site is re-fitted so that the block,
   fed with the outputs of the already linearized and re-fitted blocks before it, matches the reference block fed
   with the original model's activations; then both streams are advanced through the block. A decoder's
   first-block inputs are caught by running the (already compensated) model, so they carry the new encoder output;
   the original stream's are recorded from the unchanged model before anything is linearized. The result equals
   the whole-model path's (same units, targets and re-fits, up to floating-point rounding). Besides the model, the
   peak holds the calibration activations at one block boundary (two streams), one block's changing projections
   and one re-fit's normal equations (an fp64 Gram matrix, factored in place, of the projection's input width
   squared). On glibc the freed heap pages are handed back to the system after each sensitivity batch, after
   calibration and after each block (``malloc_trim``), so that the resident peak stays near the live one.

Blocks are used only where the first batch shows that they chain: each runs once per forward pass, in order, its
hidden-state input is the previous block's output, and its other inputs equal the first block's (T5, whose first
block hands a position bias to the others, does not chain). Otherwise, and where a site with a reader lies outside
every block, the whole-model path runs instead (a full copy of the model as the reference), with a log line.
Models dispatched by Accelerate (``from_pretrained(device_map=...)`` with ``'cpu'``/``'disk'`` entries,
``cpu_offload``, ``dispatch_model``) work: offloaded weights are loaded one module at a time to be read, and
re-fitted weights are written back to Accelerate's offload store (its in-memory part: a ``'disk'`` layer's re-fitted
projection then lives in CPU memory). The gates themselves must not be offloaded: patch the model after dispatching
it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import itertools
import json
import logging
import math
import platform
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Union

import safetensors.torch
import torch
import torch.utils.checkpoint
from accelerate.utils import (OffloadedWeightsLoader, PrefixedDataset, align_module_device, has_offloaded_params,
                              named_module_tensors)
from torch import nn
from tqdm.auto import tqdm

from .core_map import average_path_length
from .folding import reader_projections
from .gates import GatedActivation
from .patching import gated_modules, is_patched, linear_units, patch_state
from .probe_inputs import _call, main_output
from .sparsity import linear_quota

logger = logging.getLogger(__name__)

Target = Literal["affine", "identity"]
Score = Literal["residual", "sensitivity"]
_FIELDS = ("weight", "sum_x", "sum_xx", "sum_z", "sum_zz", "sum_xz")
PathLike = Union[str, Path]


# ------------------------------------------------------------------------------------------------ statistics
@dataclass
class SiteMoments:
    """Per-unit (weighted) sums over the calibration positions (tokens or pixels) of one gated site, fp64 ``[C]``:
    ``weight`` (the number of positions, or the sum of their weights), ``sum_x``, ``sum_xx`` (input ``x``),
    ``sum_z``, ``sum_zz`` (output ``z`` of the unit) and ``sum_xz``."""

    weight: torch.Tensor
    sum_x: torch.Tensor
    sum_xx: torch.Tensor
    sum_z: torch.Tensor
    sum_zz: torch.Tensor
    sum_xz: torch.Tensor

    @classmethod
    def zeros(cls, channels: int) -> "SiteMoments":
        return cls(*(torch.zeros(channels, dtype=torch.float64) for _ in _FIELDS))

    def add(self, x: torch.Tensor, z: torch.Tensor, w: Optional[torch.Tensor] = None) -> None:
        """Accumulate ``x`` and ``z`` of shape ``[positions, C]``, each position weighted by ``w`` (same shape;
        1 when None). The fp64 products are formed a few rows at a time (at most 2 MiB each)."""
        rows = max(1, (1 << 18) // max(x.shape[1], 1))
        totals = torch.zeros(len(_FIELDS), x.shape[1], dtype=torch.float64, device=x.device)  # one copy to the CPU
        for start in range(0, x.shape[0], rows):
            xs, zs = x[start:start + rows].to(torch.float64), z[start:start + rows].to(torch.float64)
            ws = None if w is None else w[start:start + rows].to(torch.float64)
            totals[0] += xs.shape[0] if ws is None else ws.sum(0)
            for total, value in zip(totals[1:], (xs, xs * xs, zs, zs * zs, xs * zs)):
                total += (value if ws is None else ws * value).sum(0)
        for name, total in zip(_FIELDS, totals.cpu()):
            getattr(self, name).add_(total)

    def fit(self, target: Target, glu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p, q, residual)``: the (weighted) least-squares linear target of every unit and the (weighted) mean
        of ``(z - target)^2``, fp64 ``[C]``. Units with no weight get ``p = 1, q = 0`` (GLU ``q = 1``) and residual
        0."""
        n = self.weight.clamp_min(1e-300)
        mean_x, mean_z = self.sum_x / n, self.sum_z / n
        var_x = (self.sum_xx / n - mean_x**2).clamp_min(0)
        var_z = (self.sum_zz / n - mean_z**2).clamp_min(0)
        cov = self.sum_xz / n - mean_x * mean_z
        ones, zeros = torch.ones_like(mean_x), torch.zeros_like(mean_x)
        if target == "identity":
            if glu:  # z -> 1
                return ones, ones, (self.sum_zz / n - 2 * mean_z + 1).clamp_min(0)
            return ones, zeros, ((self.sum_zz - 2 * self.sum_xz + self.sum_xx) / n).clamp_min(0)
        if glu:  # z -> E z, a constant
            return ones, mean_z, var_z
        # A unit whose input barely varies (relative to its scale) is a constant: p = 0.
        varies = var_x > 1e-12 * (self.sum_xx / n).clamp_min(1e-300)
        safe_var = torch.where(varies, var_x, ones)
        p = torch.where(varies, cov / safe_var, zeros)
        q = mean_z - p * mean_x
        residual = torch.where(varies, var_z - cov**2 / safe_var, var_z)
        return p, q, residual.clamp_min(0)


@dataclass
class CalibrationStats:
    """What :func:`calibrate` measured: per gated site, :class:`SiteMoments` (``sites``) and, with
    ``sensitivity=True``, the output-sensitivity weighted moments (``sensitivity``); plus the model's family and
    site widths, so that stats are never applied to another model. Saves as JSON (``.json``) or safetensors."""

    family: str
    sites: dict[str, SiteMoments]
    sensitivity: Optional[dict[str, SiteMoments]] = None
    batches: int = 0
    fingerprint: float = 0.0
    """:func:`weights_fingerprint` of the calibrated model."""

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` is patched with exactly these sites and widths."""
        if not is_patched(model):
            raise ValueError("The model is not patched; call hl.patch_model(model) (with the config used for "
                             "calibration) before applying calibration stats.")
        widths = {name: gate.channels for name, gate in gated_modules(model)}
        mine = {name: int(m.sum_x.numel()) for name, m in self.sites.items()}
        fingerprint = weights_fingerprint(model)
        same_weights = math.isclose(fingerprint, self.fingerprint, rel_tol=1e-9, abs_tol=1e-12)
        if widths != mine or patch_state(model).family != self.family or not same_weights:
            diff = sorted(set(widths.items()) ^ set(mine.items()))[:6]
            raise ValueError(
                f"These calibration stats were measured on another model (family {self.family!r}, {len(mine)} "
                f"sites, weight fingerprint {self.fingerprint:.12g}); this model is {patch_state(model).family!r} "
                f"with {len(widths)} sites and fingerprint {fingerprint:.12g}. Differing sites: {diff}. Run "
                "hl.calibrate on this model."
            )

    def _groups(self) -> dict[str, dict[str, SiteMoments]]:
        return {"sites": self.sites, **({"sensitivity": self.sensitivity} if self.sensitivity else {})}

    def save(self, path: PathLike) -> Path:
        """Write to ``path``: JSON when it ends in ``.json``, else safetensors. Returns the path."""
        path = Path(path)
        header = {"family": self.family, "batches": self.batches, "fingerprint": self.fingerprint,
                  "groups": list(self._groups()),
                  "site_names": list(self.sites)}
        if path.suffix == ".json":
            body = {group: {name: {k: getattr(m, k).tolist() for k in _FIELDS} for name, m in sites.items()}
                    for group, sites in self._groups().items()}
            path.write_text(json.dumps({**header, **body}) + "\n", encoding="utf-8")
        else:
            tensors = {f"{group}/{name}/{k}": getattr(m, k).contiguous()
                       for group, sites in self._groups().items() for name, m in sites.items() for k in _FIELDS}
            safetensors.torch.save_file(tensors, str(path), metadata={"calibration": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: PathLike) -> "CalibrationStats":
        """Read what :meth:`save` wrote."""
        path = Path(path)
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            tensors = {f"{group}/{name}/{k}": torch.tensor(v[k], dtype=torch.float64)
                       for group in data["groups"] for name, v in data[group].items() for k in _FIELDS}
        else:
            with safetensors.safe_open(str(path), framework="pt") as fh:
                data = json.loads(fh.metadata()["calibration"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        groups = {group: {name: SiteMoments(*(tensors[f"{group}/{name}/{k}"] for k in _FIELDS))
                          for name in data["site_names"]} for group in data["groups"]}
        return cls(data["family"], groups["sites"], groups.get("sensitivity"), data["batches"], data["fingerprint"])


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> float:
    """Sum of squares of every parameter except the gates, in fp64: tells two models with the same layout apart.
    Linearizing (gates and targets) leaves it unchanged; re-fitting weights (:func:`reconstruct`) changes it.
    Parameters offloaded by Accelerate are read one module at a time; each parameter is squared in chunks, so the
    fp64 temporaries stay small."""
    gate_params = {id(p) for _, gate in gated_modules(model) for p in gate.parameters(recurse=False)}
    seen: set[int] = set()
    total = 0.0
    for module in model.modules():
        hook = _offload_hook(module)
        with _onloaded(module):
            for p in module.parameters(recurse=hook is not None and hook.place_submodules):
                if p.device.type == "meta" or id(p) in gate_params or (hook is None and id(p) in seen):
                    continue  # meta: offloaded, read with the module whose hook loads it
                seen.add(id(p))
                total += sum(float(chunk.double().pow(2).sum()) for chunk in p.detach().reshape(-1).split(1 << 18))
    return total


def _positions(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``[positions, C]`` view of a site tensor whose channels lie along ``channel_dim``."""
    return t.detach().movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


def _token_mask(batch: Any, tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """Which positions of a ``[batch, length, ...]`` tensor are real tokens: the (decoder) attention mask or
    ``labels != -100``, the first that matches its leading shape; None (all) otherwise. An encoder and a decoder of
    equal length cannot be told apart by shape: the decoder's mask is then used for both."""
    if not isinstance(batch, Mapping) or tensor.dim() < 3:
        return None
    for key in ("decoder_attention_mask", "labels", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(tensor.shape[:2]):
            return (value != -100) if key == "labels" else value.bool()
    return None


def _gates(model: nn.Module) -> dict[str, GatedActivation]:
    """The model's gates by site name; ``ValueError`` when Accelerate offloaded any of them (their writes would be
    lost on the meta device)."""
    gates = dict(gated_modules(model))
    offloaded = [name for name, gate in gates.items() if gate.alpha.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"The gates of {offloaded[:3]} are offloaded by Accelerate (on the meta device), so calibration and "
            "linearization could not read or set them. Patch the model after dispatching it (from_pretrained(..., "
            "device_map=...) or dispatch_model first, then hl.patch_model): new gates stay in memory."
        )
    return gates


def calibrate(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None,
              sensitivity: bool = False, seed: int = 0, progress: bool = True,
              checkpoint_blocks: bool = True) -> CalibrationStats:
    """Stream ``batches`` through the patched ``model`` in eval mode and return per-unit moments.

    Args:
        batches: a DataLoader or any iterable of model inputs: a dict (``model(**batch)``; include
            ``decoder_input_ids`` or ``labels`` for an encoder-decoder, i.e. teacher forcing), a tuple or list
            (``model(*batch)``) or a tensor. Tensors are moved to the device of the model's first parameter that
            is not offloaded.
        max_batches: stop after this many batches.
        sensitivity: also back-propagate a random projection of the main output (one backward per batch, seeded
            by ``seed``) and record the output-sensitivity weighted moments that ``score="sensitivity"`` needs.
            Without it, calibration runs under ``no_grad``.
        checkpoint_blocks: with ``sensitivity``, run each of the model's repeated blocks (:func:`find_blocks`)
            under activation checkpointing: the backward pass holds one block's graph at a time instead of the
            whole model's, for about one more forward pass of compute. The statistics are the same (up to the order of
            the fp64 sums).
    Every position of every batch counts for the plain moments, padding included; the sensitivity weights are 0
    at padded output positions (attention mask or ``labels == -100``). Memory is O(units); sums are fp64. The
    model's key/value cache is off while it runs. Raises ``ValueError`` for an unpatched model, empty batches or
    offloaded gates.
    """
    if not is_patched(model):
        raise ValueError("calibrate needs a patched model: call hl.patch_model(model) first.")
    gates = _gates(model)
    sites = {name: SiteMoments.zeros(gate.channels) for name, gate in gates.items()}
    weighted = {name: SiteMoments.zeros(gate.channels) for name, gate in gates.items()} if sensitivity else None
    blocks = [(name, block) for group in find_blocks(model) for name, block in group.blocks] \
        if sensitivity and checkpoint_blocks else []
    recomputed = {site for site in gates if any(_inside(site, name) for name, _ in blocks)}
    # A unit's x, z and its gradient meet in the backward pass, in either order: a checkpointed block is recomputed
    # (its hooks fire again) when its first saved tensor is needed, which may come after the gradient of a site
    # whose output leaves the block (e.g. a ResNet block's last ReLU).
    waiting_xz: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in gates}
    waiting_grad: dict[str, list[torch.Tensor]] = {name: [] for name in gates}
    backward = False  # True while the backward pass runs (and recomputes checkpointed blocks)

    def meet(name: str, x: torch.Tensor, z: torch.Tensor, grad: torch.Tensor) -> None:
        weighted[name].add(x, z, _positions(grad, gates[name].channel_dim) ** 2)

    def weigh(name: str, grad: torch.Tensor) -> None:
        if waiting_xz[name]:
            meet(name, *waiting_xz[name].pop(), grad)
        else:
            waiting_grad[name].append(grad.detach())

    def hook(name: str):
        def record(gate: GatedActivation, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x, z = _positions(inputs[0], gate.channel_dim), _positions(output, gate.channel_dim)
            if backward:  # a checkpointed block recomputed
                if waiting_grad[name]:
                    meet(name, x, z, waiting_grad[name].pop())
                else:
                    waiting_xz[name].append((x, z))
                return
            sites[name].add(x, z)
            if weighted is not None and output.requires_grad:
                if name not in recomputed:
                    waiting_xz[name].append((x, z))
                output.register_hook(functools.partial(weigh, name))
        return record

    handles = [gate.register_forward_hook(hook(name)) for name, gate in gates.items()]
    device = _input_device(model)
    generator: Optional[torch.Generator] = None  # on the output's device, made at the first batch
    needs_grad = {name: gate.alpha.requires_grad for name, gate in gates.items()}
    alphas = [gate.alpha for gate in gates.values()]
    seen = 0
    try:
        for gate in gates.values():  # every gate output then has a grad_fn, whatever else is frozen
            gate.alpha.requires_grad_(sensitivity)
        with _inference(model, grad=sensitivity), _checkpointed([block for _, block in blocks]):
            for batch in tqdm(batches, desc="calibrate", total=max_batches, disable=not progress):
                if max_batches is not None and seen >= max_batches:
                    break
                output = main_output(_call(model, _to_device(batch, device)))
                if weighted is not None:
                    if generator is None:
                        generator = torch.Generator(output.device).manual_seed(seed)
                    projection = torch.randn(output.shape, generator=generator, dtype=output.dtype,
                                             device=output.device)
                    mask = _token_mask(batch, output)
                    if mask is not None:
                        projection = projection * mask.to(output.device).view(*mask.shape,
                                                                               *([1] * (output.dim() - 2)))
                    backward = True
                    try:
                        torch.autograd.grad(output, alphas, projection, allow_unused=True)
                    finally:
                        backward = False
                        for waiting in itertools.chain(waiting_xz.values(), waiting_grad.values()):
                            waiting.clear()
                    del output, projection
                    _release_freed_memory()
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for name, gate in gates.items():
            gate.alpha.requires_grad_(needs_grad[name])
    if seen == 0:
        raise ValueError("The calibration batches were empty: pass a DataLoader or a non-empty iterable of "
                         "model inputs.")
    return CalibrationStats(patch_state(model).family, sites, weighted, seen, weights_fingerprint(model))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_to_device(v, device) for v in batch)
    return batch


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its first parameter that Accelerate did not offload (CPU when
    all are)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@contextlib.contextmanager
def _inference(model: nn.Module, grad: bool = False) -> Iterator[None]:
    """Eval mode, gradients only with ``grad``, and the key/value cache off (``use_cache=False`` on every config in
    the model), so that a block can be run again on the same inputs; all restored on exit."""
    configs = {id(m.config): m.config for m in model.modules()
               if getattr(getattr(m, "config", None), "use_cache", False)}
    was_training = model.training
    model.eval()
    for config in configs.values():
        config.use_cache = False
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for config in configs.values():
            config.use_cache = True
        model.train(was_training)


@contextlib.contextmanager
def _checkpointed(blocks: list[nn.Module]) -> Iterator[None]:
    """Within the context each of ``blocks`` runs under non-reentrant activation checkpointing
    (``torch.utils.checkpoint``): its forward pass keeps only its inputs, and the backward pass recomputes the whole
    block (no early stop, so every forward hook in it fires again) just before its gradients are computed."""
    saved = [(block, block.__dict__.get("forward")) for block in blocks]  # an Accelerate hook's wrapper, or None
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False,
                                          preserve_rng_state=False)
    try:
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # (the keyword needs torch >= 2.9)
            yield
    finally:
        for block, forward in saved:
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` (None on other C libraries)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _release_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc ``malloc_trim(0)``; nothing elsewhere).

    Once a calibration batch has freed its logits (tens of MiB), glibc serves every smaller tensor from its heap
    and keeps what is freed there: batch after batch and block after block, the resident memory would grow past
    what is live. Called between batches and between blocks, this keeps the resident peak near the live one
    (``benchmarks/one_shot_memory.py``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ------------------------------------------------------------------------------------------------ offloading
def _offload_hook(module: nn.Module) -> Any:
    """Accelerate's offloading hook of ``module`` (``AlignDevicesHook`` with ``offload=True``), else None."""
    return module._hf_hook if has_offloaded_params(module) else None


def _offloaded_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``module`` that its offloading hook loads before each forward pass, by name (meta tensors
    outside :func:`_onloaded`)."""
    hook = module._hf_hook
    return dict(named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                     remove_non_persistent=True))


@contextlib.contextmanager
def _onloaded(module: nn.Module, write: bool = False) -> Iterator[None]:
    """Within the context, the tensors of ``module`` that Accelerate offloaded are loaded on its execution device
    (``accelerate.utils.align_module_device``); with ``write``, their values at the end are stored back as the
    offloaded copy, so that later forward passes load them. A module without offloaded tensors is left alone.
    ``TypeError`` when the offload store cannot be written."""
    with align_module_device(module):
        yield
        if write and _offload_hook(module) is not None:
            _store_offloaded(module)


def _store_offloaded(module: nn.Module) -> None:
    """Write the loaded tensors of an offloaded ``module`` into its hook's weights map: a state dict (``cpu_offload``,
    ``'cpu'`` entries of a device map) or the in-memory part of Accelerate's disk loader, whose entries take priority
    over the files (a checkpoint's safetensors are never overwritten)."""
    store, prefix = module._hf_hook.weights_map, ""
    if isinstance(store, PrefixedDataset):
        store, prefix = store.dataset, store.prefix
    if isinstance(store, OffloadedWeightsLoader):
        store = store.state_dict
    if not isinstance(store, MutableMapping):
        raise TypeError(
            f"The offloaded weights of this {type(module).__name__} sit in a {type(store).__name__}, to which "
            "hf_linearize cannot write re-fitted weights. Keep this layer out of offloading (an execution device in "
            "the device map), or call one_shot with compensate=False."
        )
    for name, tensor in _offloaded_tensors(module).items():
        store[prefix + name] = tensor.detach().cpu()


def _readers(model: nn.Module) -> dict[str, Optional[nn.Module]]:
    """:func:`~hf_linearize.folding.reader_projections` of ``model``. Fold's trace checks each projection against its
    weights after its pass, so Accelerate-offloaded tensors are loaded for it, all at once, and kept loaded across
    the pass (the hooks' offloading paused): an offloaded model's full size in memory, for one pass on the probe."""
    offloaded = [module for module in model.modules() if _offload_hook(module) is not None]
    with contextlib.ExitStack() as stack:
        for module in offloaded:
            stack.enter_context(_onloaded(module))
        for module in offloaded:
            module._hf_hook.offload = False
        try:
            return reader_projections(model)
        finally:
            for module in offloaded:
                module._hf_hook.offload = True


def _reference_copy(block: nn.Module, changing: Iterable[nn.Module]) -> nn.Module:
    """A copy of ``block`` that keeps computing what ``block`` computes now while the ``changing`` modules in it (the
    projections to re-fit, the gates to linearize) are changed: those are deep-copied, their offloaded tensors
    from Accelerate's store into a private map of the copy's hook; every other tensor, and the store, is shared. It
    costs the changing modules' tensors, at most one block's, and never copies the store (which may hold the
    whole model)."""
    changing = {id(module) for module in changing}
    memo: dict[int, Any] = {}
    for module in block.modules():
        hook = _offload_hook(module)
        if id(module) in changing:
            if hook is not None:
                memo[id(hook.weights_map)] = {name: hook.weights_map[name].clone()
                                              for name in _offloaded_tensors(module)}
            continue
        for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            memo[id(tensor)] = tensor
        if hook is not None:
            memo[id(hook.weights_map)] = hook.weights_map
    return copy.deepcopy(block, memo)


# ------------------------------------------------------------------------------------------------ one shot
class OneShotReport(dict):
    """:func:`linearize_one_shot`'s result: ``target``, ``score``, ``linearized`` (units set linear now),
    ``linear``/``units``/``nonlinear_fraction`` after, ``normalized_apl``/``unnormalized_apl`` (None without a
    path graph), ``predicted_error`` (sum of the chosen units' scores) and ``layers``: per site ``units``,
    ``linearized``, ``nonlinear``, ``predicted_error``."""

    def __str__(self) -> str:
        apl = "n/a" if self["normalized_apl"] is None else f"{self['normalized_apl']:.3f}"
        return (f"one-shot ({self['target']}, {self['score']}): {self['linearized']} units linearized, "
                f"nonlinear fraction {self['nonlinear_fraction']:.3f}, normalized APL {apl}, "
                f"predicted error {self['predicted_error']:.4g}")


def _reader_column_norms(reader: Optional[nn.Module], gate: GatedActivation) -> torch.Tensor:
    """``||W_out[:, c]||^2`` of the projection that reads the site (``reader``), else ones."""
    if reader is None:
        return torch.ones(gate.channels, dtype=torch.float64)
    with _onloaded(reader):
        weight = reader.weight.detach().to(torch.float64).cpu()
    return weight.pow(2).sum(dim=[d for d in range(weight.dim()) if d != 1])


def _fit_units(model: nn.Module, stats: CalibrationStats, target: Target, score: Score,
               readers: Optional[dict[str, Optional[nn.Module]]] = None
               ) -> tuple[dict[str, GatedActivation], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The model's gates and, per site, ``(p, q, score)`` of every unit (fp64 ``[C]``); units that are linear
    already score ``inf``. ``readers`` (:func:`~hf_linearize.folding.reader_projections`) are traced when the
    residual score needs them and none are given. Raises ``ValueError`` for an unknown target or score, or stats of
    another model."""
    if target not in ("affine", "identity"):
        raise ValueError(f"target must be 'affine' or 'identity'; got {target!r}.")
    if score not in ("residual", "sensitivity"):
        raise ValueError(f"score must be 'residual' or 'sensitivity'; got {score!r}.")
    if score == "sensitivity" and stats.sensitivity is None:
        raise ValueError("score='sensitivity' needs stats from hl.calibrate(model, batches, sensitivity=True).")
    stats.check_model(model)
    gates = _gates(model)
    already = linear_units(model)
    if score == "residual" and readers is None:
        readers = _readers(model)
    fits = {}
    for name, gate in gates.items():
        if score == "sensitivity":
            moments = stats.sensitivity[name]
            p, q, residual = moments.fit(target, gate.kind == "glu")
            unit_scores = residual * moments.weight
        else:
            p, q, residual = stats.sites[name].fit(target, gate.kind == "glu")
            unit_scores = residual * _reader_column_norms(readers[name], gate)
        fits[name] = (p, q, torch.where(already[name].cpu(), torch.full_like(unit_scores, math.inf), unit_scores))
    return gates, fits


@dataclass
class _Plan:
    """What :func:`linearize_one_shot` decided, before it is applied: the gates, per site the fits ``(p, q,
    score)`` and the mask of units to linearize, and how many units that is."""

    gates: dict[str, GatedActivation]
    fits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    masks: dict[str, torch.Tensor]
    count: int

    def apply(self, sites: Iterable[str]) -> None:
        """Linearize the chosen units of ``sites`` (gate 1, fitted target)."""
        sites = set(sites)
        _apply({name: gate for name, gate in self.gates.items() if name in sites}, self.fits, self.masks)


def _plan(model: nn.Module, stats: CalibrationStats, nonlinear_fraction: Optional[float], apl: Optional[float],
          target: Target, score: Score, readers: Optional[dict[str, Optional[nn.Module]]] = None) -> _Plan:
    """Rank every unit of the model by its score and choose the cheapest ones to the budget (the model is left as it
    was). ``ValueError`` as :func:`linearize_one_shot`."""
    if (nonlinear_fraction is None) == (apl is None):
        raise ValueError("Give exactly one budget: nonlinear_fraction=0.25 or apl=1.5.")
    gates, fits = _fit_units(model, stats, target, score, readers)
    names = list(gates)
    flat = torch.cat([fit[2] for fit in fits.values()])
    order = torch.argsort(flat, stable=True)
    candidates = int(torch.isfinite(flat).sum())
    total = flat.numel()
    if nonlinear_fraction is not None:
        count = max(0, min(candidates, linear_quota(nonlinear_fraction, total) - (total - candidates)))
    else:
        count = _fewest_for_apl(model, gates, names, fits, order, candidates, apl)
    return _Plan(gates, fits, _masks(names, gates, order[:count]), count)


def _report(model: nn.Module, plan: _Plan, target: Target, score: Score) -> OneShotReport:
    """The :class:`OneShotReport` of ``plan``, applied to ``model``."""
    linear = linear_units(model)
    layers = {}
    for name, gate in plan.gates.items():
        chosen = plan.masks[name]
        layers[name] = {"units": gate.channels, "linearized": int(chosen.sum()),
                        "nonlinear": int((~linear[name]).sum()),
                        "predicted_error": float(plan.fits[name][2][chosen.cpu()].sum())}
    total = sum(gate.channels for gate in plan.gates.values())
    linear_now = sum(int(m.sum()) for m in linear.values())
    report = OneShotReport(
        target=target, score=score, linearized=plan.count, units=total, linear=linear_now,
        nonlinear_fraction=(total - linear_now) / total,
        predicted_error=sum(v["predicted_error"] for v in layers.values()), layers=layers)
    report.update(_apls(model))
    return report


def linearize_one_shot(
    model: nn.Module,
    stats: CalibrationStats,
    nonlinear_fraction: Optional[float] = None,
    apl: Optional[float] = None,
    target: Target = "affine",
    score: Score = "residual",
) -> OneShotReport:
    """Linearize ``model``'s cheapest units in place, to a budget: a ``nonlinear_fraction`` of all gated units
    (met exactly: ``floor(fraction * N)`` units stay nonlinear, fewer only when more were linear already) or a
    normalized ``apl`` (the fewest units whose linearization brings the APL to at most ``apl``).

    ``target`` and ``score`` are described in the module docstring; ``score="sensitivity"`` needs stats from
    ``calibrate(..., sensitivity=True)``. Units that are linear already keep their gate and target. Chosen units
    get gate 1 and the fitted target.
    """
    plan = _plan(model, stats, nonlinear_fraction, apl, target, score)
    plan.apply(plan.gates)
    return _report(model, plan, target, score)


def _masks(names: list[str], gates: dict[str, GatedActivation], chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat unit indices (in ``names`` order) -> a bool mask per site."""
    masks, start = {}, 0
    flat = torch.zeros(sum(g.channels for g in gates.values()), dtype=torch.bool)
    flat[chosen] = True
    for name in names:
        width = gates[name].channels
        masks[name] = flat[start:start + width]
        start += width
    return masks


@torch.no_grad()
def _apply(gates: dict[str, GatedActivation], fits: dict[str, tuple], masks: dict[str, torch.Tensor],
           linearize: bool = True) -> None:
    """Give the units in ``masks`` their fitted targets and, with ``linearize``, gate 1."""
    for name, gate in gates.items():
        mask = masks[name].to(gate.alpha.device)
        if not bool(mask.any()):
            continue
        p, q, _ = fits[name]
        slope = torch.where(mask.cpu(), p.float(), gate.target_slope.cpu())
        offset = torch.where(mask.cpu(), q.float(), gate.target_offset.cpu())
        gate.set_targets(None if gate.kind == "glu" else slope, offset)
        if linearize:
            gate.alpha[mask] = 1.0


def fit_targets(model: nn.Module, stats: CalibrationStats, score: Score = "sensitivity") -> dict[str, Any]:
    """Set the linear target of every unit that is not linear yet to its affine least-squares fit ``p x + q``
    (weighted by output sensitivity with ``score="sensitivity"``), leaving every gate where it is.

    A unit at gate 0 computes exactly what it did, so a model whose nonlinear units are all at gate 0 (a trained
    model, or one linearized in one shot) keeps its function bit for bit; a unit between 0 and 1 moves to the mix
    with its new target. A training prior then moves each unit toward its best linear fit instead of the identity
    (late linearization of a trained model).
    Returns ``{"score", "fitted": units given a target, "units"}``.
    """
    gates, fits = _fit_units(model, stats, "affine", score)
    masks = {name: torch.isfinite(fits[name][2]) for name in gates}
    _apply(gates, fits, masks, linearize=False)
    return {"score": score, "fitted": sum(int(m.sum()) for m in masks.values()),
            "units": sum(g.channels for g in gates.values())}


def _apls(model: nn.Module) -> dict[str, Optional[float]]:
    try:
        return {"normalized_apl": average_path_length(model),
                "unnormalized_apl": average_path_length(model, normalized=False)}
    except NotImplementedError:
        return {"normalized_apl": None, "unnormalized_apl": None}


def _fewest_for_apl(model: nn.Module, gates: dict[str, GatedActivation], names: list[str], fits: dict[str, tuple],
                    order: torch.Tensor, candidates: int, apl: float) -> int:
    """Bisect the number of lowest-scoring units to linearize so the normalized APL is at most ``apl``
    (APL never rises when a unit is linearized, so the count is monotone)."""
    saved = {name: gate.alpha.detach().clone() for name, gate in gates.items()}

    def apl_with(count: int) -> float:
        masks = _masks(names, gates, order[:count])
        with torch.no_grad():
            for name, gate in gates.items():
                gate.alpha.copy_(saved[name])
                gate.alpha[masks[name].to(gate.alpha.device)] = 1.0
        return average_path_length(model)

    try:
        if apl_with(candidates) > apl + 1e-12:
            raise ValueError(f"apl={apl} cannot be reached: with every unit linear the normalized APL is "
                             f"{apl_with(candidates):.4f} (ungated nonlinearities or excluded sites remain).")
        low, high = 0, candidates
        while low < high:
            mid = (low + high) // 2
            if apl_with(mid) <= apl + 1e-12:
                high = mid
            else:
                low = mid + 1
        return low
    finally:
        with torch.no_grad():
            for name, gate in gates.items():
                gate.alpha.copy_(saved[name])


# ------------------------------------------------------------------------------------------------ blocks
@dataclass
class BlockGroup:
    """One list of repeated blocks (e.g. a decoder's layers): the list's module name and its blocks, each
    ``(module name, module)``, in list order."""

    name: str
    blocks: list[tuple[str, nn.Module]]


def _inside(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or lies under it (``prefix`` "" is the root)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def find_blocks(model: nn.Module) -> list[BlockGroup]:
    """The patched model's repeated blocks: every outermost ``nn.ModuleList`` or ``nn.Sequential`` of which at least
    two children hold gated sites (BERT ``encoder.layer``, LLaMA ``model.layers``, GPT-2 ``transformer.h``, timm
    ``blocks``, Marian's ``model.encoder.layers`` and ``model.decoder.layers``), in module order; ``[]`` when there
    is none. This is structure only: whether the blocks chain is checked on data by the block-wise passes."""
    sites = [name for name, _ in gated_modules(model)]
    groups: list[BlockGroup] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or any(_inside(name, g.name) for g in groups):
            continue
        blocks = [(f"{name}.{child}" if name else child, block) for child, block in module.named_children()]
        if sum(any(_inside(site, block) for site in sites) for block, _ in blocks) >= 2:
            groups.append(BlockGroup(name, blocks))
    return groups


_Slot = Union[int, str]
"""Where a block receives its hidden states: a position in its positional arguments, or a keyword."""


@dataclass
class _Call:
    """The arguments of one call of a block, as a forward pre-hook sees them."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def slots(self) -> dict[_Slot, Any]:
        return {**dict(enumerate(self.args)), **self.kwargs}

    def replaced(self, slot: _Slot, value: Any) -> "_Call":
        """The same call with ``value`` in ``slot``."""
        if isinstance(slot, int):
            return _Call(self.args[:slot] + (value,) + self.args[slot + 1:], self.kwargs)
        return _Call(self.args, {**self.kwargs, slot: value})

    def run(self, block: nn.Module) -> torch.Tensor:
        """The hidden states ``block`` returns on these arguments."""
        return _hidden(block(*self.args, **self.kwargs))


def _hidden(output: Any) -> Optional[torch.Tensor]:
    """A block's output hidden states: the output itself or the first element of a tuple/list; None otherwise."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same input: one object, equal tensors, or containers of such."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # an object whose == is not a truth value
        return False


class _Caught(Exception):
    """Raised by a forward pre-hook to stop a forward pass once it has what it needs."""

    def __init__(self, call: Optional[_Call] = None) -> None:
        super().__init__("caught")
        self.call = call


class _Unchained(Exception):
    """The blocks of a model do not chain on the first batch (the message says how)."""


@dataclass
class _Streams:
    """What the block-wise passes need: the groups in the order a forward pass runs them, the slot of each group's
    hidden states (None for a group of one block), and, per group, the inputs of its first block on every batch in
    the model they were recorded from."""

    groups: list[BlockGroup]
    slots: dict[str, Optional[_Slot]]
    first_calls: dict[str, list[_Call]]


def _chain_slot(group: BlockGroup, calls: list[_Call], outputs: list[Any]) -> Optional[_Slot]:
    """The slot through which every block of ``group`` after the first receives the previous block's hidden states
    (its calls and outputs on one batch); ``_Unchained`` unless there is exactly one such slot, the same for all,
    and every other input equals the first block's."""
    slot: Optional[_Slot] = None
    first = calls[0].slots()
    for j in range(1, len(calls)):
        hidden, current = _hidden(outputs[j - 1]), calls[j].slots()
        if hidden is None:
            raise _Unchained(f"{group.blocks[j - 1][0]} returns a {type(outputs[j - 1]).__name__}, not hidden states")
        matches = [s for s, value in current.items() if isinstance(value, torch.Tensor) and _same(value, hidden)]
        if len(matches) != 1 or (slot is not None and matches[0] != slot):
            raise _Unchained(f"{group.blocks[j][0]} does not take the output of {group.blocks[j - 1][0]} as its input")
        slot = matches[0]
        differ = sorted(str(s) for s in current.keys() | first.keys()
                        if s != slot and not (s in current and s in first and _same(current[s], first[s])))
        if differ:
            raise _Unchained(f"{group.blocks[j][0]} gets other inputs than {group.blocks[0][0]} ({differ[:4]}), "
                             "e.g. one that an earlier block computes")
    return slot


@torch.no_grad()
def _record_streams(model: nn.Module, groups: list[BlockGroup], batches: list[Any]) -> _Streams:
    """Run ``model`` (blocks looked up by the groups' names) on ``batches`` and record the inputs of every group's
    first block on each batch. On the first batch every block is watched: ``_Unchained`` unless each group's blocks
    run once each, in order and one after the other, and chain (:func:`_chain_slot`). Later passes stop once the
    last group's first inputs are recorded."""
    groups = [BlockGroup(g.name, [(name, model.get_submodule(name)) for name, _ in g.blocks]) for g in groups]
    owner = {id(block): (group, j) for group in groups for j, (_, block) in enumerate(group.blocks)}
    first_calls: dict[str, list[_Call]] = {group.name: [] for group in groups}
    trace: list[list[Any]] = []  # first batch: [group, index, call, output] per block call
    last: list[Optional[BlockGroup]] = [None]  # the group run last, known after the first batch

    def pre(block: nn.Module, args: tuple, kwargs: dict) -> None:
        group, j = owner[id(block)]
        call = _Call(args, kwargs)
        if j == 0:
            first_calls[group.name].append(call)
            if group is last[0]:
                raise _Caught()
        if last[0] is None:
            trace.append([group, j, call, None])

    def post(block: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if last[0] is None:
            trace[-1][3] = output

    blocks = [block for group in groups for _, block in group.blocks]
    handles = [block.register_forward_pre_hook(pre, with_kwargs=True) for block in blocks]
    handles += [block.register_forward_hook(post, with_kwargs=True) for block in blocks]
    try:
        for index, batch in enumerate(batches):
            try:
                _call(model, batch)
            except _Caught:
                pass
            if index == 0:
                order = [entry[0].name for entry in trace]
                runs = [name for k, name in enumerate(order) if k == 0 or order[k - 1] != name]
                for group in groups:
                    indices = [entry[1] for entry in trace if entry[0] is group]
                    if indices != list(range(len(group.blocks))) or runs.count(group.name) != 1:
                        raise _Unchained(f"the blocks of {group.name!r} did not run once each, in order and one after "
                                         f"the other on the first batch (they ran as {indices[:8]})")
                slots = {group.name: _chain_slot(group, [e[2] for e in trace if e[0] is group],
                                                 [e[3] for e in trace if e[0] is group]) for group in groups}
                groups.sort(key=lambda group: runs.index(group.name))
                last[0] = groups[-1]
                trace.clear()
    finally:
        for handle in handles:
            handle.remove()
    return _Streams(groups, slots, first_calls)


def _catch(model: nn.Module, block: nn.Module, batches: list[Any]) -> list[_Call]:
    """The inputs of ``block`` on each batch, caught by running ``model`` up to it (SparseGPT's "catcher")."""
    calls = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Caught(_Call(args, kwargs))

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _call(model, batch)
            except _Caught as caught:
                calls.append(caught.call)
    finally:
        handle.remove()
    return calls


def _block_streams(model: nn.Module, original: nn.Module, batches: list[Any],
                   readers: dict[str, Optional[nn.Module]]) -> Optional[_Streams]:
    """The streams for block-wise compensation of ``model`` against ``original`` (the model before linearization,
    or ``model`` itself while it is unchanged), recorded from ``original``; None, with a log line, when the model
    has no blocks that chain or a site to re-fit lies outside them."""
    groups = find_blocks(model)
    names = {id(module): name for name, module in model.named_modules()}
    blocks = [name for group in groups for name, _ in group.blocks]
    outside = [site for site, reader in readers.items() if reader is not None and not any(
        _inside(site, block) and _inside(names[id(reader)], block) for block in blocks)]
    reason = None
    if not groups:
        reason = "no list of repeated blocks holds gated sites"
    elif outside:
        reason = f"the sites {outside[:3]} and their readers are not inside one block"
    else:
        try:
            return _record_streams(original, groups, batches)
        except _Unchained as unchained:
            reason = str(unchained)
    logger.warning("Block-wise compensation is not possible (%s): using the whole-model path, whose reference is a "
                   "full copy of the model.", reason)
    return None


# ------------------------------------------------------------------------------------------------ compensation
def _rows(t: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """``[positions, features]`` fp64 rows of a projection's input or output."""
    t = t.detach().to(torch.float64)
    return (t.movedim(1, -1) if channels_first else t).reshape(-1, t.shape[1 if channels_first else -1])


def _sites_to_refit(linear: dict[str, torch.Tensor], readers: dict[str, Optional[nn.Module]]) -> list[str]:
    """The sites :func:`reconstruct` re-fits, in module order: from the first one with a linear unit on, those whose
    reader is known."""
    started, chosen = False, []
    for name, units in linear.items():
        started = started or bool(units.any())
        if started and readers[name] is not None:
            chosen.append(name)
    return chosen


def reconstruct(model: nn.Module, reference: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None,
                ridge: float = 1e-2, progress: bool = True, blockwise: bool = True) -> dict[str, dict[str, float]]:
    """Compensate the linearization of ``model`` in place: site by site in module order, re-fit the projection
    that reads each gated site (``W_out``, ``b_out``) so that its output on ``model``'s hidden layer matches the
    ``reference`` model's output at the same place, by ridge-regularised least squares over the calibration
    positions (real tokens only, by the attention mask or labels, where one fits). Later sites see the already
    re-fitted earlier ones, so they also absorb the error that reaches them from upstream. Sites before the first
    linear unit, and sites whose reader the trace does not find (e.g. CNNs), are left alone.

    Args:
        reference: the model before linearization (e.g. ``copy.deepcopy(model)`` taken before
            :func:`linearize_one_shot`), with the same module names.
        batches: calibration inputs as for :func:`calibrate` (held in memory).
        ridge: Tikhonov term pulling the re-fit toward the current weights, relative to the mean diagonal of the
            Gram matrix (so the error on the calibration data never rises).
        blockwise: run block by block (module docstring, phase 3, with ``reference``'s blocks as the reference):
            each block runs on the held activations at its input instead of the whole model running once per site.
            Falls back to the whole-model passes (a log line says why) where the blocks do not chain; ``False``
            forces them.
    Returns, per re-fitted site, the mean squared error of its output before and after the re-fit (calibration
    data). Linear units stay exactly linear and keep their targets, so APL, ``summary`` and ``fold`` are unchanged.
    ``ValueError`` for empty batches.
    """
    batches = _batch_list(model, batches, max_batches)
    readers = _readers(model)
    sites = _sites_to_refit(linear_units(model), readers)
    with _inference(model), _inference(reference):
        streams = _block_streams(model, reference, batches, readers) if blockwise else None
        if streams is None:
            return _reconstruct_whole(model, reference, batches, readers, sites, ridge, progress)
        return _reconstruct_blocks(model, streams, batches, readers, sites, lambda name, block: reference.get_submodule(
            name), lambda name: None, ridge, progress)


def _batch_list(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int]) -> list[Any]:
    """At most ``max_batches`` of ``batches``, on the model's input device; ``ValueError`` when there are none."""
    batches = list(itertools.islice(batches, max_batches))
    if not batches:
        raise ValueError("The calibration batches were empty: pass a non-empty iterable of model inputs.")
    device = _input_device(model)
    return [_to_device(batch, device) for batch in batches]


def _reconstruct_whole(model: nn.Module, reference: nn.Module, batches: list[Any],
                       readers: dict[str, Optional[nn.Module]], sites: list[str], ridge: float,
                       progress: bool) -> dict[str, dict[str, float]]:
    """:func:`reconstruct` on whole models: every site's re-fit runs both models on every batch."""
    names = {id(module): name for name, module in model.named_modules()}
    report = {}
    for name in tqdm(sites, desc="reconstruct", disable=not progress):
        reader = readers[name]
        runs = [(functools.partial(_call, model, batch), functools.partial(_call, reference, batch), batch)
                for batch in batches]
        report[name] = _refit(reader, reference.get_submodule(names[id(reader)]), runs, ridge)
    return report


def _reconstruct_blocks(model: nn.Module, streams: _Streams, batches: list[Any],
                        readers: dict[str, Optional[nn.Module]], sites: list[str],
                        reference_of: Callable[[str, nn.Module], nn.Module], prepare: Callable[[str], None],
                        ridge: float, progress: bool) -> dict[str, dict[str, float]]:
    """Block-wise compensation (module docstring, phase 3). Per block: ``reference_of(name, block)`` gives the
    reference block (taken before ``prepare(name)`` changes the block), each site of ``sites`` inside it is re-fitted
    with the block on the model's stream and the reference on the recorded original stream, then both streams move
    through the block. The model's stream of each group starts from its first block's inputs caught in ``model``
    as it is by then."""
    names = {id(module): name for name, module in model.named_modules()}
    report = {}
    with tqdm(total=sum(len(g.blocks) for g in streams.groups), desc="reconstruct", disable=not progress) as bar:
        for group in streams.groups:
            slot = streams.slots[group.name]
            calls = _catch(model, model.get_submodule(group.blocks[0][0]), batches)
            original = streams.first_calls.pop(group.name)
            for j, (block_name, _) in enumerate(group.blocks):
                block = model.get_submodule(block_name)
                reference = reference_of(block_name, block)
                prepare(block_name)
                for site in (site for site in sites if _inside(site, block_name)):
                    relative = names[id(readers[site])][len(block_name) + 1:]
                    runs = [(functools.partial(call.run, block), functools.partial(ref.run, reference), batch)
                            for call, ref, batch in zip(calls, original, batches)]
                    report[site] = _refit(readers[site], reference.get_submodule(relative), runs, ridge)
                for k in range(len(calls) if j + 1 < len(group.blocks) else 0):  # in place: one stream at a time
                    calls[k] = calls[k].replaced(slot, calls[k].run(block))
                    original[k] = original[k].replaced(slot, original[k].run(reference))
                del reference
                _release_freed_memory()
                bar.update()
    return report


def _refit(reader: nn.Module, target_reader: nn.Module, runs: list[tuple[Callable[[], Any], Callable[[], Any], Any]],
           ridge: float) -> dict[str, float]:
    """Least-squares re-fit of ``reader`` (Linear or 1x1 conv) so that ``reader(h_model) ≈ target_reader(h_ref)``
    over ``runs``: per batch, a call that runs ``reader`` on the model's activations, one that runs
    ``target_reader`` on the reference's, and the batch (for its token mask). The squared errors before and after
    follow from the same Gram sums, without another pass. Offloaded weights are read and written through
    Accelerate's store."""
    channels_first = isinstance(reader, nn.Conv2d)
    bias = reader.bias is not None
    out_features, in_features = reader.weight.shape[:2]
    width = in_features + int(bias)
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, out_features, dtype=torch.float64)
    energy, positions = 0.0, 0
    inputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    hooks = [reader.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())),
             target_reader.register_forward_hook(lambda m, args, out: targets.append(out.detach()))]

    def rows(tensors: list[torch.Tensor], batch: Any) -> torch.Tensor:  # real tokens only, when a mask fits
        picked = []
        for t in tensors:
            mask = _token_mask(batch, t)
            flat = _rows(t, channels_first)
            picked.append((flat[mask.reshape(-1).to(flat.device)] if mask is not None else flat).cpu())
        return torch.cat(picked)

    try:
        for run_model, run_reference, batch in runs:
            run_model()
            run_reference()
            h, y = rows(inputs, batch), rows(targets, batch)
            inputs.clear()
            targets.clear()
            if bias:
                h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
            gram.addmm_(h.T, h)
            cross.addmm_(h.T, y)
            energy += float(y.pow(2).sum())
            positions += h.shape[0]
    finally:
        for hook in hooks:
            hook.remove()

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:  # sum(a * b) without a temporary
        return float(torch.vdot(a.reshape(-1), b.reshape(-1)))

    with _onloaded(reader, write=True):
        current = reader.weight.detach().to(torch.float64).reshape(out_features, -1).T.contiguous().cpu()
        if bias:
            current = torch.cat([current, reader.bias.detach().to(torch.float64).cpu()[None]], dim=0)
        # mean squared error of S: (S.G S - 2 S.C + E) / positions
        mse_before = (dot(current, gram @ current) - 2 * dot(current, cross) + energy) / max(positions, 1)
        # Ridge toward the current weights S0: min |H S - Y|^2 + lam |S - S0|^2, so the calibration error can only
        # fall: (G + lam) S = C + lam S0, solved in place (G becomes its Cholesky factor: the only n x n matrix).
        # G S = rhs - lam S and C = rhs - lam S0 then give the error after.
        lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        rhs = cross.add_(current, alpha=lam)
        gram.diagonal().add_(lam)
        solution = _solve_in_place(gram, rhs)  # [in (+1), out]
        del gram
        solution = solution.contiguous()
        mse_after = (2 * lam * dot(solution, current) - lam * dot(solution, solution) - dot(solution, rhs)
                     + energy) / max(positions, 1)
        reader.weight.copy_(solution[:in_features].T.reshape(reader.weight.shape).to(reader.weight))
        if bias:
            reader.bias.copy_(solution[-1].to(reader.bias))
    return {"mse_before": mse_before, "mse_after": max(mse_after, 0.0)}


def _solve_in_place(matrix: torch.Tensor, rhs: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``matrix^-1 rhs`` for a symmetric positive definite ``matrix`` ``[n, n]`` and ``rhs`` ``[n, k]``. ``matrix`` is
    overwritten: a blocked right-looking Cholesky factorization (as LAPACK's ``potrf``, Golub & Van Loan, Matrix
    Computations, 4.2) leaves ``L`` with ``matrix = L L^T`` in its lower triangle, so no second ``n x n`` matrix is
    allocated; then ``L y = rhs`` and ``L^T x = y`` by triangular solves. ``torch.linalg.LinAlgError`` when
    ``matrix`` is not positive definite."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        end = min(start + block, n)
        matrix[start:end, start:end] = torch.linalg.cholesky(matrix[start:end, start:end])
        if end < n:
            panel = torch.linalg.solve_triangular(matrix[start:end, start:end].mT, matrix[end:, start:end],
                                                  upper=True, left=False)
            matrix[end:, start:end] = panel
            matrix[end:, end:].addmm_(panel, panel.mT, alpha=-1)
    upper = matrix.mT  # its upper triangle is L^T (only that triangle is read)
    y = torch.linalg.solve_triangular(upper, rhs.mT, upper=True, left=False)  # y^T L^T = rhs^T
    return torch.linalg.solve_triangular(upper, y.mT, upper=True)


def one_shot(model: nn.Module, batches: Iterable[Any], nonlinear_fraction: Optional[float] = None,
             apl: Optional[float] = None, target: Target = "affine", score: Score = "sensitivity",
             compensate: bool = True, max_batches: Optional[int] = None, progress: bool = True,
             blockwise: bool = True) -> OneShotReport:
    """The whole post-training linearization in one call: :func:`calibrate` (with ``sensitivity`` when ``score``
    needs it), :func:`linearize_one_shot` to the budget, then (``compensate``) :func:`reconstruct` against the
    model as it was. ``batches`` is read into memory (at most ``max_batches``).

    With ``blockwise`` (the default) no copy of the model is made: the statistics and the ranking are global, as
    in the calls above, and linearization and compensation run block by block with a copy of one block as the
    reference (module docstring, "Bounded memory"); the result is the same up to floating-point rounding. Where
    the blocks do not chain, or ``blockwise=False``, the whole-model path runs: a deep copy of the model is the
    reference and calibration keeps the whole backward graph. The report gains ``calibration_batches``,
    ``seconds`` (wall time of the whole step) and, when compensating, ``reconstruct`` (per-site errors).
    ``ValueError`` as :func:`calibrate` and :func:`linearize_one_shot`.
    """
    start = time.perf_counter()
    batches = _batch_list(model, batches, max_batches)
    stats = calibrate(model, batches, sensitivity=score == "sensitivity", progress=progress,
                      checkpoint_blocks=blockwise)
    _release_freed_memory()
    if not compensate:
        report = linearize_one_shot(model, stats, nonlinear_fraction=nonlinear_fraction, apl=apl, target=target,
                                    score=score)
    else:
        readers = _readers(model)
        with _inference(model):
            streams = _block_streams(model, model, batches, readers) if blockwise else None
        if streams is None:
            reference = copy.deepcopy(model)
            report = linearize_one_shot(model, stats, nonlinear_fraction=nonlinear_fraction, apl=apl, target=target,
                                        score=score)
            with _inference(model), _inference(reference):
                report["reconstruct"] = _reconstruct_whole(
                    model, reference, batches, readers, _sites_to_refit(linear_units(model), readers), 1e-2, progress)
        else:
            plan = _plan(model, stats, nonlinear_fraction, apl, target, score, readers)
            linear = linear_units(model)
            sites = _sites_to_refit({name: linear[name].cpu() | plan.masks[name] for name in plan.gates}, readers)
            blocks = [name for group in streams.groups for name, _ in group.blocks]
            plan.apply(name for name in plan.gates if not any(_inside(name, block) for block in blocks))

            def reference_of(name: str, block: nn.Module) -> nn.Module:
                changing = [readers[site] for site in sites if _inside(site, name)]
                changing += [gate for site, gate in plan.gates.items()
                             if _inside(site, name) and bool(plan.masks[site].any())]
                return _reference_copy(block, changing)

            def prepare(name: str) -> None:
                plan.apply(site for site in plan.gates if _inside(site, name))

            with _inference(model):
                compensation = _reconstruct_blocks(model, streams, batches, readers, sites, reference_of, prepare,
                                                   1e-2, progress)
            report = _report(model, plan, target, score)
            report["reconstruct"] = compensation
    report.update(calibration_batches=len(batches), seconds=time.perf_counter() - start)
    return report
