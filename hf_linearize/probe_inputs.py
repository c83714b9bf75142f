"""Probe inputs: the small input that ``patch_model`` runs once to learn a model's sites, built from the model itself.

Nothing here knows about gates; :mod:`hf_linearize.patching`, :mod:`hf_linearize.folding` and
:mod:`hf_linearize.hub` call it.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Mapping, Optional, Union

import torch
from torch.utils import _pytree as pytree
from torch import nn


def timm_input_size(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(channels, height, width)`` of the images a timm model takes *as built*, or None for a model without a
    timm ``pretrained_cfg``.

    Channels: ``in_channels`` of the first convolution (``pretrained_cfg["first_conv"]``, else the first ``Conv2d``
    in module order), so ``in_chans=1`` is seen. Size: the model's or its patch embedding's ``img_size`` (ViT,
    DeiT, Swin, EVA, Mixer, MaxViT, CoAtNet: fixed when the model was created, e.g. ``img_size=32``), else
    ``timm.data.resolve_model_data_config`` (the ``pretrained_cfg`` input size; CNNs accept other sizes too).
    """
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(pretrained_cfg, dict):
        return None
    from timm.data import resolve_model_data_config

    default = tuple(resolve_model_data_config(model)["input_size"])
    first_conv = pretrained_cfg.get("first_conv")
    conv = None
    if isinstance(first_conv, str):
        try:
            conv = model.get_submodule(first_conv)
        except AttributeError:
            conv = None
    if not isinstance(getattr(conv, "in_channels", None), int):
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else default[0]
    size = next((m.img_size for m in model.modules()
                 if (m is model or type(m).__name__.endswith("Embed")) and getattr(m, "img_size", None) is not None),
                default[1:])
    height, width = (size, size) if isinstance(size, int) else size
    return int(channels), int(height), int(width)


_TOKEN_IDS = (5, 6, 7, 8, 9, 2)
"""The probe's token ids (batch 1); reduced modulo the vocabulary size where that is smaller than 10."""
_DECODER_TOKENS = 4
"""Decoder ids of encoder-decoders: the first tokens of ``_TOKEN_IDS``."""
_AUDIO_FRAMES = 4
"""Frames (at least) a waveform (``input_values``) or Speech2Text features yield after the convolutional front end."""


def default_example_inputs(model: nn.Module) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
    """A tiny input (batch 1) for the probe pass, built from the model's config and ``forward`` signature.

    - timm models: one image, a float32 tensor ``(1, C, H, W)`` of :func:`timm_input_size`, passed positionally.
    - HF ``main_input_name == "input_ids"`` (text): ``input_ids`` int64 ``(1, 6)`` = ``[[5, 6, 7, 8, 9, 2]]``
      (modulo the vocabulary if it has 9 tokens or fewer, cut to ``max_position_embeddings``) and an all-ones
      ``attention_mask`` int64 of the same shape; encoder-decoders add ``decoder_input_ids`` int64 ``(1, 4)``.
      Dual encoders (CLIP, SigLIP and others with ``logit_scale`` and a ``vision_config``) add ``pixel_values``
      float32 ``(1, C, S, S)`` from ``config.vision_config``; the ids then respect ``config.text_config``.
    - HF ``"pixel_values"``: float32 ``(1, config.num_channels, S, S)``, ``S = config.image_size`` (from
      ``config.vision_config`` when the config has none; default 3 channels, 224 px).
    - HF ``"input_features"``: Whisper float32 ``(1, config.num_mel_bins, 2 * config.max_source_positions)``;
      Speech2Text float32 ``(1, T, config.input_feat_per_channel * config.input_channels)`` with ``T`` giving 4
      frames after its stride-2 convolutions. ``decoder_input_ids`` int64 ``(1, 4)`` where ``forward`` takes them.
    - HF ``"input_values"``: a wav2vec2-style waveform float32 ``(1, N)``, ``N`` the fewest samples from which
      ``config.conv_kernel`` / ``config.conv_stride`` make ``max(4, config.mask_time_length)`` frames; or an
      Audio Spectrogram Transformer spectrogram float32 ``(1, config.max_length, config.num_mel_bins)``.

    Floating tensors are drawn from a ``torch.Generator`` seeded with 0. Any other model raises ``ValueError``:
    pass ``example_inputs`` to ``patch_model``.
    """
    generator = torch.Generator().manual_seed(0)
    image_size = timm_input_size(model)
    if image_size is not None:
        return torch.randn(1, *image_size, generator=generator)
    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", None)
    inputs: Optional[dict[str, torch.Tensor]] = None
    if config is not None and main_input == "input_ids":
        inputs = _text_inputs(model, config, generator)
    elif config is not None and main_input == "pixel_values":
        inputs = {"pixel_values": _pixel_values(config, generator)}
    elif config is not None and main_input == "input_features":
        inputs = _feature_inputs(model, config, generator)
    elif config is not None and main_input == "input_values":
        inputs = _waveform_inputs(config, generator)
    if inputs is None:
        raise ValueError(
            f"Cannot build an example input for {_model_name(model)}; pass example_inputs= (a tensor, a tuple of "
            "positional inputs, or a dict of keyword inputs) to patch_model."
        )
    return inputs


def _forward_parameters(model: nn.Module) -> set[str]:
    """Names of the explicit parameters of ``model.forward`` (``**kwargs`` does not count)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _int_attr(config: Any, name: str) -> Optional[int]:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _token_ids(vocab_size: Optional[int], max_positions: Optional[int] = None) -> torch.Tensor:
    """``[[5, 6, 7, 8, 9, 2]]`` int64, modulo ``vocab_size`` when an id is out of range, cut to ``max_positions``."""
    ids = torch.tensor([_TOKEN_IDS])
    if vocab_size is not None and max(_TOKEN_IDS) >= vocab_size:
        ids = ids % vocab_size
    return ids[:, :max_positions] if max_positions is not None else ids


def _text_config(config: Any) -> Any:
    """The text sub-config of a multimodal config (``text_config``), else ``config`` itself."""
    text_config = getattr(config, "text_config", None)
    return text_config if text_config is not None and not isinstance(text_config, dict) else config


def _vision_config(config: Any) -> Optional[Any]:
    vision_config = getattr(config, "vision_config", None)
    return vision_config if vision_config is not None and not isinstance(vision_config, dict) else None


def _text_inputs(model: nn.Module, config: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids, an all-ones attention mask, decoder ids for encoder-decoders, an image for dual encoders."""
    text_config = _text_config(config)
    ids = _token_ids(_int_attr(text_config, "vocab_size"), _int_attr(text_config, "max_position_embeddings"))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :_DECODER_TOKENS]
    if _is_dual_encoder(model, config):
        inputs["pixel_values"] = _pixel_values(config, generator)
    return inputs


def _is_dual_encoder(model: nn.Module, config: Any) -> bool:
    """A contrastive text-image model (CLIP, SigLIP, AltCLIP, BLIP, ...): its ``forward`` takes ids and pixels, it has
    a ``logit_scale`` and a vision sub-config. Vision-language generators (LLaVA) have no ``logit_scale`` and keep
    text-only probes."""
    parameters = _forward_parameters(model)
    return ({"input_ids", "pixel_values"} <= parameters and hasattr(model, "logit_scale")
            and _vision_config(config) is not None)


def _pixel_values(config: Any, generator: torch.Generator) -> torch.Tensor:
    """float32 ``(1, num_channels, H, W)`` from ``config`` (or its ``vision_config`` when it has no ``image_size``);
    3 channels and 224 px by default."""
    if not hasattr(config, "image_size") and _vision_config(config) is not None:
        config = _vision_config(config)
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(1, getattr(config, "num_channels", 3), height, width, generator=generator)


def _feature_inputs(model: nn.Module, config: Any, generator: torch.Generator) -> Optional[dict[str, torch.Tensor]]:
    """Whisper or Speech2Text filter-bank features, plus decoder ids where ``forward`` takes them; None for other
    ``input_features`` models."""
    mel_bins, source_positions = _int_attr(config, "num_mel_bins"), _int_attr(config, "max_source_positions")
    feature_size, channels = _int_attr(config, "input_feat_per_channel"), _int_attr(config, "input_channels")
    if mel_bins is not None and source_positions is not None:  # Whisper: the encoder takes exactly 2 x positions
        features = torch.randn(1, mel_bins, 2 * source_positions, generator=generator)
    elif feature_size is not None:  # Speech2Text: (batch, time, features), stride-2 convolutions over time
        frames = _AUDIO_FRAMES * 2 ** (_int_attr(config, "num_conv_layers") or 0)
        features = torch.randn(1, frames, feature_size * (channels or 1), generator=generator)
    else:
        return None
    inputs = {"input_features": features}
    if "decoder_input_ids" in _forward_parameters(model):
        decoder_ids = _token_ids(_int_attr(config, "vocab_size"), _int_attr(config, "max_target_positions"))
        inputs["decoder_input_ids"] = decoder_ids[:, :_DECODER_TOKENS]
    return inputs


def _waveform_inputs(config: Any, generator: torch.Generator) -> Optional[dict[str, torch.Tensor]]:
    """A raw waveform for a convolutional feature extractor (wav2vec2, HuBERT, WavLM, ...), or an Audio Spectrogram
    Transformer spectrogram; None for other ``input_values`` models."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if kernels is not None and strides is not None and len(kernels) == len(strides) > 0:
        # Fewest samples giving `frames` outputs: invert out = (in - kernel) // stride + 1, last layer first.
        # At least mask_time_length frames, so SpecAugment's time masks fit if the probe runs in train mode.
        samples = max(_AUDIO_FRAMES, _int_attr(config, "mask_time_length") or 0)
        for kernel, stride in zip(reversed(tuple(kernels)), reversed(tuple(strides))):
            samples = (samples - 1) * int(stride) + int(kernel)
        return {"input_values": torch.randn(1, samples, generator=generator)}
    max_length, mel_bins = _int_attr(config, "max_length"), _int_attr(config, "num_mel_bins")
    if max_length is not None and mel_bins is not None:
        return {"input_values": torch.randn(1, max_length, mel_bins, generator=generator)}
    return None


# --------------------------------------------------------------------------------------------- input specs
_SCALARS = (type(None), bool, int, float, str)


def input_spec(inputs: Any) -> dict[str, Any]:
    """A JSON-serialisable description of ``inputs`` (never the data), rebuilt by :func:`inputs_from_spec`.

    ``inputs`` is what ``patch_model`` takes as ``example_inputs``: a tensor (``{"kind": "tensor", "shape": [...],
    "dtype": "float32"}``), a tuple of positional inputs (``{"kind": "tuple", "items": [entry, ...]}``) or a dict of
    keyword inputs with string keys (``{"kind": "dict", "items": {name: entry}}``). An entry is a tensor as above or
    ``{"kind": "value", "value": v}`` for a None/bool/int/float/str ``v``, kept as it is. Anything else (a list, a
    nested tuple or dict, a custom object) raises ``TypeError`` naming the entry.
    """
    if isinstance(inputs, torch.Tensor):
        return _tensor_spec(inputs)
    if isinstance(inputs, tuple):
        return {"kind": "tuple", "items": [_entry_spec(value, f"inputs[{i}]") for i, value in enumerate(inputs)]}
    if isinstance(inputs, Mapping):
        items = {}
        for key, value in inputs.items():
            if not isinstance(key, str):
                raise TypeError(f"Cannot describe the input key {key!r} ({type(key).__name__}): keyword inputs must "
                                "have string names.")
            items[key] = _entry_spec(value, f"inputs[{key!r}]")
        return {"kind": "dict", "items": items}
    raise TypeError(f"Cannot describe inputs of type {type(inputs).__name__}: pass a tensor, a tuple of positional "
                    "inputs or a dict of keyword inputs.")


def _tensor_spec(tensor: torch.Tensor) -> dict[str, Any]:
    return {"kind": "tensor", "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _entry_spec(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return _tensor_spec(value)
    if isinstance(value, _SCALARS):
        return {"kind": "value", "value": value}
    raise TypeError(f"Cannot describe {where} of type {type(value).__name__}: an input spec holds tensors and "
                    "None/bool/int/float/str values only. Pass the tensors as separate inputs, or a custom "
                    "example_inputs instead of a spec.")


def inputs_from_spec(spec: Mapping[str, Any], *, seed: int = 0,
                     device: Union[str, torch.device, None] = None) -> Union[torch.Tensor, tuple, dict[str, Any]]:
    """Inputs of the structure, shapes and dtypes :func:`input_spec` recorded (also after a JSON round trip).

    Floating (and complex) tensors: ``torch.randn`` from a ``torch.Generator`` seeded with ``seed``, drawn in entry
    order; integer tensors: zeros, ones for dict keys whose name contains "mask"; bool tensors: True. Values are
    returned as recorded. Tensors are created on ``device`` (CPU by default). A malformed spec raises ``ValueError``.
    """
    generator = torch.Generator().manual_seed(seed)
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind == "tensor":
        return _tensor_from_spec(spec, "spec", False, generator, device)
    if kind == "tuple" and isinstance(spec.get("items"), list):
        return tuple(_entry_from_spec(entry, f"spec['items'][{i}]", False, generator, device)
                     for i, entry in enumerate(spec["items"]))
    if kind == "dict" and isinstance(spec.get("items"), Mapping):
        return {key: _entry_from_spec(entry, f"spec['items'][{key!r}]", "mask" in str(key).lower(), generator,
                                      device)
                for key, entry in spec["items"].items()}
    raise ValueError(f"Not an input spec: {spec!r:.200}. Expected a dict from hf_linearize.probe_inputs.input_spec "
                     "with kind 'tensor', 'tuple' (items: a list) or 'dict' (items: a dict).")


def _entry_from_spec(entry: Any, where: str, is_mask: bool, generator: torch.Generator,
                     device: Union[str, torch.device, None]) -> Any:
    kind = entry.get("kind") if isinstance(entry, Mapping) else None
    if kind == "tensor":
        return _tensor_from_spec(entry, where, is_mask, generator, device)
    if kind == "value" and "value" in entry and isinstance(entry["value"], _SCALARS):
        return entry["value"]
    raise ValueError(f"Malformed input spec entry {where}: {entry!r:.200}. Expected {{'kind': 'tensor', 'shape': "
                     "[...], 'dtype': ...}} or {{'kind': 'value', 'value': a None/bool/int/float/str}}.")


def _tensor_from_spec(entry: Mapping[str, Any], where: str, is_mask: bool, generator: torch.Generator,
                      device: Union[str, torch.device, None]) -> torch.Tensor:
    shape, dtype_name = entry.get("shape"), entry.get("dtype")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if (not isinstance(shape, (list, tuple))
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            or not isinstance(dtype, torch.dtype)):
        raise ValueError(f"Malformed tensor in input spec entry {where}: {dict(entry)!r:.200}. Expected a 'shape' "
                         "of non-negative ints and a torch 'dtype' name such as 'float32', 'int64' or 'bool'.")
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=torch.complex64 if dtype.is_complex else torch.float32
                           ).to(device=device, dtype=dtype)
    try:
        return (torch.ones if is_mask else torch.zeros)(shape, dtype=dtype, device=device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Cannot build a {dtype_name} tensor for input spec entry {where}: {error}") from error


def _model_name(model: nn.Module) -> str:
    """The model's class, with its timm architecture or HF model type when it has one (for error messages)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    architecture = pretrained_cfg.get("architecture") if isinstance(pretrained_cfg, dict) else None
    architecture = architecture or getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} ({architecture!r})" if architecture else type(model).__name__


def _shapes(inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return {key: _shapes(value) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(_shapes(value) for value in inputs)
    return tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _float_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def main_output(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: itself, else ``logits``, ``last_hidden_state`` or ``logits_per_image``
    (CLIP-style dual encoders; attribute or dict key), else its first floating-point tensor. ``ValueError`` when it
    holds none."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "logits_per_image"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if value is not None:
            return value
    leaves = _float_leaves(out)
    if not leaves:
        raise ValueError(f"The model's output ({type(out).__name__}) holds no floating-point tensor.")
    return leaves[0]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of most of ``model``'s parameter and buffer elements (a bf16 model's fp32 gates do not
    change it); fp32 for a model without floating tensors."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.__getitem__) if sizes else torch.float32


def recorded_probe(model: nn.Module, spec: Optional[Mapping[str, Any]]) -> Any:
    """The input to run a patched ``model`` on again (fold and its check, the path-graph trace, reloading a
    checkpoint): its recorded probe ``spec`` (:func:`input_spec`) rebuilt on the device of its parameters, with the
    floating tensors in :func:`model_dtype` (a model cast after patching) and every ``*input_ids`` entry holding the
    default probe's tokens (``[5, 6, 7, 8, 9, 2]`` repeated, modulo the vocabulary) instead of zeros, which are often
    the padding token (a LLaMA's all-zero logits would check nothing); else the default probe of its kind
    (:func:`default_example_inputs`). ``ValueError`` naming the model when neither can be built."""
    if spec is not None:
        param = next(model.parameters(), None)
        inputs = inputs_from_spec(spec, device=None if param is None else param.device)
        dtype = model_dtype(model)
        inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, inputs)
        if isinstance(inputs, dict):
            config = getattr(model, "config", None)
            vocab = _int_attr(_text_config(config), "vocab_size") if config is not None else None
            for key, value in inputs.items():
                if key.endswith("input_ids") and isinstance(value, torch.Tensor) and not value.is_floating_point():
                    tokens = _token_ids(vocab).flatten().repeat(value.numel() // len(_TOKEN_IDS) + 1)
                    inputs[key] = tokens[:value.numel()].reshape(value.shape).to(value)
        return inputs
    try:
        return default_example_inputs(model)
    except ValueError:
        raise ValueError(
            f"{_model_name(model)} was patched without a recorded probe input and no default input fits it; patch "
            "it with example_inputs= (one small batch it accepts), which records the probe."
        ) from None

