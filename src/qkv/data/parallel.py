"""Parallel text for translation: (source, target) pairs read from a TSV or JSONL file.

    TSV     one pair per line, ``source<TAB>target``; a first line naming columns ``source`` and
            ``target`` (in any position, any case) is a header and selects those columns
    JSONL   one JSON object per line with string values under ``"source"`` and ``"target"``

Blank lines are skipped. The pairs are held in memory (translation corpora used for teaching
are small); the last ``val_fraction`` of them is the validation set.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PARALLEL_SUFFIXES", "read_parallel"]

PARALLEL_SUFFIXES: tuple[str, ...] = (".tsv", ".jsonl")


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    pairs = []
    src_col, tgt_col = 0, 1
    first = True
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            names = [c.strip().lower() for c in fields]
            if first and {"source", "target"} <= set(names):  # a header line
                src_col, tgt_col = names.index("source"), names.index("target")
                first = False
                continue
            first = False
            if len(fields) <= max(src_col, tgt_col):
                raise ValueError(
                    f"{path}:{number} has {len(fields)} tab-separated field(s); each line needs "
                    "a source and a target separated by a tab"
                )
            pairs.append((fields[src_col], fields[tgt_col]))
    return pairs


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} is not a JSON object with source and target")
            missing = [k for k in ("source", "target") if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(
                    f"{path}:{number} needs string values under 'source' and 'target' "
                    f"(missing or not text: {', '.join(missing)}; keys found: {sorted(row)})"
                )
            pairs.append((row["source"], row["target"]))
    return pairs


def read_parallel(path: str | Path) -> list[tuple[str, str]]:
    """The ``(source, target)`` pairs of a ``.tsv`` or ``.jsonl`` file, in file order.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unknown suffix, a malformed line (named by number), or no pairs at all.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no parallel text file at {p}")
    if p.suffix.lower() not in PARALLEL_SUFFIXES:
        raise ValueError(f"{p} is neither .tsv nor .jsonl; parallel text needs one of those")
    try:
        pairs = _read_tsv(p) if p.suffix.lower() == ".tsv" else _read_jsonl(p)
    except UnicodeDecodeError:
        raise ValueError(f"{p} is not UTF-8 text; convert it to UTF-8") from None
    if not pairs:
        raise ValueError(f"{p} holds no (source, target) pairs")
    return pairs
