"""YAML configs with command-line overrides for HfArgumentParser dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import pytest
import yaml
from transformers import HfArgumentParser

from hf_linearize import LinearizeConfig
from hf_linearize.arguments import LinearizeArguments, parse_pattern, parse_position, parse_with_config


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
    with pytest.raises(ValueError, match=r"Unknown keys \['layer'\] in .*c.yaml \(did you mean layers for layer\?\)"):
        parse_with_config((Model, Train), ["--config", str(config)])


def test_unknown_flag_gets_the_closest_known_one():
    with pytest.raises(ValueError, match=r"Unknown arguments \['--prior_lamda', '5'\] \(did you mean "
                                         r"--prior_lambda for --prior_lamda\?\); --help lists the flags"):
        parse_with_config((LinearizeArguments,), ["--prior_lamda", "5"])
    with pytest.raises(ValueError, match=r"Unknown arguments \['--zzz'\]; --help"):  # nothing close: no guess
        parse_with_config((Model, Train), ["--name", "m", "--zzz"])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_with_config((Model, Train), ["--config", str(tmp_path / "nope.yaml")])


# --- LinearizeArguments: every LinearizeConfig field is a flag and a YAML key ---------------------------------------

# One non-default value per LinearizeConfig field: (command-line text, the value LinearizeConfig gets).
NON_DEFAULT = {
    "target_modules": ("[activation_fn, fc1]", ["activation_fn", "fc1"]),
    "exclude_modules": (r".*decoder\.layers\.[01]\..*", r".*decoder\.layers\.[01]\..*"),
    "gate_init": ("0.25", 0.25),
    "linear_threshold": ("0.01", 0.01),
    "prior_lambda": ("2.0", 2.0),
    "prior_start": ("0.5", 0.5),
    "prior_warmup": ("100", 100),
    "freeze_gates_after": ("0.9", 0.9),
    "freeze_linear": ("false", False),
    "gate_lr": ("0.01", 0.01),
    "budget_target": ("0.3", 0.3),
    "budget_metric": ("normalized_apl", "normalized_apl"),
    "budget_gain": ("0.05", 0.05),
    "budget_tolerance": ("0.01", 0.01),
    "budget_scale": ("0.1", 0.1),
    "extra": ("{note: x, seed: 3}", {"note": "x", "seed": 3}),
}


def _flags(parser: HfArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


def test_flags_are_the_config_fields():
    assert _flags(HfArgumentParser(LinearizeArguments)) == {f.name for f in dataclasses.fields(LinearizeConfig)}
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(LinearizeConfig)}, "give every field a case"


def test_defaults_and_help_are_the_configs():
    (args,) = parse_with_config((LinearizeArguments,), [])
    assert args.to_config() == LinearizeConfig()
    parser = HfArgumentParser(LinearizeArguments)
    helps = {a.dest: a.help.replace("%%", "%") for a in parser._actions if a.dest != "help"}
    assert helps == {f.name: f.metadata["help"] for f in dataclasses.fields(LinearizeConfig)}
    assert "5%" in parser.format_help()  # '%' in a help text is escaped for argparse


def test_every_field_from_the_command_line():
    argv = [token for name, (text, _) in NON_DEFAULT.items() for token in (f"--{name}", text)]
    (args,) = parse_with_config((LinearizeArguments,), argv)
    assert args.to_config() == LinearizeConfig(**{name: value for name, (_, value) in NON_DEFAULT.items()})
    assert isinstance(args.to_config().prior_warmup, int) and isinstance(args.to_config().prior_start, float)


def test_every_field_from_yaml_and_flags_win(tmp_path):
    config = tmp_path / "lin.yaml"
    config.write_text(yaml.safe_dump({name: value for name, (_, value) in NON_DEFAULT.items()}))
    (args,) = parse_with_config((LinearizeArguments,), ["--config", str(config), "--prior_start", "100"])
    expected = {name: value for name, (_, value) in NON_DEFAULT.items()}
    assert args.to_config() == LinearizeConfig(**{**expected, "prior_start": 100})


def test_yaml_strings_read_like_flags(tmp_path):
    """Quoted YAML values (``prior_start: "0.5"``, as in the recipe configs) mean what the same flag text means."""
    config = tmp_path / "lin.yaml"
    config.write_text('prior_start: "0.5"\nprior_warmup: "0.1"\nfreeze_gates_after: "200"\n'
                      'target_modules: ".*encoder.*"\nexclude_modules: [fc2]\n')
    (args,) = parse_with_config((LinearizeArguments,), ["--config", str(config)])
    config = args.to_config()
    assert (config.prior_start, config.prior_warmup, config.freeze_gates_after) == (0.5, 0.1, 200)
    assert (config.target_modules, config.exclude_modules) == (".*encoder.*", ["fc2"])


@pytest.mark.parametrize("text, value", [("0", 0), ("250", 250), ("0.5", 0.5), ("1.0", 1.0), ("none", None)])
def test_parse_position(text, value):
    parsed = parse_position(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text, value", [("[fc1]", ["fc1"]), ("[a.b, c]", ["a.b", "c"]), ("none", None),
                                         (".*decoder.*", ".*decoder.*"), ("fc1", "fc1"), ("a: b", "a: b")])
def test_parse_pattern(text, value):
    assert parse_pattern(text) == value


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prior_start", "half"], "--prior_start: 'half' is not a training position"),
        (["--prior_start", "1.5"], "a float is a fraction of training"),
        (["--extra", "[1, 2]"], "--extra: '\\[1, 2\\]' is not a mapping"),
        (["--budget_metric", "apl"], "budget_metric='apl' is unknown"),
        (["--target_modules", "[]"], "target_modules must be None, a regex string or a non-empty list"),
    ],
)
def test_invalid_flags_name_the_problem(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_with_config((LinearizeArguments,), argv)


def test_one_shot_arguments_refuse_what_cannot_run():
    from hf_linearize.arguments import OneShotArguments

    with pytest.raises(ValueError, match="needs --train true"):
        OneShotArguments(fit_targets=True, train=False)
    with pytest.raises(ValueError, match="nonlinear fraction in"):
        OneShotArguments(one_shot_budget=1.5)
    with pytest.raises(ValueError, match="at least 1"):
        OneShotArguments(calibration_batches=0)
