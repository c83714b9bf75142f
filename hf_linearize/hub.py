"""Linearized checkpoints: the directory format, save/load, model cards and pushing to the Hugging Face Hub.

A checkpoint directory holds:

==========================  ==============================================================================
``config.json``             the base model's own config (transformers), or timm's ``config.json`` with
                            ``architecture`` and ``model_args`` (as ``timm.models.push_to_hf_hub`` writes it)
``linearize_config.json``   format version, library version, backend, family, ``LinearizeConfig``, the gated
                            sites, and the gate summary and path lengths measured on the saved model
``model.safetensors``       every weight, gates included (``<site>.alpha``)
``README.md``               the model card (YAML metadata + prose), from ``model_cards/linearized_model.md``
tokenizer / processor       when given
==========================  ==============================================================================
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import huggingface_hub
import safetensors.torch
import timm
import torch
import transformers
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from torch import nn

from .config import LinearizeConfig
from .patching import gated_modules, patch_model, patch_state, summary

FORMAT_VERSION = 1
LINEARIZE_CONFIG_NAME = "linearize_config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_TEMPLATE = importlib.resources.files("hf_linearize.model_cards") / "linearized_model.md"

PathLike = Union[str, os.PathLike]


class LinearizedCheckpointError(ValueError):
    """A directory or repo is not a valid linearized checkpoint (missing, corrupt, mismatched, or too new)."""


class HubPushError(RuntimeError):
    """Pushing failed; the message names the local directory where the checkpoint is safely saved."""


def backend(model: nn.Module) -> Optional[str]:
    """``"transformers"`` or ``"timm"`` for models this module can save, else None."""
    if isinstance(model, transformers.PreTrainedModel):
        return "transformers"
    if type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg"):
        return "timm"
    return None


def _require_backend(model: nn.Module) -> str:
    name = backend(model)
    if name is None:
        raise TypeError(
            f"Saving supports transformers and timm models; got {type(model).__name__}. Save its state_dict with "
            "torch.save instead."
        )
    return name


def _path_length(model: nn.Module) -> Optional[dict[str, Any]]:
    """Both APL forms and the per-layer map, or None where the family has no path graph yet."""
    from .core_map import path_length_report

    try:
        return path_length_report(model)
    except NotImplementedError:
        return None


def checkpoint_metadata(model: nn.Module) -> dict[str, Any]:
    """What goes into ``linearize_config.json``; every number is measured on ``model`` now."""
    from . import __version__

    state = patch_state(model)
    return {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "backend": _require_backend(model),
        "family": state.family,
        "linearize_config": state.config.to_dict(),
        "sites": {name: gate.channels for name, gate in gated_modules(model)},
        "summary": dict(summary(model)),
        "path_length": _path_length(model),
    }


# ------------------------------------------------------------------------------------------------ model card
def render_model_card(
    metadata: Mapping[str, Any],
    *,
    base_model: Optional[str] = None,
    metrics: Optional[Mapping[str, float]] = None,
    task: str = "translation",
    dataset: Optional[str] = None,
    language: Union[str, list[str], None] = None,
    model_name: str = "linearized-model",
) -> ModelCard:
    """The model card: YAML metadata (``base_model``, ``tags``, ``model-index``, ``path_length``) and prose.

    ``metadata`` is :func:`checkpoint_metadata`'s result; ``metrics`` maps a metric name (``bleu``, ``chrf``,
    ``accuracy``) to a value measured on ``dataset``.
    """
    config = metadata["linearize_config"]
    total = metadata["summary"]["total"]
    apl = metadata["path_length"] or {}
    path_length = {
        "normalized_apl": apl.get("normalized_apl"),
        "unnormalized_apl": apl.get("unnormalized_apl"),
        "total_units": total["units"],
        "linear_units": total["linear"],
        "nonlinear_units": total["nonlinear"],
        "nonlinear_fraction": total["nonlinear_fraction"],
        "per_layer_nonlinear": {n: v["nonlinear"] for n, v in metadata["summary"]["layers"].items()},
        "prior": {k: config[k] for k in ("prior_lambda", "prior_start", "prior_warmup", "freeze_gates_after",
                                         "budget_target", "budget_metric", "linear_threshold")},
    }
    eval_results = [
        EvalResult(task_type=task, dataset_type=dataset or "custom", dataset_name=dataset or "custom",
                   metric_type=name, metric_value=float(value))
        for name, value in (metrics or {}).items()
    ] or None
    card_data = ModelCardData(
        base_model=base_model,
        library_name="hf_linearize",
        tags=["linearized", "average-path-length", "hf_linearize", metadata["backend"], metadata["family"]],
        datasets=[dataset] if dataset else None,
        language=language,
        model_name=model_name,
        eval_results=eval_results,
        path_length=path_length,
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE.read_text(encoding="utf-8"),
        model_name=model_name,
        base_model=base_model,
        metrics=dict(metrics or {}),
        dataset=dataset,
        pl=path_length,
        family=metadata["family"],
        backend=metadata["backend"],
        library_version=metadata["library_version"],
    )


# ------------------------------------------------------------------------------------------------ save
def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    tokenizer: Any = None,
    model_args: Optional[dict[str, Any]] = None,
    **card_kwargs: Any,
) -> Path:
    """Write a linearized checkpoint directory (see module docstring) and return its path.

    Args:
        model: a patched transformers or timm model.
        tokenizer: a tokenizer or image processor to save alongside (anything with ``save_pretrained``).
        model_args: timm only: serialisable replacements for constructor arguments timm cannot record.
        card_kwargs: passed to :func:`render_model_card` (``base_model``, ``metrics``, ``dataset``, ...).
    """
    metadata = checkpoint_metadata(model)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    if metadata["backend"] == "transformers":
        model.save_pretrained(directory)
    else:
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(directory / "config.json"), model_args=model_args)
        safetensors.torch.save_model(model, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / LINEARIZE_CONFIG_NAME).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    render_model_card(metadata, **card_kwargs).save(directory / "README.md")
    return directory


# ------------------------------------------------------------------------------------------------ load
def _local_directory(name_or_path: PathLike, revision: Optional[str], token: Optional[str]) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") > 1:
        raise LinearizedCheckpointError(f"{name_or_path} is neither a checkpoint directory nor a Hub repo id.")
    repo_id = str(name_or_path)
    api = HfApi(token=token)
    files = api.list_repo_files(repo_id, revision=revision)
    if LINEARIZE_CONFIG_NAME not in files:
        raise LinearizedCheckpointError(
            f"Hub repo {repo_id!r} (revision {revision or 'main'}) is not a linearized model: it has no "
            f"{LINEARIZE_CONFIG_NAME}. Load it with transformers or timm directly, then hf_linearize.patch_model."
        )
    return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, token=token))


def read_checkpoint_metadata(directory: PathLike) -> dict[str, Any]:
    """Parse and check ``linearize_config.json``; raise :class:`LinearizedCheckpointError` with the fix."""
    file = Path(directory) / LINEARIZE_CONFIG_NAME
    if not file.is_file():
        raise LinearizedCheckpointError(
            f"{directory} is not a linearized checkpoint: {LINEARIZE_CONFIG_NAME} is missing. Save with "
            "hf_linearize.save_pretrained, or load the base model with transformers/timm and patch it."
        )
    try:
        metadata = json.loads(file.read_text(encoding="utf-8"))
        version = metadata["format_version"]
        config = LinearizeConfig.from_dict(metadata["linearize_config"])
        backend, sites = metadata["backend"], metadata["sites"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise LinearizedCheckpointError(f"{file} is corrupt ({type(error).__name__}: {error}); re-save it.") from error
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LinearizedCheckpointError(
            f"{file} has format_version {version!r}, newer than this hf_linearize reads ({FORMAT_VERSION}); "
            f"upgrade hf_linearize (it was written by version {metadata.get('library_version')})."
        )
    if backend not in ("transformers", "timm") or not isinstance(sites, dict):
        raise LinearizedCheckpointError(f"{file} is corrupt: unknown backend {backend!r} or malformed sites.")
    return {**metadata, "linearize_config": config}


def _build_base_model(directory: Path, backend: str) -> nn.Module:
    if backend == "timm":
        from timm.models._hub import load_model_config_from_path

        pretrained_cfg, model_name, model_args = load_model_config_from_path(directory)
        return timm.create_model(model_name, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    config = transformers.AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or ["AutoModel"]
    model_class = getattr(transformers, architectures[0], transformers.AutoModel)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the gate keys are loaded below, not by transformers
    try:
        return model_class.from_pretrained(directory)
    finally:
        transformers.logging.set_verbosity(verbosity)


def from_pretrained(
    name_or_path: PathLike, revision: Optional[str] = None, *, token: Optional[str] = None
) -> nn.Module:
    """Load a linearized checkpoint from a directory or a Hub repo id: rebuild the base model (transformers Auto
    classes from ``config.json``, timm from its recorded model args), re-apply the gates, load every weight.

    The result computes exactly what the saved model computed. Raises :class:`LinearizedCheckpointError` for a
    missing/corrupt/too-new ``linearize_config.json`` or for weights that do not match it.
    """
    directory = _local_directory(name_or_path, revision, token)
    metadata = read_checkpoint_metadata(directory)
    weights_file = directory / WEIGHTS_NAME
    if not weights_file.is_file():
        raise LinearizedCheckpointError(f"{directory} has no {WEIGHTS_NAME}; the checkpoint is incomplete.")
    model = patch_model(_build_base_model(directory, metadata["backend"]), metadata["linearize_config"])
    sites = {name: gate.channels for name, gate in gated_modules(model)}
    if sites != metadata["sites"]:
        differ = sorted(set(sites.items()) ^ set(metadata["sites"].items()))[:5]
        raise LinearizedCheckpointError(
            f"The gated sites of the rebuilt model differ from {LINEARIZE_CONFIG_NAME} (first differences: "
            f"{differ}); the checkpoint's config and weights do not belong together."
        )
    state = safetensors.torch.load_file(str(weights_file))
    if metadata["backend"] == "timm":
        _load_strict(model, state, directory)
    else:
        _load_gates(model, state, directory)
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise LinearizedCheckpointError(f"Weights in {directory} do not match its config: {error}") from error


def _load_gates(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """transformers already loaded the base weights (handling tied and renamed keys); load the gate tensors."""
    expected = {f"{name}.alpha" for name, _ in gated_modules(model)}
    parameters = dict(model.named_parameters())
    extra = sorted(k for k in state if k.endswith(".alpha") and k not in expected and k not in parameters)
    if extra:
        raise LinearizedCheckpointError(
            f"Weights in {directory} do not match its config: gate tensors {extra[:3]} (of {len(extra)}) belong to "
            f"no site that {LINEARIZE_CONFIG_NAME} gates."
        )
    for name, gate in gated_modules(model):
        key = f"{name}.alpha"
        if key not in state or state[key].shape != gate.alpha.shape:
            found = tuple(state[key].shape) if key in state else "missing"
            raise LinearizedCheckpointError(
                f"Weights in {directory} do not match its config: gate {key} expected shape "
                f"{tuple(gate.alpha.shape)}, found {found}."
            )
        with torch.no_grad():
            gate.alpha.copy_(state[key])


# ------------------------------------------------------------------------------------------------ push
def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    save_directory: Optional[PathLike] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload linearized model",
    **save_kwargs: Any,
) -> str:
    """Save the checkpoint locally (``save_directory``, or a new temporary directory), then upload it to
    ``repo_id``; returns the commit's URL. On failure raises :class:`HubPushError`, and the local save stays.
    """
    local = Path(save_directory) if save_directory is not None else Path(tempfile.mkdtemp(prefix="hf_linearize-"))
    save_pretrained(model, local, **save_kwargs)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=local, repo_id=repo_id, revision=revision,
                                   commit_message=commit_message)
    except Exception as error:  # any failure (HTTP, auth, connection): keep the local save and say where
        raise HubPushError(
            f"Pushing to {repo_id!r} at {api.endpoint} failed ({type(error).__name__}: {error}). The checkpoint is "
            f"saved at {local}; push it later with huggingface_hub.upload_folder(folder_path={str(local)!r}, "
            f"repo_id={repo_id!r})."
        ) from error
    if save_directory is None:
        shutil.rmtree(local, ignore_errors=True)
    return commit.commit_url
