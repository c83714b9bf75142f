"""hf_linearize.model_index: the model-index a linearized model's card carries, read back by the Hub's parser."""

from __future__ import annotations

from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

import hf_linearize as hl
from hf_linearize.hub import render_model_card
from hf_linearize.model_index import PATH_LENGTH_METRICS


def _card_metadata(**kwargs) -> dict:
    metadata = {"linearize_config": {"prior_lambda": 1.0, "prior_start": 0, "prior_warmup": 0,
                                     "freeze_gates_after": None, "budget_target": 0.2,
                                     "budget_metric": "nonlinear_fraction", "linear_threshold": 0.99},
                "summary": {"total": {"units": 8, "linear": 6, "nonlinear": 2, "nonlinear_fraction": 0.25},
                            "layers": {"fc": {"nonlinear": 2}}},
                "path_length": {"normalized_apl": 1.25, "unnormalized_apl": 1.5},
                "backend": "transformers", "family": "marian", "library_version": hl.__version__}
    return render_model_card(metadata, **kwargs).content


def test_model_index_round_trips_through_the_hub_parser(tmp_path):
    text = _card_metadata(metrics={"bleu": 31.2, "chrf": float("nan")}, dataset="wmt16", dataset_config="de-en",
                          dataset_split="test", task="translation", model_name="marian-lin")
    (tmp_path / "README.md").write_text(text)
    index = metadata_load(tmp_path / "README.md")["model-index"]
    name, results = model_index_to_eval_results(index)
    assert name == "marian-lin" and eval_results_to_model_index(name, results) == index
    assert [(r.metric_type, r.metric_value) for r in results] == [
        ("bleu", 31.2), ("normalized_apl", 1.25), ("unnormalized_apl", 1.5), ("nonlinear_fraction", 0.25)]
    assert {(r.task_type, r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split) for r in results} == {
        ("translation", "wmt16", "wmt16", "de-en", "test")}, "one result: task, dataset, config, split"
    assert all(r.metric_name for r in results[1:]) and ModelCard(text).data.eval_results == results
    assert ".nan" not in text, "a non-finite metric is left out: the Hub's schema wants a number"
    assert "- bleu on wmt16 (test split): **31.20**" in text

    plain = ModelCard(_card_metadata()).data.eval_results  # no task metric: the path-length figures alone
    assert [(r.metric_type, r.dataset_type) for r in plain] == [(key, "custom") for key in PATH_LENGTH_METRICS]
