"""The training loop's clock: evaluation and checkpoints do not count as training time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

import qkv
from qkv.train import config_from_dict, loop, train
from qkv.train.metrics import read_metrics

from .helpers import TINY_GPT, with_overrides

PAUSE = 0.4  # seconds each evaluation is made to take


def test_evaluation_time_is_not_training_time(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = loop._evaluate

    def slow_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        time.sleep(PAUSE)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_evaluate", slow_evaluate)
    raw = with_overrides(TINY_GPT, train={"max_steps": 6, "eval_every": 1, "checkpoint_every": 0})
    start = time.perf_counter()
    train(config_from_dict(raw), tmp_path / "run", cache_dir=cache_dir)
    wall = time.perf_counter() - start
    clock = [float(row["time"]) for row in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert wall > 6 * PAUSE  # the evaluations did take their time ...
    assert clock[-1] < wall - 5 * PAUSE, (clock, wall)  # ... and the clock left them out
    assert clock == sorted(clock)


def test_a_models_training_regularizer_joins_the_loss(tmp_path: Path, cache_dir: Path) -> None:
    """Mixtral's router losses reach the optimizer through qkv train: with their coefficient
    at 0 and at 1 the same run ends with different routers, and everything else trains."""
    routers = []
    for coef in (0.0, 1.0):
        model = {
            "family": "mixtral",
            "d_model": 32,
            "n_layers": 1,
            "n_heads": 4,
            "n_kv_heads": 2,
            "n_experts": 4,
            "top_k": 2,
            "router_aux_loss_coef": coef,
        }
        raw = with_overrides(TINY_GPT, model=model, train={"max_steps": 3, "seed": 0})
        raw["model"] = model
        result = train(config_from_dict(raw), tmp_path / f"run-{coef}", cache_dir=cache_dir)
        weights = qkv.from_pretrained(result.final_dir).state_dict()
        routers.append({k: v for k, v in weights.items() if k.endswith("router.weight")})
    assert routers[0].keys() == routers[1].keys() and routers[0]
    assert any(not torch.equal(routers[0][k], routers[1][k]) for k in routers[0])
