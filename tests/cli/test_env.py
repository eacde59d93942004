"""``qkv env`` end to end: the machine, PyTorch's build and qkv's choices, as text and JSON."""

from __future__ import annotations

import doctest
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import qkv
import qkv._env as env_module
import qkv._kernels as kernels
from qkv.cli.main import main
from qkv.train.loop import autocast_dtype

SECTIONS = {"qkv", "cpu", "torch", "training_precision", "inference_kernels", "kernel_variables"}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["env", *args]) == 0
    return capsys.readouterr().out


def auto_precision() -> str:
    return str(autocast_dtype("auto", torch.device("cpu")) or torch.float32).removeprefix("torch.")


def test_env_prints_versions_precision_and_a_kernel_per_dtype(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run(capsys)
    assert qkv.__version__ in out and torch.__version__ in out
    assert str(torch.backends.cpu.get_cpu_capability()) in out
    assert "training precision (train.precision=auto)" in out
    precision = next(line for line in out.splitlines() if line.strip().startswith("cpu  "))
    assert precision.split()[-1] == auto_precision()
    for dtype in ("float32", "bfloat16", "float16"):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{dtype} "))
        assert line.split(maxsplit=1)[1].startswith(("oneDNN inner product", "F.linear"))


def test_env_json_is_the_same_report(capsys: pytest.CaptureFixture[str]) -> None:
    report = json.loads(run(capsys, "--json"))
    assert set(report) == SECTIONS
    assert report["qkv"]["version"] == qkv.__version__
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["onednn_available"] == torch.backends.mkldnn.is_available()
    assert report["cpu"]["threads"] == torch.get_num_threads()
    assert report["training_precision"]["cpu"] == auto_precision()
    assert report["inference_kernels"]["cpu"] == kernels.kernel_report("cpu")
    assert ("cuda" in report["inference_kernels"]) == torch.cuda.is_available()


def test_env_says_f_linear_for_a_dtype_whose_kernel_fails(
    capsys: pytest.CaptureFixture[str], fresh_probes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("could not create a primitive descriptor for the inner product")
        return F.linear(x, weight, bias)

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_onednn_linear", fake)
    kernels_now = json.loads(run(capsys, "--json"))["inference_kernels"]["cpu"]
    assert kernels_now["float32"].startswith("oneDNN inner product")
    assert kernels_now["bfloat16"].startswith("F.linear (oneDNN not used for bfloat16")
    out = run(capsys)
    line = next(line for line in out.splitlines() if line.strip().startswith("bfloat16 "))
    assert "F.linear" in line and "could not create a primitive descriptor" in line


def test_env_shows_the_variables_that_change_kernels(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    report = json.loads(run(capsys, "--json"))
    assert report["kernel_variables"]["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" in run(capsys)


def test_cpu_features_come_from_cpuinfo_on_x86_and_arm() -> None:
    x86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_tile\n"
    assert env_module.cpu_model(x86) == "Some CPU"
    assert env_module.cpu_features(x86, "x86_64") == {
        "avx2": True,
        "avx512f": True,
        "avx512_bf16": False,
        "amx_tile": True,
        "amx_bf16": False,
    }
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm bf16\nCPU part\t: 0xd40\n"
    assert env_module.cpu_model(arm) is None
    assert env_module.cpu_features(arm, "aarch64") == {"neon": True, "bf16": True, "sve": False}


def test_docstring_examples() -> None:
    result = doctest.testmod(env_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
