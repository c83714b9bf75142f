"""A finished sweep folder (``recipes/sweep.py``'s ``results.json`` and plots) as a Hugging Face Hub dataset repo.

:func:`push_results` writes, in one commit to a dataset repo:

=========================  ==========================================================================================
``data/results.parquet``   one row per run, the columns of ``results.csv`` (dicts as JSON strings, as there), plus
                           ``hub_model`` (the run's model repo) when the checkpoints are pushed too
``plots/*.png``            the sweep's plots (``quality_vs_apl.png``, ``one_shot_vs_apl.png``, ``core_maps.png``)
``README.md``              the dataset card (``model_cards/sweep_results.md``): YAML ``configs``/``data_files``
                           (so ``datasets.load_dataset(repo_id)`` reads the Parquet file), ``tags``,
                           ``task_categories``; prose with the baseline, the arms, the compute and the headline
=========================  ==========================================================================================

With ``push_checkpoints=True`` each run's ``final/`` checkpoint first goes to a model repo of its own
(``REPO_ID-RUN``) with :func:`hf_linearize.hub.push_to_hub`, its card linking back to the dataset. Every repo gets
one commit; the local folder is only read, and a failed push raises :class:`~hf_linearize.hub.HubPushError` naming
the repo.
"""

from __future__ import annotations

import importlib.resources
import io
import json
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, DatasetCardData, HfApi, ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .hub import (
    HUB_FAILURES,
    LINEARIZE_CONFIG_NAME,
    HubPushError,
    PathLike,
    check_repo_id,
    from_pretrained,
    hub_failure,
    push_to_hub,
)

DATA_FILE = "data/results.parquet"
PLOTS_DIR = "plots"
CARD_TEMPLATE = importlib.resources.files("hf_linearize.model_cards") / "sweep_results.md"
RECIPE_TASKS = {"translate": "translation", "classify": "image-classification"}
"""Hub task id of each sweep recipe (``task_categories`` of the dataset, ``task.type`` of a model's card)."""
LABEL_COLUMNS = ("sweep", "task", "model", "recipe", "run", "schedule", "start", "budget_metric", "budget_target",
                 "prior_lambda")
"""Columns before the metrics in a sweep row; the metric columns follow them, up to ``normalized_apl``."""
REFERENCE_SCHEDULES = ("baseline", "control")


@dataclass(frozen=True)
class ResultsPush:
    """What :func:`push_results` pushed."""

    dataset_commit_url: str
    model_repos: dict[str, str] = field(default_factory=dict)
    """Run name -> the model repo id its checkpoint went to (empty unless ``push_checkpoints``)."""


def read_results(directory: PathLike) -> list[dict[str, Any]]:
    """The rows of ``directory/results.json`` as the sweep wrote them; ``FileNotFoundError`` saying how to make
    them when the folder has none, ``ValueError`` when it holds no rows."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a finished sweep folder. Run the sweep "
                                "(recipes/sweep.py --config SWEEP.yaml, or --report_only to tabulate finished runs).")
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} holds no runs; rerun recipes/sweep.py --report_only once a run has finished.")
    return rows


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The task-metric columns (``test_bleu``, ``test_accuracy``, ...): those between the labels and
    ``normalized_apl``, in order; the first is the headline."""
    keys = list(rows[0])
    return [key for key in keys[:keys.index("normalized_apl")] if key not in LABEL_COLUMNS]


def results_table(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Parquet bytes of ``rows``: one row per run, the columns in first-seen order (as ``results.csv``), dict and
    list values as JSON strings, missing values null."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda value: json.dumps(value) if isinstance(value, (dict, list)) else value  # noqa: E731
    table = pa.table({column: [cell(row.get(column)) for row in rows] for column in columns})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _hardware(directory: Path) -> list[str]:
    """The distinct ``hardware`` that the runs' ``sweep_run.json`` files record (newer sweeps record it)."""
    found = []
    for record in sorted(directory.glob("runs/*/sweep_run.json")):
        value = json.loads(record.read_text(encoding="utf-8")).get("hardware")
        if value and value not in found:
            found.append(value)
    return found


def render_results_card(rows: Sequence[Mapping[str, Any]], repo_id: str, plots: Sequence[str],
                        model_repos: Mapping[str, str], hardware: Sequence[str]) -> DatasetCard:
    """The dataset card of a sweep's ``rows`` (see the module docstring); ``plots`` are repo paths,
    ``model_repos`` maps run names to their model repos, ``hardware`` what the runs record."""
    from . import __version__

    headline = metric_columns(rows)[0]
    recipes = sorted({str(row.get("recipe")) for row in rows if row.get("recipe") in RECIPE_TASKS})
    prior = [row for row in rows if row["schedule"] not in REFERENCE_SCHEDULES]
    scored = [row for row in prior if row.get(headline) is not None]
    tasks = " / ".join(dict.fromkeys(str(row.get("task")) for row in rows if row.get("task")))
    card_data = DatasetCardData(
        pretty_name=f"Linearization sweep: {tasks}" if tasks else "Linearization sweep",
        task_categories=[RECIPE_TASKS[recipe] for recipe in recipes] or None,
        tags=["linearized", "average-path-length", "hf_linearize"],
        size_categories=["n<1K"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}],
    )
    return DatasetCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE.read_text(encoding="utf-8"),
        pretty_name=card_data.pretty_name,
        repo_id=repo_id,
        rows=rows,
        headline=headline,
        baseline=next((row for row in rows if row["schedule"] == "baseline"), None),
        best=max(scored, key=lambda row: row[headline]) if scored else None,
        schedules=list(dict.fromkeys(row["schedule"] for row in prior)),
        budget_metric=next((row["budget_metric"] for row in prior if row.get("budget_metric")), "budget"),
        budgets=[f"{b:g}" for b in dict.fromkeys(row["budget_target"] for row in prior
                                                  if row.get("budget_target") is not None)],
        lambdas=[f"{v:g}" for v in dict.fromkeys(row["prior_lambda"] for row in prior
                                                 if row.get("prior_lambda") is not None)],
        total_wall_s=sum(row.get("wall_s") or 0.0 for row in rows),
        hardware=list(hardware),
        plots=list(plots),
        model_repos=dict(model_repos),
        library_version=__version__,
    )


def model_repo_id(repo_id: str, run: str) -> str:
    """``REPO_ID-RUN``, the run name reduced to the characters repo ids allow; ``ValueError`` when that is not a
    valid repo id (too long: name the dataset repo shorter)."""
    name = re.sub(r"[-.]{2,}", "-", re.sub(r"[^\w.-]+", "-", run)).strip("-.")
    candidate = f"{repo_id}-{name}"
    try:
        validate_repo_id(candidate)
    except HFValidationError as error:
        raise ValueError(f"Run {run!r} gives the model repo id {candidate!r}, which the Hub refuses ({error}); "
                         "push to a dataset repo with a shorter name.") from error
    return candidate


def _checkpoint(directory: Path, row: Mapping[str, Any]) -> Path:
    """The run's ``final/`` folder: the row's ``checkpoint`` (absolute, or relative to the working directory, as
    the sweep writes it inside the project), else ``directory/runs/RUN/final``; ``FileNotFoundError`` naming both."""
    candidates = [Path(str(row.get("checkpoint") or "")), directory / "runs" / str(row["run"]) / "final"]
    for candidate in candidates:
        if (candidate / LINEARIZE_CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"Run {row['run']!r} has no checkpoint at {candidates[0]} or {candidates[1]}; run from "
                            "the project root (the sweep writes checkpoint paths relative to it), or push without "
                            "the checkpoints.")


class _FolderFiles:
    """Stands in for a tokenizer in ``save_pretrained``: copies the files of a checkpoint folder that the new save
    does not write itself (tokenizer, image processor, generation config), so a pushed run keeps them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save_pretrained(self, staging: PathLike) -> None:
        """Copy every file of the folder that ``staging`` lacks, except the card, the linearize config (both
        written after this) and weights (the new save may shard differently)."""
        for file in self.folder.iterdir():
            target = Path(staging) / file.name
            if (file.is_file() and not target.exists() and file.name not in ("README.md", LINEARIZE_CONFIG_NAME)
                    and not file.name.endswith((".safetensors", ".safetensors.index.json"))):
                shutil.copy2(file, target)


def _card_kwargs(final: Path, row: Mapping[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """Model-card arguments of a run: the task, dataset and base model of the card the recipe wrote into
    ``final/README.md`` (else the recipe's task), the row's metrics (``test_bleu`` -> ``bleu`` on the ``test``
    split)."""
    data = ModelCard.load(final / "README.md").data if (final / "README.md").is_file() else None
    first = (data.eval_results or [None])[0] if data is not None else None
    split = {column.split("_", 1)[0] for column in metrics}
    return {
        "task": first.task_type if first else RECIPE_TASKS.get(str(row.get("recipe")), "other"),
        "dataset": first.dataset_type if first and first.dataset_type != "custom" else None,
        "dataset_config": first.dataset_config if first else None,
        "dataset_split": split.pop() if len(split) == 1 else None,
        "base_model": data.base_model if data is not None else None,
        "language": data.language if data is not None else None,
        "metrics": {column.split("_", 1)[-1]: row[column] for column in metrics if row.get(column) is not None},
        "model_name": str(row["run"]),
    }


def push_results(directory: PathLike, repo_id: str, *, push_checkpoints: bool = False, private: Optional[bool] = None,
                 token: Optional[str] = None, commit_message: str = "Upload linearization sweep results") -> ResultsPush:
    """Push the finished sweep in ``directory`` to the dataset repo ``repo_id`` (created when missing; files of an
    older push under ``data/`` and ``plots/`` that this one lacks are deleted in the same commit), and with
    ``push_checkpoints`` each run's ``final/`` to its model repo first (:func:`model_repo_id`). Returns the
    dataset commit's URL and the model repos.

    Everything local is checked before anything is pushed (``FileNotFoundError``/``ValueError``: no results, a
    missing checkpoint). The folder is never written. A failed push raises :class:`HubPushError` naming the repo
    that failed (and the model repos already pushed); the dataset is pushed last, so its rows never link to a
    model repo that was not pushed.
    """
    check_repo_id(repo_id)
    directory = Path(directory)
    rows = read_results(directory)
    metrics = metric_columns(rows)
    checkpoints = {str(row["run"]): _checkpoint(directory, row) for row in rows} if push_checkpoints else {}
    model_repos = {run: model_repo_id(repo_id, run) for run in checkpoints}
    plots = sorted(directory.glob("*.png"))
    table = results_table([{**row, **({"hub_model": model_repos[row["run"]]} if model_repos else {})}
                           for row in rows])
    card = render_results_card(rows, repo_id, [f"{PLOTS_DIR}/{p.name}" for p in plots], model_repos,
                               _hardware(directory))
    pushed: list[str] = []
    for row in rows if push_checkpoints else ():
        run, target = str(row["run"]), model_repos[str(row["run"])]
        final = checkpoints[run]
        with tempfile.TemporaryDirectory(prefix="hf_linearize-push-") as staging:
            try:
                push_to_hub(from_pretrained(final), target, save_directory=Path(staging) / run, private=private,
                            token=token, commit_message=f"Upload run {run} of a linearization sweep",
                            tokenizer=_FolderFiles(final), results_dataset=repo_id, **_card_kwargs(final, row, metrics))
            except HubPushError as error:
                raise HubPushError(
                    f"Pushing run {run!r} to model repo {target!r} failed: {error.__cause__ or error}. The sweep "
                    f"folder {directory} is unchanged; the dataset {repo_id!r} was not pushed"
                    f"{'; already pushed: ' + ', '.join(pushed) if pushed else ''}. Push again when the Hub is "
                    "reachable.") from error
        pushed.append(target)
    operations: list[Any] = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()),
                             CommitOperationAdd(path_in_repo=DATA_FILE, path_or_fileobj=table)]
    operations += [CommitOperationAdd(path_in_repo=f"{PLOTS_DIR}/{p.name}", path_or_fileobj=str(p)) for p in plots]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        added = {op.path_in_repo for op in operations}
        operations += [CommitOperationDelete(path_in_repo=path) for path in
                       api.list_repo_files(repo_id, repo_type="dataset")
                       if path.startswith(("data/", f"{PLOTS_DIR}/")) and path not in added]
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="dataset")
    except HUB_FAILURES as error:  # nothing local changed, say which repo
        raise HubPushError(
            f"Pushing the sweep results of {directory} to dataset repo {repo_id!r} failed: "
            f"{hub_failure(error, api.endpoint)}. The folder is unchanged"
            f"{'; the model repos ' + ', '.join(pushed) + ' were pushed' if pushed else ''}. Push again with "
            f"hf-linearize push-results {directory} {repo_id}."
        ) from error
    return ResultsPush(commit.commit_url, model_repos)
