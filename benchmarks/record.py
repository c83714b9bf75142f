"""A benchmark's measurements as one JSON file, with what is needed to read them: versions, CPU cores,
``OMP_NUM_THREADS``, the load average before and after (other jobs on the machine), and the wall time of the run.

The README's measured numbers are these files (under ``results/``), and ``tests/test_readme.py`` checks that the
two agree. Run as a script, it times any command and writes its ``run.json`` (the recipes write their own
``results.json``, which is copied next to it):

    python -m benchmarks.record results/runs/NAME/run.json -- python recipes/classify_images.py --config ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional


class Record:
    """Started when created; :meth:`save` writes ``{"machine": ..., "wall_s": ..., **measured}``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.load_before = os.getloadavg()[0]

    def machine(self) -> dict[str, Any]:
        return {"python": platform.python_version(), "torch": version("torch"),
                "transformers": version("transformers"), "cpu_cores": os.cpu_count(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_before": self.load_before,
                "load_average_after": os.getloadavg()[0]}

    def save(self, path: Optional[Path], **measured: Any) -> float:
        """Write the file when ``path`` is given (folders created); returns the wall time in seconds so far."""
        wall = time.perf_counter() - self.start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"machine": self.machine(), "wall_s": wall, **measured}, indent=1) + "\n",
                            encoding="utf-8")
        return wall


def main() -> int:
    parser = argparse.ArgumentParser(description="Run a command and write its run.json: the command, its exit "
                                                 "status and wall time, and the machine (see the module docstring).")
    parser.add_argument("output", type=Path, help="the run.json to write")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: give it after --")
    record = Record()
    returncode = subprocess.call(command)
    record.save(args.output, command=" ".join(command), returncode=returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
