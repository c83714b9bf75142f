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

Scores (``score=``):

* ``"residual"``: ``E[(z - p x - q)^2] * ||W_out[:, c]||^2``, the residual of the fit times the squared norm of the
  unit's column in the projection that reads it (found through the family's fold rules; units whose reader is
  unknown, such as CNN activations, weigh 1). Ranked globally.
* ``"residual_per_layer"``: the same scores, normalized per layer by the layer's mean output energy
  ``E||W_out z||^2`` proxy ``sum_c E[z_c^2] ||W_out[:, c]||^2`` so that every layer's errors are relative to
  what the layer contributes. ``benchmarks/one_shot.py`` compares them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from .core_map import average_path_length
from .gates import GatedActivation
from .patching import _call, gated_modules, is_patched, linear_units, patch_state
from .sparsity import linear_quota

Target = Literal["affine", "identity"]
Score = Literal["residual", "residual_per_layer"]
_MOMENTS = ("sum_x", "sum_xx", "sum_z", "sum_zz", "sum_xz")
PathLike = Union[str, Path]


# ------------------------------------------------------------------------------------------------ statistics
@dataclass
class SiteMoments:
    """Per-unit sums over ``count`` calibration positions (tokens or pixels) of one gated site, fp64 ``[C]``:
    ``sum_x``, ``sum_xx`` (input ``x``), ``sum_z``, ``sum_zz`` (output ``z`` of the unit), ``sum_xz``."""

    count: int
    sum_x: torch.Tensor
    sum_xx: torch.Tensor
    sum_z: torch.Tensor
    sum_zz: torch.Tensor
    sum_xz: torch.Tensor

    @classmethod
    def zeros(cls, channels: int) -> "SiteMoments":
        return cls(0, *(torch.zeros(channels, dtype=torch.float64) for _ in _MOMENTS))

    def add(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """Accumulate ``x`` and ``z`` of shape ``[positions, C]``."""
        x, z = x.to(torch.float64), z.to(torch.float64)
        self.count += x.shape[0]
        for name, value in zip(_MOMENTS, (x, x * x, z, z * z, x * z)):
            getattr(self, name).add_(value.sum(0))

    def fit(self, target: Target, glu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p, q, residual)``: the linear target of every unit and ``E[(z - target)^2]``, fp64 ``[C]``."""
        n = float(self.count)
        mean_x, mean_z = self.sum_x / n, self.sum_z / n
        var_x = (self.sum_xx / n - mean_x**2).clamp_min(0)
        var_z = (self.sum_zz / n - mean_z**2).clamp_min(0)
        cov = self.sum_xz / n - mean_x * mean_z
        ones = torch.ones_like(mean_x)
        if target == "identity":
            if glu:  # z -> 1
                return ones, ones, (self.sum_zz / n - 2 * mean_z + 1).clamp_min(0)
            return ones, torch.zeros_like(mean_x), ((self.sum_zz - 2 * self.sum_xz + self.sum_xx) / n).clamp_min(0)
        if glu:  # z -> E z, a constant
            return ones, mean_z, var_z
        # A unit whose input barely varies (relative to its scale) is a constant: p = 0.
        varies = var_x > 1e-12 * (self.sum_xx / n).clamp_min(1e-300)
        p = torch.where(varies, cov / torch.where(varies, var_x, ones), torch.zeros_like(cov))
        q = mean_z - p * mean_x
        residual = torch.where(varies, var_z - cov**2 / torch.where(varies, var_x, ones), var_z)
        return p, q, residual.clamp_min(0)


@dataclass
class CalibrationStats:
    """What :func:`calibrate` measured: per gated site, :class:`SiteMoments`; plus the model's family and site
    widths, so that stats are never applied to another model. Saves as JSON (``.json``) or safetensors."""

    family: str
    sites: dict[str, SiteMoments]
    batches: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` is patched with exactly these sites and widths."""
        if not is_patched(model):
            raise ValueError("The model is not patched; call hl.patch_model(model) (with the config used for "
                             "calibration) before applying calibration stats.")
        widths = {name: gate.channels for name, gate in gated_modules(model)}
        mine = {name: int(m.sum_x.numel()) for name, m in self.sites.items()}
        if widths != mine or patch_state(model).family != self.family:
            diff = sorted(set(widths.items()) ^ set(mine.items()))[:6]
            raise ValueError(
                f"These calibration stats were measured on another model (family {self.family!r}, {len(mine)} "
                f"sites); this model is {patch_state(model).family!r} with {len(widths)} sites. Differing sites: "
                f"{diff}. Run hl.calibrate on this model."
            )

    def save(self, path: PathLike) -> Path:
        """Write to ``path``: JSON when it ends in ``.json``, else safetensors. Returns the path."""
        path = Path(path)
        header = {"family": self.family, "batches": self.batches, "metadata": self.metadata,
                  "counts": {name: m.count for name, m in self.sites.items()}}
        if path.suffix == ".json":
            body = {name: {k: getattr(m, k).tolist() for k in _MOMENTS} for name, m in self.sites.items()}
            path.write_text(json.dumps({**header, "sites": body}) + "\n", encoding="utf-8")
        else:
            tensors = {f"{name}/{k}": getattr(m, k).contiguous() for name, m in self.sites.items() for k in _MOMENTS}
            safetensors.torch.save_file(tensors, str(path), metadata={"calibration": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: PathLike) -> "CalibrationStats":
        """Read what :meth:`save` wrote."""
        path = Path(path)
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            tensors = {f"{name}/{k}": torch.tensor(v[k], dtype=torch.float64)
                       for name, v in data["sites"].items() for k in _MOMENTS}
        else:
            with safetensors.safe_open(str(path), framework="pt") as fh:
                data = json.loads(fh.metadata()["calibration"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        sites = {name: SiteMoments(count, *(tensors[f"{name}/{k}"] for k in _MOMENTS))
                 for name, count in data["counts"].items()}
        return cls(data["family"], sites, data["batches"], data.get("metadata", {}))


def _positions(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``[positions, C]`` view of a site tensor whose channels lie along ``channel_dim``."""
    return t.detach().movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], max_batches: Optional[int] = None,
              progress: bool = True) -> CalibrationStats:
    """Stream ``batches`` through the patched ``model`` (eval mode, no grad) and return per-unit moments.

    Args:
        batches: a DataLoader or any iterable of model inputs: a dict (``model(**batch)``; include
            ``decoder_input_ids`` or ``labels`` for an encoder-decoder, i.e. teacher forcing), a tuple or list
            (``model(*batch)``) or a tensor. Tensors are moved to the model's device.
        max_batches: stop after this many batches.
    Every position of every batch counts, padding included: calibrate on unpadded or similar-length batches
    where padding would dominate. Memory is O(units); accumulation is fp64.
    """
    if not is_patched(model):
        raise ValueError("calibrate needs a patched model: call hl.patch_model(model) first.")
    gates = dict(gated_modules(model))
    sites = {name: SiteMoments.zeros(gate.channels) for name, gate in gates.items()}

    def hook(name: str):
        def record(gate: GatedActivation, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            sites[name].add(_positions(inputs[0], gate.channel_dim), _positions(output, gate.channel_dim))
        return record

    handles = [gate.register_forward_hook(hook(name)) for name, gate in gates.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in tqdm(batches, desc="calibrate", total=max_batches, disable=not progress):
            if max_batches is not None and seen >= max_batches:
                break
            _call(model, _to_device(batch, device))
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("The calibration batches were empty: pass a DataLoader or a non-empty iterable of "
                         "model inputs.")
    return CalibrationStats(patch_state(model).family, sites, seen)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict) or hasattr(batch, "items"):
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


def _reader_projection(model, name, gate):  # TODO(integration): move to folding.py
    from .families import family_by_name
    from .folding import _NoFold, _fits

    for rule in family_by_name(patch_state(model).family).fold_rules:
        try:
            owner_name = _fits(model, name, gate, rule)
        except _NoFold:
            continue
        owner = model.get_submodule(owner_name) if owner_name else model
        return owner.get_submodule(rule.fc_out)
    return None


def _reader_column_norms(model: nn.Module, name: str, gate: GatedActivation) -> torch.Tensor:
    """``||W_out[:, c]||^2`` of the projection that reads the site (via the family's fold rules), else ones."""
    reader = _reader_projection(model, name, gate)
    if reader is None:
        return torch.ones(gate.channels, dtype=torch.float64)
    weight = reader.weight.detach().to(torch.float64)
    return weight.pow(2).sum(dim=[d for d in range(weight.dim()) if d != 1])


def linearize_one_shot(
    model: nn.Module,
    stats: CalibrationStats,
    nonlinear_fraction: Optional[float] = None,
    apl: Optional[float] = None,
    target: Target = "affine",
    score: Score = "residual",
) -> OneShotReport:
    """Linearize ``model``'s cheapest units in place, to a budget: a ``nonlinear_fraction`` of all gated units
    (met exactly: ``floor(fraction * N)`` stay nonlinear, or more when more were linear already cannot be undone)
    or a normalized ``apl`` (the fewest units whose linearization brings the APL to at most ``apl``).

    Units that are linear already keep their gate and target. Chosen units get gate 1 and the fitted target.
    """
    if (nonlinear_fraction is None) == (apl is None):
        raise ValueError("Give exactly one budget: nonlinear_fraction=0.25 or apl=1.5.")
    if target not in ("affine", "identity"):
        raise ValueError(f"target must be 'affine' or 'identity'; got {target!r}.")
    if score not in ("residual", "residual_per_layer"):
        raise ValueError(f"score must be 'residual' or 'residual_per_layer'; got {score!r}.")
    stats.check_model(model)
    gates = dict(gated_modules(model))
    already = linear_units(model)
    names, fits, scores = list(gates), {}, []
    for name in names:
        gate, moments = gates[name], stats.sites[name]
        p, q, residual = moments.fit(target, gate.kind == "glu")
        norms = _reader_column_norms(model, name, gate)
        unit_scores = residual * norms
        if score == "residual_per_layer":
            energy = (moments.sum_zz / max(moments.count, 1) * norms).sum()
            unit_scores = unit_scores / energy.clamp_min(1e-300)
        unit_scores = torch.where(already[name].cpu(), torch.full_like(unit_scores, math.inf), unit_scores)
        fits[name] = (p, q, unit_scores)
        scores.append(unit_scores)
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
def _apply(gates: dict[str, GatedActivation], fits: dict[str, tuple], masks: dict[str, torch.Tensor]) -> None:
    for name, gate in gates.items():
        mask = masks[name].to(gate.alpha.device)
        if not bool(mask.any()):
            continue
        p, q, _ = fits[name]
        slope = torch.where(mask.cpu(), p.float(), gate.target_slope.cpu())
        offset = torch.where(mask.cpu(), q.float(), gate.target_offset.cpu())
        gate.set_targets(None if gate.kind == "glu" else slope, offset)
        gate.alpha[mask] = 1.0


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
