"""The ``model-index`` of a linearized model's card, in the form the Hugging Face Hub parses.

The Hub (and ``huggingface_hub.repocard_data.model_index_to_eval_results``) needs, per result, ``task.type``,
``dataset.type`` and ``dataset.name``, and per metric ``type`` and a numeric ``value``; ``dataset.config`` and
``dataset.split`` say which part of the dataset was scored. A metric without a finite number (``None``, NaN, inf:
YAML's ``.nan`` is not a JSON number) is rejected by the Hub's schema, so it is left out here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional

from huggingface_hub import EvalResult

PATH_LENGTH_METRICS = {
    "normalized_apl": "Normalized average path length",
    "unnormalized_apl": "Unnormalized average path length",
    "nonlinear_fraction": "Nonlinear fraction of gated units",
}
"""Path-length figures (keys of the card's ``path_length`` block) that the model-index lists as extra metrics,
with their display names."""


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def eval_results(task: str, dataset: Optional[str], metrics: Optional[Mapping[str, float]],
                 path_length: Mapping[str, Any], *, dataset_config: Optional[str] = None,
                 dataset_split: Optional[str] = None) -> Optional[list[EvalResult]]:
    """One ``EvalResult`` per task metric (``metrics``: name -> value, e.g. ``{"bleu": 31.2}``) measured on
    ``dataset`` (a Hub dataset id or a local name; ``"custom"`` when None) with ``dataset_config`` and
    ``dataset_split``, then one per figure of ``PATH_LENGTH_METRICS`` in ``path_length``, all under task type
    ``task`` (a Hub task id such as ``translation``). Values that are not finite numbers are left out; None when
    nothing is left (the card then has no ``model-index``)."""
    common = dict(task_type=task, task_name=task.replace("-", " ").capitalize(), dataset_type=dataset or "custom",
                  dataset_name=dataset or "custom", dataset_config=dataset_config, dataset_split=dataset_split)
    values = [(name, value, None) for name, value in (metrics or {}).items()]
    values += [(key, path_length.get(key), label) for key, label in PATH_LENGTH_METRICS.items()]
    results = [EvalResult(**common, metric_type=name, metric_value=float(value), metric_name=label)
               for name, value, label in values if _finite(value)]
    return results or None
