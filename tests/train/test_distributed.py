"""Data-parallel training under torchrun (2 gloo processes on the loopback interface) gives
the same losses and weights as one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qkv.train.metrics import read_metrics

from .helpers import ROOT, run_qkv, write_config

# Seq2seq with padding: the two ranks see different numbers of real target tokens per step.
CONFIG = {
    "preset": "toy-dates",
    # T5 has no biases: a key bias gets an analytically zero gradient (softmax ignores a shift
    # of all scores), and Adam turns that gradient's rounding noise into O(lr) updates that
    # differ between any two summation orders.
    "model": {"family": "t5", "d_model": 32, "n_layers": 1, "n_heads": 4, "d_kv": 8,
              "d_ff": 64, "dropout": 0.0},
    "data": {"kind": "seq2seq", "corpus": "dates", "seq_len": 32, "num_examples": 16},
    # Adam divides by sqrt(v) + eps: for a gradient near zero (an embedding row of a token the
    # batch barely uses) that amplifies float rounding; a larger eps keeps it at rounding size.
    "optim": {"lr": 3.0e-3, "eps": 1.0e-6},
    "schedule": {"warmup_steps": 2},
    "train": {"batch_size": 8, "max_steps": 6, "eval_every": 0, "eval_batches": 1,
              "checkpoint_every": 3, "precision": "fp32", "threads": 1},
    "eval": {"generate_examples": 4, "max_new_tokens": 12},
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "qkv", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def _compare(run: Path, reference: Path) -> None:
    ours, ref = read_metrics(run / "metrics.csv"), read_metrics(reference / "metrics.csv")
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    for a, b in zip(ours, ref, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-6)
        assert int(a["tokens"]) == int(b["tokens"])
    assert float(ours[-1]["val_loss"]) == pytest.approx(float(ref[-1]["val_loss"]), abs=1e-6)
    weights = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(reference / "final" / "model.safetensors"))
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process(mode: str, tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "toy.yaml", CONFIG)
    common = ["--config", str(config), "--cache-dir", str(cache_dir), "--quiet"]
    reference = tmp_path / "one"
    single = run_qkv(["train", *common, "--out", str(reference)])
    assert single.returncode == 0, single.stderr
    run = tmp_path / mode
    # Two ranks, each splitting its half of the batch into two micro-batches.
    both = _torchrun(["train", *common, "--out", str(run), "--train.distributed", mode,
                      "--train.grad_accum", "2"])  # fmt: skip
    assert both.returncode == 0, both.stderr[-3000:]
    _compare(run, reference)
    assert (run / "checkpoints").is_dir() and (run / "loss.png").is_file()
