"""YAML configs with command-line overrides for HfArgumentParser dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from hf_linearize.arguments import parse_with_config


@dataclass
class Model:
    name: str = field(metadata={"help": "required"})
    layers: int = 2
    prefix: Optional[str] = None


@dataclass
class Train:
    lr: float = 1e-3
    fp16: bool = False


def test_yaml_then_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: marian\nlayers: 6\nlr: 0.01\n")
    model, train = parse_with_config((Model, Train), ["--config", str(config), "--layers", "3", "--fp16", "true"])
    assert (model.name, model.layers, model.prefix, train.lr, train.fp16) == ("marian", 3, None, 0.01, True)


def test_without_config_required_flags_apply():
    model, _ = parse_with_config((Model, Train), ["--name", "t5"])
    assert model.name == "t5"


def test_unknown_yaml_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: m\nlayer: 3\n")
    with pytest.raises(ValueError, match=r"Unknown keys \['layer'\]"):
        parse_with_config((Model, Train), ["--config", str(config)])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_with_config((Model, Train), ["--config", str(tmp_path / "nope.yaml")])
