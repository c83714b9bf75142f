"""recipes/translate_wmt.py end to end: single process, two gloo processes under accelerate launch, offline data."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from conftest import MULTI30K, free_port, load_script, run_subprocess
from huggingface_hub import ModelCard

import hf_linearize as hl

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "translate_wmt.py"
DEMO = ROOT / "recipes" / "configs" / "demo.yaml"  # Multi30k
SYNTHETIC = ROOT / "recipes" / "configs" / "synthetic.yaml"


def _accelerate_2_procs() -> list[str]:
    """``accelerate launch`` of 2 CPU processes, meeting on a port that is free now."""
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   **env}
    return run_subprocess(command, cwd=ROOT, env=environment)


def _check_outputs(out: Path, references: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    test = results["scores"]["test"]
    hypotheses = (out / "translations" / "test.txt").read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == len(references)
    assert test["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert test["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    assert test["mean_reference_words"] > 0 and "validation" in results["scores"]
    model = hl.from_pretrained(out / "final")
    report = results["path_length"]
    assert report["normalized_apl"] == pytest.approx(hl.average_path_length(model))
    assert results["summary"]["total"] == hl.summary(model)["total"]
    assert any("linearize/nonlinear_fraction" in entry for entry in results["log_history"])
    for png in ("training_curves.png", "core_map.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    card = ModelCard.load(out / "final" / "README.md")
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["bleu"] == pytest.approx(test["bleu"])
    assert (out / "final" / "tokenizer.json").is_file()
    return results


def _recipe_argument_types(recipe) -> tuple[type, ...]:
    from transformers import Seq2SeqTrainingArguments

    return (recipe.ModelArguments, recipe.DataArguments, recipe.LinearizeArguments, recipe.EvalArguments,
            Seq2SeqTrainingArguments)


TRANSLATION_CONFIGS = sorted(p for p in (ROOT / "recipes" / "configs").glob("*.yaml")
                             if "source_lang:" in p.read_text(encoding="utf-8"))
"""The translation recipe's configs (recipes/configs also holds other recipes' configs)."""


def test_translation_configs_are_found():
    assert {"demo", "multi30k", "wmt16_de_en", "opus_mt_en_de"} <= {p.stem for p in TRANSLATION_CONFIGS}


@pytest.mark.parametrize("config", TRANSLATION_CONFIGS, ids=lambda p: p.stem)
def test_recipe_configs_parse(config, tmp_path):
    from hf_linearize.arguments import load_yaml, parse_with_config

    recipe = load_script(RECIPE)
    argv = ["--config", str(config), "--output_dir", str(tmp_path), "--bf16", "false"]
    _, _, lin_args, _, _ = parse_with_config(_recipe_argument_types(recipe), argv)
    linearize = lin_args.to_config()
    values = load_yaml(config)
    for name in ("prior_lambda", "gate_lr"):
        if name in values:
            assert getattr(linearize, name) == values[name]
    if "prior_start" in values:
        assert linearize.prior_start == (float(values["prior_start"]) if "." in str(values["prior_start"])
                                         else int(values["prior_start"]))


def test_targets_are_truncated_with_max_target_length(tmp_path):
    import datasets
    from transformers import Seq2SeqTrainingArguments

    from hf_linearize.translation.synthetic import synthetic_pairs
    from hf_linearize.translation.tokenizer import train_shared_tokenizer

    recipe = load_script(RECIPE)
    tokenizer = train_shared_tokenizer((t for p in synthetic_pairs(200) for t in p), vocab_size=120)
    long = " ".join(["the small dog sees the red house"] * 6)
    corpus = datasets.DatasetDict(train=datasets.Dataset.from_dict({"source": [long], "target": [long]}))
    data = recipe.DataArguments(max_source_length=12, max_target_length=5)
    encoded = recipe.tokenize(corpus, tokenizer, recipe.ModelArguments(), data,
                              Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    row = encoded["train"][0]
    assert len(row["input_ids"]) == 12 and len(row["labels"]) == 5
    assert row["labels"][-1] == tokenizer.eos_token_id


def test_single_process_synthetic(tmp_path):
    out = tmp_path / "demo"
    done = _run([sys.executable, str(RECIPE), "--config", str(SYNTHETIC), "--output_dir", str(out),
                 "--synthetic_train_size", "400", "--synthetic_eval_size", "16", "--max_steps", "12",
                 "--logging_steps", "4", "--prior_start", "0.25", "--prior_warmup", "0", "--prior_lambda", "50",
                 "--warmup_steps", "0", "--gate_lr", "1.0"])
    assert done.returncode == 0, done.stderr[-3000:]
    from hf_linearize.translation.data import load_synthetic

    test = load_synthetic(400, 16)["test"]
    sources, references = list(test["source"]), list(test["target"])
    results = _check_outputs(out, references)
    assert results["summary"]["total"]["linear"] > 0, "a strong late prior linearizes units"
    assert results["settings"]["linearize"]["prior_start"] == 0.25 and results["train"]["steps"] == 12
    assert "BLEU" in done.stdout and "normalized APL" in done.stdout
    _check_self_described_decoding(out, sources, references, results["scores"]["test"]["bleu"])


def _check_self_described_decoding(out: Path, sources: list[str], references: list[str], bleu: float) -> None:
    """final/ translates as the recipe did with plain transformers calls: its generation_config.json holds the
    recipe's beam, length limit and length penalty (synthetic.yaml: beam 4, 64 new tokens), so ``generate`` on the
    tokenized sources gives the saved translations and their BLEU (results.json's)."""
    from transformers import AutoTokenizer, GenerationConfig

    final = out / "final"
    generation = GenerationConfig.from_pretrained(final)
    assert (generation.num_beams, generation.max_length, generation.length_penalty) == (4, 64 + 1, 1.0)
    model, tokenizer = hl.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    hypotheses = tokenizer.batch_decode(model.generate(**tokenizer(sources, padding=True, return_tensors="pt")),
                                        skip_special_tokens=True)
    assert hypotheses == (out / "translations" / "test.txt").read_text(encoding="utf-8").splitlines()
    assert sacrebleu.corpus_bleu(hypotheses, [references]).score == bleu


def _pretrained(tmp_path: Path) -> Path:
    """A local pretrained seq2seq checkpoint (tiny random Marian) with a tokenizer trained on synthetic pairs."""
    from transformers import MarianConfig, MarianMTModel

    from hf_linearize.translation.synthetic import synthetic_pairs
    from hf_linearize.translation.tokenizer import train_shared_tokenizer

    tokenizer = train_shared_tokenizer((t for p in synthetic_pairs(300) for t in p), vocab_size=150)
    MarianMTModel(MarianConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                               decoder_ffn_dim=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
                  ).save_pretrained(tmp_path / "pretrained")
    tokenizer.save_pretrained(tmp_path / "pretrained")
    return tmp_path / "pretrained"


def test_pretrained_checkpoint_is_scored_before_training(tmp_path):
    """The late setting: a local pretrained seq2seq checkpoint (tokenizer included) is scored, then fine-tuned."""
    pretrained = _pretrained(tmp_path)
    out = tmp_path / "late"
    done = _run([sys.executable, str(RECIPE), "--config", str(SYNTHETIC), "--output_dir", str(out),
                 "--model_name_or_path", str(pretrained), "--synthetic_train_size", "64",
                 "--synthetic_eval_size", "8", "--max_steps", "2", "--max_new_tokens", "8", "--num_beams", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    before = results["before_training"]
    assert set(before["scores"]) == {"validation", "test"}
    assert before["path_length"]["normalized_apl"] == before["path_length"]["depth"]["normalized"]
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.base_model is None, "a local folder is no Hub id: it stays out of the card's metadata"
    assert f"from `{pretrained}`" in card.text and "huggingface.co" not in card.text


@pytest.mark.parametrize("train", [True, False])
def test_one_shot_then_recovery_fine_tune(tmp_path, train):
    """--one_shot_budget linearizes the pretrained model before training; its linear units stay exactly linear
    while the late prior fine-tunes the rest, toward the affine targets --fit_targets gave them (or, with
    --train false, the one-shot model is what is scored)."""
    out = tmp_path / "one_shot"
    done = _run([sys.executable, str(RECIPE), "--config", str(SYNTHETIC), "--output_dir", str(out),
                 "--model_name_or_path", str(_pretrained(tmp_path)), "--synthetic_train_size", "64",
                 "--synthetic_eval_size", "8", "--max_steps", "3", "--max_new_tokens", "8", "--num_beams", "1",
                 "--one_shot_budget", "0.5", "--calibration_batches", "2", "--per_device_eval_batch_size", "8",
                 "--prior_lambda", "1", "--prior_start", "0", "--prior_warmup", "0", "--gate_lr", "0.5",
                 "--train", str(train).lower(), "--score_splits", "validation,test" if train else "test",
                 "--fit_targets", str(train).lower()])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    one_shot = results["one_shot"]
    assert one_shot["nonlinear_fraction"] == 0.5 and one_shot["calibration_examples"] == 16
    assert set(one_shot["scores"]) == ({"validation", "test"} if train else {"test"})
    assert set(results["before_training"]["scores"]) == set(one_shot["scores"])
    assert one_shot["reconstruct"], "the FFN output projections were re-fitted"
    model = hl.from_pretrained(out / "final")
    final = hl.summary(model)["total"]
    assert final["linear"] >= one_shot["linear"] == final["units"] // 2
    gates = dict(hl.gated_modules(model))
    for name, layer in one_shot["layers"].items():  # the one-shot units kept gate 1 and an affine target
        assert int((gates[name].alpha == 1).sum()) >= layer["units"] - layer["nonlinear"]
    assert any(gate._affine for gate in gates.values())
    if train:  # --fit_targets: the units left nonlinear got their affine fits before the prior started
        assert results["fit_targets"] == {"score": "sensitivity", "fitted": final["units"] // 2,
                                          "units": final["units"], "calibration_examples": 16}
    else:
        assert "fit_targets" not in results
        assert results["train"] is None and results["scores"] == one_shot["scores"]


def test_unknown_score_split_is_refused():
    with pytest.raises(ValueError, match="use validation and/or test"):
        load_script(RECIPE).EvalArguments(score_splits="validation,train")


@pytest.mark.slow
def test_two_processes_multi30k(tmp_path):
    out = tmp_path / "multi30k"
    done = _run([*_accelerate_2_procs(), str(RECIPE), "--config", str(DEMO), "--output_dir", str(out),
                 "--dataset_name", "multi30k", "--data_dir", str(MULTI30K), "--test_split", "test_2016_flickr",
                 "--max_train_samples", "1500", "--max_eval_samples", "24", "--vocab_size", "1000",
                 "--max_steps", "20", "--per_device_train_batch_size", "16", "--logging_steps", "5",
                 "--prior_lambda", "20", "--prior_start", "10", "--average_tokens_across_devices", "false"])
    assert done.returncode == 0, done.stderr[-3000:]
    with gzip.open(MULTI30K / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as fh:
        references = [line.rstrip("\n") for line in fh][:24]
    results = _check_outputs(out, references)
    assert results["settings"]["world_size"] == 2 and results["train"]["steps"] == 20


def test_offline_hub_dataset_fails_fast(tmp_path):
    done = _run([sys.executable, str(RECIPE), "--config", str(SYNTHETIC), "--output_dir", str(tmp_path),
                 "--dataset_name", "wmt16", "--dataset_config_name", "de-en"])
    assert done.returncode != 0
    assert "Cannot download dataset 'wmt16'" in done.stderr and "--data_dir" in done.stderr


@pytest.fixture
def guarded_recipe(monkeypatch):
    """The recipe module with every expensive step (synthetic corpus, tokenizer, model) replaced by a failure: a
    bad input must stop the run before any of them."""
    recipe = load_script(RECIPE)

    def built(*args, **kwargs):
        raise AssertionError("an expensive step ran before the bad input was refused")

    for name in ("load_synthetic", "train_shared_tokenizer", "build_model"):
        monkeypatch.setattr(recipe, name, built)
    return recipe


def _refused(recipe, monkeypatch, *flags: str) -> str:
    monkeypatch.setattr(sys, "argv", [str(RECIPE), "--config", str(SYNTHETIC), *flags])
    with pytest.raises(SystemExit) as exit_info:
        recipe.main()
    message = str(exit_info.value.code)
    assert message.startswith("translate_wmt.py: error: "), message
    return message


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_bad_inputs_are_refused_before_anything_is_built(tmp_path, monkeypatch, guarded_recipe):
    out = tmp_path / "out"
    cases = {
        "Unknown --preset 'transformer-huge'; available: ['transformer-base'": ["--preset", "transformer-huge"],
        "did you mean --prior_lambda for --prior_lamda": ["--prior_lamda", "5"],
        f"--output_dir {tmp_path / 'file' / 'run'} cannot be created: {tmp_path / 'file'} is a file":
            ["--output_dir", str(tmp_path / "file" / "run")],
        "--train_file /nowhere/train.jsonl does not exist": ["--train_file", "/nowhere/train.jsonl"],
        f"--train_file {tmp_path / 'empty.jsonl'} is empty": ["--train_file", str(tmp_path / "empty.jsonl")],
        "--data_dir /nowhere is not a folder": ["--data_dir", "/nowhere"],
        "--hub_model_id 'me/bad name' is not a valid Hub repo id": ["--push_to_hub", "true", "--hub_model_id",
                                                                    "me/bad name"],
        "has no checkpoint-* folder": ["--resume_from_checkpoint", "true"],
    }
    (tmp_path / "file").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    for expected, flags in cases.items():
        message = _refused(guarded_recipe, monkeypatch, "--output_dir", str(out), *flags)
        assert expected in message, (flags, message)
    assert not out.exists(), "nothing is left behind"


def test_data_without_pairs_is_refused_before_the_tokenizer(tmp_path, monkeypatch, guarded_recipe):
    """Used to log "Dropped 0 of 0 training pairs", fail later at the probe forward pass and leave tokenizer/."""
    out = tmp_path / "out"
    blank = _jsonl(tmp_path / "blank.jsonl", ["", "  "])
    message = _refused(guarded_recipe, monkeypatch, "--output_dir", str(out), "--train_file", blank)
    assert "No training pairs: 0 read from the training data" in message
    train = _jsonl(tmp_path / "train.jsonl", ['{"en": "a dog", "de": "ein Hund"}'])
    empty_test = _jsonl(tmp_path / "test.jsonl", [""])
    message = _refused(guarded_recipe, monkeypatch, "--output_dir", str(out), "--train_file", train,
                       "--test_file", empty_test)
    assert "The test data hold no pairs" in message
    moses = tmp_path / "moses"
    moses.mkdir()
    for name in ("train.en", "train.de"):
        (moses / name).write_text("")
    message = _refused(guarded_recipe, monkeypatch, "--output_dir", str(out), "--data_dir", str(moses))
    assert "No training pairs" in message
    assert not out.exists()


def test_an_earlier_run_is_never_overwritten(tmp_path, monkeypatch, guarded_recipe):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"scores": "earlier"}')
    message = _refused(guarded_recipe, monkeypatch, "--output_dir", str(out))
    assert "already holds an earlier run (results.json)" in message and "--overwrite_output_dir true" in message
    assert (out / "results.json").read_text() == '{"scores": "earlier"}'
    monkeypatch.setattr(sys, "argv", [str(RECIPE), "--config", str(SYNTHETIC), "--output_dir", str(out),
                                      "--overwrite_output_dir", "true"])
    with pytest.raises(AssertionError, match="an expensive step ran"):  # accepted: it goes on to build the corpus
        guarded_recipe.main()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU")
def test_a_gpu_config_says_so_on_a_cpu(monkeypatch, tmp_path, guarded_recipe):
    monkeypatch.setattr(sys, "argv", [str(RECIPE), "--config", str(ROOT / "recipes" / "configs" / "wmt16_de_en.yaml"),
                                      "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        guarded_recipe.main()
    message = str(exit_info.value.code)
    assert "wmt16_de_en.yaml sets bf16: true, mixed-precision training on a GPU, and this machine has none" in message
    assert "add --bf16 false" in message
