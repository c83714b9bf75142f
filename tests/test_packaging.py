"""The wheel: every module under hf_linearize/ and the model-card template are in it, and it works on its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_AT_TOP = {".git", "data", "outputs", "build", "dist", "tests", "recipes", "benchmarks", ".pytest_cache"}
"""Top-level folders that a wheel never takes files from (copying them would only cost time)."""


def _source_copy(target: Path) -> Path:
    """The checkout without its data, outputs and build leftovers, so that building never writes into it."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return skipped | (SKIP_AT_TOP & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, target, symlinks=True, ignore=ignore)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = _source_copy(work / "source")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-w", str(work / "dist")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (built,) = (work / "dist").glob("hf_linearize-*.whl")
    return built


def test_every_module_and_the_card_template_are_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hf_linearize").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert {"hf_linearize/translation/data.py", "hf_linearize/hub.py"} <= modules
    assert modules - names == set(), "modules missing from the wheel"
    templates = {f"hf_linearize/model_cards/{p.name}" for p in (ROOT / "model_cards").glob("*.md")}
    assert "hf_linearize/model_cards/linearized_model.md" in templates
    assert templates - names == set(), "model-card templates missing from the wheel"


def test_the_unpacked_wheel_imports_on_its_own(wheel, tmp_path):
    """Imported from the unpacked wheel (ahead of the editable checkout): subpackages and the template resolve."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    check = ("import sys; sys.path.insert(0, sys.argv[1]); import hf_linearize, hf_linearize.translation.data; "
             "from hf_linearize.hub import CARD_TEMPLATE; "
             "assert hf_linearize.__file__.startswith(sys.argv[1]), hf_linearize.__file__; "
             "assert '{{ card_data }}' in CARD_TEMPLATE.read_text(encoding='utf-8')")
    done = subprocess.run([sys.executable, "-c", check, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


IMPORT_NAMES = {"pyyaml": "yaml"}
"""Distributions whose import name differs from their name."""
USED_BY_LIBRARIES = {
    "torchvision": "timm imports it (and torchvision's ResNet is a supported family)",
    "sentencepiece": "the tokenizers of pretrained Marian/T5 checkpoints load through it",
    "jinja2": "huggingface_hub.ModelCard.from_template renders the model cards with it",
}
"""Declared dependencies the package never imports itself, and why they are declared."""


def test_every_declared_dependency_is_used():
    """No dependency is declared for nothing (``evaluate`` was: its ``evaluate.load`` needs the Hub, so BLEU/chrF
    come from sacrebleu directly)."""
    import re
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    sources = "\n".join(p.read_text() for folder in ("hf_linearize", "recipes", "benchmarks")
                        for p in (ROOT / folder).rglob("*.py"))
    unused = []
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if name not in USED_BY_LIBRARIES and not re.search(rf"^\s*(import|from) {module}\b", sources, re.M):
            unused.append(name)
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"

