"""Linearized checkpoints: save/load exactness, model card, push/pull through a local Hub server, bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any, Callable

import httpx2 as httpx
import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import transformers as tf
import tiny_models
from conftest import FAMILY_CASES, GLU_FFN_CASES, run
from hub_server import LocalHub, hub_env
from huggingface_hub import ModelCard, create_repo, upload_folder
from torch import nn
from torch.utils._pytree import tree_leaves

import hf_linearize as hl
from hf_linearize import hub
from hf_linearize.folding import fold_state, is_folded
from hf_linearize.hub import (
    LINEARIZE_CONFIG_NAME,
    NOT_FOLDED_FORMS,
    HubPushError,
    LinearizedCheckpointError,
)
from hf_linearize.patching import patch_state
from hf_linearize.probe_inputs import _call, inputs_from_spec


@pytest.fixture
def linearized_marian(marian):
    model, inputs = marian
    hl.patch_model(model, hl.LinearizeConfig(prior_lambda=0.5, budget_target=0.3))
    hl.set_linear(model, 0.5, seed=1)
    for _, gate in hl.gated_modules(model):  # partial gates too, so exactness is not trivial
        gate.alpha.data[gate.alpha == 0] = 0.3
    return model, inputs


@pytest.fixture
def linearized_resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    hl.patch_model(model, example_inputs=x[:1])  # probes at 64 px, as loading does then (faster than 224)
    hl.set_linear(model, 0.25)
    return model, x


def test_save_load_transformers_exact(tmp_path, linearized_marian):
    model, inputs = linearized_marian
    hl.save_pretrained(model, tmp_path, metrics={"bleu": 12.5, "chrf": 40.0}, dataset="multi30k",
                       base_model="Helsinki-NLP/opus-mt-en-de", language=["en", "de"])
    assert {"config.json", LINEARIZE_CONFIG_NAME, "model.safetensors", "README.md"} <= {
        p.name for p in tmp_path.iterdir()}
    loaded = hl.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))
    assert hl.summary(loaded) == hl.summary(model)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "marian"


def test_save_load_timm_exact(tmp_path, linearized_resnet):
    model, x = linearized_resnet
    rng = torch.get_rng_state()
    hl.save_pretrained(model, tmp_path)
    assert torch.equal(torch.get_rng_state(), rng), "verifying the save drew weights from the caller's RNG"
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "resnet18"
    loaded = hl.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("case", ["llama", "timm_eva"])
def test_save_load_gated_ffn_models_exact(tmp_path, case):
    """LLaMA (transformers, untied lm_head) and EVA-02 (timm, rotary embeddings) load strictly and exactly."""
    torch.manual_seed(0)
    model, inputs = GLU_FFN_CASES[case]()
    hl.patch_model(model.eval())
    hl.set_linear(model, 0.5, seed=2)
    hl.save_pretrained(model, tmp_path)
    loaded = hl.from_pretrained(tmp_path)
    _assert_bit_identical(loaded, model)
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_metadata_is_measured_on_the_saved_model(tmp_path, linearized_marian):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path, metrics={"bleu": 12.5})
    meta = json.loads((tmp_path / LINEARIZE_CONFIG_NAME).read_text())
    total = hl.summary(model)["total"]
    assert meta["format_version"] == 1 and meta["library_version"] == hl.__version__
    assert meta["summary"]["total"] == total and total["linear"] == total["units"] // 2
    assert meta["path_length"]["normalized_apl"] == pytest.approx(hl.average_path_length(model))
    assert meta["linearize_config"]["budget_target"] == 0.3


def test_model_card_yaml_parses_back(tmp_path, linearized_marian):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path, metrics={"bleu": 12.5, "chrf": 40.0}, dataset="multi30k",
                       base_model="Helsinki-NLP/opus-mt-en-de")
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "hf_linearize" and data["base_model"] == "Helsinki-NLP/opus-mt-en-de"
    assert {"linearized", "average-path-length"} <= set(data["tags"])
    pl = data["path_length"]
    total = hl.summary(model)["total"]
    assert (pl["total_units"], pl["linear_units"], pl["nonlinear_units"]) == (
        total["units"], total["linear"], total["nonlinear"])
    assert pl["normalized_apl"] == pytest.approx(hl.average_path_length(model))
    assert pl["unnormalized_apl"] == pytest.approx(hl.average_path_length(model, normalized=False))
    assert pl["per_layer_nonlinear"] == {n: v["nonlinear"] for n, v in hl.summary(model)["layers"].items()}
    assert pl["prior"]["prior_lambda"] == 0.5
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"bleu": 12.5, "chrf": 40.0, "normalized_apl": pl["normalized_apl"],
                       "unnormalized_apl": pl["unnormalized_apl"], "nonlinear_fraction": pl["nonlinear_fraction"]}
    assert "still nonlinear" in card.text and f"{pl['normalized_apl']:.3f}" in card.text
    # Links only to what exists, and the usage snippet names this folder.
    assert "github.com" not in card.text and "https://huggingface.co/Helsinki-NLP/opus-mt-en-de" in card.text
    assert f'hl.from_pretrained("{tmp_path}")' in card.text and "REPO_ID" not in card.text


def test_plain_transformers_load_warns_about_the_gates(tmp_path, linearized_marian, caplog):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path)
    tf.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            tf.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    finally:
        tf.logging.disable_propagation()
    assert "UNEXPECTED" in caplog.text and "activation_fn.alpha" in caplog.text


def test_push_and_load_round_trip_with_revision_pin(tmp_path, linearized_marian, linearized_resnet):
    marian, inputs = linearized_marian
    resnet, x = linearized_resnet
    with LocalHub(token="secret") as hub, hub_env(hub):
        url = hl.push_to_hub(marian, "user/marian-lin", save_directory=tmp_path / "m", metrics={"bleu": 1.0})
        assert "user/marian-lin" in url
        first = hub.commits("user/marian-lin")[-1].oid
        hl.push_to_hub(resnet, "user/resnet-lin")
        with torch.no_grad():
            assert torch.equal(run(hl.from_pretrained("user/marian-lin"), inputs), run(marian, inputs))
            assert torch.equal(hl.from_pretrained("user/resnet-lin")(x), resnet(x))
        card = ModelCard.load("user/marian-lin")
        assert card.data.to_dict()["path_length"]["linear_units"] == hl.summary(marian)["total"]["linear"]
        assert 'hl.from_pretrained("user/marian-lin")' in card.text

        before = hl.summary(marian)
        hl.set_linear(marian, 1.0)
        hl.push_to_hub(marian, "user/marian-lin")
        assert hl.summary(hl.from_pretrained("user/marian-lin"))["total"]["nonlinear"] == 0
        assert hl.summary(hl.from_pretrained("user/marian-lin", revision=first)) == before


def _assert_same_tensors(loaded: torch.nn.Module, model: torch.nn.Module) -> None:
    """Same state: every tensor (gates included) under the same name, with the same dtype, bit for bit."""
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    different = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not different, f"tensors differ after reload: {different[:5]}"


def _assert_bit_identical(loaded: torch.nn.Module, model: torch.nn.Module) -> None:
    """Same state (:func:`_assert_same_tensors`) and the same summary."""
    _assert_same_tensors(loaded, model)
    assert hl.summary(loaded) == hl.summary(model)


def test_push_failure_keeps_local_save(tmp_path, linearized_marian):
    model, inputs = linearized_marian
    with LocalHub(token="secret") as hub, hub_env(hub, token="wrong"):
        with pytest.raises(hl.HubPushError, match="saved at"):
            hl.push_to_hub(model, "user/denied", save_directory=tmp_path)
    loaded = hl.from_pretrained(tmp_path)
    _assert_bit_identical(loaded, model)
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))
    with LocalHub() as hub, hub_env(hub):
        endpoint = hub.endpoint
    with hub_env(endpoint=endpoint):  # the server is gone: connection refused on loopback
        with pytest.raises(HubPushError, match=f"the Hub at {endpoint} could not be reached .*"
                                                f"{tmp_path / 'second'}"):
            hl.push_to_hub(model, "user/gone", save_directory=tmp_path / "second")
    _assert_bit_identical(hl.from_pretrained(tmp_path / "second"), model)


def test_push_names_a_refused_token_and_an_invalid_repo_id(tmp_path, linearized_marian, no_retries):
    model, _ = linearized_marian
    with LocalHub(token="secret") as hub, hub_env(hub, token="wrong"):
        with pytest.raises(HubPushError, match="answered 401 .*check the token"):
            hl.push_to_hub(model, "user/denied", save_directory=tmp_path / "a")
    with pytest.raises(ValueError, match="'user/has space' is not a valid Hub repo id"):
        hl.push_to_hub(model, "user/has space", save_directory=tmp_path / "b")
    assert not (tmp_path / "b").exists(), "an invalid repo id is refused before anything is saved"


def test_checkpoint_errors_are_exported():
    assert hl.LinearizedCheckpointError is LinearizedCheckpointError and hl.HubPushError is HubPushError
    assert {"LinearizedCheckpointError", "HubPushError"} <= set(hl.__all__)


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_linearize_config(tmp_path, linearized_marian):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path)
    (tmp_path / LINEARIZE_CONFIG_NAME).unlink()
    with pytest.raises(LinearizedCheckpointError, match="linearize_config.json is missing"):
        hl.from_pretrained(tmp_path)


def test_corrupt_linearize_config(tmp_path, linearized_marian):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path)
    (tmp_path / LINEARIZE_CONFIG_NAME).write_text("{not json")
    with pytest.raises(LinearizedCheckpointError, match="is corrupt"):
        hl.from_pretrained(tmp_path)


def test_future_format_version(tmp_path, linearized_marian):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / LINEARIZE_CONFIG_NAME).read_text())
    meta["format_version"] = 99
    (tmp_path / LINEARIZE_CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(LinearizedCheckpointError, match="format_version 99, newer than .* upgrade hf_linearize"):
        hl.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config(tmp_path, linearized_marian):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path)
    other, _ = FAMILY_CASES["marian"]()
    hl.patch_model(other, hl.LinearizeConfig(exclude_modules=r".*decoder.*"))
    hl.save_pretrained(other, tmp_path / "other")
    (tmp_path / LINEARIZE_CONFIG_NAME).write_text((tmp_path / "other" / LINEARIZE_CONFIG_NAME).read_text())
    with pytest.raises(LinearizedCheckpointError, match=r"unexpected model\.decoder\.layers\.0\.activation_fn\.alpha"):
        hl.from_pretrained(tmp_path)
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "model.safetensors")
    hl.save_pretrained(model, tmp_path / "third")
    (tmp_path / "model.safetensors").replace(tmp_path / "third" / "model.safetensors")
    with pytest.raises(LinearizedCheckpointError, match=r"missing model\.decoder\.layers\.0\.activation_fn\.alpha"):
        hl.from_pretrained(tmp_path / "third")


def test_repo_that_is_not_linearized(tmp_path):
    plain, _ = FAMILY_CASES["marian"]()
    plain.save_pretrained(tmp_path)
    with LocalHub() as hub, hub_env(hub):
        create_repo("user/plain")
        upload_folder(folder_path=tmp_path, repo_id="user/plain")
        with pytest.raises(LinearizedCheckpointError, match="'user/plain' .* is not a linearized model"):
            hl.from_pretrained("user/plain")
    with pytest.raises(LinearizedCheckpointError, match="linearize_config.json is missing"):
        hl.from_pretrained(tmp_path)


def test_saving_an_unsupported_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    hl.patch_model(model, example_inputs=torch.randn(1, 3))
    with pytest.raises(TypeError, match="transformers and timm models"):
        hl.save_pretrained(model, tmp_path)


def test_recorded_sites_that_the_model_does_not_have(tmp_path, linearized_marian):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / LINEARIZE_CONFIG_NAME).read_text())
    meta["sites"]["model.encoder.layers.0.activation_fn"] = 99
    (tmp_path / LINEARIZE_CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(LinearizedCheckpointError, match="do not belong together"):
        hl.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ strict loading
def _edit_weights(directory, edit) -> None:
    """Apply ``edit`` (in place, on the dict of tensors) to ``directory/model.safetensors``."""
    file = directory / "model.safetensors"
    state = safetensors.torch.load_file(str(file))
    edit(state)
    safetensors.torch.save_file(state, str(file), metadata={"format": "pt"})


def test_a_missing_base_weight_is_named(tmp_path, linearized_marian, caplog):
    """The review's case: without this check the weight was freshly initialised and the logits drifted by 4e-3."""
    model, inputs = linearized_marian
    hl.save_pretrained(model, tmp_path)
    _edit_weights(tmp_path, lambda state: state.pop("model.decoder.layers.0.fc1.weight"))
    with pytest.raises(LinearizedCheckpointError, match=r"\(1 missing, 0 unexpected, 0 of the wrong shape\):\n"
                                                        r"  missing model\.decoder\.layers\.0\.fc1\.weight\n"):
        hl.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_linearize.hub"):
        partial = hl.from_pretrained(tmp_path, allow_partial=True)
    assert "allow_partial=True: missing model.decoder.layers.0.fc1.weight" in caplog.text
    with torch.no_grad():
        assert not torch.equal(run(partial, inputs), run(model, inputs))


def test_unexpected_and_wrongly_shaped_tensors_are_all_named(tmp_path, linearized_marian, caplog):
    model, _ = linearized_marian
    hl.save_pretrained(model, tmp_path)

    def damage(state):
        state["model.encoder.layers.0.fc2.weight"] = state["model.encoder.layers.0.fc2.weight"][:, :-1].clone()
        state["model.encoder.layers.1.activation_fn.alpha"] = torch.zeros(3)
        state["model.encoder.extra_head.weight"] = torch.zeros(2)

    _edit_weights(tmp_path, damage)
    with pytest.raises(LinearizedCheckpointError) as error:
        hl.from_pretrained(tmp_path)
    message = str(error.value)
    assert "(0 missing, 1 unexpected, 2 of the wrong shape)" in message
    assert "unexpected model.encoder.extra_head.weight" in message
    assert "wrong shape model.encoder.layers.0.fc2.weight: file (16, 23), model (16, 24)" in message
    assert "wrong shape model.encoder.layers.1.activation_fn.alpha: file (3,), model (24,)" in message
    assert "allow_partial=True" in message
    with caplog.at_level(logging.WARNING, logger="hf_linearize.hub"):
        hl.from_pretrained(tmp_path, allow_partial=True)
    assert sum("allow_partial=True" in r.message for r in caplog.records) == 3


def test_tied_weights_that_transformers_leaves_out_are_not_missing(tmp_path, linearized_marian):
    """Marian ties its embeddings and lm_head: the file holds model.shared.weight only, and that is complete."""
    model, inputs = linearized_marian
    assert model.config.tie_word_embeddings
    hl.save_pretrained(model, tmp_path)
    keys = set(safetensors.torch.load_file(str(tmp_path / "model.safetensors")))
    assert "model.shared.weight" in keys
    assert not keys & {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    loaded = hl.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.shared.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))
    _edit_weights(tmp_path, lambda state: state.pop("model.shared.weight"))
    with pytest.raises(LinearizedCheckpointError, match=r"missing model\.shared\.weight"):
        hl.from_pretrained(tmp_path)


def test_timm_loading_is_strict_too(tmp_path, linearized_resnet, caplog):
    model, x = linearized_resnet
    hl.save_pretrained(model, tmp_path)

    def damage(state):
        del state["layer1.0.conv1.weight"], state["act1.alpha"]
        state["fc.extra"] = torch.zeros(1)
        state["fc.bias"] = torch.zeros(3)

    _edit_weights(tmp_path, damage)
    with pytest.raises(LinearizedCheckpointError) as error:
        hl.from_pretrained(tmp_path)
    for line in ("missing act1.alpha", "missing layer1.0.conv1.weight", "unexpected fc.extra",
                 "wrong shape fc.bias: file (3,), model (7,)"):
        assert line in str(error.value)
    with caplog.at_level(logging.WARNING, logger="hf_linearize.hub"):
        partial = hl.from_pretrained(tmp_path, allow_partial=True)
    assert sum("allow_partial=True" in r.message for r in caplog.records) == 4
    assert bool((partial.act1.alpha == 0).all()), "a missing gate keeps gate_init"


# ------------------------------------------------------------------------------------------------ path or repo
@pytest.mark.parametrize("name", ["./out/marian-lin", "out\\marian-lin", "out/a/b", "~/no-such-checkpoint"])
def test_a_path_that_names_no_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LinearizedCheckpointError) as error:
        hl.from_pretrained(name)
    message = str(error.value)
    assert f"There is no local folder {name!r}" in message
    assert f"{name!r} is not a Hub repo id" in message and f"no Hub repo {name!r} can be found" in message
    assert "Check the path" in message and str(tmp_path) in message


def test_a_missing_folder_that_could_be_a_repo_id_offline(tmp_path, monkeypatch):
    """The README's own example path, with no such folder and no network: not an OfflineModeIsEnabled."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LinearizedCheckpointError) as error:
        hl.from_pretrained("out/marian-lin")
    message = str(error.value)
    assert "There is no local folder 'out/marian-lin'" in message
    assert "Hub repo 'out/marian-lin' (revision main) cannot be loaded: offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "Check the path" in message


@pytest.fixture
def no_retries(monkeypatch):
    """The Hub client's backoff sleeps between retries; here a retry fails the test instead of waiting."""
    def sleep(seconds):
        raise AssertionError(f"the Hub client retried (would sleep {seconds} s)")

    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", sleep)


@pytest.fixture
def unreachable_hub():
    """``HF_HUB_OFFLINE`` unset and ``HF_ENDPOINT`` at a closed loopback port: the usual offline laptop."""
    with LocalHub() as hub, hub_env(hub):
        endpoint = hub.endpoint
    with hub_env(endpoint=endpoint):  # the server is gone: connection refused
        yield endpoint


@pytest.mark.parametrize("call", [lambda: hl.from_pretrained("out/marian-lni"),
                                  lambda: hl.from_pretrained("user/model", revision="v2")], ids=["path", "revision"])
def test_an_unreachable_hub_is_reported_as_unreachable_without_retries(tmp_path, monkeypatch, unreachable_hub,
                                                                       no_retries, call):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LinearizedCheckpointError) as error:
        call()
    message = str(error.value)
    assert f"the Hub at {unreachable_hub} could not be reached (ConnectError" in message
    assert "There is no local folder" in message and "HF_HUB_OFFLINE=1" in message


def test_the_cli_reports_an_unreachable_hub_in_one_line(tmp_path, unreachable_hub):
    env = {**os.environ, "HF_ENDPOINT": unreachable_hub, "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, "-m", "hf_linearize.cli", "apl", "out/marian-lni"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "could not be reached" in result.stderr and "Retrying" not in result.stderr, result.stderr


def test_a_missing_folder_and_a_missing_repo(tmp_path, monkeypatch, no_retries):
    monkeypatch.chdir(tmp_path)
    with LocalHub() as hub, hub_env(hub):
        with pytest.raises(LinearizedCheckpointError, match=r"There is no local folder 'user/nothing' .*, and Hub repo "
                                                            r"'user/nothing' .* answered 404 \(RepositoryNotFoundError"):
            hl.from_pretrained("user/nothing")


def test_a_missing_revision_is_an_answered_404(tmp_path, linearized_marian, no_retries):
    model, _ = linearized_marian
    with LocalHub() as hub, hub_env(hub):
        hl.push_to_hub(model, "user/marian-lin")
        with pytest.raises(LinearizedCheckpointError, match=r"revision v9\) cannot be loaded: the Hub at .* answered "
                                                            r"404 \(RevisionNotFoundError"):
            hl.from_pretrained("user/marian-lin", revision="v9")


@pytest.mark.parametrize("status, words", [(401, "check the token"), (403, "lacks permission"),
                                           (404, "check the repo id"), (500, "answered 500")])
def test_hub_failure_names_the_answer_and_the_fix(status, words):
    request = httpx.Request("GET", "http://127.0.0.1:1/api/models/user/x")
    error = huggingface_hub.errors.HfHubHTTPError("refused", response=httpx.Response(status, request=request))
    message = hub.hub_failure(error, "http://127.0.0.1:1")
    assert message.startswith(f"the Hub at http://127.0.0.1:1 answered {status} (HfHubHTTPError: refused)")
    assert words in message
    assert "could not be reached (ConnectTimeout" in hub.hub_failure(httpx.ConnectTimeout("slow"))


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LinearizedCheckpointError, match="is a file, not a checkpoint folder"):
        hl.from_pretrained(tmp_path / "model.safetensors")


def test_timm_checkpoint_records_the_input_of_the_model_as_built(tmp_path):
    model = hl.patch_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                                             in_chans=1, depth=1))
    hl.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(hl.from_pretrained(tmp_path).eval()(x), model.eval()(x))


def test_a_timm_checkpoint_records_how_to_feed_it_and_its_class_names(tmp_path):
    """data_config and label_names go into config.json: timm resolves the very preprocessing back, from the model
    hf_linearize loads and from timm's own local-dir: loader, and the model keeps its class names."""
    model = hl.patch_model(timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1,
                                             channels=(8, 8, 8, 8), stem_width=8))
    given = timm.data.resolve_model_data_config(model, args={"input_size": (1, 28, 28), "crop_pct": 1.0,
                                                             "mean": (0.13,), "std": (0.31,),
                                                             "interpolation": "bilinear"})
    hl.save_pretrained(model, tmp_path, data_config=given, label_names=["cat", "dog", "eel"])
    for loaded in (hl.from_pretrained(tmp_path), timm.create_model(f"local-dir:{tmp_path}")):
        assert timm.data.resolve_model_data_config(loaded) == {**given, "mean": [0.13], "std": [0.31]}
        assert loaded.pretrained_cfg["label_names"] == ["cat", "dog", "eel"]


def test_a_transformers_classifier_records_its_labels(tmp_path):
    model, _ = tiny_models.ALL["hf_vit"]()
    hl.patch_model(model)
    hl.save_pretrained(model, tmp_path, label_names=["cat", "dog", "eel"])
    config = hl.from_pretrained(tmp_path).config
    assert config.id2label == {0: "cat", 1: "dog", 2: "eel"} and config.label2id == {"cat": 0, "dog": 1, "eel": 2}
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, "the saved model is left as it was"


def test_a_description_that_does_not_fit_the_model_is_refused(tmp_path, linearized_marian, linearized_resnet):
    resnet, marian = linearized_resnet[0], linearized_marian[0]
    with pytest.raises(ValueError, match=r"keys \['img_size'\] that a checkpoint does not record"):
        hl.save_pretrained(resnet, tmp_path / "a", data_config={"img_size": 28})
    with pytest.raises(ValueError, match="transformers model; save its image processor with tokenizer="):
        hl.save_pretrained(marian, tmp_path / "b", data_config={"crop_pct": 1.0})
    with pytest.raises(ValueError, match="label_names has 2 names, but .* has 7 output classes"):
        hl.save_pretrained(resnet, tmp_path / "c", label_names=["a", "b"])
    vit = hl.patch_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                                           depth=1))
    with pytest.raises(ValueError, match=r"does not fit .* as built: Requested image size \(64, 64\), but the model "
                                         r"requires \(32, 32\)"):
        hl.save_pretrained(vit, tmp_path / "d", data_config={"input_size": (3, 64, 64)})
    assert not any(tmp_path.iterdir()), "nothing was written"


def test_format_1_checkpoint_without_gate_targets_loads(tmp_path, linearized_marian):
    """Checkpoints written before affine gate targets existed hold only ``<site>.alpha``: they load exactly, with the
    default targets."""
    model, inputs = linearized_marian
    hl.save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    old = {k: v for k, v in state.items() if not k.endswith((".target_slope", ".target_offset"))}
    assert len(old) < len(state)
    safetensors.torch.save_file(old, weights, metadata={"format": "pt"})
    loaded = hl.from_pretrained(tmp_path)
    assert not any(gate._affine for _, gate in hl.gated_modules(loaded))
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))


# ------------------------------------------------------------------------------------------------ every model
_IMAGE = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
_PIXELS = {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}

ROUND_TRIP_MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    **{name: build for name, build in tiny_models.ALL.items() if name != "timm_vit_swiglu"},  # refused: see below
    "hf_vit_model": lambda: (tf.ViTModel(tf.ViTConfig(intermediate_size=24, **_IMAGE)), _PIXELS),
    "dinov2_swiglu": lambda: (tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, use_swiglu_ffn=True, **_IMAGE)),
                              _PIXELS),
    "clip_vision": lambda: (tf.CLIPVisionModel(tf.CLIPVisionConfig(intermediate_size=24, **_IMAGE)), _PIXELS),
    "timm_test_resnet": lambda: (timm.create_model("test_resnet", pretrained=False, num_classes=3),
                                 torch.randn(1, 3, 32, 32)),
}
"""Every architecture that patches (``tiny_models.ALL``; its timm ViT built with a SwiGLU class cannot be recorded
by timm and is refused) and the layouts that transformers 5 renames on save: HF ViT's ``layers`` (saved as
``encoder.layer``), DINOv2's SwiGLU (``weights_in``), CLIP's vision tower alone (a prefix change), besides Mixtral's
``block_sparse_moe`` and the fused experts there; and a CNN, where no FFN folds."""


def _linearized(name: str) -> nn.Module:
    """Model ``name`` (``ROUND_TRIP_MODELS``, ``FAMILY_CASES`` or ``GLU_FFN_CASES``), patched in eval mode on its
    inputs, half of its units linear and a few gates fractional, so that a round trip which loses or renames a gate
    fails."""
    torch.manual_seed(0)
    model, inputs = {**FAMILY_CASES, **GLU_FFN_CASES, **ROUND_TRIP_MODELS}[name]()
    hl.patch_model(model.eval(), example_inputs=inputs)
    hl.set_linear(model, 0.5, seed=1)
    for _, gate in hl.gated_modules(model):
        nonlinear = (gate.alpha == 0).nonzero().flatten()[:3]
        gate.alpha.data[nonlinear] = torch.linspace(0.1, 0.7, len(nonlinear))
    return model


def _assert_same_outputs(loaded: nn.Module, model: nn.Module, probe: dict) -> None:
    """Every output tensor equal (``torch.equal``) on the probe input of the spec ``probe``."""
    with torch.no_grad():
        expected, got = ([t for t in tree_leaves(_call(m, inputs_from_spec(probe))) if isinstance(t, torch.Tensor)]
                         for m in (model, loaded))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_MODELS))
def test_every_patchable_model_round_trips_bit_exactly(tmp_path, name):
    model = _linearized(name)
    hl.save_pretrained(model, tmp_path, verify=False)  # the checks below are verify's, and more
    loaded = hl.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    _assert_bit_identical(loaded, model)
    _assert_same_outputs(loaded, model, patch_state(model).probe)


def _folded_round_trip(directory, name: str) -> tuple[nn.Module, ModelCard]:
    """Fold model ``name``, save it and check that it loads back folded, bit for bit; the folded model and its card."""
    folded = hl.fold(_linearized(name))
    hl.save_pretrained(folded, directory)
    loaded = hl.from_pretrained(directory)
    assert type(loaded) is type(folded) and is_folded(loaded)
    assert hl.fold_report(loaded)["sites"] == hl.fold_report(folded)["sites"]
    _assert_same_tensors(loaded, folded)
    _assert_same_outputs(loaded, folded, fold_state(folded).source["probe"])
    return folded, ModelCard.load(directory / "README.md")


@pytest.mark.parametrize("name", ["bert", "marian", "llama", "timm_vit", "hf_vit_model", "qwen2_moe", "gpt2"])
def test_folded_models_round_trip_bit_exactly(tmp_path, name):
    """Folded checkpoints keep the folded tensors' own names too (HF ViT and Qwen2-MoE rename on save)."""
    folded, card = _folded_round_trip(tmp_path, name)
    nothing_folded = all(s["form"] in NOT_FOLDED_FORMS for s in hl.fold_report(folded)["sites"].values())
    assert ("no FFN folded" in card.text) is nothing_folded and ("multiply-adds" in card.text) is not nothing_folded


def test_a_folded_model_where_nothing_folded(tmp_path):
    """Saving it raised ZeroDivisionError before: the card divided by the FFN MACs after folding, 0 here."""
    folded, card = _folded_round_trip(tmp_path, "timm_test_resnet")
    forms = {s["form"] for s in hl.fold_report(folded)["sites"].values()}
    assert forms <= set(NOT_FOLDED_FORMS), f"fold now folds ResNet ({forms}); pick a model where nothing folds"
    assert "This checkpoint is folded" in card.text and "no FFN folded" in card.text
    assert "multiply-adds" not in card.text and "folded" in card.data.tags


@pytest.mark.parametrize("name,fold", [("hf_vit_model", False), ("qwen2_moe", True), ("timm_eva", False)])
def test_sharded_checkpoints_round_trip_and_replace_a_single_file_one(tmp_path, name, fold):
    model = _linearized(name)
    model = hl.fold(model) if fold else model
    (tmp_path / "notes.txt").write_text("not part of the checkpoint")
    hl.save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    hl.save_pretrained(model, tmp_path, max_shard_size=4096)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "notes.txt").read_text() == "not part of the checkpoint"
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert set(weight_map) <= set(model.state_dict()), "tensors are stored under the model's own names"
    loaded = hl.from_pretrained(tmp_path)
    _assert_same_tensors(loaded, model)
    probe = fold_state(model).source["probe"] if fold else patch_state(model).probe
    _assert_same_outputs(loaded, model, probe)
    (tmp_path / shards[-1]).unlink()
    with pytest.raises(LinearizedCheckpointError, match=f"lacks the weight shard.*{shards[-1]}"):
        hl.from_pretrained(tmp_path)


def test_a_model_cast_after_patching_comes_back_in_its_dtype_with_fp32_gates(tmp_path):
    """Gates stay fp32 in a bf16 model, in the file and after loading, also from a file that holds them in bf16 (as
    saved before gates kept fp32); dtype= (torch_dtype=) loads the model in another dtype, gates still fp32."""
    model = _linearized("llama").to(torch.bfloat16)
    hl.save_pretrained(model, tmp_path)
    loaded = hl.from_pretrained(tmp_path)
    assert {p.dtype for n, p in loaded.named_parameters() if not n.endswith("alpha")} == {torch.bfloat16}
    assert {gate.alpha.dtype for _, gate in hl.gated_modules(loaded)} == {torch.float32}
    _assert_bit_identical(loaded, model)
    wide = hl.from_pretrained(tmp_path, dtype=torch.float32)
    assert {t.dtype for t in wide.state_dict().values() if t.is_floating_point()} == {torch.float32}
    half = hl.from_pretrained(tmp_path, torch_dtype="float16").state_dict()
    gate_keys = {k for k in half if k.endswith(("alpha", "target_slope", "target_offset"))}
    assert {half[k].dtype for k in gate_keys} == {torch.float32}
    assert {t.dtype for k, t in half.items() if k not in gate_keys and t.is_floating_point()} == {torch.float16}
    _edit_weights(tmp_path, lambda state: state.update({k: v.bfloat16() for k, v in state.items() if "alpha" in k}))
    old = hl.from_pretrained(tmp_path)
    assert {gate.alpha.dtype for _, gate in hl.gated_modules(old)} == {torch.float32}
    assert all(torch.equal(gate.alpha, gate.alpha.bfloat16().float()) for _, gate in hl.gated_modules(old))


def _timm_vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5)
    return model.eval(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("patched_in", [torch.float32, torch.bfloat16])
def test_a_timm_model_comes_back_in_its_saved_dtype(tmp_path, patched_in):
    """config.json records a timm model's dtype and loading builds it in that dtype, as transformers does: a bf16 ViT
    comes back bf16 with the same outputs (patched in bf16 it did not load: an fp32 rebuild cannot run its bf16
    probe). dtype=/torch_dtype= load it in another dtype."""
    model, x = _timm_vit()
    hl.patch_model(model.to(patched_in), example_inputs=x[:1].to(patched_in))
    hl.set_linear(model, 0.5)
    hl.path_length_report(model)  # saving traces the path graph on the probe as recorded (fp32 pixels for the fp32
    # case), which recorded_probe does not cast to the model's dtype: trace it before the cast
    model, x = model.to(torch.bfloat16), x.bfloat16()
    hl.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = hl.from_pretrained(tmp_path)
    _assert_bit_identical(loaded, model)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
        for kwargs in ({"dtype": torch.float32}, {"torch_dtype": "float32"}):
            wide = hl.from_pretrained(tmp_path, **kwargs)
            assert {t.dtype for t in wide.state_dict().values()} == {torch.float32}
            torch.testing.assert_close(wide(x.float()), expected.float(), rtol=0,
                                       atol=4 * torch.finfo(torch.bfloat16).eps * float(expected.abs().max()))


@pytest.mark.parametrize("kwargs, message", [({"dtype": "int8"}, "must be a floating torch.dtype"),
                                             ({"dtype": "bfloat16", "torch_dtype": torch.float16}, "differ")])
def test_a_dtype_that_cannot_be_loaded_is_refused(tmp_path, linearized_resnet, kwargs, message):
    hl.save_pretrained(linearized_resnet[0], tmp_path)
    with pytest.raises(ValueError, match=message):
        hl.from_pretrained(tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------------ refused saves
def _snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_timm_features_only_backbone_is_refused_before_anything_is_written(tmp_path, linearized_marian):
    model = timm.create_model("resnet18", pretrained=False, features_only=True)
    hl.patch_model(model.eval(), example_inputs=torch.randn(1, 3, 64, 64))
    with pytest.raises(LinearizedCheckpointError) as error:
        hl.save_pretrained(model, tmp_path / "new" / "backbone")
    message = str(error.value)
    assert "FeatureListNet ('resnet18') cannot be saved as a linearized checkpoint: timm cannot record" in message
    assert "no features_only=True wrapper" in message and "torch.save" in message
    assert f"Nothing was written to {tmp_path / 'new' / 'backbone'}" in message
    assert list(tmp_path.iterdir()) == [], "no folder, no staging folder left behind"
    hl.save_pretrained(linearized_marian[0], tmp_path / "old")
    before = _snapshot(tmp_path / "old")
    with pytest.raises(LinearizedCheckpointError, match="cannot be saved"):
        hl.save_pretrained(model, tmp_path / "old")
    assert _snapshot(tmp_path / "old") == before and [p.name for p in tmp_path.iterdir()] == ["old"]


def test_timm_arguments_that_timm_cannot_record_are_refused(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=3,
                              mlp_layer=timm.layers.SwiGLU, act_layer=nn.SiLU)
    hl.patch_model(model.eval())
    with pytest.raises(LinearizedCheckpointError, match=r"VisionTransformer \('vit_tiny_patch16_224'\) cannot be "
                                                        r"saved.*'mlp_layer' is not serializable.*model_args="):
        hl.save_pretrained(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_class_transformers_cannot_rebuild_is_refused(tmp_path):
    class MyBert(tf.BertModel):
        """A subclass that hf_linearize.from_pretrained could only rebuild as tf.BertModel."""

    model = MyBert(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=24))
    hl.patch_model(model.eval())
    with pytest.raises(LinearizedCheckpointError, match=r"MyBert \('bert'\) cannot be saved .*transformers\.MyBert.*"
                                                        r"custom code or a subclass.*Nothing was written"):
        hl.save_pretrained(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_does_not_read_back_leaves_the_old_one(tmp_path, linearized_marian, monkeypatch):
    """The verification loads what was written; here every gate reads back as 0, so nothing replaces the old
    checkpoint."""
    model, inputs = linearized_marian
    hl.save_pretrained(model, tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    read = hub._read_tensors
    monkeypatch.setattr(hub, "_read_tensors", lambda files, keys=None: {
        k: torch.zeros_like(v) if k.endswith(".alpha") else v for k, v in read(files, keys).items()})
    hl.set_linear(model, 1.0)
    with pytest.raises(LinearizedCheckpointError, match=r"does not read back exactly: \d+ tensor\(s\) differ .*alpha"
                                                        r".*Nothing was written to"):
        hl.save_pretrained(model, tmp_path / "ckpt")
    assert _snapshot(tmp_path / "ckpt") == before and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    monkeypatch.undo()
    loaded = hl.from_pretrained(tmp_path / "ckpt")
    assert hl.summary(loaded)["total"]["nonlinear"] > 0, "the old checkpoint, from before set_linear(1.0)"
