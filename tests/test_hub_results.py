"""hf_linearize.hub_results: a tiny finished sweep folder pushed to the loopback Hub as a dataset repo (and its
runs as model repos), loaded back; failed pushes; the cards' metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hub_server import LocalHub, hub_env, load_dataset
from huggingface_hub import DatasetCard, HfApi, ModelCard

import hf_linearize as hl
from hf_linearize.cli import main as cli
from hf_linearize.hub import HubPushError, checkpoint_metadata
from hf_linearize.hub_results import DATA_FILE, metric_columns, model_repo_id, push_results, read_results
from hf_linearize.model_index import PATH_LENGTH_METRICS
from hf_linearize.sweep_report import plot_core_maps, plot_quality_vs_apl, result_row, write_results

RUNS = (("baseline", "baseline", None, 0.0, 0.0), ("early_nf0.5_lam1", "early", 0.5, 1.0, 0.5),
        ("late_nf0.5_lam1", "late", 0.5, 1.0, 0.5), ("control", "control", None, 0.0, 0.0))
"""name, schedule, budget, lambda, fraction of units made linear."""


@pytest.fixture
def sweep_folder(tmp_path, marian):
    """A finished tiny sweep as recipes/sweep.py leaves it: runs/NAME/{final/, sweep_run.json}, results.csv,
    results.json and the plots; rows from result_row on the checkpoints' own numbers."""
    model, _ = marian
    hl.patch_model(model)
    out, rows = tmp_path / "sweep", []
    for index, (name, schedule, budget, lam, linear) in enumerate(RUNS):
        hl.set_linear(model, linear, seed=index)
        final = out / "runs" / name / "final"
        hl.save_pretrained(model, final, metrics={"bleu": 10.0 + index}, dataset="multi30k", language=["en", "de"],
                           task="translation")
        meta = checkpoint_metadata(model)
        results = {"scores": {"test": {"bleu": 10.0 + index, "chrf": 30.0 + index}}, "path_length":
                   meta["path_length"], "summary": meta["summary"], "train": {"steps": 8, "epochs": 1.0,
                                                                             "runtime_s": 2.0 + index}}
        row = result_row(results, ["test.bleu", "test.chrf"], task="synthetic en-de", model="marian-tiny",
                         recipe="translate", run=name, schedule=schedule,
                         start="baseline" if schedule in ("late", "control") else "scratch",
                         budget_metric="nonlinear_fraction" if budget else None, budget_target=budget,
                         prior_lambda=lam)
        row.update(budget_reached_step=None, wall_s=3.0 + index, total_epochs=1.0, total_wall_s=3.0 + index,
                   checkpoint=str(final))
        (final.parent / "sweep_run.json").write_text(json.dumps({"wall_s": row["wall_s"],
                                                                 "hardware": "2 CPU cores (x86_64), no GPU"}))
        rows.append(row)
    write_results(rows, out)
    plot_quality_vs_apl(rows, out / "quality_vs_apl.png", "test_bleu", ("early", "late"))
    plot_core_maps(rows, out / "core_maps.png")
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _as_parquet(rows: list[dict]) -> list[dict]:
    return [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()} for row in rows]


def test_push_results_then_load_dataset_gives_equal_rows(sweep_folder, tmp_path):
    before = _snapshot(sweep_folder)
    rows = read_results(sweep_folder)
    with LocalHub(token="secret") as hub, hub_env(hub):
        pushed = push_results(sweep_folder, "user/tiny-sweep")
        assert pushed.model_repos == {} and "/datasets/user/tiny-sweep/commit/" in pushed.dataset_commit_url
        loaded = load_dataset(hub, "user/tiny-sweep", tmp_path / "cache")
        assert list(loaded) == _as_parquet(rows) and loaded.column_names == list(rows[0])
        files = HfApi().list_repo_files("user/tiny-sweep", repo_type="dataset")
        assert sorted(files) == [".gitattributes", "README.md", DATA_FILE, "plots/core_maps.png",
                                 "plots/quality_vs_apl.png"]
        assert len(hub.commits("user/tiny-sweep", "dataset")) == 2, "creation + one commit with everything"

        (sweep_folder / "core_maps.png").unlink()  # an update drops the plot the folder no longer has
        push_results(sweep_folder, "user/tiny-sweep")
        assert "plots/core_maps.png" not in HfApi().list_repo_files("user/tiny-sweep", repo_type="dataset")
        card = DatasetCard.load("user/tiny-sweep", repo_type="dataset")
    assert _snapshot(sweep_folder) == {k: v for k, v in before.items() if k != "core_maps.png"}
    data = card.data.to_dict()
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}]
    assert {"linearized", "average-path-length"} <= set(data["tags"]) and data["task_categories"] == ["translation"]
    text = card.text
    assert "## Baseline" in text and "`baseline` (synthetic en-de, marian-tiny), no prior: **test_bleu 10**" in text
    assert "Schedules early, late × budgets (nonlinear_fraction) 0.5 × prior λ 1." in text
    assert "18 s of wall time" in text and "2 CPU cores (x86_64), no GPU" in text
    assert "`late_nf0.5_lam1` (late, budget 0.5),\n**12**" in text and "(+2)" in text


def test_push_checkpoints_link_both_ways(sweep_folder, tmp_path):
    with LocalHub() as hub, hub_env(hub):
        pushed = push_results(sweep_folder, "user/sw", push_checkpoints=True)
        assert pushed.model_repos == {name: f"user/sw-{name}" for name, *_ in RUNS}
        loaded = load_dataset(hub, "user/sw", tmp_path / "cache")
        assert [row["hub_model"] for row in loaded] == list(pushed.model_repos.values())
        for name, repo in pushed.model_repos.items():
            assert len(hub.commits(repo)) == 2, "creation + one commit"
            card = ModelCard.load(repo)
            assert "[`user/sw`](https://huggingface.co/datasets/user/sw)" in card.text
            results = {r.metric_type: r for r in card.data.eval_results}
            assert set(results) == {"bleu", "chrf", *PATH_LENGTH_METRICS}
            assert results["bleu"].dataset_type == "multi30k" and results["bleu"].dataset_split == "test"
            model = hl.from_pretrained(repo)
            assert results["normalized_apl"].metric_value == pytest.approx(hl.average_path_length(model))
        assert "[user/sw-control](https://huggingface.co/user/sw-control)" in DatasetCard.load(
            "user/sw", repo_type="dataset").text


def test_failed_push_names_the_repo_and_keeps_the_folder(sweep_folder):
    before = _snapshot(sweep_folder)
    with LocalHub() as hub:
        endpoint = hub.endpoint
    with hub_env(endpoint=endpoint):  # closed port on loopback
        with pytest.raises(HubPushError, match=r"dataset repo 'user/gone'.*folder is unchanged"):
            push_results(sweep_folder, "user/gone")
        with pytest.raises(HubPushError, match=r"run 'baseline' to model repo 'user/gone-baseline'.*was not pushed"):
            push_results(sweep_folder, "user/gone", push_checkpoints=True)
    assert _snapshot(sweep_folder) == before


def test_local_problems_are_found_before_pushing(sweep_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished sweep folder"):
        push_results(tmp_path / "empty", "user/x")
    shutil.rmtree(sweep_folder / "runs" / "control" / "final")
    with pytest.raises(FileNotFoundError, match="Run 'control' has no checkpoint"):
        push_results(sweep_folder, "user/x", push_checkpoints=True)  # no Hub is reachable: it never got that far
    assert model_repo_id("me/sweep", "late (fitted)") == "me/sweep-late-fitted"
    with pytest.raises(ValueError, match="shorter name"):
        model_repo_id("me/" + "s" * 90, "late_nf0.5_lam1")
    assert metric_columns(read_results(sweep_folder)) == ["test_bleu", "test_chrf"]


def test_cli_push_results(sweep_folder, tmp_path, capsys):
    with LocalHub() as hub, hub_env(hub):
        assert cli(["push-results", str(sweep_folder), "user/cli-sweep"]) == 0
        assert "user/cli-sweep" in capsys.readouterr().out
        assert len(load_dataset(hub, "user/cli-sweep", tmp_path / "cache")) == len(RUNS)
        endpoint = hub.endpoint
    with hub_env(endpoint=endpoint):
        assert cli(["push-results", str(sweep_folder), "user/cli-sweep"]) == 2
    assert "dataset repo 'user/cli-sweep'" in capsys.readouterr().err
