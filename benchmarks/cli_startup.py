"""Time ``hf-linearize --help`` against importing the whole stack, side by side in one run.

The command imports the library only when a command runs, so ``--help`` and argument errors should return in well
under the 2 s target on an idle machine; importing torch, transformers and timm (what ``hl.patch_model`` needs)
takes several seconds. Each is a fresh Python process, timed 5 times; the medians and their ratio are printed.

Run from the repository root: ``python -m benchmarks.cli_startup [--json results/cli_startup/cpu.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.record import Record

TARGET_S = 2.0
REPEATS = 5


def median_seconds(command: list[str]) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the medians there")
    args = parser.parse_args()
    record = Record()
    help_s = median_seconds([sys.executable, "-m", "hf_linearize.cli", "--help"])
    stack_s = median_seconds([sys.executable, "-c", "import hf_linearize as hl; hl.patch_model"])
    print(f"hf-linearize --help: {help_s:.2f} s (target < {TARGET_S:.0f} s: {'met' if help_s < TARGET_S else 'MISSED'})")
    print(f"import of the whole stack (hl.patch_model): {stack_s:.2f} s; --help takes {help_s / stack_s:.2f}x of it")
    record.save(args.json, repeats=REPEATS, help_s=help_s, stack_s=stack_s, target_s=TARGET_S)


if __name__ == "__main__":
    main()
