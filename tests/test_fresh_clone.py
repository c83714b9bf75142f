"""A fresh clone runs and tests on its own: nothing outside the repository is read, and the data it needs ships."""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import pytest
from conftest import MULTI30K

ROOT = Path(__file__).resolve().parents[1]
# A path into the workspace folder beside the clone, which a fresh clone elsewhere does not have. The folder's
# name is spelt in two halves so that this file does not match its own pattern.
_NAME = "sha" + "red"
OUTSIDE = re.compile(rf"\.\./{_NAME}|[\"']{_NAME}[\"']\s*/|{_NAME}/data")


def _tracked_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names if n and not n.startswith(".ci/")]


def test_no_tracked_file_reads_outside_the_repository():
    offenders = []
    for file in _tracked_files():
        if file.suffix in {".gz", ".png", ".safetensors"} or not file.is_file():
            continue
        text = file.read_text(encoding="utf-8", errors="ignore")
        offenders += [f"{file.relative_to(ROOT)}: {m.group(0)!r}" for m in OUTSIDE.finditer(text)]
    assert not offenders, f"These files point outside the repository; use data/ in the repo instead: {offenders}"


def test_guard_catches_a_shared_path():
    assert OUTSIDE.search(f"data_dir: ../{_NAME}/data/multi30k")
    assert OUTSIDE.search(f'Path(__file__).parents[2] / "{_NAME}" / "data"')
    assert not OUTSIDE.search(f"a {_NAME} tokenizer, the {_NAME} relu")


@pytest.mark.parametrize("split,lines", [("train", 29000), ("val", 1014), ("test_2016_flickr", 1000)])
def test_multi30k_ships_with_the_project(split, lines):
    assert MULTI30K.is_relative_to(ROOT) and (MULTI30K / "README.md").is_file()
    for lang in ("en", "de", "fr"):
        with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as fh:
            assert sum(1 for _ in fh) == lines, f"{split}.{lang}.gz"
