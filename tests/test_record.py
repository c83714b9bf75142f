"""benchmarks.record: the run.json that the README's measured runs are read from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _record(tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.record", str(tmp_path / "out" / "run.json"), "--",
                           *command], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_command_is_timed_and_its_exit_status_kept(tmp_path):
    done = _record(tmp_path, sys.executable, "-c", "import sys, time; time.sleep(0.3); print('ran'); sys.exit(3)")
    assert done.returncode == 3 and done.stdout.strip() == "ran"
    run = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert run["returncode"] == 3 and 0.3 <= run["wall_s"] < 60
    assert run["command"].endswith("time.sleep(0.3); print('ran'); sys.exit(3)")
    assert run["machine"]["cpu_cores"] >= 1 and run["machine"]["load_average_before"] >= 0


def test_no_command_is_an_error(tmp_path):
    done = _record(tmp_path)
    assert done.returncode == 2 and "no command" in done.stderr and not (tmp_path / "out").exists()
