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

Compensation: :func:`reconstruct` then re-fits, layer by layer, the projection that reads each site so that the
linearized model's FFN outputs match a reference copy of the model (least squares on calibration data, as
SparseGPT does for pruning). ``benchmarks/one_shot.py`` measures all of these on the real MiniLM.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from .core_map import average_path_length
from .folding import reader_projections
from .gates import GatedActivation
from .patching import gated_modules, is_patched, linear_units, patch_state
from .probe_inputs import _call, main_output
from .sparsity import linear_quota

Target = Literal["affine", "identity"]
Score = Literal["residual", "sensitivity"]
_MOMENTS = ("sum_x", "sum_xx", "sum_z", "sum_zz", "sum_xz")
_FIELDS = ("weight",) + _MOMENTS
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
        1 when None)."""
        x, z = x.to(torch.float64), z.to(torch.float64)
        if w is None:
            self.weight.add_(x.shape[0])
            w = 1.0
        else:
            w = w.to(torch.float64)
            self.weight.add_(w.sum(0))
        for name, value in zip(_MOMENTS, (x, x * x, z, z * z, x * z)):
            getattr(self, name).add_((w * value).sum(0))

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
    Linearizing (gates and targets) leaves it unchanged; re-fitting weights (:func:`reconstruct`) changes it."""
    gate_params = {id(p) for _, gate in gated_modules(model) for p in gate.parameters(recurse=False)}
    return float(sum(p.detach().double().pow(2).sum() for p in model.parameters() if id(p) not in gate_params))


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


def calibrate(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None,
              sensitivity: bool = False, seed: int = 0, progress: bool = True) -> CalibrationStats:
    """Stream ``batches`` through the patched ``model`` in eval mode and return per-unit moments.

    Args:
        batches: a DataLoader or any iterable of model inputs: a dict (``model(**batch)``; include
            ``decoder_input_ids`` or ``labels`` for an encoder-decoder, i.e. teacher forcing), a tuple or list
            (``model(*batch)``) or a tensor. Tensors are moved to the model's device.
        max_batches: stop after this many batches.
        sensitivity: also back-propagate a random projection of the main output (one backward per batch, seeded
            by ``seed``) and record the output-sensitivity weighted moments that ``score="sensitivity"`` needs.
            Without it, calibration runs under ``no_grad``.
    Every position of every batch counts for the plain moments, padding included; the sensitivity weights are 0
    at padded output positions (attention mask or ``labels == -100``). Memory is O(units); sums are fp64.
    """
    if not is_patched(model):
        raise ValueError("calibrate needs a patched model: call hl.patch_model(model) first.")
    gates = dict(gated_modules(model))
    sites = {name: SiteMoments.zeros(gate.channels) for name, gate in gates.items()}
    weighted = {name: SiteMoments.zeros(gate.channels) for name, gate in gates.items()} if sensitivity else None

    outputs: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # this batch: name, x, z, output

    def hook(name: str):
        def record(gate: GatedActivation, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x, z = _positions(inputs[0], gate.channel_dim), _positions(output, gate.channel_dim)
            sites[name].add(x, z)
            if weighted is not None:
                outputs.append((name, x, z, output))
        return record

    handles = [gate.register_forward_hook(hook(name)) for name, gate in gates.items()]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    needs_grad = {name: gate.alpha.requires_grad for name, gate in gates.items()}
    model.eval()
    seen = 0
    try:
        for gate in gates.values():  # every gate output then has a grad_fn, whatever else is frozen
            gate.alpha.requires_grad_(sensitivity)
        for batch in tqdm(batches, desc="calibrate", total=max_batches, disable=not progress):
            if max_batches is not None and seen >= max_batches:
                break
            batch = _to_device(batch, device)
            with torch.set_grad_enabled(sensitivity):
                output = main_output(_call(model, batch))
            if weighted is not None:
                projection = torch.randn(output.shape, generator=generator, device=device, dtype=output.dtype)
                mask = _token_mask(batch, output)
                if mask is not None:
                    projection = projection * mask.view(*mask.shape, *([1] * (output.dim() - 2)))
                grads = torch.autograd.grad(output, [o for *_, o in outputs], projection, allow_unused=True)
                for (name, x, z, _), g in zip(outputs, grads):
                    if g is not None:
                        weighted[name].add(x, z, _positions(g, gates[name].channel_dim) ** 2)
                outputs.clear()
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for name, gate in gates.items():
            gate.alpha.requires_grad_(needs_grad[name])
        model.train(was_training)
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
    weight = reader.weight.detach().to(torch.float64)
    return weight.pow(2).sum(dim=[d for d in range(weight.dim()) if d != 1])


def _fit_units(model: nn.Module, stats: CalibrationStats, target: Target, score: Score
               ) -> tuple[dict[str, GatedActivation], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The model's gates and, per site, ``(p, q, score)`` of every unit (fp64 ``[C]``); units that are linear
    already score ``inf``. Raises ``ValueError`` for an unknown target or score, or stats of another model."""
    if target not in ("affine", "identity"):
        raise ValueError(f"target must be 'affine' or 'identity'; got {target!r}.")
    if score not in ("residual", "sensitivity"):
        raise ValueError(f"score must be 'residual' or 'sensitivity'; got {score!r}.")
    if score == "sensitivity" and stats.sensitivity is None:
        raise ValueError("score='sensitivity' needs stats from hl.calibrate(model, batches, sensitivity=True).")
    stats.check_model(model)
    gates = dict(gated_modules(model))
    already = linear_units(model)
    readers = reader_projections(model) if score == "residual" else {}
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
    if (nonlinear_fraction is None) == (apl is None):
        raise ValueError("Give exactly one budget: nonlinear_fraction=0.25 or apl=1.5.")
    gates, fits = _fit_units(model, stats, target, score)
    names, scores = list(gates), [fit[2] for fit in fits.values()]
    flat = torch.cat(scores)
    order = torch.argsort(flat, stable=True)
    candidates = int(torch.isfinite(flat).sum())
    total = flat.numel()
    if nonlinear_fraction is not None:
        count = max(0, min(candidates, linear_quota(nonlinear_fraction, total) - (total - candidates)))
    else:
        count = _fewest_for_apl(model, gates, names, fits, order, candidates, apl)
    masks = _masks(names, gates, order[:count])
    _apply(gates, fits, masks)
    layers = {}
    for name in names:
        chosen = masks[name]
        layers[name] = {"units": gates[name].channels, "linearized": int(chosen.sum()),
                        "nonlinear": int((~linear_units(model)[name]).sum()),
                        "predicted_error": float(fits[name][2][chosen.cpu()].sum())}
    linear_now = sum(int(m.sum()) for m in linear_units(model).values())
    report = OneShotReport(
        target=target, score=score, linearized=count, units=total, linear=linear_now,
        nonlinear_fraction=(total - linear_now) / total,
        predicted_error=sum(v["predicted_error"] for v in layers.values()), layers=layers)
    report.update(_apls(model))
    return report


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


# ------------------------------------------------------------------------------------------------ compensation
def _rows(t: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """``[positions, features]`` fp64 rows of a projection's input or output."""
    t = t.detach().to(torch.float64)
    return (t.movedim(1, -1) if channels_first else t).reshape(-1, t.shape[1 if channels_first else -1])


@torch.no_grad()
def reconstruct(model: nn.Module, reference: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None,
                ridge: float = 1e-2, progress: bool = True) -> dict[str, dict[str, float]]:
    """Compensate the linearization of ``model`` in place: site by site in module order, re-fit the projection
    that reads each gated site (``W_out``, ``b_out``) so that its output on ``model``'s hidden layer matches the
    ``reference`` model's output at the same place, by ridge-regularised least squares over the calibration
    positions (real tokens only, by the attention mask or labels, where one fits). Later sites see the already
    re-fitted earlier ones, so they also absorb the error that reaches them from upstream. Sites before the first
    linear unit, and sites whose reader the trace does not find (e.g. CNNs), are left alone.

    Args:
        reference: the model before linearization (e.g. ``copy.deepcopy(model)`` taken before
            :func:`linearize_one_shot`), with the same module names.
        batches: calibration inputs as for :func:`calibrate` (held in memory: each site takes one pass).
        ridge: Tikhonov term pulling the re-fit toward the current weights, relative to the mean diagonal of the
            Gram matrix (so the error on the calibration data never rises).
    Returns, per re-fitted site, the mean squared error of its output before and after the re-fit (calibration
    data). Linear units stay exactly linear and keep their targets, so APL, ``summary`` and ``fold`` are unchanged.
    """
    batches = list(itertools.islice(batches, max_batches))
    if not batches:
        raise ValueError("The calibration batches were empty: pass a non-empty iterable of model inputs.")
    device = next(model.parameters()).device
    batches = [_to_device(batch, device) for batch in batches]
    linear = linear_units(model)
    readers = reader_projections(model)
    started, report = False, {}
    was_training = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        for name, gate in tqdm(list(gated_modules(model)), desc="reconstruct", disable=not progress):
            started = started or bool(linear[name].any())
            reader = readers[name]
            if not started or reader is None:
                continue
            reader_name = next(n for n, m in model.named_modules() if m is reader)
            report[name] = _refit(model, reference, reader, reference.get_submodule(reader_name), batches, ridge)
    finally:
        model.train(was_training[0])
        reference.train(was_training[1])
    return report


def _refit(model: nn.Module, reference: nn.Module, reader: nn.Module, target_reader: nn.Module,
           batches: list[Any], ridge: float) -> dict[str, float]:
    """Least-squares re-fit of ``reader`` (Linear or 1x1 conv) so that ``reader(h_model) ≈ target_reader(h_ref)``;
    the squared errors before and after follow from the same Gram sums, without another pass."""
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
            picked.append((flat[mask.reshape(-1)] if mask is not None else flat).cpu())
        return torch.cat(picked)

    try:
        for batch in batches:
            _call(model, batch)
            _call(reference, batch)
            h, y = rows(inputs, batch), rows(targets, batch)
            inputs.clear()
            targets.clear()
            if bias:
                h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
            gram += h.T @ h
            cross += h.T @ y
            energy += float(y.pow(2).sum())
            positions += h.shape[0]
    finally:
        for hook in hooks:
            hook.remove()
    current = reader.weight.detach().to(torch.float64).reshape(out_features, -1).T.cpu()
    if bias:
        current = torch.cat([current, reader.bias.detach().to(torch.float64).cpu()[None]], dim=0)

    def mse(solution: torch.Tensor) -> float:
        return (float(torch.sum(solution * (gram @ solution - 2 * cross))) + energy) / max(positions, 1)

    # Ridge toward the current weights: min |H S - Y|^2 + lam |S - S0|^2. The calibration error can only fall.
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    regularised = gram + lam * torch.eye(width, dtype=gram.dtype)
    solution = torch.linalg.solve(regularised, cross + lam * current)  # [in (+1), out]
    with torch.no_grad():
        reader.weight.copy_(solution[:in_features].T.reshape(reader.weight.shape).to(reader.weight))
        if bias:
            reader.bias.copy_(solution[-1].to(reader.bias))
    return {"mse_before": mse(current), "mse_after": mse(solution)}


def one_shot(model: nn.Module, batches: Iterable[Any], nonlinear_fraction: Optional[float] = None,
             apl: Optional[float] = None, target: Target = "affine", score: Score = "sensitivity",
             compensate: bool = True, max_batches: Optional[int] = None, progress: bool = True) -> OneShotReport:
    """The whole post-training linearization in one call: :func:`calibrate` (with ``sensitivity`` when ``score``
    needs it), :func:`linearize_one_shot` to the budget, then (``compensate``) :func:`reconstruct` against a copy of
    the model taken before. ``batches`` is read into memory (at most ``max_batches``). The report gains
    ``calibration_batches``, ``seconds`` (wall time of the whole step) and, when compensating, ``reconstruct``
    (per-site errors)."""
    start = time.perf_counter()
    batches = list(itertools.islice(batches, max_batches))
    reference = copy.deepcopy(model) if compensate else None
    stats = calibrate(model, batches, sensitivity=score == "sensitivity", progress=progress)
    report = linearize_one_shot(model, stats, nonlinear_fraction=nonlinear_fraction, apl=apl, target=target,
                                score=score)
    if reference is not None:
        report["reconstruct"] = reconstruct(model, reference, batches, progress=progress)
    report.update(calibration_batches=len(batches), seconds=time.perf_counter() - start)
    return report
