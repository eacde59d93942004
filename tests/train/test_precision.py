"""``train.precision=auto`` on every kind of CPU: bfloat16 autocast only where it is native and
PyTorch's kernels run it, float32 elsewhere (emulated bfloat16 is slower than float32)."""

from __future__ import annotations

import pytest
import torch

import qkv.train.build as build
from qkv.train.loop import autocast_dtype

CPU = torch.device("cpu")
AVX2 = "flags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512_BF16 = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16\n"


@pytest.mark.parametrize(
    ("cpuinfo", "onednn_bf16", "expected"),
    [
        (AVX512_BF16, True, torch.bfloat16),  # native and usable
        (AVX512_BF16, False, None),  # native, but oneDNN refuses bf16 (capped ISA)
        (AVX2, True, None),  # emulated: float32 is faster
        ("", True, None),  # no /proc/cpuinfo (macOS, Windows): nothing known, float32
    ],
)
def test_auto_picks_bf16_only_where_it_is_native_and_runs(
    monkeypatch: pytest.MonkeyPatch,
    cpuinfo: str,
    onednn_bf16: bool,
    expected: torch.dtype | None,
) -> None:
    monkeypatch.setattr(build, "_cpuinfo", lambda: cpuinfo)
    monkeypatch.setattr(build, "onednn_available", lambda dtype=torch.float32: onednn_bf16)
    assert autocast_dtype("auto", CPU) == expected
    # An explicit choice is obeyed on every CPU.
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16
