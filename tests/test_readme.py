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
    run = json.loads((ROOT / "results" / "demo" / "run.json").read_text(encoding="utf-8"))
    assert run["returncode"] == 0 and run["command"].startswith("python recipes/translate_wmt.py --config "
                                                                "recipes/configs/demo.yaml")
    clock = "{:.0f} min {:.0f} s".format
    assert (f"took {clock(*divmod(round(run['wall_s']), 60))} in all, "
            f"{clock(*divmod(round(results['train']['runtime_s']), 60))} of it training") in " ".join(text.split())
    assert (f"(load average {run['machine']['load_average_before']:.1f} to "
            f"{run['machine']['load_average_after']:.1f})") in " ".join(text.split())
    demo = [command for command in commands() if command.split("#")[0].split() == [
        "accelerate", "launch", "recipes/translate_wmt.py", "--config", "recipes/configs/demo.yaml"]]
    assert len(demo) == 1 and f"# long ({run['wall_s'] / 60:.0f} min)" in demo[0], demo
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

    benchmark = json.loads((ROOT / "results" / "one_shot" / "minilm.json").read_text(encoding="utf-8"))
    results = benchmark["rows"]
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
    text = _text()
    first = [r for r in results if r["method"] == "identity"]
    assert (" / ".join(f"{r['normalized_apl']:.2f}" for r in first)
            + f" of a full depth of {benchmark['full_depth_normalized']:.2f}") in text
    rebuilt = sorted(r["seconds"] for r in results if r["method"] == "affine+sensitivity+reconstruct")
    assert f"about {(rebuilt[1] + rebuilt[2]) / 2:.0f} s per row" in text
    assert "the run took {} min {} s".format(*divmod(round(benchmark["wall_s"]), 60)) in text
    assert benchmark["machine"]["omp_num_threads"] == "1" and "with `OMP_NUM_THREADS=1`" in text
    gain = {r["linear"]: r["cosine"] - next(s["cosine"] for s in results if s["method"] == "affine+sensitivity"
                                            and s["linear"] == r["linear"])
            for r in results if r["method"] == "affine+sensitivity+reconstruct"}
    assert max(gain, key=gain.get) in (0.5, 0.75) and gain[0.9] < 0.001  # "adds most at 50-75%, nothing at 90%"


def _json(relative: str) -> Any:
    import json

    return json.loads((ROOT / "results" / relative).read_text(encoding="utf-8"))


def test_fold_speed_tables_are_the_committed_benchmark():
    """The folding-speed tables and their wall time are ``results/fold_speed/cpu.json`` (``benchmarks.fold_speed``)."""
    results = _json("fold_speed/cpu.json")
    header, *body = _table("### Measured: folding speed on this CPU")
    assert header[3:] == ["FFN blocks", "forward", "generate"] and len(body) == len(results["marian"]) == 10
    for cells, row in zip(sorted(body, key=lambda c: (c[0], c[1].strip("*"))),
                          sorted(results["marian"], key=lambda r: (str(r["threads"]), f"{r['linear']:.0%}"))):
        cells = [cell.replace("**", "") for cell in cells]
        assert cells[:3] == [str(row["threads"]), f"{row['linear']:.0%}",
                             f"{row['params_gated'] / 1e6:.1f}M → {row['params_folded'] / 1e6:.1f}M"], cells
        for cell, key in zip(cells[3:], ("ffn", "forward", "generate")):
            assert cell == f"{row[key]['speedup']:.2f}× ({row[key]['flop_ratio']:.2f})", (cells[:2], key)
    _, *vision = _table("| model, 90% linear units, forward of 8 images")
    assert len(vision) == len(results["vision"]) == 4
    for cells in vision:
        row = next(r for r in results["vision"]
                   if f"`{r['model']}`" in cells[0] and str(r["threads"]) == cells[1])
        assert cells[2:] == [f"{row['params_gated'] / 1e6:.2f}M → {row['params_folded'] / 1e6:.2f}M",
                             f"{row['forward']['speedup']:.2f}× ({row['forward']['flop_ratio']:.2f})"], cells
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert (f"took {results['wall_s']:.0f} s wall time on the 2 otherwise idle cores (load average "
            f"{results['machine']['load_average_before']:.1f} before, "
            f"{results['machine']['load_average_after']:.1f} after)") in text
    assert all(row["generate_identical"] for row in results["marian"])
    ninety = next(r for r in results["marian"] if r["threads"] == 1 and r["linear"] == 0.9)
    assert (f"{ninety['ffn']['speedup']:.1f}× faster in its FFN blocks, {ninety['forward']['speedup']:.2f}× in a "
            f"forward pass and {ninety['generate']['speedup']:.2f}× in `generate`") in text
    assert f"blocks reach {ninety['ffn']['speedup']:.2f}×" in text
    zero = [r[key]["speedup"] for r in results["marian"] if r["linear"] == 0 for key in ("ffn", "forward", "generate")]
    assert f"the ratios of {min(zero):.2f}× to {max(zero):.2f}×" in text



def _text(section: str = "# hf_linearize") -> str:
    """The README from the heading ``section`` on (all of it by default), bold markers dropped and whitespace
    normalized."""
    text = README.read_text(encoding="utf-8")
    return " ".join(text[text.index(section):].replace("**", "").split())


MNIST_RUNS = {("`mnist_resnet.yaml`", "no prior"): "mnist_resnet", ("`mnist_resnet.yaml`", "late prior"):
              "mnist_resnet_prior", ("`mnist_vit.yaml`", "no prior"): "mnist_vit",
              ("`mnist_vit.yaml`", "late prior"): "mnist_vit_prior"}
"""(config cell, run cell) of the README's MNIST table -> its folder under ``results/runs``."""


def test_mnist_table_is_the_committed_runs():
    """The "Measured: MNIST digits" table, its prose and the vision commands' durations are ``results/runs/*``."""
    header, *body = _table("### Measured: MNIST digits on this CPU")
    assert len(body) == len(MNIST_RUNS)
    config = ""
    runs = {}
    for cells in body:
        config = cells[0].split(" ")[0] or config
        name = MNIST_RUNS[config, cells[1]]
        results, run = _json(f"runs/{name}/results.json"), _json(f"runs/{name}/run.json")
        runs[name] = results
        assert run["returncode"] == 0 and run["machine"]["omp_num_threads"] == "1"
        assert run["command"].startswith(f"python recipes/classify_images.py --config recipes/configs/{config[1:-1]}")
        assert ("--prior_lambda 2" in run["command"]) == (cells[1] == "late prior")
        path, total = results["path_length"], results["summary"]["total"]
        assert cells[2:] == [
            f"{results['scores']['test']['accuracy']:.1%}",
            f"{path['normalized_apl']:.3f} ({path['depth']['normalized']:.3f})",
            f"{path['unnormalized_apl']:.3f} ({path['depth']['unnormalized']:.3f})",
            f"{total['nonlinear']:,} of {total['units']:,} ({total['nonlinear_fraction']:.1%})",
            f"{run['wall_s'] / 60:.1f} min"], cells
    text = _text()
    for name, model in (("mnist_resnet", "ResNet's activation units"), ("mnist_vit", "ViT's MLP units")):
        late, plain = runs[f"{name}_prior"], runs[name]
        drop = plain["scores"]["test"]["accuracy"] - late["scores"]["test"]["accuracy"]
        assert f"{1 - late['summary']['total']['nonlinear_fraction']:.1%} of the {model}" in text
        assert f"for {100 * drop:.1f} points" in text
    digits = [round(500 * (float(next(r for r in _rows(name) if r["schedule"] == "baseline")["test_accuracy"])
                           - runs[name]["scores"]["test"]["accuracy"])) for name in ("mnist_resnet", "mnist_vit")]
    assert f"score {digits[0] / 5:.1f} and {digits[1] / 5:.1f} points below the baselines" in text
    assert f"{digits[0]} and {digits[1]} digits of 500" in text
    for config, name in (("mnist_resnet.yaml ", "mnist_resnet"), ("mnist_vit.yaml ", "mnist_vit"),
                         ("--output_dir outputs/mnist_resnet_prior ", "mnist_resnet_prior")):
        minutes = _json(f"runs/{name}/run.json")["wall_s"] / 60
        assert any(config in command and f"# long ({minutes:.1f} min)" in command for command in commands()), name


def test_synthetic_run_is_the_committed_run():
    """The synthetic config's duration, in the prose and the command's comment, is ``results/runs/synthetic``."""
    run = _json("runs/synthetic/run.json")
    assert run["returncode"] == 0 and "--config recipes/configs/synthetic.yaml" in run["command"]
    assert "({} min {} s here".format(*divmod(round(run["wall_s"]), 60)) in _text()
    assert any("synthetic.yaml" in command and f"# long ({run['wall_s'] / 60:.0f} min)" in command
               for command in commands())

def _peak(row: dict[str, Any]) -> str:
    """A block-wise cell of the memory table: ``"1,457 MiB = 1.29 W, within target (117 s)"``."""
    within = ", within target" if row["within_target"] else ""
    return f"{row['peak_bytes'] / 2 ** 20:,.0f} MiB = {row['ratio']:.2f} W{within} ({row['seconds']:.0f} s)"


def test_one_shot_memory_table_is_the_committed_benchmark():
    """The one-shot memory table and its prose are ``results/one_shot/memory.json`` (``one_shot_memory``)."""
    results = _json("one_shot/memory.json")
    rows = {(r["model"], r["path"], r["allocator"]): r for r in results["rows"]}
    header, *body = _table("Peak resident memory of `one_shot`")
    assert header[3:] == ["block-wise, glibc default", "block-wise, fixed mmap threshold",
                          "whole-model path (default / fixed)"] and len(body) == 2
    for cells, model in zip(body, ("llama-300m", "minilm")):
        cells = [cell.replace("**", "") for cell in cells]
        block, fixed = rows[model, "blockwise", "default"], rows[model, "blockwise", "fixed"]
        whole = [rows[model, "whole", allocator] for allocator in ("default", "fixed")]
        assert f"{block['params'] / 1e6:.1f}M parameters" in cells[0]
        assert cells[1:] == [
            f"{block['weights_bytes'] / 2 ** 20:,.0f} MiB", f"{block['activations_bytes'] / 2 ** 20:,.0f} MiB",
            _peak(block), _peak(fixed),
            " / ".join(f"{r['peak_bytes'] / 2 ** 20:,.0f}" for r in whole) + " MiB = "
            + " / ".join(f"{r['ratio']:.2f}" for r in whole) + " W ("
            + " / ".join(f"{r['seconds']:.0f}" for r in whole) + " s)"], cells
    assert rows["llama-300m", "blockwise", "default"]["within_target"]  # the issue's target, glibc as it comes
    text = _text()
    minutes, seconds = divmod(round(results["wall_s"]), 60)
    assert (f"The whole benchmark took {minutes} min {seconds} s on this shared 2-core machine (load average "
            f"{results['machine']['load_average_before']:.1f} to "
            f"{results['machine']['load_average_after']:.1f}") in text
    llama = [rows["llama-300m", path, "default"]["ratio"] for path in ("blockwise", "whole")]
    assert f"block-wise path needs {llama[0]:.2f} W where the whole-model path needs {llama[1]:.1f} W" in text

def test_benchmark_prose_is_the_committed_benchmarks():
    """The start-up, APL and gate-overhead timings are ``results/{cli_startup,apl_speed,gate_overhead}/cpu.json``."""
    text = _text()
    startup, apl = _json("cli_startup/cpu.json"), _json("apl_speed/cpu.json")
    assert (f"`hf-linearize --help` at {startup['help_s']:.2f} s here, against {startup['stack_s']:.2f} s for "
            f"importing the stack (medians of {startup['repeats']}; {startup['wall_s']:.0f} s wall for the script, "
            f"load average {startup['machine']['load_average_before']:.1f}") in text
    overhead = _json("gate_overhead/cpu.json")
    training, inference = overhead["results"]["training step"], overhead["results"]["inference"]
    assert (f"CPU, {overhead['threads']} threads, all gates 0, medians of the paired ratios over {overhead['reps']} "
            f"interleaved repetitions): training ×{training['ratio']:.3f}, inference ×{inference['ratio']:.3f} "
            f"against the unpatched model (targets ×{training['target']:.2f} / ×{inference['target']:.2f}), on the otherwise "
            f"idle machine (load average {overhead['machine']['load_average_before']:.1f}; "
            f"{overhead['wall_s']:.0f} s wall)") in text
    medians = apl["median_ms"]
    assert (f"{medians['average_path_length(normalized=True)']:.2f} ms normalized, "
            f"{medians['average_path_length(normalized=False)']:.2f} ms unnormalized (medians of {apl['repeats']}; "
            f"{apl['wall_s']:.0f} s wall for the whole script, model building included, load average "
            f"{apl['machine']['load_average_before']:.1f})") in text


def test_multi30k_measured_paragraph_is_the_sweep_baseline():
    """"Measured: Multi30k" reports the paper reproduction's baseline run (``results/sweeps/multi30k``)."""
    baseline = next(r for r in _rows("multi30k") if r["schedule"] == "baseline")
    marked = [command for command in commands() if "--config recipes/configs/multi30k.yaml" in command
              and "# long (" in command and "min of training)" in command]
    assert len(marked) == 2 and all(f"# long ({float(baseline['wall_s']) / 60:.0f} min of training)" in command
                                    for command in marked)
    assert (f"{float(baseline['wall_s']) / 60:.0f} min of training ({int(baseline['steps']):,} steps), and with beam "
            f"4 test BLEU {float(baseline['test_bleu']):.2f}, chrF {float(baseline['test_chrf']):.2f}") in _text()


# ------------------------------------------------------------------------------------------------ paper prose
UNCOMMITTED = {
    "against 35.45 (chrF 61.08) for the control with `--seed 1`: 0.80 and 0.90 below its own control":
        "the seed-1 control (outputs/multi30k_control_seed1): the seed-1 sweep's control row is the seed-0 control",
    "against 35.54 for the control: 0.36 and 0.54 below": "the mean of the seed-0 and the uncommitted seed-1 control",
    "against its own control (35.45, a run not kept;": "the seed-1 control",
    "at 90% (0.80 below)": "34.65 against the uncommitted seed-1 control",
    "at 95% (0.90 below)": "34.55 against the uncommitted seed-1 control",
    "scored 35.75 (chrF 61.35; that run's output folder was not kept":
        "the baseline + 1 epoch without the prior (outputs/multi30k_recovery_control)",
    "so its 35.45 is the one number of this comparison that no file in `results/` holds": "says so in the README",
}
"""Phrases of "Reproducing the paper" whose numbers no committed ``results/`` file holds -> why. Those runs started
from the original baseline checkpoint, which was not kept (a rerun of the baseline on today's code trains another
model), so they cannot be redone; the README says so next to them."""


def test_uncommitted_paper_numbers_are_listed():
    text = _text("## Reproducing the paper")
    missing = [phrase for phrase in UNCOMMITTED if phrase not in text]
    assert not missing, f"UNCOMMITTED phrases gone from the README (drop them here, or test their new files): {missing}"


def test_paper_findings_are_the_committed_results():
    """Every measured number in the prose of "Reproducing the paper" is recomputed from ``results/sweeps/*``."""
    import json
    import math

    csvs = {name: _rows(name) for name in ("compare_multi30k", "compare_mnist_resnet", "compare_mnist_vit",
                                           "multi30k_late_fitted_seed1")}

    def row(csv_name: str, schedule: str, budget: float | None = None) -> dict[str, str]:
        match = [r for r in csvs[csv_name] if r["schedule"] == schedule
                 and (budget is None or (r["budget_target"] and math.isclose(float(r["budget_target"]), budget)))]
        assert len(match) == 1, (csv_name, schedule, budget, len(match))
        return match[0]

    def arm(csv_name: str, schedule: str) -> dict[float, dict[str, str]]:
        """``{nonlinear fraction: row}`` of one arm."""
        return {float(r["budget_target"]): r for r in csvs[csv_name] if r["schedule"] == schedule}

    def f(r: dict[str, str], column: str) -> float:
        return float(r[column])

    def layers(r: dict[str, str]) -> list[int]:
        return list(json.loads(r["layer_nonlinear"]).values())

    def split(r: dict[str, str]) -> str:
        """Multi30k's nonlinear units per layer, ``"enc/enc/enc against dec/dec/dec"``."""
        names = list(json.loads(r["layer_nonlinear"]))
        assert [n.split(".")[1] for n in names] == ["encoder"] * 3 + ["decoder"] * 3, names
        counts = layers(r)
        return f"{'/'.join(map(str, counts[:3]))} encoder units against {'/'.join(map(str, counts[3:]))}"

    def span(values, form: str) -> str:
        return f"{form.format(min(values))}–{form.format(max(values))}"

    def pcts(values) -> str:
        """A range of accuracies as the README writes it, ``"97.4–98.0%"``."""
        return span([100 * value for value in values], "{:.1f}") + "%"

    def own_hours(sweep: str) -> float:
        """Seconds of the runs a sweep trains itself (not the baseline/control runs it borrows), in hours."""
        own = [r for r in _rows(sweep) if r["checkpoint"].startswith(f"outputs/sweeps/{sweep}/")]
        return sum(float(r["wall_s"]) for r in own) / 3600

    m, res, vit = "compare_multi30k", "compare_mnist_resnet", "compare_mnist_vit"
    bleu = lambda schedule, b: f(row(m, schedule, b), "test_bleu")  # noqa: E731
    acc = lambda csv_name, schedule, b=None: f(row(csv_name, schedule, b), "test_accuracy")  # noqa: E731
    base, control = row(m, "baseline"), row(m, "control")
    b_base, b_control = f(base, "test_bleu"), f(control, "test_bleu")
    fitted, late, early, early10 = (arm(m, s) for s in ("late (fitted targets)", "late", "early", "early (10 epochs)"))
    fb = {b: f(r, "test_bleu") for b, r in fitted.items()}
    seed1 = {b: f(r, "test_bleu") for b, r in arm("multi30k_late_fitted_seed1", "late").items()}
    seed1_chrf = {b: f(r, "test_chrf") for b, r in arm("multi30k_late_fitted_seed1", "late").items()}
    res_fitted, vit_fitted = arm(res, "late (fitted targets)"), arm(vit, "late (fitted targets)")
    paper_budgets = (0.5, 0.25, 0.1, 0.05)  # the MNIST sweeps' own budgets, where every arm ran
    pct = "{:.1%}"
    words = dict(enumerate("zero one two three four five six".split()))
    early_runs = [r for name, schedule in ((m, "early"), (m, "early (10 epochs)"), (res, "early"), (vit, "early"))
                  for r in arm(name, schedule).values()]
    early10_loss = [b_base - bleu("early (10 epochs)", b) for b in early10]

    scratch = _json("runs/multi30k_2epochs/results.json")["scores"]["test"]["bleu"]
    flat = " ".join(README.read_text(encoding="utf-8").replace("\\\n", " ").split())
    assert _json("runs/multi30k_2epochs/run.json")["command"] in flat  # the README's command made that file
    expected: list[tuple[str, str]] = [  # (where, the phrase the README must contain)
        ("Multi30k", f"2 epochs from scratch without the prior, early's own compute, {scratch:.2f}, rerun on the "
                     "current code: `results/runs/multi30k_2epochs`"),
        ("F1", f"against {scratch:.2f} for 2 epochs without the prior"),
        ("Headline", f"{b_control - seed1[0.05]:.2f} below the seed-0 control at 95%"),
        # the sweep commands' core-hour comments
        ("commands", f"Multi30k en->de, about {round(own_hours('multi30k'))} core-hours"),
        ("commands", f"MNIST ResNet, about {round(own_hours('mnist_resnet') * 60)} core-minutes"),
        ("commands", f"MNIST ViT, about {round(own_hours('mnist_vit') * 60)} core-minutes"),
        ("commands", f"early, 10 epochs, {own_hours('multi30k_full_early'):.1f} core-hours"),
        ("commands", f"late, fitted, {own_hours('multi30k_late_fitted'):.1f} core-hours"),
        ("commands", f"mnist_resnet_late_fitted.yaml # long: about "
                     f"{round(own_hours('mnist_resnet_late_fitted') * 60)} core-minutes"),
        ("commands", f"mnist_vit_late_fitted.yaml # long: about "
                     f"{round(own_hours('mnist_vit_late_fitted') * 60)} core-minutes"),
        # the baselines table's model, units and wall-time cells
        ("baselines", f"Marian-style d=128, {len(layers(base)) // 2}+{len(layers(base)) // 2} layers, FFN "
                      f"{set(json.loads(base['layer_units']).values()).pop()} ({int(f(base, 'units')):,} FFN units) | "
                      f"`multi30k.yaml`, {f(base, 'epochs'):.0f} epochs"),
        ("baselines", f"| {f(base, 'wall_s') / 60:.0f} min (1 core) |"),
        ("baselines", f"({int(f(row(res, 'baseline'), 'units')):,} activation units) | `mnist_resnet.yaml`, "
                      f"{f(row(res, 'baseline'), 'epochs'):.0f} epochs"),
        ("baselines", f"| {f(row(res, 'baseline'), 'wall_s'):.0f} s (1 core) |"),
        ("baselines", f"small timm ViT, {len(layers(row(vit, 'baseline')))} blocks "
                      f"({int(f(row(vit, 'baseline'), 'units')):,} MLP units) | `mnist_vit.yaml`, "
                      f"{f(row(vit, 'baseline'), 'epochs'):.0f} epochs"),
        ("baselines", f"| {f(row(vit, 'baseline'), 'wall_s'):.0f} s (1 core) |"),
        # the arms
        ("arms", f"Multi30k {f(early[0.5], 'epochs'):.0f} epochs at {words[len(early)]} budgets and, as early, "
                 f"{f(early10[0.1], 'epochs'):.0f} epochs, as long as the baseline at the {words[len(early10)]} "
                 f"tightest budgets"),
        ("arms", f"(Multi30k {f(late[0.5], 'epochs'):.0f} epochs, ResNet {f(arm(res, 'late')[0.5], 'epochs'):.0f}, "
                 f"ViT {f(arm(vit, 'late')[0.5], 'epochs'):.0f}; λ starts at {f(late[0.5], 'prior_lambda'):g}"),
        # the tables' captions and row labels
        ("Multi30k", f"The prior arms (baseline {b_base:.2f}; control, the baseline + {f(control, 'epochs'):.0f} "
                     f"epochs without the prior, {b_control:.2f};"),
        ("Multi30k", f"| 100% ({1 - f(fitted[0.0], 'nonlinear_units') / f(fitted[0.0], 'units'):.2%} reached: "
                     f"{f(fitted[0.0], 'nonlinear_units'):.0f} unit left) |"),
        ("ResNet", f"ResNet-18 (baseline {pct.format(acc(res, 'baseline'))}, control "
                   f"{pct.format(acc(res, 'control'))};"),
        ("ViT", f"ViT (baseline {pct.format(acc(vit, 'baseline'))}, control {pct.format(acc(vit, 'control'))};"),
        ("ViT", f"| 100% ({1 - f(vit_fitted[0.0], 'nonlinear_units') / f(vit_fitted[0.0], 'units'):.1%} reached: "
                f"{f(vit_fitted[0.0], 'nonlinear_units'):.0f} units left) |"),
        # the second seed
        ("seed 1", f"{seed1[0.1]:.2f} BLEU at 90% linear and {seed1[0.05]:.2f} at 95% (chrF {seed1_chrf[0.1]:.2f}, "
                   f"{seed1_chrf[0.05]:.2f})"),
        ("seed 1", f"Over the two seeds, 90% linear averages {(fb[0.1] + seed1[0.1]) / 2:.2f} and 95% "
                   f"{(fb[0.05] + seed1[0.05]) / 2:.2f}"),
        # Headline
        ("Headline", f"(the control, {b_control:.2f}) down to "
                     f"{1 - f(fitted[0.0], 'nonlinear_units') / f(fitted[0.0], 'units'):.2%} (all but one of "
                     f"{int(f(fitted[0.0], 'units')):,}) linear FFN units: {fb[0.5]:.2f} BLEU at 50%, {fb[0.2]:.2f} at "
                     f"80%, {fb[0.1]:.2f} at 90% and {fb[0.05]:.2f} at 95% linear ({b_control - fb[0.05]:.2f} below "
                     f"the control, {b_base - fb[0.05]:.2f} below the 10-epoch baseline; chrF "
                     f"{f(fitted[0.05], 'test_chrf'):.2f} against the control's {f(control, 'test_chrf'):.2f}); at 98% "
                     f"it scores {fb[0.02]:.2f}, and with every FFN unit but one linear {fb[0.0]:.2f} "
                     f"({b_control - fb[0.0]:.2f} below the control)"),
        ("Headline", f"{seed1[0.1]:.2f} at 90%"),
        ("Headline", f"{seed1[0.05]:.2f} at 95%"),
        ("Headline", f"The two seeds differ by about {round(fb[0.1] - seed1[0.1])} BLEU at the same budget"),
        ("Headline", f"stays within 1.0 BLEU only at 50% ({bleu('late', 0.5):.2f}) and loses "
                     f"{b_control - bleu('late', 0.1):.1f} BLEU at 90% ({bleu('late', 0.1):.2f}) and "
                     f"{b_control - bleu('late', 0.05):.1f} at 95% ({bleu('late', 0.05):.2f})"),
        ("Headline", f"(step {span([int(r['budget_reached_step']) for r in fitted.values()], '{}')} of "
                     f"{int(f(fitted[0.1], 'steps'))}, against "
                     f"{span([int(r['budget_reached_step']) for r in late.values()], '{}')})"),
        ("Headline", f"reaches {bleu('one_shot_recovery', 0.1):.2f} at 90% and {bleu('one_shot_recovery', 0.05):.2f} "
                     f"at 95%"),
        # F1
        ("F1", f"the 10-epoch early run scores {bleu('early (10 epochs)', 0.1):.2f} BLEU "
               f"({b_base - bleu('early (10 epochs)', 0.1):.2f} below the 10-epoch baseline, chrF "
               f"{f(early10[0.1], 'test_chrf'):.2f}), and at 95% {bleu('early (10 epochs)', 0.05):.2f} "
               f"({b_base - bleu('early (10 epochs)', 0.05):.2f} below, chrF {f(early10[0.05], 'test_chrf'):.2f})"),
        ("F1", f"({fb[0.1]:.2f} at 90%, with "
               f"{f(fitted[0.1], 'total_epochs') - f(early10[0.1], 'total_epochs'):.0f} more epochs) and "
               f"{bleu('early (10 epochs)', 0.1) - bleu('late', 0.1):.1f} BLEU above late toward the identity "
               f"({bleu('late', 0.1):.2f}) at nearly the same normalized APL ({f(early10[0.1], 'normalized_apl'):.3f} "
               f"against {f(late[0.1], 'normalized_apl'):.3f})"),
        ("F1", f"Early toward the identity loses only {span(early10_loss, '{:.2f}')} BLEU"),
        ("F1", f"late toward the identity loses {b_control - bleu('late', 0.1):.0f} BLEU, because"),
        ("F1", f"The 2-epoch early runs ({span([f(r, 'test_bleu') for r in early.values()], '{:.1f}')} BLEU"),
        ("F1", "(ResNet early " + pcts([acc(res, "early", b) for b in paper_budgets])
               + " against late " + pcts([acc(res, "late", b) for b in paper_budgets])
               + " and fitted " + pcts([acc(res, "late (fitted targets)", b) for b in paper_budgets])
               + "; ViT early " + pcts([acc(vit, "early", b) for b in paper_budgets])
               + " against late " + pcts([acc(vit, "late", b) for b in paper_budgets])
               + " and fitted " + pcts([acc(vit, "late (fitted targets)", b) for b in paper_budgets]) + ")"),
        # F2
        ("F2", f"95% of the FFN units linear for {b_control - fb[0.05]:.2f} BLEU below the control"),
        ("F2", f"every ReLU linear for {100 * (acc(res, 'baseline') - acc(res, 'late (fitted targets)', 0.0)):.1f} "
               f"point of accuracy below the baseline ({pct.format(acc(res, 'late (fitted targets)', 0.0))} against "
               f"{pct.format(acc(res, 'baseline'))}; the control scored {pct.format(acc(res, 'control'))})"),
        ("F2", f"90% linear for {100 * (acc(vit, 'control') - acc(vit, 'late (fitted targets)', 0.1)):.1f} points "
               f"below the control ({pct.format(acc(vit, 'late (fitted targets)', 0.1))} against "
               f"{pct.format(acc(vit, 'control'))}) and 99% for "
               f"{100 * (acc(vit, 'control') - acc(vit, 'late (fitted targets)', 0.01)):.1f} "
               f"({pct.format(acc(vit, 'late (fitted targets)', 0.01))})"),
        ("F2", f"the cost is {b_control - bleu('late', 0.05):.1f} BLEU at 95% (Multi30k) and "
               f"{100 * (acc(vit, 'control') - acc(vit, 'late', 0.05)):.1f} points at 95% (ViT)"),
        # F3
        ("F3", f"({', '.join(f'{fb[b]:.2f}' for b in (0.5, 0.2, 0.1, 0.05, 0.02))} as the normalized APL falls from "
               f"{f(fitted[0.5], 'normalized_apl'):.2f} to {f(fitted[0.02], 'normalized_apl'):.3f} of "
               f"{f(base, 'normalized_apl'):g}) and falls {fb[0.02] - fb[0.0]:.2f} more when every FFN unit but one "
               f"is linear ({fb[0.0]:.2f})"),
        ("F3", "The ViT holds " + pcts([acc(vit, "late (fitted targets)", b) for b in vit_fitted if b >= 0.01])
               + f" down to 1% nonlinear units (normalized APL {f(vit_fitted[0.01], 'normalized_apl'):.3f}) and drops "
                 f"to {pct.format(acc(vit, 'late (fitted targets)', 0.0))} with "
                 f"{f(vit_fitted[0.0], 'nonlinear_units'):.0f} units left (APL "
                 f"{f(vit_fitted[0.0], 'normalized_apl'):.3f})"),
        ("F3", f"The ResNet shows none: {pct.format(acc(res, 'late (fitted targets)', 0.0))} with every ReLU linear"),
        ("F3", f"(Multi30k {bleu('late', 0.5):.2f} → {bleu('late', 0.05):.2f} from 50% to 95% linear)"),
        # F4
        ("F4", f"Multi30k keeps nonlinear units in all {f(base, 'active_layers'):.0f} FFN layers at every budget down "
               f"to {min(b for b in fitted if b > 0):.0%} (mean width {f(fitted[0.5], 'core_width'):.0f} → "
               f"{f(fitted[0.1], 'core_width'):.0f} → {f(fitted[0.05], 'core_width'):.0f} units per layer at "
               f"50/10/5%, fitted)"),
        ("F4", f"the ResNet's fitted core shrinks from {f(res_fitted[0.5], 'active_layers'):.0f} of "
               f"{f(row(res, 'baseline'), 'active_layers'):.0f} layers (50%) to "
               f"{f(res_fitted[0.05], 'active_layers'):.0f} (5%) and {f(res_fitted[0.01], 'active_layers'):.0f} (1%), "
               f"and the ViT's from {f(vit_fitted[0.5], 'active_layers'):.0f} blocks to "
               f"{f(vit_fitted[0.05], 'active_layers'):.0f} (5%) and {f(vit_fitted[0.02], 'active_layers'):.0f} (2%)"),
        # Beyond the paper
        ("Beyond", f"the budget is met at step {early[0.1]['budget_reached_step']}, inside the 200-step warmup"),
        ("Beyond", f"({split(early10[0.1])} in the "
                   f"decoder after 10 epochs, {split(early[0.1]).split(' against ')[1]} after 2)"),
        ("Beyond", f"late toward fitted targets keeps {split(fitted[0.1])} decoder "
                   f"units, and {split(fitted[0.05]).replace(' encoder units', '')} at 95%"),
        ("Beyond", f"keeps more in the encoder ({split(late[0.1]).replace(' encoder units', '')} at 90%)"),
        ("Beyond", f"(identity: {bleu('one_shot_identity', 0.1):.2f} BLEU at 90% linear; affine: "
                   f"{bleu('one_shot_affine', 0.1):.2f})"),
        ("Beyond", f"98% of Multi30k's FFN units linear cost {b_control - fb[0.02]:.2f} BLEU against the control "
                   f"({fb[0.02]:.2f}, {f(fitted[0.02], 'nonlinear_units'):.0f} units of "
                   f"{int(f(fitted[0.02], 'units')):,} left) and all but one cost {b_control - fb[0.0]:.2f} "
                   f"({fb[0.0]:.2f})"),
        ("Beyond", f"On MNIST the ResNet with every ReLU linear scores "
                   f"{pct.format(acc(res, 'late (fitted targets)', 0.0))}, and the ViT with 99% of its MLP units "
                   f"linear {pct.format(acc(vit, 'late (fitted targets)', 0.01))}"),
        ("Beyond", "(Multi30k steps " + span([int(r["budget_reached_step"]) for r in early.values()], "{}")
                   + f" of {int(f(early[0.1], 'steps')):,} and "
                   + " and ".join(r["budget_reached_step"] for _, r in sorted(early10.items(), reverse=True))
                   + f" of {int(f(early10[0.1], 'steps')):,} in the 10-epoch runs, ResNet "
                   + span([int(r["budget_reached_step"]) for r in arm(res, "early").values()], "{}")
                   + f" of {int(f(arm(res, 'early')[0.1], 'steps')):,}, ViT "
                   + span([int(r["budget_reached_step"]) for r in arm(vit, "early").values()], "{}")
                   + f" of {int(f(arm(vit, 'early')[0.1], 'steps')):,})"),
        ("Beyond", "reaches its budget within the first {:.0%} of training on every task".format(
            max(f(r, "budget_reached_step") / f(r, "steps") for r in early_runs))),
        ("Beyond", "at 10% nonlinear it leaves {}, {} and {} units in the encoder layers and {}, {} and {} in the "
                   "decoder's".format(*layers(row(m, "one_shot_affine_refit", 0.1)))),
    ]
    text = _text("## Reproducing the paper")
    missing = [(where, phrase) for where, phrase in expected if phrase not in text]
    assert not missing, "README numbers that are not the committed results:\n" + "\n".join(map(str, missing))

    # claims the prose makes about the numbers rather than printing them
    assert sorted(early10) == sorted(early)[:len(early10)], "'early, 10 epochs ... at the two tightest budgets'"
    assert all(f(r, "epochs") == f(row(name, "baseline"), "epochs") for name in (res, vit)
               for r in arm(name, "early").values()), "'MNIST [early] as long as the baseline'"
    assert all(b_control - value < 1.0 for value in fb.values()), "fitted: 'within 1.0 BLEU of the control'"
    assert {b for b, r in late.items() if b_control - f(r, "test_bleu") < 1.0} == {0.5}, "identity: 'only at 50%'"
    assert fb[0.1] >= b_control, "'turned a 2-BLEU loss at 90% into none'"
    assert all(0.5 <= fb[b] - seed1[b] < 1.5 for b in seed1), "'the two seeds differ by about 1 BLEU'"
    assert all(f(r, "active_layers") == f(base, "active_layers") for b, r in fitted.items() if b >= 0.02)
    refit = layers(row(m, "one_shot_affine_refit", 0.1))
    assert refit[-1] * 2 == list(json.loads(base["layer_units"]).values())[-1], "'half of the last decoder layer'"
    assert all(f(early10[b], "budget_reached_step") == f(early[b], "budget_reached_step") for b in early10), (
        "'the budget is met at the same step' in the 2- and 10-epoch early runs")
    assert all(layers(early[b])[:3] == layers(early10[b])[:3] == [0, 0, 0] for b in early10), "'encoder completely'"
    assert all(layers(r)[1:] == [0] * (len(layers(r)) - 1) for b, r in vit_fitted.items() if b <= 0.02), (
        "ViT: 'the nonlinearity that survives sits in the first block'")
    stages = list(json.loads(row(res, "baseline")["layer_nonlinear"]))
    linear_from = {stage: max((b for b, r in res_fitted.items() if not any(
        count for name, count in json.loads(r["layer_nonlinear"]).items() if name.startswith(stage))), default=None)
        for stage in ("layer1", "layer2", "layer3", "layer4")}
    assert stages[-1].startswith("layer4") and linear_from["layer4"] > max(
        b for stage, b in linear_from.items() if stage != "layer4"), ("ResNet: 'the last stage becomes linear first'",
                                                                       linear_from)
