"""Scoring an image classifier: predictions over a dataset, top-1/top-5 accuracy, loss, confusion matrix (PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def predict(model: nn.Module, dataset: Any, collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
            batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, classes] fp32, labels [N])`` of ``model`` in eval mode over every example of ``dataset`` (in
    order, on the model's device; the model's train/eval mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
            logits.append(model(batch["x"].to(device)).float().cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``accuracy`` (top-1, in [0, 1]), ``top5_accuracy`` (only with more than 5 classes), ``loss`` (mean
    cross-entropy) and ``num_samples`` of logits ``[N, classes]`` against labels ``[N]``."""
    scores = {"accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
              "loss": float(F.cross_entropy(logits, labels)), "num_samples": int(labels.numel())}
    if logits.shape[1] > 5:
        top5 = logits.topk(5, dim=1).indices
        scores["top5_accuracy"] = float((top5 == labels[:, None]).any(dim=1).float().mean())
    return scores


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts: row = true class, column = predicted class."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion_matrix(matrix: torch.Tensor, class_names: Sequence[str], path: Union[str, os.PathLike],
                          title: str = "confusion matrix") -> Path:
    """PNG heatmap of ``matrix`` (rows true, columns predicted), counts written in the cells up to 30 classes;
    returns the path."""
    n = len(class_names)
    size = min(3.0 + 0.45 * n, 16.0)
    figure = Figure(figsize=(size, size * 0.9), constrained_layout=True)
    axis = figure.subplots()
    image = axis.imshow(matrix.numpy(), cmap="Blues")
    figure.colorbar(image, ax=axis, shrink=0.8)
    ticks = range(n) if n <= 30 else range(0, n, max(1, n // 30))
    axis.set_xticks(list(ticks), [class_names[i] for i in ticks], rotation=90 if n > 10 else 0)
    axis.set_yticks(list(ticks), [class_names[i] for i in ticks])
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    if n <= 30:
        high = float(matrix.max()) / 2
        for (row, col), count in zip(((r, c) for r in range(n) for c in range(n)), matrix.flatten().tolist()):
            if count:
                axis.text(col, row, str(count), ha="center", va="center", fontsize=7,
                          color="white" if count > high else "black")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out
