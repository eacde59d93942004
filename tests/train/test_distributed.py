"""Data-parallel training under torchrun (2 gloo processes on the loopback interface) gives
the same losses and weights as one process on the same global batch; and the choice of device
and backend (``train.device``), tried on a pretend GPU machine."""

from __future__ import annotations

import doctest
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import distributed as dist

from qkv.train import distributed
from qkv.train.config import ConfigError
from qkv.train.distributed import choose_backend, setup_distributed
from qkv.train.loop import evaluate_run
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
    # Both runs on the CPU, even on a GPU machine: gloo, and the same arithmetic as the reference.
    "train": {"batch_size": 8, "max_steps": 6, "eval_every": 0, "eval_batches": 1,
              "checkpoint_every": 3, "precision": "fp32", "threads": 1, "device": "cpu"},
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
    # `qkv eval --checkpoint latest` in one process: FSDP's rank shards are joined back.
    latest = evaluate_run(run, checkpoint="latest", cache_dir=cache_dir)
    assert latest == pytest.approx(evaluate_run(run, cache_dir=cache_dir), abs=1e-6)
    one = evaluate_run(reference, checkpoint="latest", cache_dir=cache_dir)
    assert latest["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
    assert latest == pytest.approx(one, rel=1e-5)  # perplexity is exp(loss)


# -- where each process computes: train.device ------------------------------------------------

CPU = ("gloo", torch.device("cpu"))


@pytest.mark.parametrize(
    "device,world_size,local_rank,cuda_count,expected",
    [
        ("auto", 1, 0, 0, CPU),  # one process, no GPU
        ("auto", 1, 0, 1, ("nccl", torch.device("cuda", 0))),  # one process, a GPU
        ("cuda", 1, 0, 2, ("nccl", torch.device("cuda", 0))),
        ("cpu", 1, 0, 1, CPU),  # the CPU although there is a GPU
        ("cpu", 2, 1, 2, CPU),
        ("auto", 2, 0, 2, ("nccl", torch.device("cuda", 0))),  # a GPU per process
        ("auto", 2, 1, 2, ("nccl", torch.device("cuda", 1))),
        ("cuda", 2, 1, 8, ("nccl", torch.device("cuda", 1))),
        ("auto", 2, 1, 0, CPU),  # no GPU at all: the CPU, nothing to say
    ],
)
def test_choose_backend(
    device: str, world_size: int, local_rank: int, cuda_count: int,
    expected: tuple[str, torch.device], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    with caplog.at_level("WARNING", logger="qkv.train.distributed"):
        got = choose_backend(
            device, world_size=world_size, local_rank=local_rank, cuda_count=cuda_count
        )
    assert got == expected
    assert not caplog.records


def test_auto_with_fewer_gpus_than_processes_falls_back_to_the_cpu_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="qkv.train.distributed"):
        assert choose_backend("auto", world_size=2, local_rank=0, cuda_count=1) == CPU
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert "1 CUDA GPU(s) for 2 processes" in message and "gloo" in message
    assert "--nproc_per_node 1" in message and "--device cpu" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="qkv.train.distributed"):
        assert choose_backend("auto", world_size=2, local_rank=1, cuda_count=1) == CPU
    assert not caplog.records  # one note per machine, from local rank 0


def test_local_world_size_counts_the_processes_of_this_machine() -> None:
    # Two machines of two GPUs, two processes each: enough GPUs on every machine.
    got = choose_backend("cuda", world_size=4, local_world_size=2, local_rank=1, cuda_count=2)
    assert got == ("nccl", torch.device("cuda", 1))
    with pytest.raises(ConfigError, match="1 CUDA GPU"):
        choose_backend("cuda", world_size=4, local_world_size=2, cuda_count=1)


@pytest.mark.parametrize(
    "device,world_size,cuda_count,words",
    [
        ("cuda", 1, 0, ["train.device=cuda", "no CUDA GPU is visible", "--device cpu or auto"]),
        ("cuda", 2, 0, ["no CUDA GPU is visible"]),
        ("cuda", 2, 1, ["1 CUDA GPU(s) for 2 processes", "--nproc_per_node 1", "--device cpu"]),
        ("cuda", 8, 4, ["4 CUDA GPU(s) for 8 processes", "--nproc_per_node 4"]),
        ("gpu", 1, 1, ["train.device='gpu'", "auto, cpu, cuda"]),
    ],
)
def test_impossible_device_choices_are_one_line_errors(
    device: str, world_size: int, cuda_count: int, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        choose_backend(device, world_size=world_size, cuda_count=cuda_count)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.fixture
def pretend_gpus(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, object]]:
    """Make this process look like local rank LOCAL_RANK of a torchrun job on a machine with
    ``gpus`` GPUs; returns what the process group and the CUDA device were set up with."""
    calls: dict[str, object] = {}

    def pretend(gpus: int, world_size: int, local_rank: int = 0) -> dict[str, object]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(cuda=d))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(kw))
        monkeypatch.setattr(dist, "get_rank", lambda: local_rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: world_size)
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        return calls

    return pretend


def test_setup_distributed_on_a_pretend_gpu_machine(
    pretend_gpus: Callable[..., dict[str, object]],
) -> None:
    # Two processes, two GPUs: NCCL, rank 1 on GPU 1 (set before the group forms).
    calls = pretend_gpus(gpus=2, world_size=2, local_rank=1)
    ctx = setup_distributed("ddp", "auto")
    assert calls["backend"] == "nccl" and calls["cuda"] == torch.device("cuda", 1)
    assert (ctx.mode, ctx.rank, ctx.world_size) == ("ddp", 1, 2)
    assert ctx.device == torch.device("cuda", 1)


def test_setup_distributed_cpu_on_a_pretend_gpu_machine(
    pretend_gpus: Callable[..., dict[str, object]],
) -> None:
    calls = pretend_gpus(gpus=2, world_size=2)
    ctx = setup_distributed("fsdp", "cpu")
    assert calls == {"backend": "gloo", "timeout": calls["timeout"]}  # no CUDA device touched
    assert ctx.device == torch.device("cpu")


def test_setup_distributed_too_few_gpus(
    pretend_gpus: Callable[..., dict[str, object]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    calls = pretend_gpus(gpus=1, world_size=2)
    with caplog.at_level("WARNING", logger="qkv.train.distributed"):
        ctx = setup_distributed("auto", "auto")
    assert calls["backend"] == "gloo" and "cuda" not in calls
    assert ctx.mode == "ddp" and ctx.device == torch.device("cpu")
    assert "1 CUDA GPU(s) for 2 processes" in caplog.text
    calls.clear()
    with pytest.raises(ConfigError, match=r"1 CUDA GPU\(s\) for 2 processes"):
        setup_distributed("ddp", "cuda")
    assert not calls  # refused before any process group is formed
    # LOCAL_WORLD_SIZE, when torchrun sets it, counts this machine's processes only.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert setup_distributed("ddp", "cuda").device == torch.device("cuda", 0)


def test_setup_distributed_single_process(
    pretend_gpus: Callable[..., dict[str, object]],
) -> None:
    pretend_gpus(gpus=1, world_size=1)
    assert setup_distributed("auto").device == torch.device("cuda", 0)
    assert setup_distributed("none", "cpu").device == torch.device("cpu")
    pretend_gpus(gpus=0, world_size=1)
    assert setup_distributed("auto").device == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible; use --device cpu or auto"):
        setup_distributed("none", "cuda")


def test_docstring_examples() -> None:
    result = doctest.testmod(distributed, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
