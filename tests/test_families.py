"""The family table: the README's table is generated from it, and every layout it declares is the one a model of the
family really has."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import FAMILY_CASES, GLU_FFN_CASES
from tiny_models import ALL

import hf_linearize as hl
from hf_linearize.families import FAMILIES, family_by_name, find_family, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
CASES = {**FAMILY_CASES, **GLU_FFN_CASES, **ALL}


def test_readme_family_table_is_generated_from_the_family_table():
    text = README.read_text()
    match = re.search(r"<!-- family-table -->\n(.*?)\n<!-- /family-table -->", text, re.S)
    assert match, "README.md lacks the <!-- family-table --> block"
    assert match.group(1) == markdown_table(), (
        "README.md's family table is out of date; replace it with the output of "
        "python -c 'from hf_linearize.families import markdown_table; print(markdown_table())'")


def test_every_declared_layout_is_verified():
    """Patch a model of every case (each patch verifies its sites): per family, the layouts found are exactly the
    declared ones, so each declared layout is verified by at least one model and none is missing."""
    found: dict[str, set[str]] = {spec.name: set() for spec in FAMILIES}
    for case, build in CASES.items():
        torch.manual_seed(0)
        model, inputs = build()
        family = find_family(model).name
        own_input = family == "generic" or case.startswith(("torchvision", "timm_regnet", "timm_vit_swiglu"))
        hl.patch_model(model.eval(), example_inputs=inputs if own_input else None)
        found[family] |= {layout for calls in model._hf_linearize.layouts.values() for layout in calls}
    for name, layouts in found.items():
        assert layouts == set(family_by_name(name).layouts), name

