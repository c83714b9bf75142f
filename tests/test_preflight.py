"""hf_linearize.preflight: each check refuses its bad input with a message naming the flag, and writes nothing."""

from __future__ import annotations

import pytest
from hub_server import LocalHub, hub_env
from transformers import TrainingArguments

from hf_linearize.preflight import check_files, check_hub, check_output_dir


def _args(output_dir, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", **kwargs)


def test_a_new_or_empty_output_dir_is_a_new_run(tmp_path):
    assert check_output_dir(_args(tmp_path / "new" / "run"), overwrite=False) is None
    assert not (tmp_path / "new").exists(), "checks create nothing"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(_args(tmp_path / "empty"), overwrite=False) is None


def test_an_earlier_run_is_refused_unless_overwriting_or_resuming(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds an earlier run \(results.json\).*--resume_from_checkpoint "
                                         r"true.*--overwrite_output_dir true"):
        check_output_dir(_args(tmp_path), overwrite=False)
    assert check_output_dir(_args(tmp_path), overwrite=True) is None
    for step in (5, 40, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for word in ("true", "True", "last"):
        args = _args(tmp_path, resume_from_checkpoint=word)
        assert check_output_dir(args, overwrite=False) == str(tmp_path / "checkpoint-40")
        assert args.resume_from_checkpoint == str(tmp_path / "checkpoint-40")
    explicit = _args(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert check_output_dir(explicit, overwrite=False) == str(tmp_path / "checkpoint-5")


def test_resuming_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="resumes the last checkpoint in --output_dir .* has no checkpoint-\\* folder"):
        check_output_dir(_args(tmp_path / "nothing", resume_from_checkpoint="true"), overwrite=False)
    with pytest.raises(ValueError, match="--resume_from_checkpoint .*missing is not a checkpoint folder"):
        check_output_dir(_args(tmp_path, resume_from_checkpoint=str(tmp_path / "missing")), overwrite=False)


def test_an_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"cannot be created: {tmp_path / 'file'} is a file"):
        check_output_dir(_args(tmp_path / "file" / "run"), overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


def test_files_must_exist_and_hold_data(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "train.jsonl").write_text('{"en": "a", "de": "b"}\n')
    check_files([("train_file", str(tmp_path / "train.jsonl")), ("test_file", None)])
    with pytest.raises(ValueError, match="--validation_file .*missing.jsonl does not exist"):
        check_files([("validation_file", str(tmp_path / "missing.jsonl"))])
    with pytest.raises(ValueError, match="--train_file .*empty.jsonl is empty"):
        check_files([("train_file", str(tmp_path / "empty.jsonl"))])


def test_hub_settings_are_checked_before_training(tmp_path):
    check_hub(_args(tmp_path / "run"))  # not pushing: nothing to check, no request
    with pytest.raises(ValueError, match="--hub_model_id 'me/bad name' is not a valid Hub repo id"):
        check_hub(_args(tmp_path / "run", push_to_hub=True, hub_model_id="me/bad name"))
    with LocalHub(token="secret") as hub:
        with hub_env(hub):
            check_hub(_args(tmp_path / "run", push_to_hub=True, hub_model_id="user/run"))
        with hub_env(hub, token="wrong"):
            with pytest.raises(ValueError, match="would push to 'user/run', but the Hub at .* answered 401 .*check "
                                                 "the token"):
                check_hub(_args(tmp_path / "run", push_to_hub=True, hub_model_id="user/run"))
        endpoint = hub.endpoint
    with hub_env(endpoint=endpoint):
        with pytest.raises(ValueError, match="no token is set for the Hub at .*: set HF_TOKEN"):
            check_hub(_args(tmp_path / "run", push_to_hub=True))
    with hub_env(endpoint=endpoint, token="secret"):
        with pytest.raises(ValueError, match="would push to 'run', but the Hub at .* could not be reached .*drop "
                                             "--push_to_hub"):
            check_hub(_args(tmp_path / "run", push_to_hub=True))
    assert not (tmp_path / "run").exists()
