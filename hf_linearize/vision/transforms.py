"""timm image transforms for a model as built: its channels and size, its normalisation, optional augmentation."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import nn

from ..probe_inputs import timm_input_size

logger = logging.getLogger(__name__)

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
"""PIL modes of single-channel (grayscale) images."""


def data_config(model: nn.Module, image_size: Optional[int] = None, crop_pct: Optional[float] = None) -> dict[str, Any]:
    """``timm.data.resolve_model_data_config`` for the model as built: input size ``(C, H, W)`` from
    :func:`~hf_linearize.probe_inputs.timm_input_size` (``image_size`` replaces H and W for models that take any size),
    the pretrained mean/std reduced to their average when the model has another channel count.

    ``ValueError`` when ``image_size`` disagrees with a model built for a fixed size (ViT, Swin).
    """
    channels, height, width = _input_size(model)
    if image_size is not None and (image_size, image_size) != (height, width):
        if model.pretrained_cfg.get("fixed_input_size", False):
            raise ValueError(f"{model.pretrained_cfg.get('architecture', type(model).__name__)} was built for "
                             f"{height}x{width} images; build it for {image_size} px with --model_kwargs "
                             f"img_size={image_size} instead of --image_size.")
        height = width = image_size
    args: dict[str, Any] = {"input_size": (channels, height, width)}
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    config = resolve_model_data_config(model, args=args)
    for key in ("mean", "std"):
        if len(config[key]) != channels:
            config[key] = (sum(config[key]) / len(config[key]),) * channels
    return config


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    size = timm_input_size(model)
    if size is None:
        raise TypeError(f"{type(model).__name__} is not a timm model (it has no pretrained_cfg); the vision recipe "
                        "builds timm models by name.")
    return size


def image_transforms(model: nn.Module, image_size: Optional[int] = None, crop_pct: Optional[float] = None,
                     augment: bool = False, augment_kwargs: Optional[dict[str, Any]] = None,
                     convert_channels: bool = True, image_mode: Optional[str] = None
                     ) -> tuple[Callable[[Image.Image], torch.Tensor], Callable[[Image.Image], torch.Tensor]]:
    """``(train, eval)`` callables: PIL image -> normalised ``[C, H, W]`` float tensor for ``model``.

    Both first convert the image to the model's channels (``"L"`` for 1, ``"RGB"`` for 3). ``eval`` is timm's
    evaluation transform (resize, center crop by ``crop_pct``); ``train`` is timm's training transform
    (``create_transform(is_training=True, **augment_kwargs)``, e.g. ``hflip=0.0``, ``scale=(0.7, 1.0)``) when
    ``augment``, else the evaluation transform. When ``image_mode`` (the data's PIL mode) does not match the
    model's channels, the images are converted with a warning, or, with ``convert_channels=False``, a
    ``ValueError`` names both fixes.
    """
    config = data_config(model, image_size, crop_pct)
    channels = config["input_size"][0]
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"The model takes {channels}-channel images; the vision recipe feeds 1 (grayscale) or 3 "
                         "(RGB) channels.")
    if image_mode is not None and (image_mode in GRAY_MODES) != (channels == 1):
        problem = (f"The images are {'grayscale' if image_mode in GRAY_MODES else 'color'} ({image_mode!r}) but the "
                   f"model takes {channels}-channel input; build the model with --model_kwargs "
                   f"in_chans={1 if image_mode in GRAY_MODES else 3}")
        if not convert_channels:
            raise ValueError(f"{problem}, or let the recipe convert the images (--convert_channels true).")
        logger.warning(f"{problem}, or keep converting: every image is converted to {mode!r}.")
    timm_args = {k: config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    evaluate = create_transform(**timm_args, is_training=False)
    train = create_transform(**timm_args, is_training=True, **(augment_kwargs or {})) if augment else evaluate
    return _Converted(mode, train), _Converted(mode, evaluate)


class _Converted:
    """``transform(image.convert(mode))``; picklable for DataLoader workers."""

    def __init__(self, mode: str, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.mode, self.transform = mode, transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image.convert(self.mode))

    def __repr__(self) -> str:
        return f"Convert({self.mode!r}) -> {self.transform!r}"


def with_transform(dataset: Any, transform: Callable[[Image.Image], torch.Tensor]) -> Any:
    """``dataset`` (columns ``image``, ``label``) yielding ``{"pixel_values": tensor, "label": int}`` on access."""
    def apply(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {"pixel_values": [transform(image) for image in batch["image"]], "label": batch["label"]}

    return dataset.with_transform(apply)
