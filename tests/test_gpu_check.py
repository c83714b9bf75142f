"""benchmarks/gpu_check.py, the prepared GPU check, runs on the CPU with tiny sizes and writes its one JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_subprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_with_tiny_sizes(tmp_path):
    output = tmp_path / "check" / "cpu.json"
    result = run_subprocess([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiny", "--output",
                             str(output)], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text(encoding="utf-8"))
    sections = ("training", "fold_speed", "one_shot")
    assert data["environment"]["device"] == "cpu" and data["environment"]["sizes"]["preset"] == "transformer-tiny"
    assert set(data["peak_memory_mib"]) == set(data["seconds"]) == set(sections)
    assert all(data["peak_memory_mib"][name] > 0 and data["seconds"][name] > 0 for name in sections)
    training = data["training"]
    assert training["steps"] == 6 and training["autocast"] == "bfloat16"
    assert training["gate_dtypes"] == ["torch.float32"]
    assert training["overhead_ratio"] > 0 and training["mean_gate"] > 0, "the prior moved the gates"
    assert sum(training["fold_after_training"]["forms"].values()) == 4, "the tiny Marian's 2 + 2 FFN sites"
    rows = data["fold_speed"]["rows"]
    assert list(rows) == ["0%", "50%", "90%"] and data["fold_speed"]["dtype"] == "bfloat16"
    assert rows["0%"]["ffn_macs_folded"] == rows["0%"]["ffn_macs_gated"]
    assert rows["90%"]["params_folded"] < rows["50%"]["params_folded"] < rows["50%"]["params_gated"]
    for row in rows.values():
        assert 0 <= row["generate_same_sequences"] <= 1
        assert all(row[key]["speedup"] > 0 and row[key]["flop_ratio"] >= 1 for key in ("forward", "generate"))
    one_shot = data["one_shot"]
    assert one_shot["nonlinear_fraction"] == 0.5 and 0.8 < one_shot["cosine"] <= 1.0
    assert 0 <= one_shot["top1_retrieval"] <= 1
