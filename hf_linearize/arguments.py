"""Recipe arguments: ``HfArgumentParser`` dataclasses filled from a YAML config, overridden by the command line.

`LinearizeArguments` is generated from `LinearizeConfig`'s fields, so every setting is a recipe flag (and a YAML
key) with the same name, default and help text, and the two can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, get_type_hints

import yaml
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, TrainingArguments

from .config import LinearizeConfig, Pattern, Schedule

logger = logging.getLogger(__name__)


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
    Unknown YAML keys and unknown flags raise ``ValueError``, with the closest known name where one is near
    (``--prior_lamda``: did you mean ``--prior_lambda``). With `TrainingArguments` among the types, ``bf16``/``fp16``
    on a machine without a GPU raise ``ValueError`` before anything is built, giving the CPU alternative.
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
            raise ValueError(f"Unknown keys {unknown} in {known.config}{_suggest(unknown, valid)}; valid keys "
                             f"are arguments of {[dc.__name__ for dc in dataclass_types]}.")
        parser.set_defaults(**values)
        for action in parser._actions:  # a YAML value satisfies a required flag
            if action.dest in values:
                action.required = False
    if any(issubclass(dc, TrainingArguments) for dc in dataclass_types):
        _check_precision(parser.parse_known_args(rest)[0], known.config)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False,
                                                           return_remaining_strings=True)
    flags = [word for word in remaining if word.startswith("-")]
    if remaining:
        known_flags = {option for action in parser._actions for option in action.option_strings}
        raise ValueError(f"Unknown arguments {remaining}{_suggest(flags, known_flags)}; --help lists the "
                         "flags (each is also a --config YAML key, without the dashes).")
    return tuple(parsed)


def _check_precision(values: argparse.Namespace, config: Optional[str]) -> None:
    """``ValueError`` when `TrainingArguments` ask for ``bf16``/``fp16`` on a machine without a GPU, saying so up front
    (before transformers' "Your setup doesn't support bf16/gpu") with the way to run it on the CPU. bf16 is accepted
    where transformers accepts it (a bf16 GPU or XLA), fp16 on any accelerator."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    wanted = [name for name in ("bf16", "fp16") if getattr(values, name, False)]
    if not wanted or getattr(values, "use_cpu", False) or is_torch_xla_available():
        return
    if is_torch_bf16_gpu_available() if wanted[0] == "bf16" else (
            torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())):
        return
    where = f"{config} sets" if config else "the flags set"
    raise ValueError(f"{where} {wanted[0]}: true, mixed-precision training on a GPU, and this machine has none. To "
                     f"run it on the CPU, add --{wanted[0]} false (fp32; expect it to be slow at a GPU-sized "
                     "config's scale: shrink it with --max_steps, --preset or --max_train_samples).")


def _suggest(words: Sequence[str], known: set[str]) -> str:
    """``" (did you mean --prior_lambda?)"`` for the words with a close match among ``known`` (difflib), else ""."""
    hints = []
    for word in words:
        name = word.split("=", 1)[0]
        match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        if match:
            hints.append(f"{match[0]} for {name}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def parse_position(text: str) -> Schedule:
    """A training position from its text: ``"100"`` -> step 100, ``"0.5"`` -> fraction 0.5, ``"none"`` -> None."""
    word = text.strip()
    if word.lower() in ("none", "null", "~", ""):
        return None
    try:
        return int(word)
    except ValueError:
        pass
    try:
        return float(word)
    except ValueError:
        raise ValueError(f"{text!r} is not a training position: write an int step (e.g. 100) or a float fraction "
                         "of training (e.g. 0.5).") from None


def parse_pattern(text: str) -> Pattern:
    """A module selector from its text, read as YAML: a list (``"[fc1, mlp.act]"``) is a list of name suffixes,
    ``"none"``/``"null"`` is None, anything else is the regex itself (``".*decoder.*"``)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None or isinstance(value, list):
        return value
    return text


def parse_mapping(text: str) -> dict[str, Any]:
    """A mapping from its text, read as YAML or JSON (``"{run: a, seed: 1}"``); ``"none"`` or empty -> ``{}``."""
    value = None if text.strip().lower() == "none" else yaml.safe_load(text)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{text!r} is not a mapping; write it as YAML or JSON, e.g. '{{run: a, seed: 1}}'.")
    return value


_FROM_TEXT: dict[Any, Callable[[str], Any]] = {
    Pattern: parse_pattern,
    Schedule: parse_position,
    dict[str, Any]: parse_mapping,
}
"""`LinearizeConfig` field types that a flag carries as text, and how that text becomes the field's value."""
_CONFIG_TYPES = get_type_hints(LinearizeConfig)
"""`LinearizeConfig`'s field types, resolved."""
_AS_IS = (bool, int, float, str, Optional[int], Optional[float], Optional[str])
"""`LinearizeConfig` field types that `HfArgumentParser` parses itself."""


def _argument_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """One ``(name, type, field)`` per `LinearizeConfig` field, with its default and help (``%`` escaped for
    argparse); raises ``TypeError`` for a field type that no flag can carry, so a new field cannot be forgotten."""
    specs = []
    for config_field in dataclasses.fields(LinearizeConfig):
        hint = _CONFIG_TYPES[config_field.name]
        if hint in _FROM_TEXT:
            flag_type: Any = Optional[str]
        elif hint in _AS_IS:
            flag_type = hint
        else:
            raise TypeError(f"LinearizeConfig.{config_field.name} has type {hint}, which no recipe flag can carry; "
                            "add a parser for it to hf_linearize.arguments._FROM_TEXT.")
        metadata = {"help": config_field.metadata.get("help", "").replace("%", "%%")}
        if config_field.default_factory is not dataclasses.MISSING:
            spec = dataclasses.field(default_factory=config_field.default_factory, metadata=metadata)
        else:
            spec = dataclasses.field(default=config_field.default, metadata=metadata)
        specs.append((config_field.name, flag_type, spec))
    return specs


def _values_from_text(self) -> None:
    """Turn the text of schedule, module-selector and mapping flags into the values `LinearizeConfig` takes
    (YAML values that already have the right type are kept), then validate them."""
    for name, hint in _CONFIG_TYPES.items():
        value = getattr(self, name)
        if hint in _FROM_TEXT and isinstance(value, str):
            try:
                setattr(self, name, _FROM_TEXT[hint](value))
            except ValueError as error:
                raise ValueError(f"--{name}: {error}") from None
    self.to_config()


def _to_config(self) -> LinearizeConfig:
    """The validated `LinearizeConfig` of these arguments."""
    return LinearizeConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


LinearizeArguments = dataclasses.make_dataclass(
    "LinearizeArguments",
    _argument_fields(),
    namespace={"__post_init__": _values_from_text, "to_config": _to_config},
)
LinearizeArguments.__module__ = __name__
LinearizeArguments.__doc__ = (
    "Recipe flags for every `LinearizeConfig` field (same names, defaults and help). Schedule positions take an "
    "int step or a float fraction (``--prior_start 0.5``, ``--prior_start 100``); ``--target_modules`` and "
    "``--exclude_modules`` take a regex (``'.*decoder.*'``) or a YAML list of name suffixes (``'[fc1, fc2]'``); "
    "``--extra`` takes a YAML/JSON mapping. `to_config()` returns the `LinearizeConfig`."
)


@dataclasses.dataclass
class OneShotArguments:
    """Recipe flags for post-training linearization (:func:`hf_linearize.one_shot`) before, or instead of,
    training; training then continues with the linear units frozen (a recovery fine-tune). ``fit_targets`` gives
    the units left nonlinear their fitted affine targets, so that a prior in the training that follows moves them
    toward ``p x + q`` rather than the identity."""

    one_shot_budget: Optional[float] = dataclasses.field(default=None, metadata={
        "help": "linearize in one shot before training, keeping this fraction of units nonlinear (e.g. 0.1)"})
    one_shot_target: str = dataclasses.field(default="affine", metadata={"help": "affine (p x + q) or identity"})
    one_shot_score: str = dataclasses.field(default="sensitivity", metadata={
        "help": "sensitivity or residual (also the fit that fit_targets uses)"})
    one_shot_compensate: bool = dataclasses.field(default=True, metadata={
        "help": "re-fit each FFN's output projection against the model before linearization"})
    fit_targets: bool = dataclasses.field(default=False, metadata={
        "help": "before training (after any one-shot step), set every nonlinear unit's linear target to its "
                "affine fit p x + q on the calibration batches, gates unchanged: the prior then linearizes units "
                "toward their best linear fit instead of the identity"})
    calibration_batches: int = dataclasses.field(default=16, metadata={
        "help": "training batches (of per_device_eval_batch_size, the first ones, unshuffled) to calibrate on"})
    train: bool = dataclasses.field(default=True, metadata={
        "help": "train after the one-shot step (false: only linearize and score)"})

    def _batches(self, examples: Any, collate_fn: Callable[[list[Any]], Any], batch_size: int,
                 inputs: Callable[[Any], Any]) -> tuple[list[Any], int]:
        """The first ``calibration_batches * batch_size`` of ``examples`` (unshuffled, so every rank of a
        distributed run sees the same batches), collated and turned into model inputs; and their count."""
        subset = examples.select(range(min(len(examples), self.calibration_batches * batch_size)))
        loader = DataLoader(subset, batch_size=batch_size, collate_fn=collate_fn)
        return [inputs(batch) for batch in loader], len(subset)

    def linearize(self, model: Any, examples: Any, collate_fn: Callable[[list[Any]], Any], batch_size: int,
                  inputs: Callable[[Any], Any] = lambda batch: batch, progress: bool = True) -> dict[str, Any]:
        """Run :func:`hf_linearize.one_shot` on ``model`` to ``one_shot_budget``, calibrated on the first
        ``calibration_batches * batch_size`` of ``examples`` (a dataset, unshuffled, so every rank of a distributed
        run sees the same batches and linearizes the same units); ``inputs`` turns a collated batch into model
        inputs. Returns the report plus ``calibration_examples``."""
        from .calibration import one_shot

        batches, count = self._batches(examples, collate_fn, batch_size, inputs)
        report = one_shot(model, batches, nonlinear_fraction=self.one_shot_budget, target=self.one_shot_target,
                          score=self.one_shot_score, compensate=self.one_shot_compensate, progress=progress)
        logger.info("%s (%.0f s)", report, report["seconds"])
        return {**report, "calibration_examples": count}

    def fit(self, model: Any, examples: Any, collate_fn: Callable[[list[Any]], Any], batch_size: int,
            inputs: Callable[[Any], Any] = lambda batch: batch, progress: bool = True) -> dict[str, Any]:
        """Calibrate ``model`` on the same batches as :meth:`linearize` and run :func:`hf_linearize.fit_targets`
        with ``one_shot_score``. Returns its report plus ``calibration_examples``."""
        from .calibration import calibrate, fit_targets

        batches, count = self._batches(examples, collate_fn, batch_size, inputs)
        stats = calibrate(model, batches, sensitivity=self.one_shot_score == "sensitivity", progress=progress)
        report = fit_targets(model, stats, score=self.one_shot_score)
        logger.info("fitted affine targets (%s fit) for %d of %d units", report["score"], report["fitted"],
                    report["units"])
        return {**report, "calibration_examples": count}

    def __post_init__(self) -> None:
        if self.one_shot_budget is not None and not 0.0 <= self.one_shot_budget <= 1.0:
            raise ValueError(f"--one_shot_budget {self.one_shot_budget} must be a nonlinear fraction in [0, 1].")
        if self.calibration_batches < 1:
            raise ValueError(f"--calibration_batches {self.calibration_batches} must be at least 1.")
        if self.fit_targets and not self.train:
            raise ValueError("--fit_targets true sets the targets that a training prior moves units toward; it "
                             "needs --train true (with --train false nothing would use them).")
