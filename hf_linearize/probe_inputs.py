"""Probe inputs: the small input that ``patch_model`` runs once to learn a model's sites, built from the model itself.

Nothing here knows about gates; :mod:`hf_linearize.patching`, :mod:`hf_linearize.folding` and
:mod:`hf_linearize.hub` call it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import nn


def timm_input_size(model: nn.Module) -> Optional[tuple[int, int, int]]:
    """``(channels, height, width)`` of the images a timm model takes *as built*, or None for a model without a
    timm ``pretrained_cfg``.

    Channels: ``in_channels`` of the first convolution (``pretrained_cfg["first_conv"]``, else the first ``Conv2d``
    in module order), so ``in_chans=1`` is seen. Size: the patch embedding's ``img_size`` (ViT, DeiT, Swin, EVA,
    Mixer: fixed when the model was created, e.g. ``img_size=32``), else ``timm.data.resolve_model_data_config``
    (the ``pretrained_cfg`` input size; CNNs accept other sizes too).
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
                 if type(m).__name__.endswith("Embed") and getattr(m, "img_size", None) is not None), default[1:])
    height, width = (size, size) if isinstance(size, int) else size
    return int(channels), int(height), int(width)


def default_example_inputs(model: nn.Module) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
    """A tiny input for the probe pass: timm models get one image of :func:`timm_input_size`, HF models token ids
    (plus decoder ids for encoder-decoders) or pixel values. Other models must pass ``example_inputs``."""
    generator = torch.Generator().manual_seed(0)
    image_size = timm_input_size(model)
    if image_size is not None:
        return torch.randn(1, *image_size, generator=generator)
    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", None)
    if config is not None and main_input == "input_ids":
        ids = torch.tensor([[5, 6, 7, 8, 9, 2]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, :4]
        return inputs
    if config is not None and main_input == "pixel_values":
        size = getattr(config, "image_size", 224)
        return {"pixel_values": torch.randn(1, getattr(config, "num_channels", 3), size, size, generator=generator)}
    raise ValueError(
        f"Cannot build an example input for {_model_name(model)}; pass example_inputs= (a tensor, a tuple of "
        "positional inputs, or a dict of keyword inputs) to patch_model."
    )


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
