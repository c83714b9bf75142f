"""hf_linearize: measure and remove the nonlinearity a trained network does not use."""

__version__ = "0.1.0"

from .calibration import (
    CalibrationStats,
    OneShotReport,
    calibrate,
    fit_targets,
    linearize_one_shot,
    one_shot,
    reconstruct,
)
from .config import LinearizeConfig
from .core_map import (
    average_path_length,
    model_graph,
    path_length_report,
    plot_core_map,
    save_report_json,
)
from .folding import FoldReport, fold, fold_report
from .gates import ExpertGatedActivation, GatedActivation, SharedGatedActivation
from .hub import HubPushError, LinearizedCheckpointError, from_pretrained, push_to_hub, save_pretrained
from .hub_results import push_results
from .patching import (
    GateSummary,
    SiteLayout,
    gated_modules,
    is_patched,
    patch_model,
    set_linear,
    summary,
    unpatch,
    verify_patch,
)
from .path_length import PathGraph
from .probe_inputs import default_example_inputs, input_spec, inputs_from_spec
from .trainer import (
    LinearizeCallback,
    LinearizeMixin,
    LinearizePlainTrainer,
    LinearizeTrainer,
)

__all__ = [
    "CalibrationStats",
    "OneShotReport",
    "calibrate",
    "fit_targets",
    "linearize_one_shot",
    "one_shot",
    "reconstruct",
    "FoldReport",
    "GateSummary",
    "GatedActivation",
    "HubPushError",
    "LinearizeCallback",
    "LinearizeConfig",
    "LinearizeMixin",
    "LinearizePlainTrainer",
    "LinearizeTrainer",
    "LinearizedCheckpointError",
    "PathGraph",
    "SharedGatedActivation",
    "ExpertGatedActivation",
    "SiteLayout",
    "average_path_length",
    "fold",
    "fold_report",
    "from_pretrained",
    "gated_modules",
    "is_patched",
    "model_graph",
    "patch_model",
    "path_length_report",
    "plot_core_map",
    "push_results",
    "push_to_hub",
    "save_pretrained",
    "save_report_json",
    "set_linear",
    "summary",
    "unpatch",
    "verify_patch",
    "default_example_inputs",
    "input_spec",
    "inputs_from_spec",
]
