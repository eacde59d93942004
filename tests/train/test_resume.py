"""Bit-exact resumption: a run killed with SIGKILL (even mid-checkpoint) and resumed produces
the same per-step losses and final weights as a run that was never interrupted."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qkv._io import TMP_PREFIX
from qkv.train.checkpoint import complete_checkpoints
from qkv.train.metrics import read_metrics

from .helpers import TINY_GPT, run_qkv, with_overrides, write_config

CONFIG = with_overrides(
    TINY_GPT,
    train={"max_steps": 40, "checkpoint_every": 5, "eval_every": 10, "keep_last": 2},
)


def _losses(run: Path) -> list[tuple[str, str, str]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run / "metrics.csv")]


@pytest.mark.slow
def test_sigkill_mid_checkpoint_and_after_a_step_then_resume_is_bit_exact(
    tmp_path: Path, cache_dir: Path
) -> None:
    config = write_config(tmp_path / "toy.yaml", CONFIG)
    common = ["--cache-dir", str(cache_dir), "--quiet"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    done = run_qkv(["train", "--config", str(config), "--out", str(reference), *common])
    assert done.returncode == 0, done.stderr

    # 1. Killed while writing the checkpoint of step 20: step 15 stays the newest complete one.
    killed = run_qkv(["train", "--config", str(config), "--out", str(resumed), *common],
                     kill_at="checkpoint:20")  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = resumed / "checkpoints"
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [10, 15]
    assert any(p.name.startswith(TMP_PREFIX) for p in checkpoints.iterdir())  # half written
    assert len(read_metrics(resumed / "metrics.csv")) == 20  # rows 16..20 are redone

    # 2. Resumed, then killed right after step 33 (between checkpoints).
    killed = run_qkv(["train", "--resume", str(resumed), *common], kill_at="step:33")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [25, 30]
    assert not any(p.name.startswith(TMP_PREFIX) for p in checkpoints.iterdir())  # swept

    # 3. Resumed to the end.
    finished = run_qkv(["train", "--resume", str(resumed), *common])
    assert finished.returncode == 0, finished.stderr

    assert _losses(resumed) == _losses(reference)  # every step's loss and lr, exactly
    assert len(_losses(reference)) == 40
    ours = load_file(str(resumed / "final" / "model.safetensors"))
    theirs = load_file(str(reference / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    rows = read_metrics(resumed / "metrics.csv")
    ref_rows = read_metrics(reference / "metrics.csv")
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in ref_rows]
    samples = (resumed / "samples.txt").read_text().split("=== step 40 ===")[-1]
    assert samples == (reference / "samples.txt").read_text().split("=== step 40 ===")[-1]
