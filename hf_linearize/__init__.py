"""hf_linearize: measure and remove the nonlinearity a trained network does not use."""

from .config import LinearizeConfig
from .gates import GatedActivation, SharedGatedActivation
from .patching import GateSummary, gated_modules, is_patched, patch_model, set_linear, summary, unpatch

__version__ = "0.1.0"

__all__ = [
    "GateSummary",
    "GatedActivation",
    "LinearizeConfig",
    "SharedGatedActivation",
    "gated_modules",
    "is_patched",
    "patch_model",
    "set_linear",
    "summary",
    "unpatch",
]
