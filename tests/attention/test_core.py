"""Scaled dot-product attention: the reference, the fused path and the NumPy oracle agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv import masks, numpy_ref
from qkv.attention import backends
from tests.conftest import ATOL, DTYPES, HALF_FACTOR

IMPLS = ["reference", "sdpa"]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
MASK_KINDS = ["none", "causal", "padding", "prefix_lm", "sliding_window", "random", "empty_row"]


def make_mask(kind: str, b: int, t: int, s: int) -> torch.Tensor | None:
    """A boolean mask of the given kind, broadcastable to (B, H, T, S)."""
    if kind == "none":
        return None
    if kind == "causal":
        return masks.causal(t, s)
    if kind == "padding":
        lengths = torch.randint(1, s + 1, (b,))
        return masks.padding(lengths, max_len=s)
    if kind == "prefix_lm":
        return masks.prefix_lm(min(3, t), t) if t == s else masks.causal(t, s)
    if kind == "sliding_window":
        return masks.sliding_window(t, 3, s)
    if kind == "random":
        return torch.rand(b, 1, t, s) > 0.4
    if kind == "empty_row":  # some queries see no key at all
        m = masks.causal(t, s).expand(b, 1, t, s).clone()
        m[:, :, 0] = False
        return m
    raise AssertionError(kind)


def make_qkv(
    b: int, h: int, kv: int, t: int, s: int, e: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.randn(b, h, t, e, dtype=dtype),
        torch.randn(b, kv, s, e, dtype=dtype),
        torch.randn(b, kv, s, e, dtype=dtype),
    )


def oracle(q, k, v, mask=None, bias=None, scale=None) -> torch.Tensor:
    """The NumPy float64 result, as a tensor."""
    out, _ = numpy_ref.scaled_dot_product_attention(
        q.double().numpy(),
        k.double().numpy(),
        v.double().numpy(),
        None if mask is None else mask.numpy(),
        bias=None if bias is None else bias.double().numpy(),
        scale=scale,
    )
    return torch.from_numpy(out)


def test_two_tokens_worked_by_hand() -> None:
    # One head, E = 2. q = [1, 0]; keys [1, 0] and [0, 1]; scores 1/sqrt(2) and 0.
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    a = math.exp(1 / math.sqrt(2))
    w0, w1 = a / (a + 1), 1 / (a + 1)  # softmax([0.7071, 0]) = [0.6698, 0.3302]
    for impl in IMPLS:
        out = qkv.scaled_dot_product_attention(q, k, v, impl=impl)
        torch.testing.assert_close(out, torch.tensor([[10 * w0, 10 * w1]]), atol=1e-6, rtol=0)
    _, weights = qkv.scaled_dot_product_attention(q, k, v, return_weights=True)
    torch.testing.assert_close(weights, torch.tensor([[w0, w1]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_float32_matches_numpy(impl: str, heads: str, mask_kind: str, with_bias: bool) -> None:
    h, kv = HEADS[heads]
    b, t, s, e = 2, 7, 7 if mask_kind == "prefix_lm" else 11, 16
    q, k, v = make_qkv(b, h, kv, t, s, e, torch.float32)
    mask = make_mask(mask_kind, b, t, s)
    bias = torch.randn(h, t, s) if with_bias else None
    out = qkv.scaled_dot_product_attention(q, k, v, mask, bias=bias, impl=impl)
    expected = oracle(q, k, v, mask, bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_half_precision_error_rule(
    dtype: torch.dtype, heads: str, mask_kind: str, with_bias: bool
) -> None:
    """Fast path's error vs float64 is at most HALF_FACTOR x the reference path's own error."""
    h, kv = HEADS[heads]
    b, t, s, e = 2, 16, 16 if mask_kind == "prefix_lm" else 24, 32
    q, k, v = make_qkv(b, h, kv, t, s, e)  # float64 originals
    mask = make_mask(mask_kind, b, t, s)
    bias = torch.randn(h, t, s, dtype=torch.float64) if with_bias else None
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    bh = None if bias is None else bias.to(dtype)
    exact = oracle(qh, kh, vh, mask, bh)  # float64 on the same rounded inputs
    ref = qkv.scaled_dot_product_attention(qh, kh, vh, mask, bias=bh, impl="reference")
    fast = qkv.scaled_dot_product_attention(qh, kh, vh, mask, bias=bh, impl="sdpa")
    assert ref.dtype == fast.dtype == dtype
    ref_err = (ref.double() - exact).abs().max().item()
    fast_err = (fast.double() - exact).abs().max().item()
    assert fast_err <= HALF_FACTOR * ref_err, (fast_err, ref_err)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mask_kind", ["none", "causal", "random", "empty_row"])
def test_sdpa_gradients_match_reference(heads: str, mask_kind: str) -> None:
    h, kv = HEADS[heads]
    b, t, s, e = 2, 6, 9, 8
    base = make_qkv(b, h, kv, t, s, e, torch.float32)
    mask = make_mask(mask_kind, b, t, s)
    bias = torch.randn(h, t, s)
    grads = {}
    for impl in IMPLS:
        q, k, v = (x.clone().requires_grad_() for x in base)
        bb = bias.clone().requires_grad_()
        out = qkv.scaled_dot_product_attention(q, k, v, mask, bias=bb, impl=impl)
        out.backward(torch.ones_like(out))
        grads[impl] = [x.grad for x in (q, k, v, bb)]
    for g_ref, g_fast in zip(grads["reference"], grads["sdpa"], strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_row_is_zero_with_zero_grad(impl: str, dtype: torch.dtype) -> None:
    q, k, v = (x.to(dtype).requires_grad_() for x in make_qkv(2, 2, 2, 4, 5, 8))
    mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    mask[:, :, 1] = False  # query 1 sees nothing
    bias = torch.randn(2, 4, 5, dtype=dtype)  # a bias must not resurrect a masked row
    for b in (None, bias):
        out = qkv.scaled_dot_product_attention(q, k, v, mask, bias=b, impl=impl)
        assert not out.isnan().any()
        assert (out[:, :, 1] == 0).all()
        (grad_q,) = torch.autograd.grad(out.float().square().sum(), q)
        assert not grad_q.isnan().any()
        assert (grad_q[:, :, 1] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_sum_to_one_and_masked_keys_get_zero(impl: str) -> None:
    q, k, v = make_qkv(2, 3, 3, 5, 8, 4, torch.float32)
    mask = make_mask("random", 2, 5, 8)
    mask[..., 0] = True  # every row sees at least one key
    _, weights = qkv.scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5), atol=1e-6, rtol=0)
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_keys_with_huge_values_change_nothing(impl: str) -> None:
    q, k, v = make_qkv(2, 2, 2, 5, 6, 4, torch.float32)
    mask = masks.padding(torch.tensor([4, 3]), max_len=6)
    out = qkv.scaled_dot_product_attention(q, k, v, mask, impl=impl)
    k2, v2 = k.clone(), v.clone()
    hidden = ~mask.squeeze(1).squeeze(1)  # (B, S)
    k2[hidden.unsqueeze(1).expand(2, 2, 6)] = 1e4
    v2[hidden.unsqueeze(1).expand(2, 2, 6)] = 1e30
    out2 = qkv.scaled_dot_product_attention(q, k2, v2, mask, impl=impl)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


def test_reference_softmax_runs_in_float32() -> None:
    q, k, v = (x.half() for x in make_qkv(1, 2, 2, 4, 4, 8))
    out, weights = qkv.scaled_dot_product_attention(q, k, v, return_weights=True)
    assert weights.dtype == torch.float32 and out.dtype == torch.float16
    expected = torch.softmax((q @ k.transpose(-2, -1)).float() / math.sqrt(8), dim=-1)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl: str) -> None:
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 1, 3, 4, 3))
    bias = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = masks.causal(3, 4)

    def f(q, k, v, bias):
        return qkv.scaled_dot_product_attention(q, k, v, mask, bias=bias, impl=impl)

    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-5)


def test_auto_picks_fast_path_unless_weights_are_requested(monkeypatch) -> None:
    calls: list[str] = []
    for name in IMPLS:
        real = backends.get_backend(name)

        def spy(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setitem(backends._BACKENDS, name, spy)
    q, k, v = make_qkv(1, 1, 1, 2, 2, 2, torch.float32)
    qkv.scaled_dot_product_attention(q, k, v)
    qkv.scaled_dot_product_attention(q, k, v, return_weights=True)
    assert calls == ["sdpa", "reference"]


@pytest.mark.parametrize("grouped_kv", [False, True])
def test_registered_backend_is_dispatched(grouped_kv: bool) -> None:
    seen_heads: list[int] = []

    def doubled(q, k, v, mask, *, bias, scale, dropout_p):
        seen_heads.append(k.shape[-3])
        k, v = (
            backends.repeat_kv(k, q.shape[-3] // k.shape[-3]),
            v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3),
        )
        out, _ = qkv.reference_attention(q, k, v, mask, bias=bias, scale=scale)
        return 2 * out, None

    qkv.register_backend("test-doubled", doubled, grouped_kv=grouped_kv)
    try:
        assert "test-doubled" in qkv.available_backends()
        q, k, v = make_qkv(1, 4, 2, 3, 3, 2, torch.float32)
        out = qkv.scaled_dot_product_attention(q, k, v, impl="test-doubled")
        ref = qkv.scaled_dot_product_attention(q, k, v, impl="reference")
        torch.testing.assert_close(out, 2 * ref)
        # A backend that does not share heads itself gets them repeated.
        assert seen_heads == [2 if grouped_kv else 4]
    finally:
        qkv.unregister_backend("test-doubled")
    assert "test-doubled" not in qkv.available_backends()
    with pytest.raises(ValueError, match="cannot be removed"):
        qkv.unregister_backend("sdpa")


def test_dropout_on_weights_in_reference_path() -> None:
    q, k, v = make_qkv(1, 1, 1, 64, 64, 4, torch.float32)
    _, full = qkv.scaled_dot_product_attention(q, k, v, return_weights=True)
    _, dropped = qkv.reference_attention(q, k, v, dropout_p=0.5)
    kept = dropped != 0
    assert 0.35 < kept.float().mean().item() < 0.65
    # Survivors are rescaled by 1 / (1 - p), so the expected weights are unchanged.
    torch.testing.assert_close(dropped[kept], 2 * full[kept], atol=1e-6, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    kv=st.integers(1, 3),
    groups=st.integers(1, 3),
    t=st.integers(1, 9),
    extra=st.integers(0, 6),
    e=st.sampled_from([1, 2, 4, 8, 16]),
    ev=st.sampled_from([1, 3, 8]),
    use_mask=st.booleans(),
)
def test_any_shape_matches_numpy(b, kv, groups, t, extra, e, ev, use_mask) -> None:
    s = t + extra
    h = kv * groups
    q = torch.randn(b, h, t, e)
    k = torch.randn(b, kv, s, e)
    v = torch.randn(b, kv, s, ev)
    mask = masks.causal(t, s) if use_mask else None
    expected = oracle(q, k, v, mask)
    for impl in IMPLS:
        out = qkv.scaled_dot_product_attention(q, k, v, mask, impl=impl)
        assert out.shape == (b, h, t, ev)
        np.testing.assert_allclose(out.double().numpy(), expected.numpy(), atol=1e-5, rtol=0)


def test_inputs_on_different_devices_are_named() -> None:
    # The meta device stands in for a GPU here: no accelerator is needed to check the message.
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="one device, got cpu, meta, meta"):
        qkv.scaled_dot_product_attention(q, q.to("meta"), q.to("meta"))
    with pytest.raises(ValueError, match="mask is on meta but q is on cpu"):
        qkv.scaled_dot_product_attention(q, q, q, torch.ones(4, 4, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.randn(2, 4, 8), torch.randn(2, 4, 7), torch.randn(2, 4, 7)), {}, "head dim E"),
        ((torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 4, 8)), {}, "positions S"),
        (
            (torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)),
            {},
            "multiple",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            {"mask": torch.ones(3, 4, dtype=torch.bool)},
            "does not broadcast",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            {"mask": torch.zeros(4, 4)},
            "must be boolean",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(2, 4, 8).half(), torch.randn(2, 4, 8)),
            {},
            "one dtype",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            {"impl": "sdpa", "return_weights": True},
            "cannot return attention weights",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            {"impl": "nope"},
            "unknown attention impl 'nope'",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            {"dropout_p": 1.5},
            "dropout_p",
        ),
        (
            (torch.randn(4, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)),
            {},
            "same batch size",
        ),
        (
            (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            {"bias": torch.ones(4, 4, dtype=torch.bool)},
            "bias must be a floating-point",
        ),
    ],
)
def test_bad_input_names_the_problem(args, kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        qkv.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "empty_row"])
def test_cuda_fused_kernels_follow_the_rules(dtype: torch.dtype, mask_kind: str) -> None:
    h, kv = HEADS["gqa"]
    q, k, v = make_qkv(2, h, kv, 64, 64, 64)
    mask = make_mask(mask_kind, 2, 64, 64)
    exact = oracle(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    qc, kc, vc = (x.to(dtype).cuda().requires_grad_() for x in (q, k, v))
    mc = None if mask is None else mask.cuda()
    ref = qkv.scaled_dot_product_attention(qc, kc, vc, mc, impl="reference")
    fast = qkv.scaled_dot_product_attention(qc, kc, vc, mc, impl="sdpa")
    ref_err = (ref.double().cpu() - exact).abs().max().item()
    fast_err = (fast.double().cpu() - exact).abs().max().item()
    assert fast_err <= HALF_FACTOR * ref_err
    (g,) = torch.autograd.grad(fast.float().sum(), qc)
    assert not g.isnan().any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("extra", ["none", "padding", "bias"])
@pytest.mark.parametrize(("t", "s"), [(6, 6), (3, 7), (1, 5)], ids=["square", "cached", "one"])
def test_is_causal_equals_the_causal_mask(
    impl: str, heads: str, extra: str, t: int, s: int
) -> None:
    """is_causal=True computes what mask=causal(T, S) (& mask) does, outputs and gradients."""
    h, kv = HEADS[heads]
    q, k, v = (x.requires_grad_() for x in make_qkv(2, h, kv, t, s, 8, torch.float32))
    mask = masks.padding(torch.tensor([s, s - 1]), max_len=s) if extra == "padding" else None
    bias = torch.randn(h, t, s) if extra == "bias" else None
    grad = torch.randn(2, h, t, 8)
    out = qkv.scaled_dot_product_attention(q, k, v, mask, bias=bias, is_causal=True, impl=impl)
    got = torch.autograd.grad(out, (q, k, v), grad)
    causal = masks.causal(t, s) if mask is None else mask & masks.causal(t, s)
    expected_out = oracle(q.detach(), k.detach(), v.detach(), causal, bias)
    ref = qkv.scaled_dot_product_attention(q, k, v, causal, bias=bias, impl="reference")
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(
        out.detach().double(), expected_out, atol=ATOL[torch.float32], rtol=0
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=ATOL[torch.float32], rtol=0)


def test_is_causal_reaches_the_fused_kernel_without_a_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Square causal attention hands PyTorch is_causal=True and no mask tensor to build."""
    calls: list[dict[str, object]] = []
    real = backends.F.scaled_dot_product_attention

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(backends.F, "scaled_dot_product_attention", recording)
    q, k, v = make_qkv(1, 4, 2, 5, 5, 8, torch.float32)
    qkv.scaled_dot_product_attention(q, k, v, is_causal=True, impl="sdpa")
    assert calls[-1]["is_causal"] is True and calls[-1].get("attn_mask") is None
    q, k, v = make_qkv(1, 4, 2, 3, 5, 8, torch.float32)  # T != S: bottom-right, needs the mask
    qkv.scaled_dot_product_attention(q, k, v, is_causal=True, impl="sdpa")
    assert calls[-1].get("is_causal", False) is False and calls[-1]["attn_mask"] is not None


def test_is_causal_with_more_queries_than_keys_is_a_clear_error() -> None:
    q, k, v = make_qkv(1, 2, 2, 5, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="S >= T"):
        qkv.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_a_backend_this_installation_lacks_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(backends._UNAVAILABLE, "test-missing", "needs the extra: pip install x")
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="pip install x"):
        qkv.scaled_dot_product_attention(q, q, q, impl="test-missing")
    with pytest.raises(ValueError, match="unknown attention impl 'nope'"):
        qkv.scaled_dot_product_attention(q, q, q, impl="nope")
