"""``train.compile``: a torch.compile'd model trains the same run as the eager one."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkv.train import config_from_dict, train
from qkv.train.metrics import read_metrics
from tests.train.helpers import TINY_GPT, with_overrides

# Inductor fuses and reorders float32 arithmetic, so the losses agree to rounding, not bits.
COMPILE_ATOL = 1e-4


@pytest.mark.slow  # compiling with the C++ backend takes ~10-20 s on 2 cores
def test_compiled_training_matches_eager(tmp_path: Path, cache_dir: Path) -> None:
    base = with_overrides(
        TINY_GPT,
        model={"dropout": 0.0},
        train={"max_steps": 4, "eval_every": 0, "checkpoint_every": 0, "precision": "fp32"},
    )
    losses = {}
    for compile_ in (False, True):
        config = config_from_dict(with_overrides(base, train={"compile": compile_}))
        run = tmp_path / f"compile-{compile_}"
        train(config, run, cache_dir=cache_dir)
        losses[compile_] = [float(r["loss"]) for r in read_metrics(run / "metrics.csv")]
    assert len(losses[True]) == len(losses[False]) == 4
    for eager, compiled in zip(losses[False], losses[True], strict=True):
        assert abs(eager - compiled) < COMPILE_ATOL, (losses[False], losses[True])
    assert losses[True][-1] < losses[True][0]  # and it does learn
