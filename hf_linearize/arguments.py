"""Recipe arguments: ``HfArgumentParser`` dataclasses filled from a YAML config, overridden by the command line."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from transformers import HfArgumentParser


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a clear error when the file is missing or not a mapping."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Config file {file} does not exist.")
    data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {file} must hold a mapping of argument names to values.")
    return data


def parse_with_config(dataclass_types: Sequence[type], argv: Optional[Sequence[str]] = None) -> tuple[Any, ...]:
    """Parse ``--config FILE.yaml`` (optional) and the remaining flags into instances of ``dataclass_types``.

    Values from the YAML file replace the dataclass defaults; flags on the command line win over both.
    Unknown YAML keys raise, naming the valid ones.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types)
    if known.config:
        values = load_yaml(known.config)
        valid = {f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"Unknown keys {unknown} in {known.config}; valid keys are arguments of "
                             f"{[dc.__name__ for dc in dataclass_types]}.")
        parser.set_defaults(**values)
        for action in parser._actions:  # a YAML value satisfies a required flag
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
