"""``qkv._kernels.inference_linear`` against ``F.linear``, on both sides of its size threshold,
and its per-dtype choice of kernel: a dtype whose oneDNN kernel fails here takes ``F.linear``."""

from __future__ import annotations

import doctest
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import qkv._kernels as kernels
from qkv._kernels import (
    ONEDNN_MIN_ENTRIES,
    bound_linear,
    inference_kernel_name,
    inference_linear,
    kernel_report,
    linear_kernel,
    onednn_available,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")

# (out, in): under the threshold (F.linear) and over it (oneDNN where available).
SHAPES = [(48, 32), (1024, 512), (600, 700)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (5,), (2, 3)])
def test_inference_linear_equals_f_linear_in_float32(
    shape: tuple[int, int], bias: bool, rows: tuple[int, ...]
) -> None:
    n_out, n_in = shape
    weight = torch.randn(n_out, n_in) / n_in**0.5
    b = torch.randn(n_out) if bias else None
    x = torch.randn(*rows, n_in)
    with torch.inference_mode():
        fast = inference_linear(x, weight, b)
        bound = bound_linear(weight, b)(x)
    reference = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert fast.shape == (*rows, n_out) and fast.dtype == torch.float32
    # Both kernels sum n_in float32 products of size ~1: rounding stays near 1e-6.
    torch.testing.assert_close(fast.double(), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(bound, fast, atol=0, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_inference_linear_in_bfloat16_is_as_close_as_f_linear(shape: tuple[int, int]) -> None:
    n_out, n_in = shape
    weight = (torch.randn(n_out, n_in) / n_in**0.5).bfloat16()
    b = torch.randn(n_out).bfloat16()
    x = torch.randn(3, n_in).bfloat16()
    exact = F.linear(x.double(), weight.double(), b.double())
    with torch.inference_mode():
        fast_err = (inference_linear(x, weight, b).double() - exact).abs().max()
        plain_err = (F.linear(x, weight, b).double() - exact).abs().max()
    # Both round their output to bfloat16 (8 bits of mantissa): within a few of its steps.
    assert fast_err <= max(2 * plain_err, 2.0**-6)


@needs_onednn
def test_kernel_choice_follows_size_dtype_and_layout() -> None:
    big = torch.randn(ONEDNN_MIN_ENTRIES // 256, 256)  # exactly the threshold
    small = torch.randn(ONEDNN_MIN_ENTRIES // 256 - 1, 256)
    assert linear_kernel(big) is not F.linear
    # bfloat16 has its own check: on x86 CPUs without AVX-512, oneDNN has no bfloat16 kernel.
    assert (linear_kernel(big.bfloat16()) is not F.linear) == onednn_available(torch.bfloat16)
    assert linear_kernel(small) is F.linear
    assert linear_kernel(big.double()) is F.linear  # no oneDNN kernel for float64
    assert linear_kernel(big.t()) is F.linear  # not contiguous
    assert linear_kernel(big, torch.zeros(big.shape[0], dtype=torch.float64)) is F.linear


def test_other_dtypes_and_mixed_inputs_fall_back_to_f_linear() -> None:
    weight = torch.randn(1024, 512, dtype=torch.float64)
    x = torch.randn(2, 512, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(inference_linear(x, weight), F.linear(x, weight), atol=0, rtol=0)
        with pytest.raises(RuntimeError):  # a dtype mismatch is F.linear's clear error
            inference_linear(x.float(), weight)


def test_with_gradients_wanted_it_is_f_linear_and_gradients_flow() -> None:
    weight = torch.randn(1024, 512, requires_grad=True)
    x = torch.randn(2, 512, requires_grad=True)
    inference_linear(x, weight).sum().backward()
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    F.linear(x, weight).sum().backward()
    torch.testing.assert_close(grads[0], x.grad, atol=0, rtol=0)
    torch.testing.assert_close(grads[1], weight.grad, atol=0, rtol=0)


def test_without_onednn_it_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    kernels._onednn_probe.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="qkv._kernels"):
            assert not onednn_available()
        assert "no oneDNN" in caplog.text and "torch.nn.functional.linear" in caplog.text
        weight = torch.randn(1024, 512)
        assert linear_kernel(weight) is F.linear
        x = torch.randn(3, 512)
        torch.testing.assert_close(inference_linear(x, weight), F.linear(x, weight))
    finally:
        kernels._onednn_probe.cache_clear()  # the next caller probes the real build again


# -- the per-dtype check ----------------------------------------------------------------------

ONEDNN_ERROR = (
    "could not create a primitive descriptor for the inner product forward propagation "
    "primitive. Run workload with environment variable ONEDNN_VERBOSE=all to get additional "
    "diagnostic information."
)  # what PyTorch's bfloat16 oneDNN linear raises on x86 CPUs with AVX2 and no AVX-512


def _fake_onednn(broken: torch.dtype, failure: str) -> kernels.LinearKernel:
    """A stand-in for oneDNN's kernel, on every machine (with or without oneDNN): ``F.linear``
    for every dtype but ``broken``, where it raises oneDNN's error or returns a wrong result."""

    def fake(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if weight.dtype != broken:
            return F.linear(x, weight, bias)
        if failure == "raises":
            raise RuntimeError(ONEDNN_ERROR)
        return F.linear(x, weight, bias) + 1.0  # off by one everywhere

    return fake


@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_a_dtype_whose_onednn_kernel_fails_alone_falls_back_to_f_linear_with_one_warning(
    failure: str,
    fresh_probes: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    fake = _fake_onednn(torch.bfloat16, failure)
    monkeypatch.setattr(kernels, "_onednn_linear", fake)
    big = torch.randn(1024, 512) / 512**0.5
    x = torch.randn(3, 512)
    with caplog.at_level("WARNING", logger="qkv._kernels"), torch.inference_mode():
        # float32 still takes the (fake) oneDNN kernel: the bfloat16 failure is not its own.
        assert linear_kernel(big) is fake and onednn_available(torch.float32)
        for _ in range(3):  # checked once: later products ask the cache
            assert linear_kernel(big.bfloat16()) is F.linear
            assert not onednn_available(torch.bfloat16)
            bound = bound_linear(big.bfloat16())(x.bfloat16())
            fast = inference_linear(x.bfloat16(), big.bfloat16())
            plain = F.linear(x.bfloat16(), big.bfloat16())
            torch.testing.assert_close(fast, plain, atol=0, rtol=0)
            torch.testing.assert_close(bound, plain, atol=0, rtol=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    message = warnings[0]
    assert "bfloat16" in message and "float32" not in message
    assert "torch.ops.mkldnn._linear_pointwise" in message  # both paths are named
    assert "torch.nn.functional.linear" in message
    expected = "could not create a primitive descriptor" if failure == "raises" else "differed"
    assert expected in message
    assert "ONEDNN_VERBOSE" not in message  # oneDNN's advice on its debug output is cut
    report = kernel_report()
    assert report["float32"].startswith("oneDNN inner product")
    assert report["bfloat16"].startswith("F.linear (oneDNN not used for bfloat16")
    assert expected in report["bfloat16"]


def test_the_check_runs_once_per_dtype_on_a_product_over_the_threshold(
    fresh_probes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    seen: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...]]] = []

    def spy(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        seen.append((weight.dtype, tuple(weight.shape), tuple(x.shape)))
        return F.linear(x, weight, bias)

    monkeypatch.setattr(kernels, "_onednn_linear", spy)
    with torch.inference_mode():
        for _ in range(2):
            for dtype in (torch.float32, torch.bfloat16):
                inference_linear(torch.randn(1, 512, dtype=dtype), torch.randn(1024, 512).to(dtype))
    probed = [(dtype, shape) for dtype, shape, rows in seen if rows[0] > 1]  # not our 1-row calls
    assert {dtype for dtype, _ in probed} == {torch.float32, torch.bfloat16}
    assert len(probed) == 2  # each dtype checked once (with a one-row and a several-row input)
    assert all(shape[0] * shape[1] >= ONEDNN_MIN_ENTRIES for _, shape in probed)


def test_a_first_use_under_autocast_checks_the_dtype_itself(
    fresh_probes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exact(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = x.double() @ weight.double().T  # float64: autocast leaves it alone
        return (out if bias is None else out + bias.double()).to(weight.dtype)

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_onednn_linear", exact)
    # Autocast would run the check's F.linear in bfloat16 and fail a correct float32 kernel.
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        assert onednn_available(torch.float32)


def test_other_dtypes_and_devices_are_reported_as_f_linear_without_a_check() -> None:
    assert not onednn_available(torch.float64) and not onednn_available(torch.float16)
    assert inference_kernel_name(torch.float16).startswith("F.linear")
    assert inference_kernel_name(torch.float32, "cuda").startswith("F.linear")
    assert set(kernel_report()) == {"float32", "bfloat16", "float16"}
    assert kernel_report()["float32"] == inference_kernel_name(torch.float32)


def test_docstring_examples() -> None:
    result = doctest.testmod(kernels, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- a CPU with AVX2 and no AVX-512, emulated -------------------------------------------------

# oneDNN and PyTorch's own kernels then use at most AVX2 (oneDNN has no bfloat16 inner product
# there), which is how the bfloat16 failure was found: this runs it on any x86 machine.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
needs_x86 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"),
    reason=f"emulating an AVX2-only CPU needs an x86 CPU (this one is {platform.machine()})",
)


def _run_as_avx2_only(script: str) -> dict[str, Any]:
    """Run ``script`` in a fresh Python with AVX-512 hidden; its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, **AVX2_ONLY},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def _fell_back_if_unusable(result: dict[str, Any]) -> None:
    """Where bfloat16's kernel is unusable (here: always, on PyTorch 2.x's oneDNN), the run
    said so once, naming the dtype."""
    stderr = str(result["stderr"])
    if not result["bf16_onednn"]:
        assert stderr.count("not used for bfloat16") == 1, stderr
    assert "not used for float32" not in stderr


@needs_x86
def test_bfloat16_inference_linear_works_on_a_cpu_without_avx512() -> None:
    result = _run_as_avx2_only(
        """
        import json, logging, torch
        import torch.nn.functional as F
        from qkv._kernels import inference_linear, onednn_available

        logging.basicConfig()
        weight = (torch.randn(1024, 512) / 512**0.5).bfloat16()  # over the oneDNN threshold
        bias, x = torch.randn(1024).bfloat16(), torch.randn(3, 512).bfloat16()
        exact = F.linear(x.double(), weight.double(), bias.double())
        with torch.inference_mode():
            fast = (inference_linear(x, weight, bias).double() - exact).abs().max().item()
            plain = (F.linear(x, weight, bias).double() - exact).abs().max().item()
        print(json.dumps({
            "capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_onednn": onednn_available(torch.bfloat16), "fast": fast, "plain": plain,
        }))
        """
    )
    assert result["capability"] == "AVX2"
    assert result["fast"] <= max(2 * result["plain"], 2.0**-6)  # as test_..._in_bfloat16 above
    _fell_back_if_unusable(result)


@needs_x86
def test_a_bfloat16_gpt_generates_on_a_cpu_without_avx512() -> None:
    result = _run_as_avx2_only(
        """
        import json, logging, torch
        import torch.nn.functional as F
        import qkv
        import qkv._kernels as kernels
        from qkv.models import GPTConfig

        logging.basicConfig()
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=64, d_model=512, n_layers=1, n_heads=8)
        model = qkv.GPT(config).to(torch.bfloat16).eval()
        prompt = torch.tensor([[1, 2, 3]])
        tokens = model.generate(prompt, max_new_tokens=4)
        # The same model with every product on F.linear (the fallback, taken everywhere).
        kernels.linear_kernel = lambda weight, bias=None: F.linear
        plain = model.generate(prompt, max_new_tokens=4)
        print(json.dumps({
            "bf16_onednn": kernels.onednn_available(torch.bfloat16),
            "tokens": tokens.tolist(), "plain": plain.tolist(),
        }))
        """
    )
    tokens = result["tokens"]
    assert isinstance(tokens, list) and len(tokens[0]) == 3 + 4 and tokens[0][:3] == [1, 2, 3]
    if not result["bf16_onednn"]:  # bfloat16 took F.linear throughout: the very same tokens
        assert tokens == result["plain"]
    _fell_back_if_unusable(result)
