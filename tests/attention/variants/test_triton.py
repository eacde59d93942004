"""The Triton kernels (``impl="triton"``) against the reference, on the CPU through Triton's
interpreter and, marked gpu, on CUDA in bfloat16 at T = 1024; which masks they take, and the
errors that name what to do otherwise.

Triton's interpreter is chosen by TRITON_INTERPRET=1 when Triton is first imported, so the
interpreted checks run in a fresh Python process (another test of this run may have imported
Triton already, compiled for a GPU); it reports each case's errors as JSON.

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · E head dim (Ev: of the values).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
from qkv import masks
from qkv.attention.variants.triton_flash import kernel_mask, triton_attention
from tests.attention.test_core import HEADS, make_qkv
from tests.conftest import ATOL, GPU_ATOL, HALF_FACTOR

ROOT = Path(__file__).resolve().parents[3]


def _mask(kind: str, b: int, t: int, s: int) -> torch.Tensor | None:
    """The masks the kernels take, broadcastable to (B, H, T, S)."""
    if kind == "none":
        return None
    if kind == "causal":
        return masks.causal(t, s)
    if kind == "padding":  # right padding, (B, 1, 1, S)
        return masks.padding(torch.tensor([s, max(1, s // 3)]), max_len=s)[:b]
    if kind == "padding_rows":  # the same, spelled out for every query: (B, 1, T, S)
        return _mask("padding", b, t, s).expand(b, 1, t, s).clone()
    if kind == "causal_left_padding":  # causal & left padding: padded queries see no key
        keep = torch.ones(b, s, dtype=torch.long)
        keep[-1, : s - t + 3] = 0
        return masks.causal(t, s) & masks.padding(keep)
    raise AssertionError(kind)


def _compare(impl_fn, q, k, v, mask, grad_out):
    """Output and gradients of q, k, v from ``impl_fn`` and from the float64 reference."""
    results = []
    for fn, cast in ((impl_fn, lambda x: x), (_reference, torch.Tensor.double)):
        inputs = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        out = fn(*inputs, mask)
        grads = torch.autograd.grad(out, inputs, cast(grad_out))
        results.append([out.detach(), *grads])
    return results


def _reference(q, k, v, mask):
    return qkv.scaled_dot_product_attention(q, k, v, mask, impl="reference")


def _triton(q, k, v, mask, **blocks):
    out, _ = triton_attention(q, k, v, mask, bias=None, scale=None, dropout_p=0.0, **blocks)
    return out


def interpreted_cases() -> dict[str, object]:
    """Run in a fresh process with TRITON_INTERPRET=1 (see ``interpreted``): every case's worst
    error against the float64 reference, relative to its tolerance (<= 1 passes)."""
    torch.manual_seed(int(os.environ["QKV_TEST_SEED"]))
    report: dict[str, object] = {}
    triton = functools.partial(_triton, block_m=16, block_n=16)
    names = ["output", "dq", "dk", "dv"]
    # float32: every mask kind with grouped heads, T = S = 20 (two 16-blocks, the second
    # partial); MHA and MQA; decoding shapes (T < S) with an odd head size (E = 12, Ev = 8).
    # Few heads and cases: the interpreter runs every program one after the other, in NumPy.
    cases = [(kind, "gqa", 20, 20, 16, 16) for kind in MASKS]
    cases += [("causal_left_padding", heads, 20, 20, 16, 16) for heads in ("mha", "mqa")]
    cases += [(kind, "gqa", 5, 37, 12, 8) for kind in ("causal", "causal_left_padding")]
    for kind, heads, t, s, e, ev in cases:
        h, kv = SMALL_HEADS[heads]
        q, k, _ = make_qkv(2, h, kv, t, s, e, torch.float32)
        v = torch.randn(2, kv, s, ev)
        mask = _mask(kind, 2, t, s)
        got, exact = _compare(triton, q, k, v, mask, torch.randn(2, h, t, ev))
        worst = max(
            (g.double() - x).abs().max().item()
            / (ATOL[torch.float32] * max(1, x.abs().max().item()))
            for g, x in zip(got, exact, strict=True)
        )
        report[f"float32-{kind}-{heads}-T{t}-S{s}"] = worst
        if kind == "causal_left_padding":  # the queries that see nothing: zero, zero gradient
            empty = ~mask.any(-1).squeeze(1)  # (B, T)
            report[f"empty-rows-are-zero-{heads}-T{t}"] = float(
                sum(x.transpose(1, 2)[empty].abs().sum().item() for x in got[:2])
            )
    # float16: the error against float64 at most HALF_FACTOR times the reference's own.
    for kind in ("causal", "causal_left_padding"):
        h, kv = SMALL_HEADS["gqa"]
        q, k, v = (x.half() for x in make_qkv(2, h, kv, 24, 24, 16))
        mask, grad_out = _mask(kind, 2, 24, 24), torch.randn(2, h, 24, 16).half()
        fast, exact = _compare(triton, q, k, v, mask, grad_out)
        ref, _ = _compare(_reference, q, k, v, mask, grad_out)
        for name, f, r, x in zip(names, fast, ref, exact, strict=True):
            ratio = (f.double() - x).abs().max().item() / (r.double() - x).abs().max().item()
            report[f"float16-{kind}-{name}"] = ratio / HALF_FACTOR
    # 3-D inputs (B, T, E), one head.
    q, k, v = make_qkv(2, 1, 1, 9, 9, 8, torch.float32)
    got, exact = _compare(triton, q[:, 0], k[:, 0], v[:, 0], masks.causal(9), torch.randn(2, 9, 8))
    report["float32-3d-causal"] = max(
        (g.double() - x).abs().max().item() / ATOL[torch.float32]
        for g, x in zip(got, exact, strict=True)
    )
    # Through the dispatcher, with the default (interpreter) blocks.
    q, k, v = make_qkv(1, 2, 2, 7, 7, 4, torch.float32)
    out = qkv.scaled_dot_product_attention(q, k, v, masks.causal(7), impl="triton")
    exact = _reference(q.double(), k.double(), v.double(), masks.causal(7))
    report["dispatcher"] = (out.double() - exact).abs().max().item() / ATOL[torch.float32]
    # bfloat16 products are wrong in Triton's interpreter (triton-lang/triton#11584): refused.
    try:
        triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
        report["bfloat16-refused"] = "ran"
    except TypeError as error:
        report["bfloat16-refused"] = str(error)
    return report


MASKS = ["none", "causal", "padding", "padding_rows", "causal_left_padding"]
SMALL_HEADS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (3, 1)}  # (H, K)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, object]:
    """``interpreted_cases()`` run by a fresh Python with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "QKV_TEST_SEED": str(torch.seed() % 2**31)}
    code = (
        "import json; from tests.attention.variants.test_triton import interpreted_cases; "
        "print(json.dumps(interpreted_cases()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.requires("triton")
def test_interpreted_kernels_match_the_reference(interpreted: dict[str, object]) -> None:
    """Forward and backward, float32 within ATOL and float16 within HALF_FACTOR (all in one
    process: starting Python with torch and Triton costs seconds)."""
    errors = {name: e for name, e in interpreted.items() if isinstance(e, float)}
    assert len(errors) >= 15
    failing = {
        name: e
        for name, e in errors.items()
        if not e <= 1.0 or (name.startswith("empty-rows") and e != 0.0)
    }
    assert not failing, f"error / tolerance above 1: {failing}"


@pytest.mark.requires("triton")
def test_interpreter_refuses_bfloat16_with_the_reason(interpreted: dict[str, object]) -> None:
    assert "interpreter" in str(interpreted["bfloat16-refused"])
    assert "11584" in str(interpreted["bfloat16-refused"])


# -- which masks the kernels take ----------------------------------------------------------------
def test_kernel_mask_recognises_causal_and_key_padding() -> None:
    q_shape = torch.Size((2, 4, 6, 8))  # (B, H, T, E)
    assert kernel_mask(None, q_shape, 9) == (False, None)
    assert kernel_mask(masks.causal(6, 9), q_shape, 9) == (True, None)
    assert kernel_mask(torch.ones(6, 9, dtype=torch.bool), q_shape, 9) == (False, None)
    padding = masks.padding(torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 8 + [0]]))
    for mask, causal in ((padding, False), (masks.causal(6, 9) & padding, True)):
        got_causal, keep = kernel_mask(mask, q_shape, 9)
        assert got_causal == causal
        assert keep is not None and keep.shape == (2, 9)  # (N, S): one row of flags per batch
        assert torch.equal(keep.bool(), padding[:, 0, 0])


@pytest.mark.parametrize("kind", ["sliding_window", "random", "empty_row", "per_head", "prefix"])
def test_other_masks_raise_and_name_tiled(kind: str) -> None:
    b, h, t, s = 2, 4, 6, 9
    mask = {
        "sliding_window": masks.sliding_window(t, 3, s),
        "random": torch.rand(b, 1, t, s) > 0.5,
        "empty_row": masks.causal(t, s) & (torch.arange(t) != 2)[:, None],
        "per_head": masks.causal(t, s) & (torch.rand(1, h, 1, s) > 0.5),
        "prefix": masks.prefix_lm(3, t),
    }[kind]
    q, k, v = make_qkv(b, h, h, t, t if kind == "prefix" else s, 8, torch.float32)
    with pytest.raises(ValueError, match="impl='tiled'"):
        _triton(q, k, v, mask)


@pytest.mark.parametrize("kwargs", [{"bias": torch.zeros(3, 3)}, {"dropout_p": 0.1}])
def test_bias_and_dropout_raise_and_name_tiled(kwargs: dict[str, object]) -> None:
    q = torch.randn(1, 3, 4)
    args = {"bias": None, "scale": None, "dropout_p": 0.0, **kwargs}
    with pytest.raises(ValueError, match="impl='tiled'"):
        triton_attention(q, q, q, None, **args)


def test_without_triton_qkv_imports_and_the_error_names_the_install() -> None:
    """A fresh Python in which ``import triton`` fails, as on a machine without it."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, qkv\n"
        "from qkv.attention.variants.triton_flash import triton_attention\n"
        "assert 'triton' not in qkv.available_backends(), qkv.available_backends()\n"
        "q = torch.randn(1, 3, 4)\n"
        "try:\n"
        "    triton_attention(q, q, q, None, bias=None, scale=None, dropout_p=0.0)\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "pip install 'qkv[gpu]'" in run.stdout


@pytest.mark.requires("triton")
def test_cpu_tensors_without_the_interpreter_name_the_setting() -> None:
    code = (
        "import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import qkv\n"
        "assert 'triton' in qkv.available_backends()\n"
        "q = torch.randn(1, 3, 4)\n"
        "try:\n"
        "    qkv.scaled_dot_product_attention(q, q, q, impl='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "TRITON_INTERPRET=1" in run.stdout and "impl='tiled'" in run.stdout


# -- on a GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.requires("triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["causal", "causal_left_padding", "padding"])
def test_cuda_kernels_match_the_reference_at_t_1024(
    dtype: torch.dtype, kind: str, gpu_device: torch.device
) -> None:
    """Compiled kernels, default blocks, GQA, T = S = 1024: output and gradients. Half
    precision: at most HALF_FACTOR times the reference's error; float32: within GPU_ATOL."""
    if gpu_device.type != "cuda":
        pytest.skip("compiled Triton kernels need CUDA; the interpreter test covers the CPU")
    h, kv = HEADS["gqa"]
    b, t, e = 2, 1024, 64
    q, k, v = (x.to(dtype).to(gpu_device) for x in make_qkv(b, h, kv, t, t, e))
    mask = _mask(kind, b, t, t)
    mask = None if mask is None else mask.to(gpu_device)
    grad_out = torch.randn(b, h, t, e).to(dtype).to(gpu_device)
    fast, exact = _compare(_triton, q, k, v, mask, grad_out)
    ref, _ = _compare(_reference, q, k, v, mask, grad_out)
    for name, f, r, x in zip(["output", "dq", "dk", "dv"], fast, ref, exact, strict=True):
        assert f.dtype == dtype and f.is_cuda
        fast_err = (f.double() - x).abs().max().item()
        if dtype == torch.float32:
            assert fast_err <= GPU_ATOL[torch.float32] * max(1.0, x.abs().max().item()), name
        else:
            ref_err = (r.double() - x).abs().max().item()
            assert fast_err <= HALF_FACTOR * ref_err, (name, fast_err, ref_err)
