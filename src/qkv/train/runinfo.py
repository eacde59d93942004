"""What a run was trained on and under: ``run.json``, written beside ``config.yaml``.

``config.yaml`` says what was asked for; ``run.json`` says what the machine made of it, so that
two runs can be compared and a surprising result explained::

    data          the data's fingerprint: for a text corpus the SHA-256 of the text, its bytes,
                  characters and distinct characters, and the tokenizer's vocabulary size
    environment   Python, PyTorch, qkv, the platform, the device, threads, world size
    precision     what train.precision resolved to (bf16 autocast or fp32)
    follows_clock whether the run depends on the wall clock (a ``train.max_time`` budget: the
                  learning rate and the last step follow elapsed time), and so is not repeatable
    segments      one entry per start: the first one and every resume, each with its
                  environment

The same corpus name can mean different text on different machines: ``python-docs`` is the help
text of the Python that runs qkv, and it changes between Python versions. A resume whose data
fingerprint differs from the run's is refused, since it would continue on other text.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

import qkv
from qkv._io import atomic_write_json
from qkv.data.config import DataSource
from qkv.interop.files import CheckpointError
from qkv.train.config import TrainConfig

__all__ = ["RUN_INFO", "clock_notes", "describe_run", "record_run"]

RUN_INFO = "run.json"


def clock_notes(config: TrainConfig) -> list[str]:
    """Why a run depends on the wall clock, one sentence each (empty: it does not)."""
    c = config.train
    if not c.max_time:
        return []
    repeat = (
        "two runs of this config differ; for a repeatable run give a step budget alone "
        "(--max-steps N)"
    )
    if config.schedule.kind == "cosine":
        return [
            f"the learning rate follows the clock (train.max_time={c.max_time}: the cosine "
            f"ends when the time runs out) and so does the last step: {repeat}"
        ]
    return [f"the last step follows the clock (train.max_time={c.max_time}): {repeat}"]


def describe_run(
    config: TrainConfig,
    source: DataSource,
    *,
    device: torch.device,
    world_size: int,
    autocast: torch.dtype | None,
) -> dict[str, Any]:
    """The facts of one start of a run (see the module docstring)."""
    data = dict(getattr(source, "fingerprint", {}) or {})
    vocab = getattr(source, "vocab_size", None)
    if vocab is not None:
        data["vocab_size"] = int(vocab)
    notes = clock_notes(config)
    return {
        "data": data,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "qkv": qkv.__version__,
            "platform": platform.platform(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "world_size": world_size,
        },
        "precision": "bf16" if autocast == torch.bfloat16 else "fp32",
        "deterministic": config.train.deterministic,
        "follows_clock": bool(notes),
        "notes": notes,
    }


def record_run(
    run_dir: Path, info: dict[str, Any], start_step: int, *, write: bool = True
) -> dict[str, Any]:
    """Write ``run.json`` for a start at ``start_step``; a resume adds a segment.

    Every rank of a distributed run calls this (so that all refuse a resume together); only
    the one with ``write`` writes.

    Raises:
        CheckpointError: resuming on data whose fingerprint differs from the run's.
    """
    path = run_dir / RUN_INFO
    segment = {"start_step": start_step, "environment": info["environment"]}
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if start_step == 0 or previous is None:
        record = {**info, "segments": [segment]}
    else:
        before, now = previous.get("data", {}), info["data"]
        if before.get("sha256") != now.get("sha256"):
            was = previous["segments"][0]["environment"].get("python", "?")
            raise CheckpointError(
                f"{run_dir} was trained on {before.get('corpus')!r} with SHA-256 "
                f"{str(before.get('sha256'))[:12]}… (Python {was}), but that corpus here is "
                f"{str(now.get('sha256'))[:12]}… (Python {platform.python_version()}): resuming "
                "would continue on other text; resume where the run started, or start a new "
                "run with --out"
            )
        record = {**info, "segments": [*previous.get("segments", []), segment]}
    if write:
        atomic_write_json(path, record)
    return record
