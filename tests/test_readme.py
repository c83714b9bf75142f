"""The README's code runs as written: every Python block on tiny stand-ins for the names it does not define (the
preludes below, one per block), every shell command that finishes offline within a minute, and every other command
is marked ``# long`` or ``# needs`` in its comment."""

from __future__ import annotations

import gzip
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
import torch
from hub_server import LocalHub, hub_env

import hf_linearize as hl

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(language: str) -> list[tuple[str, int, str]]:
    """``(section heading, index of the block within its section, code)`` of every ``language`` block."""
    found, heading, counts = [], "", {}
    for match in re.finditer(r"^(#{1,4} [^\n]*)$|^```(\w*)\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ").strip()
        elif match.group(2) == language:
            index = counts[heading] = counts.get(heading, -1) + 1
            found.append((heading, index, match.group(3)))
    return found


# ------------------------------------------------------------------------------------------------ stand-ins
def _tokenizer():
    from hf_linearize.translation.synthetic import synthetic_pairs
    from hf_linearize.translation.tokenizer import train_shared_tokenizer

    return train_shared_tokenizer((text for pair in synthetic_pairs(200) for text in pair), vocab_size=120)


def _marian(tok) -> torch.nn.Module:
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    return MarianMTModel(MarianConfig(
        vocab_size=len(tok), d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)).eval()


def _pairs(tok, count: int = 16) -> list[dict[str, Any]]:
    from hf_linearize.translation.synthetic import synthetic_pairs

    return [{**tok(source), "labels": tok(text_target=target)["input_ids"]}
            for source, target in synthetic_pairs(count, seed=3)]


def _batches(tok) -> list[dict[str, torch.Tensor]]:
    from transformers import DataCollatorForSeq2Seq

    collate, pairs = DataCollatorForSeq2Seq(tok), _pairs(tok)
    return [collate(pairs[i:i + 4]) for i in range(0, len(pairs), 4)]


def python_api() -> dict[str, Any]:
    return {"model": _marian(_tokenizer())}


def patched_marian() -> dict[str, Any]:
    return {"model": hl.patch_model(_marian(_tokenizer()))}


def folding() -> dict[str, Any]:
    tok = _tokenizer()
    model = hl.patch_model(_marian(tok))
    hl.set_linear(model, 0.5)
    return {"model": model, "batch": tok(["the dog sees a red house"], return_tensors="pt")}


def checkpoint() -> dict[str, Any]:
    tok = _tokenizer()
    return {"model": hl.patch_model(_marian(tok)), "tok": tok}


def timm_checkpoint() -> dict[str, Any]:
    """The folder the MNIST recipe writes (``outputs/mnist_resnet/final``), from a tiny timm ResNet."""
    import timm

    model = hl.patch_model(timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1))
    hl.save_pretrained(model, "outputs/mnist_resnet/final", label_names=[str(d) for d in range(10)],
                       data_config={"input_size": (1, 28, 28), "crop_pct": 1.0, "mean": (0.449,), "std": (0.226,),
                                    "interpolation": "bilinear", "crop_mode": "center"})
    return {"timm": timm}


def training() -> dict[str, Any]:
    import datasets

    tok = _tokenizer()
    return {"model": _marian(tok), "tok": tok, "train": datasets.Dataset.from_list(_pairs(tok, 64))}


def one_shot() -> dict[str, Any]:
    tok = _tokenizer()
    return {"model": hl.patch_model(_marian(tok)), "batches": _batches(tok)}


def sweep_dataset() -> dict[str, Any]:
    """The README's sweep pushed to the loopback Hub as ``me/multi30k-sweep`` (``hl.push_results``)."""
    hl.push_results(ROOT / "results" / "sweeps" / "multi30k", "me/multi30k-sweep")
    return {}


PRELUDES: dict[tuple[str, int], Callable[[], dict[str, Any]]] = {
    ("Python API", 0): python_api,
    ("Example: a decoder-only LM end to end", 0): dict,
    ("Average path length (APL) and the core-network map", 0): patched_marian,
    ("Folding: `fold`", 0): folding,
    ("Linearized checkpoints and the Hub", 0): checkpoint,
    ("Linearized checkpoints and the Hub", 1): timm_checkpoint,
    ("Training: `LinearizeTrainer`", 0): training,
    ("Post-training linearization: calibrate, fit, linearize in one shot", 0): one_shot,
    ("Sweeps: early against late linearization", 0): sweep_dataset,
}
"""(README section, block index in it) -> the stand-ins for the names the block uses but does not define."""


def test_every_python_block_has_a_prelude():
    found = {(heading, index) for heading, index, _ in blocks("python")}
    assert found == set(PRELUDES), (f"README Python blocks without a prelude here: {sorted(found - set(PRELUDES))}; "
                                    f"preludes of blocks that are gone: {sorted(set(PRELUDES) - found)}")


@pytest.mark.parametrize("heading, index, code", blocks("python"),
                         ids=[f"{heading[:30]}-{index}" for heading, index, _ in blocks("python")])
def test_python_block_runs_as_written(tmp_path, monkeypatch, heading, index, code):
    import datasets

    monkeypatch.chdir(tmp_path)
    with LocalHub(user="me") as hub, hub_env(hub), mock.patch.multiple(
            datasets.config, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE=False, HF_UPDATE_DOWNLOAD_COUNTS=False,
            USE_PARQUET_EXPORT=False, HF_DATASETS_CACHE=tmp_path / "datasets"):
        namespace = {"hl": hl, **PRELUDES[heading, index]()}  # the README imports hf_linearize as hl once, on top
        exec(compile(code, f"README.md ({heading}, block {index})", "exec"), namespace)


# ------------------------------------------------------------------------------------------------ shell
def commands() -> list[str]:
    """Every command of every bash block after the set-up block, continuation lines joined."""
    found = []
    for _, _, code in blocks("bash")[1:]:  # the first block is the set-up: CI runs its test command
        found += [line.strip() for line in code.replace("\\\n", " ").splitlines() if line.strip()]
    return found


FAST = {"python recipes/sweep.py --config recipes/configs/sweeps/multi30k.yaml --dry_run": "of 26 runs done"}
"""Commands that finish offline within a minute, and a phrase of their output (they run from the project root)."""


def test_every_command_is_run_here_or_marked_long_or_needs():
    for command in commands():
        text, _, comment = command.partition("#")
        if text.strip() in FAST:
            continue
        assert comment.strip().startswith(("long", "needs")), (
            f"README command {command!r} neither runs in tests/test_readme.py (FAST) nor is marked '# long' or "
            "'# needs' in its comment")
    assert set(FAST) <= {command.partition("#")[0].strip() for command in commands()}


@pytest.mark.parametrize("command", sorted(FAST))
def test_fast_commands_run(command):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    words = shlex.split(command)
    done = subprocess.run([sys.executable if words[0] == "python" else words[0], *words[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert FAST[command] in done.stdout


# ------------------------------------------------------------------------------------------------ numbers
SWEEPS = ROOT / "results" / "sweeps"
ARMS = {"early": "early", "early, 2 epochs": "early", "early, 10 epochs": "early (10 epochs)", "late": "late",
        "late, fitted targets": "late (fitted targets)", "one-shot identity": "one_shot_identity",
        "one-shot affine": "one_shot_affine", "affine + sensitivity + refit": "one_shot_affine_refit",
        "+ 1-epoch recovery": "one_shot_recovery"}
"""README sweep-table column -> the ``schedule`` of its rows in the committed ``results.csv``."""
APL_ARMS = {"early": "early", "late": "late", "fitted": "late (fitted targets)"}
TABLES = [  # (the line above the table, its results.csv, its metric column, how the README writes the metric)
    ("The prior arms (baseline 35.76", "compare_multi30k", "test_bleu", "{:.2f}"),
    ("The one-shot methods on the same baseline", "multi30k", "test_bleu", "{:.2f}"),
    ("ResNet-18 (baseline 98.2%", "compare_mnist_resnet", "test_accuracy", "{:.1%}"),
    ("ViT (baseline 97.0%", "compare_mnist_vit", "test_accuracy", "{:.1%}"),
]


def _rows(csv_name: str) -> list[dict[str, str]]:
    import csv

    with (SWEEPS / csv_name / "results.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _table(after: str) -> list[list[str]]:
    """The cells of the README table that follows the paragraph starting with ``after`` (header row first)."""
    text = README.read_text(encoding="utf-8")
    lines = text[text.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not set(line) <= set("|-: "):
            table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


@pytest.mark.parametrize("after, csv_name, metric, form", TABLES, ids=[t[1] for t in TABLES])
def test_sweep_tables_are_the_committed_results(after, csv_name, metric, form):
    rows = _rows(csv_name)

    def value(schedule: str, linear: float, column: str) -> float:
        match = [row for row in rows if row["schedule"] == schedule and row["budget_target"]
                 and abs(1 - float(row["budget_target"]) - linear) < 1e-9]
        assert len(match) == 1, (schedule, linear, len(match))
        return float(match[0][column])

    header, *body = _table(after)
    checked = 0
    for cells in body:
        linear = float(cells[0].split("%")[0]) / 100
        for name, cell in zip(header[1:], cells[1:]):
            if name.startswith("normalized APL"):
                arms = name.split(", ")[1].split(" / ")
                for arm, text in zip(arms, cell.split(" / ")):
                    if text != "–":
                        assert text == f"{value(APL_ARMS[arm], linear, 'normalized_apl'):.3f}", (name, cells[0])
                        checked += 1
            elif cell != "–":
                assert cell == form.format(value(ARMS[name], linear, metric)), (name, cells[0], cell)
                checked += 1
    assert checked >= 16


def test_baselines_table_is_the_committed_results():
    cells = {row[2]: row[3] for row in _table("**Baselines** (no prior)")[1:]}
    baseline = {name: next(r for r in _rows(name) if r["schedule"] == "baseline")
                for name in ("multi30k", "mnist_resnet", "mnist_vit")}
    assert cells["`multi30k.yaml`, 10 epochs"] == (f"**{float(baseline['multi30k']['test_bleu']):.2f} BLEU**, chrF "
                                                   f"{float(baseline['multi30k']['test_chrf']):.2f}")
    assert cells["`mnist_resnet.yaml`, 10 epochs"] == f"**{float(baseline['mnist_resnet']['test_accuracy']):.1%}**"
    assert cells["`mnist_vit.yaml`, 30 epochs"] == f"**{float(baseline['mnist_vit']['test_accuracy']):.1%}**"


def test_demo_paragraph_is_the_committed_demo_run():
    """The numbers and example translations at the top come from ``results/demo`` (the README's first command)."""
    import json

    results = json.loads((ROOT / "results" / "demo" / "results.json").read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    test, total, report = results["scores"]["test"], results["summary"]["total"], results["path_length"]
    expected = (f"test BLEU {test['bleu']:.1f}, chrF {test['chrf']:.1f} with {total['nonlinear']} of "
                f"{total['units']:,} FFN units still nonlinear ({total['nonlinear_fraction']:.1%})**: normalized APL "
                f"{report['normalized_apl']:.3f} of a full depth of {report['depth']['normalized']:.2f} (unnormalized "
                f"{report['unnormalized_apl']:.2f} of {report['depth']['unnormalized']:.2f})")
    assert expected in " ".join(text.split()), expected
    assert f"({results['train']['steps']:,} steps)" in text
    translations = (ROOT / "results" / "demo" / "translations" / "test.txt").read_text(encoding="utf-8").splitlines()
    sources = gzip.open(ROOT / "data" / "multi30k" / "test_2016_flickr.en.gz", "rt", encoding="utf-8").read()
    sources = sources.splitlines()
    shown = [cells for cells in _table("Three test captions")[1:]]
    assert len(shown) == 3
    for source, _, output in shown:
        assert output == translations[sources.index(source)], source


def test_minilm_table_is_the_committed_benchmark():
    """The one-shot MiniLM table is ``results/one_shot/minilm.json`` (``python -m benchmarks.one_shot``)."""
    import json

    results = json.loads((ROOT / "results" / "one_shot" / "minilm.json").read_text(encoding="utf-8"))
    methods = {"identity (paper's target)": "identity", "affine, residual score (baseline)": "affine",
               "affine + sensitivity": "affine+sensitivity",
               "affine + sensitivity + reconstruct": "affine+sensitivity+reconstruct"}
    header, *body = _table("**Measured on the real MiniLM**")
    assert len(body) == 4
    for cells in body:
        linear = float(cells[0].rstrip("%")) / 100
        for name, cell in zip(header[1:], cells[1:]):
            row = next(r for r in results if r["method"] == methods[name] and abs(r["linear"] - linear) < 1e-9)
            retrieval = f"{row['retrieval']:.1%}".replace("100.0%", "100%")
            assert cell == f"{row['cosine']:.3f} / {retrieval}", (name, cells[0])
