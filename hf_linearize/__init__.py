"""hf_linearize: measure and remove the nonlinearity a trained network does not use.

The public names below are imported on first use (PEP 562), so that ``import hf_linearize`` and the
``hf-linearize`` command's ``--help`` do not load torch, transformers and timm before they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "CalibrationStats": "calibration",
    "OneShotReport": "calibration",
    "calibrate": "calibration",
    "fit_targets": "calibration",
    "linearize_one_shot": "calibration",
    "one_shot": "calibration",
    "reconstruct": "calibration",
    "LinearizeConfig": "config",
    "average_path_length": "core_map",
    "model_graph": "core_map",
    "path_length_report": "core_map",
    "plot_core_map": "core_map",
    "save_report_json": "core_map",
    "FoldReport": "folding",
    "fold": "folding",
    "fold_report": "folding",
    "ExpertGatedActivation": "gates",
    "GatedActivation": "gates",
    "SharedGatedActivation": "gates",
    "HubPushError": "hub",
    "LinearizedCheckpointError": "hub",
    "from_pretrained": "hub",
    "push_to_hub": "hub",
    "save_pretrained": "hub",
    "push_results": "hub_results",
    "GateSummary": "patching",
    "SiteLayout": "patching",
    "gated_modules": "patching",
    "is_patched": "patching",
    "patch_model": "patching",
    "set_linear": "patching",
    "summary": "patching",
    "unpatch": "patching",
    "verify_patch": "patching",
    "PathGraph": "path_length",
    "default_example_inputs": "probe_inputs",
    "input_spec": "probe_inputs",
    "inputs_from_spec": "probe_inputs",
    "LinearizeCallback": "trainer",
    "LinearizeMixin": "trainer",
    "LinearizePlainTrainer": "trainer",
    "LinearizeTrainer": "trainer",
}
"""Public name -> the module of the package that defines it."""


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_linearize' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = list(_EXPORTS)
