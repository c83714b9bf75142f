"""Translation support: corpora loaders, filtering, the synthetic corpus, the shared tokenizer, sacreBLEU scores."""

from __future__ import annotations

import gzip
import json

import pytest
import sacrebleu
from conftest import MULTI30K

from hf_linearize.translation.data import (
    filter_pairs,
    load_hub,
    load_jsonl,
    load_moses,
    load_synthetic,
)
from hf_linearize.translation.metrics import translation_scores
from hf_linearize.translation.synthetic import synthetic_pairs
from hf_linearize.translation.tokenizer import train_shared_tokenizer


def test_multi30k_moses_files():
    corpus = load_moses(MULTI30K, "en", "de", test_split="test_2016_flickr")
    assert {k: len(v) for k, v in corpus.items()} == {"train": 29000, "validation": 1014, "test": 1000}
    assert corpus["train"][0] == {"source": "Two young, White males are outside near many bushes.",
                                  "target": "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."}


def test_moses_plain_and_gz_and_errors(tmp_path):
    (tmp_path / "train.en").write_text("a b\nc\n")
    (tmp_path / "train.de").write_text("x y\nz\n")
    with gzip.open(tmp_path / "dev.en.gz", "wt") as fh:
        fh.write("hello\n")
    with gzip.open(tmp_path / "dev.de.gz", "wt") as fh:
        fh.write("hallo\n")
    corpus = load_moses(tmp_path, "en", "de")
    assert corpus["validation"]["target"] == ["hallo"] and corpus["train"]["source"] == ["a b", "c"]
    (tmp_path / "test.en").write_text("one\ntwo\n")
    (tmp_path / "test.de").write_text("eins\n")
    with pytest.raises(ValueError, match="test.en has 2 lines but test.de has 1"):
        load_moses(tmp_path, "en", "de")
    with pytest.raises(FileNotFoundError, match="No train.fr"):
        load_moses(tmp_path, "fr", "de")


def test_jsonl_formats(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"translation": {"en": "a", "de": "x"}}, {"en": "b", "de": "y"}, {"source": "c", "target": "z"}]))
    assert load_jsonl({"train": path}, "en", "de")["train"]["target"] == ["x", "y", "z"]
    path.write_text(json.dumps({"fr": "a"}))
    with pytest.raises(ValueError, match="train.jsonl:1 has neither 'en'/'de'"):
        load_jsonl({"train": path}, "en", "de")


def test_hub_dataset_offline_fails_fast_with_local_options(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="--data_dir DIR .* --train_file"):
        load_hub("wmt16", "de-en", "de", "en")


def test_filter_pairs_counts_drops():
    corpus = load_synthetic(50, 5)
    corpus["train"] = corpus["train"].add_item({"source": "", "target": "x"}).add_item(
        {"source": "w " * 30, "target": "y"})
    filtered, dropped = filter_pairs(corpus, max_words=20)
    assert dropped == {"train": 2, "validation": 0, "test": 0} and len(filtered["train"]) == 50


def test_synthetic_corpus_is_deterministic_and_grammatical():
    assert synthetic_pairs(100, seed=3) == synthetic_pairs(100, seed=3) != synthetic_pairs(100, seed=4)
    pairs = dict(synthetic_pairs(5000))
    checked = {"definite accusative": 0, "plural": 0}
    for english, german in pairs.items():
        assert english.endswith(".") and german.endswith(".") and not german.endswith(" .")  # detokenized
        if english.startswith("The dog is eating a cake"):  # definite masculine singular, accusative object
            assert german.startswith("Der Hund isst") and german.endswith("einen Kuchen.")
            checked["definite accusative"] += 1
        if english.startswith("Two ") and " are " in english:
            assert german.startswith("Zwei ")
            checked["plural"] += 1
    assert checked["definite accusative"] >= 1 and checked["plural"] > 50, checked  # each sentence was generated
    corpus = load_synthetic(200, 20)
    assert set(corpus) == {"train", "validation", "test"} and len(corpus["test"]) == 20


def test_shared_tokenizer_round_trip():
    pairs = synthetic_pairs(500)
    for model in ("unigram", "bpe"):
        tokenizer = train_shared_tokenizer((t for p in pairs for t in p), vocab_size=200, model=model)
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        for english, german in pairs[:20]:
            ids = tokenizer(english, text_target=german)
            assert ids.input_ids[-1] == 1 and ids.labels[-1] == 1
            assert tokenizer.decode(ids.labels, skip_special_tokens=True) == german
    with pytest.raises(ValueError, match="'unigram' or 'bpe'"):
        train_shared_tokenizer(["a"], model="wordpiece")


def test_translation_scores_are_sacrebleu():
    refs = ["Ein Hund läuft im Park .", "Zwei Frauen essen einen Kuchen ."]
    hyps = ["Ein Hund läuft im Garten .", "Zwei Frauen essen einen Kuchen ."]
    scores = translation_scores(hyps, refs)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < scores["bleu"] < 100 and scores["mean_hypothesis_words"] == 6.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        translation_scores(hyps, refs[:1])
