"""Hub datasets for the recipes: ``datasets.load_dataset`` that fails at once, naming the local options, when the
Hugging Face Hub is offline or unreachable (instead of retrying or surfacing a bare connection error)."""

from __future__ import annotations

from typing import Optional

import datasets


def load_hub_dataset(name: str, config_name: Optional[str], local_options: str) -> datasets.DatasetDict:
    """``datasets.load_dataset(name, config_name)``; ``ConnectionError`` naming ``local_options`` (what to use
    instead) when ``HF_HUB_OFFLINE`` is set or the download fails."""
    if datasets.config.HF_HUB_OFFLINE:
        raise ConnectionError(f"Cannot download dataset {name!r}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1). "
                              f"{local_options}")
    try:
        return datasets.load_dataset(name, config_name)
    except (ConnectionError, OSError) as error:
        raise ConnectionError(f"Cannot download dataset {name!r} ({error}). {local_options}") from error
