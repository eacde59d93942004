"""Training on a GPU: bfloat16 autocast learns a small synthetic task, and a run stopped after a
checkpoint and resumed ends exactly where one uninterrupted run ends.

Run on the ``gpu_device`` (``QKV_TEST_DEVICE=cpu`` runs them on the CPU, to check them on a
machine without a GPU). ``train.device`` and ``train.deterministic`` are set when this version
of ``LoopConfig`` has them; without ``train.device`` the trainer takes CUDA whenever there is one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qkv.train import TrainCallback, config_from_dict, train
from qkv.train.config import LoopConfig
from qkv.train.metrics import read_metrics

from .helpers import TINY_GPT, with_overrides

pytestmark = pytest.mark.gpu

LOOP_FIELDS = {f.name for f in dataclasses.fields(LoopConfig)}

# The 2017 Transformer copying strings of up to 10 letters ("qmvxe" -> "qmvxe").
COPY_TASK: dict[str, Any] = {
    "preset": "gpu-copy",
    "model": {"family": "transformer", "d_model": 32, "n_encoder_layers": 1,
              "n_decoder_layers": 1, "n_heads": 4, "d_ff": 64, "dropout": 0.0},
    "data": {"kind": "seq2seq", "corpus": "copy", "tokenizer": "char", "seq_len": 12,
             "num_examples": 16},
    "optim": {"lr": 3.0e-3, "weight_decay": 0.0},
    "schedule": {"warmup_steps": 2},
    "train": {"batch_size": 16, "max_steps": 20, "eval_every": 0, "eval_batches": 1,
              "checkpoint_every": 0, "threads": 1},
    "eval": {"generate_examples": 4, "max_new_tokens": 8},
}  # fmt: skip


def _on(device: torch.device, run: dict[str, Any], **loop: Any) -> dict[str, Any]:
    """``run`` with ``loop`` in its train section, trained on ``device``."""
    if "device" in LOOP_FIELDS:
        loop["device"] = device.type
    elif device.type == "cpu" and torch.cuda.is_available():
        pytest.skip("this trainer has no train.device and takes the GPU whenever there is one")
    return with_overrides(run, train=loop)


def _cuda_allocations() -> int:
    """How many CUDA allocations this process has made so far (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


@contextlib.contextmanager
def _ran_on(device: torch.device) -> Iterator[None]:
    """Check that the block computed on ``device``: it allocated CUDA memory if, and only if,
    ``device`` is a GPU."""
    before = _cuda_allocations()
    yield
    used_cuda = _cuda_allocations() > before
    assert used_cuda == (device.type == "cuda"), f"the run did not train on {device}"


def test_bf16_autocast_learns_a_synthetic_task(
    gpu_device: torch.device, tmp_path: Path, cache_dir: Path
) -> None:
    config = config_from_dict(_on(gpu_device, COPY_TASK, precision="bf16"))
    with _ran_on(gpu_device):
        result = train(config, tmp_path / "run", cache_dir=cache_dir)
    assert result.steps == 20
    losses = [float(r["loss"]) for r in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses), losses
    # About 4.0 nats at the first step, 3.2 by the 20th (measured on the CPU).
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses
    assert math.isfinite(result.metrics["val_loss"])
    assert result.final_dir is not None
    weights = load_file(str(result.final_dir / "model.safetensors"))
    # Autocast computes in bfloat16; the weights it updates stay float32.
    assert all(w.dtype == torch.float32 for w in weights.values())


class _Stop(Exception):
    """Stands for the end of a process (a crash, a lost machine)."""


class _StopAfterCheckpoint(TrainCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.step:
            raise _Stop(f"stopped after the checkpoint of step {step}")


@contextlib.contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    """PyTorch's deterministic kernels for the block, for a trainer without
    ``train.deterministic``: some CUDA backward kernels (scatter-adds, attention) add in
    whatever order their threads finish, so two runs may differ in the last bits."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS: a fixed reduction order
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_a_stopped_and_resumed_run_equals_one_run(
    gpu_device: torch.device, tmp_path: Path, cache_dir: Path
) -> None:
    loop: dict[str, Any] = {"max_steps": 12, "checkpoint_every": 6, "eval_every": 6,
                            "precision": "bf16"}  # fmt: skip
    if "deterministic" in LOOP_FIELDS:
        loop["deterministic"] = True
    # Dropout stays on (TINY_GPT's 0.1): the resumed run must restore the device's RNG too.
    config = config_from_dict(_on(gpu_device, TINY_GPT, **loop))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    deterministic = (
        contextlib.nullcontext() if "deterministic" in LOOP_FIELDS else _deterministic_algorithms()
    )
    with deterministic, _ran_on(gpu_device):
        train(config, reference, cache_dir=cache_dir)
        with pytest.raises(_Stop):
            train(config, resumed, cache_dir=cache_dir, callback=_StopAfterCheckpoint(6))
        assert len(read_metrics(resumed / "metrics.csv")) == 6
        train(config, resumed, resume=True, cache_dir=cache_dir)

    def rows(run: Path) -> list[tuple[str, str, str, str]]:
        return [(r["step"], r["loss"], r["lr"], r.get("val_loss", ""))
                for r in read_metrics(run / "metrics.csv")]  # fmt: skip

    assert len(rows(reference)) == 12
    assert rows(resumed) == rows(reference)  # every step's loss and lr, and each val_loss, exactly
    ours = load_file(str(resumed / "final" / "model.safetensors"))
    theirs = load_file(str(reference / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    samples = (resumed / "samples.txt").read_text().split("=== step 12 ===")[-1]
    assert samples == (reference / "samples.txt").read_text().split("=== step 12 ===")[-1]
