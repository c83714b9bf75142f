"""timm classifiers for the vision recipe: creation by name (with checked kwargs and pretrained weights) and loss."""

from __future__ import annotations

import ast
import difflib
from typing import Any, Optional, Union

import huggingface_hub
import timm
import torch
import torch.nn.functional as F
from torch import nn


def parse_kwargs(text: Optional[str]) -> dict[str, Any]:
    """``"img_size=32,in_chans=1,depths=(1, 1)"`` -> ``{"img_size": 32, "in_chans": 1, "depths": (1, 1)}``.

    Values are Python literals; a value that is not one is kept as text (``act_layer=gelu`` -> ``"gelu"``).
    Empty or None -> ``{}``.
    """
    if not text or not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"Cannot read {text!r} as keyword arguments; write them as name=value pairs separated by "
                         "commas, e.g. 'img_size=32,in_chans=1'.") from error
    if call.args or any(k.arg is None for k in call.keywords):
        raise ValueError(f"{text!r} must hold name=value pairs only, e.g. 'img_size=32,in_chans=1'.")
    values = {}
    for keyword in call.keywords:
        try:
            values[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            values[keyword.arg] = ast.get_source_segment(f"f({text})", keyword.value)
    return values


def create_classifier(name: str, num_classes: int, *, pretrained: bool = False, pretrained_file: Optional[str] = None,
                      model_kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """``timm.create_model(name, num_classes=..., **model_kwargs)``, with errors that name the fix.

    ``pretrained`` downloads timm's weights from the Hub (fails fast offline, naming the local options);
    ``pretrained_file`` loads them from a local timm weights file (``.safetensors``/``.pth``) instead. A classifier
    head of another size is re-initialised by timm.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"timm has no model {name!r}{f'; did you mean {close}' if close else ''}? List the names "
                         "with timm.list_models('*pattern*').")
    kwargs = dict(model_kwargs or {})
    if "num_classes" in kwargs and kwargs.pop("num_classes") != num_classes:
        raise ValueError(f"--model_kwargs sets num_classes, which disagrees with the data's {num_classes} classes; "
                         "drop it from --model_kwargs (the recipe takes it from the data).")
    if pretrained_file is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    elif pretrained:
        local = ("Train from scratch (--pretrained false), or load local weights with --pretrained_file "
                 "PATH (a timm .safetensors/.pth file).")
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise ConnectionError(f"Pretrained weights for {name!r} come from the Hugging Face Hub, which is offline "
                                  f"(HF_HUB_OFFLINE=1). {local}")
        kwargs["pretrained"] = True
        try:
            return timm.create_model(name, num_classes=num_classes, **kwargs)
        except (ConnectionError, OSError) as error:
            raise ConnectionError(f"Cannot download pretrained weights for {name!r} ({error}). {local}") from error
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise ValueError(f"timm model {name!r} does not take --model_kwargs {kwargs}: {error}") from error


def classification_loss(outputs: torch.Tensor, labels: torch.Tensor,
                        num_items_in_batch: Union[torch.Tensor, int, None] = None) -> torch.Tensor:
    """Cross-entropy of logits ``[B, classes]`` against ``labels`` ``[B]``: summed and divided by
    ``num_items_in_batch`` when the Trainer gives it (the mean over the whole accumulated batch), else the mean.
    Usable as ``Trainer(compute_loss_func=...)``."""
    if num_items_in_batch is None:
        return F.cross_entropy(outputs, labels)
    return F.cross_entropy(outputs, labels, reduction="sum") / num_items_in_batch
