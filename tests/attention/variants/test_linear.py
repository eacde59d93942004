"""Linear attention (elu + 1): the fast forms and the recurrent state equal the dense form,
forward and backward; the masks it cannot apply are clear errors; a GPT trains and generates."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

import qkv
from qkv import masks
from qkv.attention.backends import repeat_kv
from qkv.attention.variants.linear import (
    CHUNK_SIZE,
    LinearAttentionState,
    causal_kernel_attention,
    dense_kernel_attention,
    elu_feature_map,
    linear_attention,
    split_mask,
)
from qkv.models.gpt import GPT, PRESETS
from tests.attention.variants.test_sparse import LargestTensor
from tests.conftest import ATOL, HALF_FACTOR

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
# (mask kind, T, S): T < S is decoding after a cache's past, T > S leaves the first queries with
# no key; "padding_empty" hides every key of one sequence.
CASES = [
    ("none", 7, 9),
    ("padding", 7, 9),
    ("padding_empty", 5, 6),
    ("causal", 9, 9),
    ("causal", 3, 9),
    ("causal", 9, 4),
    ("causal_padding", 9, 9),
    ("causal_padding", 2, 9),
]
CASE_IDS = [f"{kind}-T{t}-S{s}" for kind, t, s in CASES]


def make_mask(kind: str, b: int, t: int, s: int) -> Tensor | None:
    """A mask linear attention supports, broadcastable to (B, H, T, S)."""
    keys = masks.padding(torch.rand(b, s) > 0.3)  # (B, 1, 1, S): any pattern of real keys
    if kind == "none":
        return None
    if kind == "padding":
        return keys
    if kind == "padding_empty":
        return masks.padding([0, s], max_len=s)  # (B, 1, 1, S), B = 2
    # masks.causal(T, S), which wants S >= T; for T > S the first T - S queries see no key.
    causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # (T, S)
    if kind == "causal":
        return causal
    if kind == "causal_padding":
        return keys & causal  # (B, 1, T, S)
    raise AssertionError(kind)


def leaves(*xs: Tensor, dtype: torch.dtype) -> list[Tensor]:
    return [x.detach().to(dtype).requires_grad_() for x in xs]


def check_against_dense(
    fast: Tensor, dense: Tensor, fast_leaves: list[Tensor], dense_leaves: list[Tensor], atol: float
) -> None:
    """Outputs, then the gradients of one random projection of them, agree within ``atol``."""
    grad = torch.randn_like(dense)
    fast.backward(grad.to(fast.dtype))
    dense.backward(grad)
    torch.testing.assert_close(fast.double(), dense, atol=atol, rtol=0.0)
    for name, a, b in zip("qkv", fast_leaves, dense_leaves, strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(
            a.grad.double(), b.grad, atol=atol, rtol=0.0, msg=lambda m, n=name: f"d{n}: {m}"
        )


def dense_linear(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The dense masked form with φ = elu + 1, key/value heads repeated for grouped queries."""
    n_rep = q.shape[-3] // k.shape[-3]
    phi_k = elu_feature_map(repeat_kv(k, n_rep))  # (B, H, S, E)
    return dense_kernel_attention(elu_feature_map(q), phi_k, repeat_kv(v, n_rep), mask)[0]


# ---------------------------------------------------------------------------------------------
# Fast forms vs the dense form


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [3, 64])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize(("kind", "t", "s"), CASES, ids=CASE_IDS)
def test_fast_forms_equal_dense_form(
    kind: str, t: int, s: int, heads: str, chunk_size: int, dtype: torch.dtype
) -> None:
    """In float32 (or float64) against the dense form in float64, outputs and gradients. Chunks
    of 3 split the causal scan unevenly; 64 is the backend's default, called by its name."""
    h, kv = HEADS[heads]
    q, k, v = torch.randn(2, h, t, 8), torch.randn(2, kv, s, 8), torch.randn(2, kv, s, 6)
    mask = make_mask(kind, 2, t, s)
    dense_leaves, fast_leaves = leaves(q, k, v, dtype=torch.float64), leaves(q, k, v, dtype=dtype)
    dense = dense_linear(*dense_leaves, mask)  # (B, H, T, Ev)
    if chunk_size == 64:
        fast = qkv.scaled_dot_product_attention(*fast_leaves, mask, impl="linear")
    else:
        fast = linear_attention(*fast_leaves, mask, chunk_size=chunk_size)
    assert fast.dtype == dtype and fast.shape == (2, h, t, 6)
    check_against_dense(fast, dense, fast_leaves, dense_leaves, ATOL[dtype])


# (T, S) of the causal cases through the dispatcher: one chunk, T < S (a cache's past), T > S
# (queries with no key), and several chunks of CHUNK_SIZE, the last one short.
CAUSAL_LENGTHS = [(9, 9), (3, 9), (9, 4), (300, 300), (200, 330), (330, 200)]
CAUSAL_IDS = [f"T{t}-S{s}" for t, s in CAUSAL_LENGTHS]


def causal_mask(t: int, s: int) -> Tensor:
    """masks.causal(T, S), bottom-right aligned, also for T > S (first T - S rows empty)."""
    return torch.ones(t, s, dtype=torch.bool).tril(s - t)  # (T, S)


@pytest.mark.parametrize("padding", [False, True], ids=["causal", "causal_padding"])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize(("t", "s"), CAUSAL_LENGTHS, ids=CAUSAL_IDS)
def test_is_causal_through_dispatcher_equals_dense_form(
    t: int, s: int, heads: str, padding: bool
) -> None:
    """``is_causal=True`` (with a (B, 1, 1, S) key padding mask or none) reaches the backend as
    a flag; outputs and gradients equal the dense form with the causal mask built out."""
    h, kv = HEADS[heads]
    q, k, v = torch.randn(2, h, t, 8), torch.randn(2, kv, s, 8), torch.randn(2, kv, s, 6)
    keys = masks.padding(torch.rand(2, s) > 0.3) if padding else None  # (B, 1, 1, S)
    dense_mask = causal_mask(t, s) if keys is None else keys & causal_mask(t, s)
    dense_leaves, fast_leaves = leaves(q, k, v, dtype=torch.float64), leaves(q, k, v, dtype=q.dtype)
    dense = dense_linear(*dense_leaves, dense_mask)  # (B, H, T, Ev)
    fast = qkv.scaled_dot_product_attention(*fast_leaves, keys, is_causal=True, impl="linear")
    check_against_dense(fast, dense, fast_leaves, dense_leaves, ATOL[torch.float32])


@pytest.mark.parametrize(("t", "s"), CAUSAL_LENGTHS, ids=CAUSAL_IDS)
def test_readable_causal_form_equals_dense_form(t: int, s: int) -> None:
    """``causal_kernel_attention`` (the chunk loop under plain autograd, the one the docs show)."""
    q, k, v = torch.randn(2, 2, t, 8), torch.randn(2, 2, s, 8), torch.randn(2, 2, s, 6)
    keys = masks.padding(torch.rand(2, s) > 0.3)  # (B, 1, 1, S)
    dense_leaves, fast_leaves = leaves(q, k, v, dtype=torch.float64), leaves(q, k, v, dtype=q.dtype)
    dense = dense_linear(*dense_leaves, keys & causal_mask(t, s))
    phi_q, phi_k = elu_feature_map(fast_leaves[0]), elu_feature_map(fast_leaves[1])
    fast = causal_kernel_attention(phi_q, phi_k, fast_leaves[2], keys, chunk_size=7)
    check_against_dense(fast, dense, fast_leaves, dense_leaves, ATOL[torch.float32])


@pytest.mark.parametrize("impl", ["linear", "performer"])
def test_is_causal_builds_no_t_by_s_tensor(impl: str) -> None:
    """Forward and backward of ``is_causal=True`` with key padding: no tensor as large as a
    quarter of T x S is ever created (the dispatcher's causal mask alone would be T x S), and
    autograd keeps q, k, v and the chunk states, no features or C x C products."""
    b, h, t, e = 1, 2, 2048, 8
    q, k, v = (torch.randn(b, h, t, e, requires_grad=True) for _ in range(3))
    keys = masks.padding([t - 5], max_len=t)  # (B, 1, 1, S)
    saved = []

    def pack(x: Tensor) -> Tensor:
        saved.append(x.numel())
        return x

    with LargestTensor() as seen, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = qkv.scaled_dot_product_attention(q, k, v, keys, is_causal=True, impl=impl)
    out.sum().backward()
    assert seen.largest * 4 <= t * t
    n_features = e if impl == "linear" else 256
    states = (t // CHUNK_SIZE) * b * h * n_features * (e + 1)  # (..., M, Ev + 1) per chunk
    key_mask_and_w = t + n_features * e  # (Performer's W, read by the past keys' features)
    assert sum(saved) <= 3 * b * h * t * e + states + key_mask_and_w, saved


def test_query_without_keys_outputs_zeros() -> None:
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    out = linear_attention(q, k, v, masks.padding([0, 5]))  # every key of row 0 hidden
    assert out[0].abs().max() == 0
    out.sum().backward()
    assert q.grad is not None and q.grad[0].abs().max() == 0 and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_factor_of_dense(dtype: torch.dtype) -> None:
    """Inputs in half precision: the fast path (float32 inside) errs at most HALF_FACTOR times
    as much as the dense form run in that dtype, both against float64."""
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = masks.causal(16)
    exact = dense_linear(q.double(), k.double(), v.double(), mask)
    fast = linear_attention(q, k, v, mask)
    dense_half = dense_linear(q, k, v, mask)
    assert fast.dtype == dtype
    fast_err = (fast.double() - exact).abs().max()
    assert fast_err <= HALF_FACTOR * (dense_half.double() - exact).abs().max()


# ---------------------------------------------------------------------------------------------
# The recurrent state


@pytest.mark.parametrize("heads", ["mha", "gqa"])
def test_recurrent_state_equals_causal_form_token_by_token(heads: str) -> None:
    h, kv = HEADS[heads]
    t = 11
    q, k, v = torch.randn(2, h, t, 8), torch.randn(2, kv, t, 8), torch.randn(2, kv, t, 5)
    causal = linear_attention(q, k, v, masks.causal(t), chunk_size=4)  # (B, H, T, Ev)
    exact = dense_linear(q.double(), k.double(), v.double(), masks.causal(t))
    k, v = repeat_kv(k, h // kv), repeat_kv(v, h // kv)  # (B, H, T, E): the state takes H heads
    state = LinearAttentionState()
    steps = torch.stack([state.step(q[..., i, :], k[..., i, :], v[..., i, :]) for i in range(t)])
    steps = steps.permute(1, 2, 0, 3)  # (T, B, H, Ev) -> (B, H, T, Ev)
    assert state.kv is not None and state.kv.shape == (2, h, 8, 5)  # O(1) memory in T
    torch.testing.assert_close(steps, causal, atol=ATOL[torch.float32], rtol=0.0)
    torch.testing.assert_close(steps.double(), exact, atol=ATOL[torch.float32], rtol=0.0)


def test_causal_form_ignores_future_tokens() -> None:
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    out = linear_attention(q, k, v, masks.causal(10), chunk_size=3)
    k2, v2 = k.clone(), v.clone()
    k2[..., 6:, :], v2[..., 6:, :] = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    changed = linear_attention(q, k2, v2, masks.causal(10), chunk_size=3)
    torch.testing.assert_close(changed[..., :6, :], out[..., :6, :], atol=0.0, rtol=0.0)


# ---------------------------------------------------------------------------------------------
# Which masks, and the clear errors


def test_split_mask_recognises_the_supported_masks() -> None:
    keys = masks.padding([3, 5])  # (B, 1, 1, S)
    assert split_mask(None, 4, 5) == ("none", None)
    assert split_mask(keys, 4, 5)[0] == "key"
    assert split_mask(keys.expand(2, 1, 4, 5), 4, 5)[0] == "key"  # rows all equal
    assert split_mask(masks.causal(4, 5), 4, 5)[0] == "causal"
    kind, key_mask = split_mask(keys & masks.causal(4, 5), 4, 5)
    assert kind == "causal" and key_mask is not None and torch.equal(key_mask, keys)
    assert split_mask(None, 4, 5, is_causal=True) == ("causal", None)
    kind, key_mask = split_mask(keys, 4, 5, is_causal=True)
    assert kind == "causal" and key_mask is keys  # recognised by its shape, not read
    assert split_mask(masks.causal(4, 5), 4, 5, is_causal=True)[0] == "causal"
    with pytest.raises(ValueError, match="none of these"):
        split_mask(masks.sliding_window(5, 2)[1:], 4, 5, is_causal=True)


@pytest.mark.parametrize(
    "mask",
    [
        masks.sliding_window(6, 3),
        masks.prefix_lm(2, 6),
        masks.causal(6).T,  # anti-causal
        torch.rand(1, 1, 6, 6) > 0.5,
    ],
    ids=["sliding_window", "prefix_lm", "anti_causal", "random"],
)
def test_unsupported_mask_is_a_clear_error(mask: Tensor) -> None:
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match=r"causal mask .* key padding mask .* none of these"):
        qkv.scaled_dot_product_attention(q, q, q, mask, impl="linear")


def test_bias_and_dropout_are_clear_errors() -> None:
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="cannot add a bias"):
        qkv.scaled_dot_product_attention(q, q, q, bias=torch.zeros(6, 6), impl="linear")
    with pytest.raises(ValueError, match=r"dropout_p=0\.1; set the attention dropout to 0"):
        qkv.scaled_dot_product_attention(q, q, q, dropout_p=0.1, impl="linear")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, q, q, masks.causal(6), chunk_size=0)


def test_scale_is_ignored() -> None:
    q, k, v = torch.randn(3, 2, 6, 4).unbind(0)
    plain = qkv.scaled_dot_product_attention(q, k, v, impl="linear")
    scaled = qkv.scaled_dot_product_attention(q, k, v, scale=3.0, impl="linear")
    torch.testing.assert_close(scaled, plain, atol=0.0, rtol=0.0)


# ---------------------------------------------------------------------------------------------
# In a model

LINEAR_GPT = dataclasses.replace(PRESETS["tiny"], attn_impl="linear", dropout=0.0)


def test_gpt_with_linear_attention_trains() -> None:
    model = GPT(LINEAR_GPT)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_gpt_with_linear_attention_decodes_with_the_cache() -> None:
    """Through the registry a decoding step recomputes from every cached key (correct, O(S));
    ``LinearAttentionState`` is the O(1) form. Cached logits equal one full forward, with left
    padding, and ``generate`` runs."""
    model = GPT(LINEAR_GPT).eval()
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    cache = model.new_cache()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in range(6, 10):
            step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
            steps.append(step.logits)
    real = mask.bool()
    atol = ATOL[torch.float32]
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=atol, rtol=0.0)
    out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and 4 < out.shape[1] <= 9


def test_gpt_with_attention_dropout_is_a_clear_error() -> None:
    model = GPT(dataclasses.replace(LINEAR_GPT, dropout=0.1)).train()
    with pytest.raises(ValueError, match="dropout"):
        model(torch.randint(0, 128, (1, 4)))


def test_parity_check_can_fail() -> None:
    """A planted error: the dense form with the causal mask aligned top-left instead of
    bottom-right (the classic decoding bug) must fail the check above."""
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 6)
    dense_leaves, fast_leaves = leaves(q, k, v, dtype=torch.float64), leaves(q, k, v, dtype=q.dtype)
    top_left = torch.ones(3, 9, dtype=torch.bool).tril()  # (T, S)
    dense = dense_linear(*dense_leaves, top_left)
    fast = linear_attention(*fast_leaves, masks.causal(3, 9), chunk_size=2)
    with pytest.raises(AssertionError):
        check_against_dense(fast, dense, fast_leaves, dense_leaves, ATOL[torch.float32])
