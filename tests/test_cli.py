"""The hf-linearize command on a saved checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import hf_linearize as hl
from hf_linearize.cli import main


@pytest.fixture
def saved(tmp_path, marian):
    model, _ = marian
    hl.patch_model(model)
    hl.set_linear(model, 0.5)
    hl.save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_apl_prints_the_report(saved, capsys):
    model, path = saved
    assert main(["apl", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"normalized APL:   {hl.average_path_length(model):.4f}" in out
    assert f"unnormalized APL: {hl.average_path_length(model, normalized=False):.4f}" in out
    assert "model.decoder.layers.1.activation_fn" in out


def test_apl_json_and_plot(saved, capsys, tmp_path):
    model, path = saved
    assert main(["apl", str(path), "--json", "--plot", str(tmp_path / "map.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(json.dumps(hl.path_length_report(model)))
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary(saved, capsys):
    model, path = saved
    assert main(["summary", str(path)]) == 0
    assert capsys.readouterr().out.strip() == str(hl.summary(model))


def test_error_exit_code(tmp_path, capsys):
    assert main(["apl", str(tmp_path)]) == 2
    assert "linearize_config.json is missing" in capsys.readouterr().err


def test_help_and_argument_errors_load_no_heavy_library():
    """--help and a bad argument return before torch, transformers or timm are imported (a fresh process)."""
    code = ("import sys, hf_linearize.cli as cli\n"
            "for argv in (['--help'], ['apl']):\n"
            "    try:\n"
            "        cli.main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'timm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    assert "usage: hf-linearize" in done.stdout and "the following arguments are required" in done.stderr

