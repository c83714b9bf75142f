"""Checks a recipe runs before its first expensive step (corpus, tokenizer, model, training), so that a bad input
fails within seconds, with a message naming the flag or file and the fix, and leaves nothing behind.

Every check only reads: no folder is created and no file written. The output folder follows the transformers
examples' convention (``get_last_checkpoint``): a non-empty ``--output_dir`` is refused unless the run resumes from a
checkpoint or ``--overwrite_output_dir`` is given (transformers 5 dropped that flag; :class:`RunArguments` brings
it back), and ``--resume_from_checkpoint true`` means the last checkpoint in ``output_dir``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .hub import HUB_FAILURES, check_repo_id, hub_failure

RESUME_LAST = ("true", "last")
"""``--resume_from_checkpoint`` values meaning the last ``checkpoint-*`` folder in ``output_dir``."""


@dataclass
class RunArguments:
    """Recipe flags about the run's output folder."""

    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "write into a non-empty output_dir, replacing an earlier run's outputs (else it is refused, unless "
                "--resume_from_checkpoint continues a run there)"})


def check_output_dir(training: TrainingArguments, overwrite: bool) -> Optional[str]:
    """Check ``training.output_dir`` and resolve ``training.resume_from_checkpoint`` in place.

    ``"true"``/``"last"`` becomes the last ``checkpoint-*`` folder of ``output_dir``; a path must be a folder.
    Returns the checkpoint the run resumes from (``None``: a new run). ``ValueError`` when resuming finds no
    checkpoint, when ``output_dir`` or one of its parents is a file or is not writable, or when ``output_dir``
    holds files of an earlier run and neither resuming nor ``overwrite`` was asked for.
    """
    output = Path(training.output_dir)
    ancestor = output
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--output_dir {output} cannot be created: {ancestor} is a file. Choose another "
                         "--output_dir.")
    if not os.access(ancestor, os.W_OK):
        raise ValueError(f"--output_dir {output} cannot be written: {ancestor} is not writable. Choose another "
                         "--output_dir.")
    resume = training.resume_from_checkpoint
    if isinstance(resume, str) and resume.strip().lower() in RESUME_LAST:
        resume = get_last_checkpoint(str(output)) if output.is_dir() else None
        if resume is None:
            raise ValueError(f"--resume_from_checkpoint {training.resume_from_checkpoint} resumes the last "
                             f"checkpoint in --output_dir {output}, but it has no checkpoint-* folder. Drop the flag "
                             "to start a new run, or give the checkpoint folder itself.")
    elif resume is not None and not Path(resume).is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume} is not a checkpoint folder. Give a checkpoint-* folder, "
                         "or 'true' for the last one in --output_dir.")
    training.resume_from_checkpoint = resume
    if resume is None and not overwrite and output.is_dir() and any(output.iterdir()):
        found = ", ".join(sorted(p.name for p in output.iterdir())[:5])
        raise ValueError(f"--output_dir {output} already holds an earlier run ({found}). Pass "
                         "--resume_from_checkpoint true to continue its last checkpoint, --overwrite_output_dir "
                         "true to replace its outputs, or choose another --output_dir.")
    return resume


def check_files(files: Iterable[tuple[str, Optional[str]]]) -> None:
    """``ValueError`` naming the flag unless each given ``(flag, path)`` is an existing, non-empty file; ``None``
    paths (flag not given) are skipped."""
    for flag, path in files:
        if path is None:
            continue
        if not Path(path).is_file():
            raise ValueError(f"--{flag} {path} does not exist (or is not a file); check the path, relative to "
                             f"{Path.cwd()}.")
        if Path(path).stat().st_size == 0:
            raise ValueError(f"--{flag} {path} is empty; give a file with data.")


def check_hub(training: TrainingArguments) -> None:
    """With ``--push_to_hub``: ``ValueError`` unless the repo id (``--hub_model_id``, else the ``output_dir``
    name) is valid and the Hub answers for the token (one request, no retries), so that a run never trains for
    hours to fail at the push."""
    if not training.push_to_hub:
        return
    from huggingface_hub import HfApi  # only runs that push need the Hub client

    repo_id = training.hub_model_id or Path(training.output_dir).name
    check_repo_id(repo_id, "--hub_model_id" if training.hub_model_id else "--push_to_hub (the output_dir name)")
    api = HfApi(token=training.hub_token)
    try:
        api.whoami()
    except HUB_FAILURES as error:
        raise ValueError(f"--push_to_hub would push to {repo_id!r}, but {hub_failure(error, api.endpoint)}. Fix "
                         "that first, or drop --push_to_hub and push the saved final/ folder later "
                         "(hf_linearize.push_to_hub).") from error
