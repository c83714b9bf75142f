"""Parallel corpora as ``datasets.DatasetDict``s with string columns ``source`` and ``target``.

Sources: Moses-style text files (``{split}.{lang}``, optionally ``.gz``), JSON lines, a Hub dataset with a
``translation`` column (WMT style), or the synthetic corpus. Split names are normalised to ``train``,
``validation`` and ``test``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Optional, Union

import datasets

from ..hub_datasets import load_hub_dataset
from .synthetic import synthetic_pairs

PathLike = Union[str, os.PathLike]
SPLIT_ALIASES = {"train": "train", "val": "validation", "valid": "validation", "dev": "validation",
                 "validation": "validation", "test": "test"}


def _canonical_split(name: str, test_split: Optional[str]) -> Optional[str]:
    if test_split is not None and name == test_split:
        return "test"
    return SPLIT_ALIASES.get(name)


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


def _build(pairs_by_split: dict[str, list[tuple[str, str]]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})
        for split, pairs in pairs_by_split.items()
    })


def load_moses(
    data_dir: PathLike, source_lang: str, target_lang: str, test_split: Optional[str] = None
) -> datasets.DatasetDict:
    """Read ``{split}.{lang}[.gz]`` line-aligned files. ``test_split`` names the file prefix used as ``test``
    (e.g. ``test_2016_flickr`` for Multi30k); otherwise ``train``/``val``/``valid``/``dev``/``test`` are used."""
    directory = Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"--data_dir {directory} is not a directory.")
    splits: dict[str, list[tuple[str, str]]] = {}
    for source_file in sorted(directory.iterdir()):
        name = source_file.name.removesuffix(".gz")
        prefix, _, lang = name.rpartition(".")
        split = _canonical_split(prefix, test_split)
        if lang != source_lang or split is None:
            continue
        target_file = source_file.with_name(f"{prefix}.{target_lang}" + (".gz" if source_file.suffix == ".gz" else ""))
        if not target_file.is_file():
            raise FileNotFoundError(f"{source_file} has no parallel file {target_file.name}.")
        sources, targets = _read_lines(source_file), _read_lines(target_file)
        if len(sources) != len(targets):
            raise ValueError(f"{source_file.name} has {len(sources)} lines but {target_file.name} has {len(targets)}.")
        splits[split] = list(zip(sources, targets))
    if "train" not in splits:
        raise FileNotFoundError(
            f"No train.{source_lang}[.gz] with train.{target_lang}[.gz] in {directory} (found: "
            f"{sorted(p.name for p in directory.iterdir())[:10]})."
        )
    return _build(splits)


def load_jsonl(files: dict[str, PathLike], source_lang: str, target_lang: str) -> datasets.DatasetDict:
    """JSON lines per split: ``{"translation": {src: ..., tgt: ...}}``, ``{src: ..., tgt: ...}`` or
    ``{"source": ..., "target": ...}``."""
    splits = {}
    for split, path in files.items():
        pairs = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                record = record.get("translation", record)
                if source_lang in record and target_lang in record:
                    pairs.append((record[source_lang], record[target_lang]))
                elif "source" in record and "target" in record:
                    pairs.append((record["source"], record["target"]))
                else:
                    raise ValueError(f"{path}:{number} has neither {source_lang!r}/{target_lang!r} nor "
                                     f"'source'/'target' keys: {sorted(record)}.")
        splits[SPLIT_ALIASES.get(split, split)] = pairs
    return _build(splits)


def load_hub(dataset_name: str, config_name: Optional[str], source_lang: str, target_lang: str) -> datasets.DatasetDict:
    """A Hub dataset with a ``translation`` column, e.g. ``wmt16`` ``de-en``. Fails fast offline."""
    hint = ("Use local files instead: --data_dir DIR with Moses-style {split}.{lang}[.gz] files, "
            "--train_file/--validation_file/--test_file with JSON lines, or --dataset_name synthetic.")
    raw = load_hub_dataset(dataset_name, config_name, hint)
    return datasets.DatasetDict({
        SPLIT_ALIASES.get(split, split): ds.map(
            lambda ex: {"source": ex["translation"][source_lang], "target": ex["translation"][target_lang]},
            remove_columns=ds.column_names)
        for split, ds in raw.items()
    })


def load_synthetic(train_size: int, eval_size: int, seed: int = 0) -> datasets.DatasetDict:
    """The synthetic English -> German corpus: disjoint seeds per split."""
    return _build({"train": synthetic_pairs(train_size, seed), "validation": synthetic_pairs(eval_size, seed + 1),
                   "test": synthetic_pairs(eval_size, seed + 2)})


def filter_pairs(corpus: datasets.DatasetDict, max_words: int) -> tuple[datasets.DatasetDict, dict[str, int]]:
    """Drop pairs with an empty side or a side longer than ``max_words`` whitespace words.

    Returns the filtered corpus and the number dropped per split.
    """
    def keep(example: dict[str, str]) -> bool:
        return all(0 < len(example[side].split()) <= max_words for side in ("source", "target"))

    filtered = datasets.DatasetDict({split: ds.filter(keep) for split, ds in corpus.items()})
    return filtered, {split: len(corpus[split]) - len(filtered[split]) for split in corpus}
