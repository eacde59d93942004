"""Toy run configs for the training tests: tiny models that train in a second."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

TINY_GPT: dict[str, Any] = {
    "preset": "toy-gpt",
    "model": {"family": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "dropout": 0.1},
    "data": {"kind": "lm", "corpus": "python-docs", "tokenizer": "char", "seq_len": 32},
    "optim": {"lr": 3.0e-3},
    "schedule": {"warmup_steps": 5},
    "train": {
        "batch_size": 8, "max_steps": 10, "eval_every": 5, "eval_batches": 2,
        "checkpoint_every": 5, "threads": 1,
    },
    "eval": {"sample_tokens": 8},
}  # fmt: skip

ROOT = Path(__file__).resolve().parents[2]


def with_overrides(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """``base`` with some keys of some sections replaced."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values}
    return out


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_qkv(
    args: list[str],
    *,
    kill_at: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``python -m qkv ARGS`` in a fresh process, one thread per op (deterministic).

    ``kill_at`` ("checkpoint:20", "step:33") runs it through ``tests.train.killer`` instead,
    which SIGKILLs the process at that point of the training loop.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = ["-m", "qkv"] if kill_at is None else ["-m", "tests.train.killer", kill_at]
    return subprocess.run(
        [sys.executable, *command, *args], capture_output=True, text=True, env=full_env,
        timeout=timeout, cwd=ROOT,
    )  # fmt: skip
