"""Linearized checkpoints: the directory format, save/load, model cards and pushing to the Hugging Face Hub.

A checkpoint directory holds:

==========================  ==============================================================================
``config.json``             the base model's own config (transformers; ``id2label``/``label2id`` when
                            ``label_names`` are given), or timm's ``config.json`` with ``architecture``,
                            ``model_args``, ``label_names``, the model's ``dtype`` and the ``pretrained_cfg``
                            preprocessing (input size, crop, mean/std, interpolation: ``data_config``), as
                            ``timm.models.push_to_hf_hub`` writes it
``linearize_config.json``   format version, library version, backend, family, ``LinearizeConfig``, the gated
                            sites, the probe input's spec (``probe``: names, shapes, dtypes, no data; loading
                            probes with it), and the gate summary and path lengths measured on the saved model; for a
                            folded model (``hl.fold``) also ``variant: "folded"`` and ``fold`` (the plan that
                            rebuilds its structure, each site's fold form, and the fold report's totals)
``model.safetensors``       every weight, gates included (``<site>.alpha``), each under the name it has in the
                            model (``model.state_dict()``); or ``model-0000i-of-0000n.safetensors`` shards and
                            ``model.safetensors.index.json`` when it exceeds ``max_shard_size``
``README.md``               the model card (YAML metadata + prose), from ``model_cards/linearized_model.md``
``generation_config.json``  a generating transformers model's decoding settings (``model.generation_config``)
tokenizer / processor       when given
==========================  ==============================================================================

Tensors keep the model's own names: transformers 5 would rename some on save back to an older layout (ViT's
``layers`` as ``encoder.layer``, Mixtral's ``mlp`` as ``block_sparse_moe``, fused experts split per expert), a
mapping that its loader inverts for the weights it knows but not for the gates or a folded model's tensors. Saved
under the names the rebuilt model has, every tensor loads back as it was.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import huggingface_hub
import safetensors
import timm
import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError, OfflineModeIsEnabled
from huggingface_hub.errors import LocalTokenNotFoundError, RemoteEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from timm.data.model_config import resolve_input_data_config
from torch import nn

from .config import LinearizeConfig
from .folding import fold_state, is_folded, refold
from .model_index import eval_results
from .patching import gated_modules, patch_model, patch_state, summary
from .probe_inputs import _model_name, model_dtype, recorded_probe, timm_input_size

FORMAT_VERSION = 1
LINEARIZE_CONFIG_NAME = "linearize_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
CARD_TEMPLATE = importlib.resources.files("hf_linearize.model_cards") / "linearized_model.md"
NOT_FOLDED_FORMS = ("unchanged", "gated")
"""Fold forms (:class:`~hf_linearize.folding.SiteFold`) of a site whose units were not merged: no unit linear, or
its FFN cannot fold (``fold_report`` says why). A folded checkpoint where every site has one says "no FFN folded"."""

TIMM_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
"""The preprocessing a timm checkpoint records (``data_config``): what ``timm.data.resolve_model_data_config`` returns
and ``timm.data.create_transform`` takes."""

PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)


class LinearizedCheckpointError(ValueError):
    """A directory or repo is not a valid linearized checkpoint (missing, corrupt, mismatched, or too new), or a model
    cannot be saved as one that loads back (then nothing was written)."""


class HubPushError(RuntimeError):
    """Pushing failed; the message names the local directory where the checkpoint is safely saved."""


HUB_FAILURES = (OSError, HTTPError)
"""What a failed ``huggingface_hub`` call raises: its HTTP errors, offline mode and OS errors (``OSError``), and the
HTTP client's connection errors and timeouts (``httpx`` ``HTTPError``, not an ``OSError``)."""


def hub_failure(error: BaseException, endpoint: Optional[str] = None) -> str:
    """Why a Hub call failed, in words: the Hub was not asked (offline mode, no token), could not be reached
    (connection error, timeout), or answered with an HTTP status (401/403: the token; 404: the repo, revision or
    file), with the fix."""
    where = f"the Hub at {endpoint or huggingface_hub.constants.ENDPOINT}"
    first = (str(error).strip().splitlines() or [""])[0]
    detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
    if isinstance(error, OfflineModeIsEnabled):
        return (f"offline mode is on (HF_HUB_OFFLINE=1), so {where} was not asked ({detail}); unset HF_HUB_OFFLINE "
                "to use the Hub")
    if isinstance(error, LocalTokenNotFoundError):
        return f"no token is set for {where}: set HF_TOKEN, or run `hf auth login`"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        fix = {401: "; check the token (HF_TOKEN, or `hf auth login`)",
               403: "; the token lacks permission for this repo (a write token is needed to push)",
               404: "; check the repo id, the revision and the token (a private repo answers 404 without one)"}
        return f"{where} answered {status} ({detail}){fix.get(status, '')}"
    if isinstance(error, HTTPError):  # the HTTP client's own errors: no answer came back
        return (f"{where} could not be reached ({detail}); check the network, or HF_ENDPOINT, or set "
                "HF_HUB_OFFLINE=1 to work offline")
    return f"{where} could not be used ({detail})"


def check_repo_id(repo_id: str, flag: str = "repo_id") -> None:
    """``ValueError`` naming ``flag`` unless ``repo_id`` is a valid Hub repo id (``user/name``, or ``name``)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{flag} {repo_id!r} is not a valid Hub repo id ({error}); write it as 'user/name'.") from None


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

    if is_folded(model):  # the gated model's numbers, recorded by fold, plus what rebuilds the folded structure
        folded = fold_state(model)
        forms = {name: site["form"] for name, site in folded.report["sites"].items()}
        return {"format_version": FORMAT_VERSION, "library_version": __version__, "backend": _require_backend(model),
                **folded.source, "variant": "folded",
                "fold": {**folded.plan, "forms": forms, "total": dict(folded.report["total"])}}
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
        "probe": state.probe,
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
    load_from: str = "path/to/checkpoint",
    dataset_config: Optional[str] = None,
    dataset_split: Optional[str] = None,
    results_dataset: Optional[str] = None,
) -> ModelCard:
    """The model card: YAML metadata (``base_model``, ``tags``, ``model-index``, ``path_length``) and prose.

    ``metadata`` is :func:`checkpoint_metadata`'s result; ``metrics`` maps a metric name (``bleu``, ``chrf``,
    ``accuracy``) to a value measured on ``dataset`` (its ``dataset_config`` and ``dataset_split``). The
    ``model-index`` (:func:`~hf_linearize.model_index.eval_results`) lists them and the path-length figures.
    ``load_from`` is what the card's usage snippet passes to ``from_pretrained``: the Hub repo id when pushed, the
    directory when saved. ``base_model`` is linked to the Hub only when it is not a local folder;
    ``results_dataset``, a Hub dataset repo id, is linked as the sweep this model is a run of.
    """
    config = metadata["linearize_config"]
    fold = metadata.get("fold") or {}
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
    base_model_on_hub = bool(base_model) and not Path(base_model).exists()
    card_data = ModelCardData(
        base_model=base_model if base_model_on_hub else None,
        library_name="hf_linearize",
        tags=["linearized", "average-path-length", "hf_linearize", metadata["backend"], metadata["family"]]
        + (["folded"] if metadata.get("variant") == "folded" else []),
        datasets=[dataset] if dataset else None,
        language=language,
        model_name=model_name,
        eval_results=eval_results(task, dataset, metrics, path_length, dataset_config=dataset_config,
                                  dataset_split=dataset_split),
        path_length=path_length,
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE.read_text(encoding="utf-8"),
        model_name=model_name,
        base_model=base_model,
        base_model_on_hub=base_model_on_hub,
        load_from=load_from,
        results_dataset=results_dataset,
        dataset_split=dataset_split,
        metrics=dict(metrics or {}),
        dataset=dataset,
        pl=path_length,
        family=metadata["family"],
        backend=metadata["backend"],
        library_version=metadata["library_version"],
        fold=fold.get("total"),
        folded_sites=sum(form not in NOT_FOLDED_FORMS for form in fold.get("forms", {}).values()),
    )


# ------------------------------------------------------------------------------------------------ save
def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    tokenizer: Any = None,
    model_args: Optional[dict[str, Any]] = None,
    data_config: Optional[Mapping[str, Any]] = None,
    label_names: Optional[Sequence[str]] = None,
    max_shard_size: Union[int, str] = "50GB",
    verify: bool = True,
    **card_kwargs: Any,
) -> Path:
    """Write a linearized checkpoint directory (see module docstring) and return its path.

    The checkpoint is written to a temporary folder next to ``save_directory`` and moved there only once complete
    (and verified): a failure leaves ``save_directory`` as it was. Saving into a folder that holds a previous
    checkpoint replaces its files (stale weight shards are removed; other files stay); while the files move, the
    folder holds no ``linearize_config.json``, so it never loads as a mix of both. torch's global RNG is left as it
    was (verifying draws fresh weights for the rebuilt model).

    Args:
        model: a patched (or folded) transformers or timm model.
        tokenizer: a tokenizer or image processor to save alongside (anything with ``save_pretrained``).
        model_args: timm only: serialisable replacements for constructor arguments timm cannot record.
        data_config: timm only: the preprocessing the model was trained and evaluated with, as
            ``timm.data.resolve_model_data_config`` returns it (keys among :data:`TIMM_DATA_KEYS`); written to
            ``config.json``'s ``pretrained_cfg``, so that ``resolve_model_data_config(from_pretrained(dir))`` gives
            it back. Keys left out keep the model's own (``input_size``: the model as built).
        label_names: the class names, index = class id: timm's ``label_names``, or a transformers model's
            ``id2label``/``label2id`` in ``config.json``. One name per output class.
        max_shard_size: largest weights file (bytes, or a string such as ``"5GB"``); larger models are split into
            shards with an index, as transformers does.
        verify: load the written checkpoint with :func:`from_pretrained` and check that every tensor (gates
            included) comes back bit for bit, before moving it into place. Costs one load (a second copy of the
            model on the CPU); ``False`` skips it.
        card_kwargs: passed to :func:`render_model_card` (``base_model``, ``metrics``, ``dataset``, ...).

    Raises:
        TypeError: neither a transformers nor a timm model.
        ValueError: an unpatched model; ``data_config`` for a transformers model or with unknown keys;
            ``label_names`` of another length than the model's classes.
        LinearizedCheckpointError: the model cannot be rebuilt by :func:`from_pretrained` (a class transformers
            does not export, a timm feature-extraction wrapper), the written checkpoint does not read back
            exactly, or timm does not resolve ``data_config`` back from it; nothing is written to
            ``save_directory`` then.
    """
    metadata = checkpoint_metadata(model)
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise LinearizedCheckpointError(f"{directory} is a file; pass a folder (new, or one to overwrite).")
    _check_description(model, metadata["backend"], data_config, label_names)
    if metadata["backend"] == "transformers":
        _check_transformers_class(model, directory)
    staging = _existing_ancestor(directory) / f".{directory.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    try:
        with torch.random.fork_rng(devices=[]):  # rebuilding the model draws fresh weights: keep the caller's RNG
            if metadata["backend"] == "transformers":
                _save_transformers(model, staging, label_names, max_shard_size)
            else:
                _save_timm(model, staging, directory, model_args, data_config, label_names, max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            (staging / LINEARIZE_CONFIG_NAME).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            card_kwargs.setdefault("load_from", str(directory))
            render_model_card(metadata, **card_kwargs).save(staging / "README.md")
            if verify:
                _verify_round_trip(model, staging, directory)
        _move_into(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _check_description(model: nn.Module, backend_name: str, data_config: Optional[Mapping[str, Any]],
                       label_names: Optional[Sequence[str]]) -> None:
    """Raise ``ValueError`` naming the fix when ``data_config`` or ``label_names`` cannot describe ``model``."""
    if data_config is not None:
        if backend_name != "timm":
            raise ValueError(f"data_config records timm preprocessing, and {_model_name(model)} is a transformers "
                             "model; save its image processor with tokenizer= instead.")
        unknown = sorted(set(data_config) - set(TIMM_DATA_KEYS))
        if unknown:
            raise ValueError(f"data_config has keys {unknown} that a checkpoint does not record; pass only "
                             f"{list(TIMM_DATA_KEYS)} (what timm.data.resolve_model_data_config returns).")
        try:
            resolve_input_data_config(model, args=dict(data_config))
        except ValueError as error:
            raise ValueError(f"data_config does not fit {_model_name(model)} as built: {error} Pass the preprocessing "
                             "the model was trained with, e.g. timm.data.resolve_model_data_config(model, args=...); "
                             "for another image size build the model for it (img_size=...).") from error
    if label_names is not None:
        classes = model.num_classes if backend_name == "timm" else model.config.num_labels
        if len(label_names) != classes:
            raise ValueError(f"label_names has {len(label_names)} names, but {_model_name(model)} has {classes} "
                             "output classes; pass one name per class, in class-id order.")


def _save_transformers(model: nn.Module, staging: Path, label_names: Optional[Sequence[str]],
                       max_shard_size: Union[int, str]) -> None:
    """``model.save_pretrained`` under the model's own names, every tensor included, and the generation config of a
    generating model; ``label_names`` become ``config.json``'s ``id2label``/``label2id`` (``model.config`` is left
    as it is). The keys a class leaves out on save (``_keys_to_ignore_on_save``, e.g. Marian's sinusoidal positions,
    which transformers recomputes on load) are written too, since a model loaded with ``from_pretrained`` may have
    changed them (they are trainable then) and the checkpoint must give back the model as it is."""
    ignored = model.__dict__.get("_keys_to_ignore_on_save", _NOT_SET)
    model._keys_to_ignore_on_save = None
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size, save_original_format=False)
    finally:
        if ignored is _NOT_SET:
            del model._keys_to_ignore_on_save
        else:
            model._keys_to_ignore_on_save = ignored
    if label_names is not None:
        config_file = staging / transformers.utils.CONFIG_NAME
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["id2label"] = {str(i): name for i, name in enumerate(label_names)}
        config["label2id"] = {name: i for i, name in enumerate(label_names)}
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_NOT_SET = object()


def _existing_ancestor(directory: Path) -> Path:
    """The nearest existing folder above ``directory``: where its staging folder goes, on the same file system."""
    return next(p for p in directory.absolute().parents if p.is_dir())


def _unsaveable(model: nn.Module, directory: Path, reason: str, fix: str) -> LinearizedCheckpointError:
    return LinearizedCheckpointError(
        f"{_model_name(model)} cannot be saved as a linearized checkpoint: {reason}. {fix} Nothing was written to "
        f"{directory}."
    )


def _check_transformers_class(model: nn.Module, directory: Path) -> None:
    """Raise :class:`LinearizedCheckpointError` unless :func:`from_pretrained` rebuilds ``type(model)``: it builds
    ``transformers.<architectures[0]>``, the name ``save_pretrained`` records."""
    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        raise _unsaveable(
            model, directory,
            f"from_pretrained rebuilds a transformers model as the class config.json names, transformers.{name}, "
            f"and transformers has no such class or another one ({type(model).__module__}.{name} is custom code or a "
            "subclass)",
            "Patch and save a model of a class transformers exports (e.g. from transformers.AutoModelFor...), or save "
            "model.state_dict() with torch.save and rebuild and patch the model yourself before loading it.",
        )


def _save_timm(model: nn.Module, staging: Path, directory: Path, model_args: Optional[dict[str, Any]],
               data_config: Optional[Mapping[str, Any]], label_names: Optional[Sequence[str]],
               max_shard_size: Union[int, str]) -> None:
    """timm's ``config.json`` (the preprocessing of ``data_config``, by default the input the model was built for;
    the ``label_names``; the model's ``dtype``, as transformers records it, which loading builds the model in),
    checked to rebuild ``type(model)`` and to resolve ``data_config`` back, then the weights (sharded beyond
    ``max_shard_size``)."""
    from timm.models._hub import save_config_for_hf

    fix = ("Build the model as timm.create_model returns it (no features_only=True wrapper) from JSON-serialisable "
           "arguments (e.g. act_layer='silu', not a class), or pass such replacements as model_args=; else save "
           "model.state_dict() with torch.save.")
    # The preprocessing recorded for the model as built (e.g. 1x28x28 digits), not its pretrained default.
    recorded = {"input_size": timm_input_size(model), **(data_config or {})}
    try:
        labels = {"label_names": list(label_names)} if label_names is not None else {}
        save_config_for_hf(model, str(staging / "config.json"), model_args=model_args, data_config=recorded,
                           model_config={"dtype": str(model_dtype(model)).removeprefix("torch."), **labels})
        rebuilt = _build_timm_model(staging, device="meta")
    except Exception as error:  # timm's exporter and factory raise anything from AttributeError to AssertionError
        raise _unsaveable(model, directory, f"timm cannot record or replay how to build it ({type(error).__name__}: "
                                            f"{error})", fix) from error
    if type(rebuilt) is not type(model):
        raise _unsaveable(model, directory, f"from_pretrained would rebuild it as {type(rebuilt).__name__} with "
                                            "timm.create_model(architecture, **model_args) from config.json", fix)
    resolved = timm.data.resolve_model_data_config(rebuilt)
    differ = {k: (v, resolved.get(k)) for k, v in recorded.items() if _plain(v) != _plain(resolved.get(k))}
    if differ:
        raise _unsaveable(model, directory, "timm resolves another preprocessing from the written config.json "
                                            f"(key: (given, resolved) {differ})",
                          "Please report this with the model and data_config; saving without data_config records "
                          "the input of the model as built.")
    huggingface_hub.save_torch_state_dict(model.state_dict(), staging, max_shard_size=max_shard_size,
                                          metadata={"format": "pt"})


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, as JSON gives them back."""
    return json.loads(json.dumps(value))


def _verify_round_trip(model: nn.Module, staging: Path, directory: Path) -> None:
    """Raise :class:`LinearizedCheckpointError` unless the checkpoint in ``staging`` loads back with every tensor of
    ``model.state_dict()`` (names, dtypes, values) bit for bit."""
    def fail(reason: str) -> LinearizedCheckpointError:
        return LinearizedCheckpointError(
            f"The checkpoint written for {_model_name(model)} does not read back exactly: {reason}. Nothing was "
            f"written to {directory}. Please report this with the model's config; save_pretrained(..., verify=False) "
            "writes it unchecked."
        )

    try:
        loaded = from_pretrained(staging)
    except LinearizedCheckpointError as error:
        raise fail(str(error)) from error
    expected, got = model.state_dict(), loaded.state_dict()
    differ = sorted(
        k for k in expected.keys() | got.keys()
        if k not in expected or k not in got or got[k].dtype != expected[k].dtype
        or not torch.equal(got[k], expected[k].to(got[k].device))
    )
    if differ:
        first = differ[0]
        if first not in got or first not in expected:
            detail = "missing"
        elif got[first].dtype != expected[first].dtype:
            detail = f"dtype {got[first].dtype} instead of {expected[first].dtype}"
        else:
            gap = (got[first].double() - expected[first].double().to(got[first].device)).abs().max()
            detail = f"max abs difference {float(gap):.3g}"
        raise fail(f"{len(differ)} tensor(s) differ or are missing after loading, first {differ[:5]} ({first}: "
                   f"{detail})")


def _is_weights_file(name: str) -> bool:
    return name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_NAME.fullmatch(name) is not None


def _move_into(staging: Path, directory: Path) -> None:
    """Move the files of ``staging`` into ``directory``: one rename when it does not exist. Else its
    ``linearize_config.json`` goes first (the folder is no checkpoint while files move), weight files that the new
    checkpoint does not have are removed, the new files replace the old, and ``linearize_config.json`` comes last."""
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(directory)
        return
    (directory / LINEARIZE_CONFIG_NAME).unlink(missing_ok=True)
    for old in directory.iterdir():
        if _is_weights_file(old.name) and not (staging / old.name).exists():
            old.unlink()
    for new in staging.iterdir():
        if new.name != LINEARIZE_CONFIG_NAME:
            os.replace(new, directory / new.name)
    os.replace(staging / LINEARIZE_CONFIG_NAME, directory / LINEARIZE_CONFIG_NAME)


# ------------------------------------------------------------------------------------------------ load
def _looks_like_path(name_or_path: PathLike) -> bool:
    """A path object, or a string that starts with ``.``, ``/`` or ``~``, or holds ``\\``: never a Hub repo id."""
    if not isinstance(name_or_path, str):
        return True
    return name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path or Path(name_or_path).is_absolute()


def _checkpoint_directory(name_or_path: PathLike, revision: Optional[str], token: Optional[str]) -> Path:
    """The local checkpoint folder ``name_or_path``, else the downloaded snapshot of the Hub repo of that name.

    When neither exists the :class:`LinearizedCheckpointError` names both: no local folder, and why the Hub repo
    could not be used (not a valid repo id, unreachable, offline, not found).
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise LinearizedCheckpointError(
            f"{name_or_path} is a file, not a checkpoint folder; pass the folder that holds {LINEARIZE_CONFIG_NAME}."
        )
    name = os.fspath(name_or_path)
    no_folder = f"There is no local folder {name!r} (looked for {path.expanduser().resolve()})"
    check = (f"Check the path (relative paths start from the working directory {Path.cwd()}), or the repo id, "
             "revision and token if you meant the Hub.")
    try:
        validate_repo_id(name)
        invalid = None
    except HFValidationError as error:
        invalid = str(error)
    if invalid is not None or _looks_like_path(name_or_path):
        reason = invalid or "it is written as a path"
        raise LinearizedCheckpointError(f"{no_folder}, and {name!r} is not a Hub repo id ({reason}), so no Hub repo "
                                        f"{name!r} can be found. {check}")
    try:  # one request, without the client's retries: an unreachable Hub answers at once
        huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(name, LINEARIZE_CONFIG_NAME, revision=revision), token=token)
    except RemoteEntryNotFoundError:
        raise LinearizedCheckpointError(
            f"Hub repo {name!r} (revision {revision or 'main'}) is not a linearized model: it has no "
            f"{LINEARIZE_CONFIG_NAME}. Load it with transformers or timm directly, then hf_linearize.patch_model."
        ) from None
    except HUB_FAILURES as error:
        raise LinearizedCheckpointError(
            f"{no_folder}, and Hub repo {name!r} (revision {revision or 'main'}) cannot be loaded: "
            f"{hub_failure(error)}. {check}"
        ) from error
    try:
        return Path(huggingface_hub.snapshot_download(name, revision=revision, token=token))
    except HUB_FAILURES as error:
        raise LinearizedCheckpointError(
            f"Downloading Hub repo {name!r} (revision {revision or 'main'}) failed: {hub_failure(error)}.") from error


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


@dataclass
class _WeightMismatch:
    """Tensors of a checkpoint file that do not fit the model rebuilt from its config (checkpoint keys)."""

    missing: list[str] = field(default_factory=list)
    """Tensors the model has and the file lacks (tied weights that the file legitimately omits excluded)."""
    unexpected: list[str] = field(default_factory=list)
    """Tensors in the file that the model has no place for."""
    wrong_shape: list[str] = field(default_factory=list)
    """``"key: file (a, b), model (c, d)"`` per tensor whose shape differs."""

    def lines(self) -> list[str]:
        return ([f"missing {k}" for k in self.missing] + [f"unexpected {k}" for k in self.unexpected]
                + [f"wrong shape {k}" for k in self.wrong_shape])


def _shape_note(key: str, file_shape: Any, model_shape: Any) -> str:
    return f"{key}: file {tuple(file_shape)}, model {tuple(model_shape)}"


def _build_transformers_model(directory: Path, dtype: Optional[torch.dtype] = None
                              ) -> tuple[nn.Module, _WeightMismatch]:
    """The transformers model of ``config.json`` (``architectures[0]``, else ``AutoModel``) with the base weights
    loaded, in ``dtype`` (default: the one ``config.json`` records), and what did not fit. transformers resolves tied
    and renamed keys; the gates are among the unexpected keys here and are sorted out by the caller."""
    config = transformers.AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or ["AutoModel"]
    model_class = getattr(transformers, architectures[0], transformers.AutoModel)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # every mismatch is reported by from_pretrained below
    try:
        model, info = model_class.from_pretrained(directory, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  dtype=dtype or "auto")
    finally:
        transformers.logging.set_verbosity(verbosity)
    _own_memory(model)
    return model, _WeightMismatch(
        missing=sorted(info["missing_keys"]),
        unexpected=sorted(info["unexpected_keys"]),
        wrong_shape=sorted(_shape_note(k, f, m) for k, f, m in info["mismatched_keys"]),
    )


def _own_memory(model: nn.Module) -> None:
    """Copy every parameter and buffer that lives in memory torch did not allocate (transformers maps the weights
    file into memory) into memory of its own: the model then holds no file open, and CPU kernels see aligned data as
    in the saved model (on the file's unaligned data they may round differently, 1 ulp in ALBERT's pooler)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if not tensor.untyped_storage().resizable():
            tensor.data = tensor.data.clone()


def _build_timm_model(directory: Path, device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The timm model that ``directory/config.json`` describes (``architecture``, ``model_args``), freshly
    initialised, on ``device`` (``"meta"``: no memory, for checking its class), in ``dtype``, else in the ``dtype``
    that ``config.json`` records (checkpoints written before it was recorded: fp32, and loading their weights gives
    each tensor its saved dtype)."""
    from timm.models._hub import load_model_config_from_path

    pretrained_cfg, model_name, model_args = load_model_config_from_path(directory)
    model = timm.create_model(model_name, pretrained=False, pretrained_cfg=pretrained_cfg, device=device, **model_args)
    recorded = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("dtype")
    dtype = dtype or _requested_dtype(recorded)
    return model if dtype is None else model.to(dtype)


def _weight_files(directory: Path) -> list[Path]:
    """``model.safetensors`` (as transformers, preferred when both are there), else the shards that
    ``model.safetensors.index.json`` lists; :class:`LinearizedCheckpointError` when neither is there, the index is
    corrupt or a listed shard is missing."""
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index = directory / INDEX_NAME
    if not index.is_file():
        raise LinearizedCheckpointError(
            f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; the checkpoint is incomplete. Save it again.")
    try:
        names = sorted({str(name) for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise LinearizedCheckpointError(f"{index} is corrupt ({type(error).__name__}: {error}); save the checkpoint "
                                        "again.") from error
    files = [directory / name for name in names]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise LinearizedCheckpointError(f"{directory} lacks the weight shard(s) {absent} that {INDEX_NAME} lists; the "
                                        "checkpoint is incomplete (an interrupted download or copy?).")
    return files


def _read_tensors(files: list[Path], keys: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files`` (or those named in ``keys``), by name, on the CPU."""
    state = {}
    for file in files:
        with safetensors.safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if keys is None or key in keys:
                    state[key] = handle.get_tensor(key)
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor],
                keys: Optional[set[str]] = None) -> _WeightMismatch:
    """Load every tensor of ``state`` whose key and shape fit ``model`` and report the rest, counting only
    ``keys`` of the model's state dict when given. Missing means missing after the modules' own load hooks (a
    gate fills in default targets that format-1 checkpoints lack); a tensor sharing its storage with a loaded one
    (a tied weight, which safetensors stores once) is loaded through it and is not missing. A loaded tensor takes
    the dtype it has in ``state``, except a gate's, which stays fp32 (:class:`~hf_linearize.gates.GatedActivation`)."""
    own = model.state_dict(keep_vars=True)
    if keys is not None:
        own = {k: v for k, v in own.items() if k in keys}
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    wrong_shape = {k: v.shape for k, v in state.items() if k in own and k not in fits}
    for key, tensor in fits.items():
        if own[key].dtype != tensor.dtype:
            own[key].data = own[key].data.to(tensor.dtype)
    result = model.load_state_dict(fits, strict=False)
    loaded = {own[k].data_ptr() for k in fits}
    return _WeightMismatch(
        missing=sorted(k for k in result.missing_keys
                       if k in own and k not in wrong_shape and own[k].data_ptr() not in loaded),
        unexpected=sorted(k for k in state if k not in own),
        wrong_shape=sorted(_shape_note(k, shape, own[k].shape) for k, shape in wrong_shape.items()),
    )


def _settle(mismatch: _WeightMismatch, weights: str, allow_partial: bool) -> None:
    """Raise :class:`LinearizedCheckpointError` naming every tensor that did not fit, or with ``allow_partial``
    log each one as a warning."""
    lines = mismatch.lines()
    if not lines:
        return
    if allow_partial:
        for line in lines:
            logger.warning("Loading %s with allow_partial=True: %s", weights, line)
        return
    shown = "\n  ".join(lines[:50]) + (f"\n  ... and {len(lines) - 50} more" if len(lines) > 50 else "")
    raise LinearizedCheckpointError(
        f"The weights in {weights} do not fit the model rebuilt from its config ({len(mismatch.missing)} "
        f"missing, {len(mismatch.unexpected)} unexpected, {len(mismatch.wrong_shape)} of the wrong shape):\n  "
        f"{shown}\nThe file is damaged or belongs to another checkpoint; save the model again. To load it anyway "
        "pass allow_partial=True: missing and wrongly shaped tensors then keep their fresh initialisation."
    )


def _requested_dtype(dtype: Union[torch.dtype, str, None], torch_dtype: Union[torch.dtype, str, None] = None
                     ) -> Optional[torch.dtype]:
    """The floating dtype asked for by ``dtype`` or by its older name ``torch_dtype`` (a ``torch.dtype`` or its name,
    ``"bfloat16"``), None for the saved one (``None``, ``"auto"``); ``ValueError`` for anything else and for two
    different requests."""
    def parse(value: Union[torch.dtype, str, None]) -> Optional[torch.dtype]:
        if value is None or value == "auto":
            return None
        resolved = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), its name ('bfloat16') or "
                             f"'auto' (the dtype the checkpoint was saved in); got {value!r}.")
        return resolved

    requested = {parse(dtype), parse(torch_dtype)} - {None}
    if len(requested) > 1:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} differ; pass one of them (torch_dtype is "
                         "the older name of dtype).")
    return requested.pop() if requested else None


def from_pretrained(
    name_or_path: PathLike, revision: Optional[str] = None, *, token: Optional[str] = None,
    allow_partial: bool = False, dtype: Union[torch.dtype, str, None] = None,
    torch_dtype: Union[torch.dtype, str, None] = None,
) -> nn.Module:
    """Load a linearized checkpoint from a directory or a Hub repo id: rebuild the base model (transformers
    classes from ``config.json``, timm from its recorded model args), re-apply the gates, load every weight.

    The result computes exactly what the saved model computed: every tensor comes back with its saved value and
    dtype, from ``model.safetensors`` or the shards that ``model.safetensors.index.json`` lists. Loading is strict:
    a missing, unexpected or wrongly shaped tensor (base weight or gate) raises :class:`LinearizedCheckpointError`
    naming it; tied weights that transformers leaves out of the file are the one exception. ``allow_partial=True``
    logs each such tensor as a warning instead (a missing one keeps its fresh initialisation, a missing gate its
    ``gate_init``). Also raises :class:`LinearizedCheckpointError` for a missing/corrupt/too-new
    ``linearize_config.json``, a missing or corrupt weights index or shard, and when ``name_or_path`` is neither a
    local folder nor a reachable Hub repo (naming both).

    A checkpoint of a folded model (``"variant": "folded"``) comes back folded, bit-identical to the saved model:
    the gated architecture is rebuilt, refolded by its saved plan (:func:`~hf_linearize.folding.refold`), and every
    tensor loaded into it. An unknown variant raises :class:`LinearizedCheckpointError`.

    ``dtype`` (or its older name ``torch_dtype``; a ``torch.dtype`` or its name) loads the model in that floating
    dtype instead of the saved one (``None`` or ``"auto"``: the saved dtype, which transformers records in
    ``config.json`` and so does :func:`save_pretrained` for timm models). Gates stay fp32 either way;
    ``ValueError`` for a dtype that is not floating.
    """
    requested = _requested_dtype(dtype, torch_dtype)
    directory = _checkpoint_directory(name_or_path, revision, token)
    metadata = read_checkpoint_metadata(directory)
    variant = metadata.get("variant")
    if variant not in (None, "folded"):
        raise LinearizedCheckpointError(
            f"{LINEARIZE_CONFIG_NAME} names the format variant {variant!r}, which this hf_linearize does not know "
            "(it reads plain and 'folded' checkpoints); upgrade hf_linearize."
        )
    files = _weight_files(directory)
    weights = str(files[0]) if len(files) == 1 else f"{directory} ({len(files)} shards)"
    if metadata["backend"] == "timm":
        model, base_mismatch = _build_timm_model(directory, dtype=requested), None
    else:
        model, base_mismatch = _build_transformers_model(directory, dtype=requested)
    base_keys = set(model.state_dict())
    probe = metadata.get("probe")  # how the saved model was probed (names, shapes, dtypes); older files: the default
    patch_model(model, metadata["linearize_config"], example_inputs=recorded_probe(model, probe) if probe else None)
    sites = {name: gate.channels for name, gate in gated_modules(model)}
    if sites != metadata["sites"]:
        differ = sorted(set(sites.items()) ^ set(metadata["sites"].items()))[:5]
        raise LinearizedCheckpointError(
            f"The gated sites of the rebuilt model differ from {LINEARIZE_CONFIG_NAME} (first differences: "
            f"{differ}); the checkpoint's config and weights do not belong together."
        )
    if variant == "folded":  # rebuild the folded structure, then load every tensor into it
        model = refold(model, metadata["fold"])
        mismatch = _load_state(model, _read_tensors(files))
        if base_mismatch is not None:  # base tensors transformers accepted without the file (recomputed positions)
            accepted = base_keys - set(base_mismatch.missing)
            mismatch.missing = [k for k in mismatch.missing if k not in accepted]
    elif base_mismatch is None:
        mismatch = _load_state(model, _read_tensors(files))
    else:  # transformers loaded the base weights; the tensors that patching added were its unexpected keys
        patched_keys = set(model.state_dict()) - base_keys
        moved = base_keys - set(model.state_dict())  # parameters of an activation now inside its gate (PReLU)
        gates = _load_state(model, _read_tensors(files, patched_keys), keys=patched_keys)
        mismatch = _WeightMismatch(
            missing=sorted({k for k in base_mismatch.missing if k not in moved} | set(gates.missing)),
            unexpected=[k for k in base_mismatch.unexpected if k not in patched_keys],
            wrong_shape=base_mismatch.wrong_shape + gates.wrong_shape,
        )
    _settle(mismatch, weights, allow_partial)
    if requested is not None:  # loading gave each tensor the dtype it has in the file
        model.to(requested)
    return model.eval()


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
    ``repo_id``; returns the commit's URL. ``ValueError`` before anything is saved when ``repo_id`` is not a valid
    repo id. A failed upload raises :class:`HubPushError` saying why (:func:`hub_failure`: unreachable, offline, or
    the Hub's answer), and the local save stays.
    """
    check_repo_id(repo_id)
    local = Path(save_directory) if save_directory is not None else Path(tempfile.mkdtemp(prefix="hf_linearize-"))
    try:
        save_pretrained(model, local, load_from=repo_id, **save_kwargs)
    except Exception:
        if save_directory is None:
            shutil.rmtree(local, ignore_errors=True)
        raise
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=local, repo_id=repo_id, revision=revision,
                                   commit_message=commit_message)
    except HUB_FAILURES as error:  # keep the local save and say where
        raise HubPushError(
            f"Pushing to {repo_id!r} failed: {hub_failure(error, api.endpoint)}. The checkpoint is "
            f"saved at {local}; push it later with huggingface_hub.upload_folder(folder_path={str(local)!r}, "
            f"repo_id={repo_id!r})."
        ) from error
    if save_directory is None:
        shutil.rmtree(local, ignore_errors=True)
    return commit.commit_url
