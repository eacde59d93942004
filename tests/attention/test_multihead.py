"""MultiHeadAttention against torch.nn.MultiheadAttention, and the properties it must have."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv import KVCache, MultiHeadAttention, masks
from qkv.attention import recording_weights
from qkv.attention.multihead import capturing
from tests.conftest import ATOL

D, H = 32, 4


def copy_into_torch(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    """torch keeps q, k, v projections stacked in one in_proj (3D, D) matrix, in that order."""
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_matches_torch_multihead_attention(impl: str, kind: str) -> None:
    ours = MultiHeadAttention(D, H, attn_impl=impl)
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    copy_into_torch(ours, ref)
    b, t, s = 3, 6, 6 if kind == "self" else 9
    x = torch.randn(b, t, D, requires_grad=True)
    lengths = torch.tensor([s, s - 2, 1])
    pad = masks.padding(lengths, max_len=s)  # (B, 1, 1, S), True = real
    if kind == "self":
        out = ours(x, mask=pad, causal=True)
        expected, _ = ref(
            x,
            x,
            x,
            key_padding_mask=~pad[:, 0, 0],  # torch: True = ignore
            attn_mask=~masks.causal(t),
            need_weights=False,
        )
    else:
        mem = torch.randn(b, s, D)
        out = ours(x, mem, mask=pad)
        expected, _ = ref(x, mem, mem, key_padding_mask=~pad[:, 0, 0], need_weights=False)
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)

    grad = torch.randn_like(out)
    (gx_ours,) = torch.autograd.grad(out, x, grad, retain_graph=True)
    (gx_ref,) = torch.autograd.grad(expected, x, grad, retain_graph=True)
    torch.testing.assert_close(gx_ours, gx_ref, atol=1e-5, rtol=1e-4)
    ours_w = torch.autograd.grad(out, [ours.q_proj.weight, ours.out_proj.weight], grad)
    ref_w = torch.autograd.grad(expected, [ref.in_proj_weight, ref.out_proj.weight], grad)
    torch.testing.assert_close(ours_w[0], ref_w[0][:D], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_w[1], ref_w[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_query_equals_mha_with_repeated_kv_heads(n_kv_heads: int) -> None:
    gqa = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads)
    mha = MultiHeadAttention(D, H)
    e, n_rep = D // H, H // n_kv_heads
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            w = src.weight.view(n_kv_heads, e, D).repeat_interleave(n_rep, dim=0)  # (H, E, D)
            dst.weight.copy_(w.reshape(H * e, D))
            dst.bias.copy_(src.bias.view(n_kv_heads, e).repeat_interleave(n_rep, 0).flatten())
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(gqa(x, causal=True), mha(x, causal=True), atol=1e-5, rtol=0)
    assert gqa.k_proj.weight.shape == (n_kv_heads * e, D)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_causal_outputs_ignore_the_future(n_kv_heads: int) -> None:
    mha = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads)
    x = torch.randn(2, 8, D)
    t = 4
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, 8 - t - 1, D)
    out, out2 = mha(x, causal=True), mha(x2, causal=True)
    torch.testing.assert_close(out[:, : t + 1], out2[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, t + 1 :], out2[:, t + 1 :])


def test_permutation_equivariant_without_positions() -> None:
    mha = MultiHeadAttention(D, H)
    x = torch.randn(2, 9, D)
    perm = torch.randperm(9)
    torch.testing.assert_close(mha(x[:, perm]), mha(x)[:, perm], atol=1e-5, rtol=0)


def test_padding_does_not_change_real_tokens() -> None:
    mha = MultiHeadAttention(D, H)
    x = torch.randn(1, 5, D)
    padded = torch.cat([x, 100 * torch.randn(1, 3, D)], dim=1)
    mask = masks.padding(torch.tensor([5]), max_len=8)
    out = mha(x, causal=False)
    out_padded = mha(padded, mask=mask)
    torch.testing.assert_close(out_padded[:, :5], out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_decoding_equals_full_forward(static: bool, n_kv_heads: int) -> None:
    mha = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads).eval()
    x = torch.randn(2, 9, D)
    full = mha(x, causal=True)
    cache = KVCache.static(2, n_kv_heads, 9, D // H) if static else KVCache()
    steps = [mha(x[:, :4], causal=True, cache=cache)]  # prefill 4 tokens at once
    for i in range(4, 9):  # then one token at a time
        steps.append(mha(x[:, i : i + 1], causal=True, cache=cache))
    assert cache.seq_len == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_static_cache_overflow_is_a_clear_error() -> None:
    cache = KVCache.static(1, 2, 4, 8)
    cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"overflow.*larger max_len"):
        cache.update(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))


def test_cache_crop_and_reorder() -> None:
    cache = KVCache()
    k = torch.randn(3, 2, 5, 4)
    cache.update(k, k.clone())
    cache.crop(3)
    assert cache.seq_len == 3 and torch.equal(cache.keys, k[:, :, :3])
    cache.reorder(torch.tensor([2, 0]))
    assert torch.equal(cache.keys, k[[2, 0], :, :3])


def test_cross_attention_cache_reuses_encoder_keys() -> None:
    mha = MultiHeadAttention(D, H, d_context=16)
    memory = torch.randn(2, 7, 16)
    x = torch.randn(2, 3, D)
    cache = KVCache()
    first = mha(x[:, :1], memory, cache=cache)
    # The second step ignores the memory it is given: keys and values come from the cache.
    second = mha(x[:, 1:], torch.zeros_like(memory), cache=cache)
    full = mha(x, memory)
    assert cache.seq_len == 7
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pass the encoder's output as context"):
        mha(x[:, 2:], cache=cache)  # forgetting the context must not turn it into self-attention


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_captured_weights_reproduce_the_fast_output(n_kv_heads: int) -> None:
    mha = MultiHeadAttention(D, H, n_kv_heads=n_kv_heads, attn_impl="sdpa")
    mha.capture_weights = True
    x = torch.randn(2, 6, D)
    mask = masks.padding(torch.tensor([6, 4]), max_len=6)
    out = mha(x, mask=mask, causal=True)
    w = mha.last_weights
    assert w is not None and w.shape == (2, H, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, H, 6), atol=1e-6, rtol=0)
    assert (w[1, :, :, 4:] == 0).all()  # padded keys get no weight
    v = mha.v_proj(x).view(2, 6, n_kv_heads, D // H).transpose(1, 2)  # (B, K, S, E)
    v = v.repeat_interleave(H // n_kv_heads, dim=1)  # (B, H, S, E)
    merged = (w @ v).transpose(1, 2).reshape(2, 6, D)  # (B, T, D)
    torch.testing.assert_close(mha.out_proj(merged), out, atol=1e-5, rtol=0)


def test_recording_weights_collects_in_order_and_restores_flags() -> None:
    first, second, third = (MultiHeadAttention(D, H) for _ in range(3))
    second.capture_weights = True  # already recording: stays so, and keeps its weights
    x = torch.randn(2, 5, D)
    with recording_weights([third, first, second]) as weights:
        assert first.capture_weights and second.capture_weights and third.capture_weights
        assert weights == []  # filled when the block exits
        h = first(x, causal=True)
        h = second(h)
        third(h, causal=True)
        expected = [m.last_weights for m in (third, first, second)]
    assert len(weights) == 3
    assert all(w is e for w, e in zip(weights, expected, strict=True))  # in the order given
    for w in weights:
        assert w.shape == (2, H, 5, 5)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, H, 5), atol=1e-6, rtol=0)
    assert (weights[0].triu(1) == 0).all()  # third ran causally
    assert not first.capture_weights and not third.capture_weights
    assert first.last_weights is None and third.last_weights is None
    assert second.capture_weights and second.last_weights is weights[2]


def test_recording_weights_disabled_captures_nothing() -> None:
    mha = MultiHeadAttention(D, H)
    with recording_weights([mha], enabled=False) as weights:
        assert not mha.capture_weights
        mha(torch.randn(2, 5, D))
    assert weights == [] and mha.last_weights is None and not mha.capture_weights


def test_recording_weights_restores_flags_after_an_error() -> None:
    mha = MultiHeadAttention(D, H)
    with pytest.raises(RuntimeError), recording_weights([mha]) as weights:
        mha(torch.randn(2, 5, D))
        raise RuntimeError
    assert weights == [] and not mha.capture_weights and mha.last_weights is None


def test_capturing_keeps_what_proves_the_weights_and_marks_modules_that_did_not_run() -> None:
    ran, idle = MultiHeadAttention(D, H, n_kv_heads=2), MultiHeadAttention(D, H)
    x = torch.randn(2, 5, D)
    with capturing([idle, ran]) as captures:
        out = ran(x, causal=True)
        assert captures == []  # filled when the block exits
    assert captures[0] is None  # idle did not run
    capture = captures[1]
    assert capture is not None and capture.weights.shape == (2, H, 5, 5)
    assert capture.values.shape == (2, 2, 5, D // H) and capture.output.shape == (2, H, 5, D // H)
    v = capture.values.repeat_interleave(H // 2, dim=1)  # (B, H, S, E)
    torch.testing.assert_close(capture.weights @ v, capture.output, atol=1e-6, rtol=0)
    merged = capture.output.transpose(1, 2).reshape(2, 5, D)  # (B, T, H E)
    torch.testing.assert_close(ran.out_proj(merged), out, atol=1e-6, rtol=0)
    assert ran.last_capture is None and not ran.capture_weights  # freed: the caller holds it


def test_dropout_only_in_training() -> None:
    mha = MultiHeadAttention(D, H, dropout=0.5)
    x = torch.randn(2, 6, D)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x), atol=0, rtol=0)
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads"),
        ({"d_model": 32, "n_heads": 4, "n_kv_heads": 3}, "not divisible by n_kv_heads"),
        ({"d_model": 32, "n_heads": 4, "dropout": 1.0}, "dropout"),
    ],
)
def test_bad_configuration(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_bad_input_width() -> None:
    with pytest.raises(ValueError, match="D=d_model=32"):
        MultiHeadAttention(D, H)(torch.randn(2, 5, 16))
