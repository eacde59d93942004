"""ALiBi (Press et al. 2021): slopes, the bias, and its use inside multi-head attention."""

from __future__ import annotations

import pytest
import torch

from qkv.attention import KVCache, MultiHeadAttention
from qkv.positional import ALiBi, alibi_bias, alibi_slopes

ATOL32 = 1e-5  # float32 paths, as in tests/conftest.py


def test_slopes_for_a_power_of_two() -> None:
    # 8 heads: start 2^(-8/8) = 1/2, ratio 1/2.
    expected = torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256])
    assert torch.equal(alibi_slopes(8), expected)
    # 4 heads: start and ratio 2^(-8/4) = 1/4.
    assert torch.equal(alibi_slopes(4), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]))
    # 1 head: 2^(-8/1).
    assert torch.equal(alibi_slopes(1), torch.tensor([1 / 256]))


def test_slopes_for_six_heads_follow_the_paper_recipe() -> None:
    # Largest power of two below 6 is 4: slopes 1/4, 1/16, 1/64, 1/256. The 8-head sequence is
    # 1/2, 1/4, ..., 1/256; every other one starting with the first is 1/2, 1/8, 1/32, 1/128,
    # and the first 6 - 4 = 2 of those are appended.
    expected = torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    assert torch.equal(alibi_slopes(6), expected)


def test_slopes_for_twelve_heads() -> None:
    # 8 -> 1/2 .. 1/256; the 16-head sequence has ratio 2^(-1/2): 2^-0.5, 2^-1, 2^-1.5, ...;
    # every other one: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (the 4 missing slopes).
    expected = [2.0**-i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected), rtol=1e-7, atol=0)
    assert alibi_slopes(12).dtype == torch.float32
    with pytest.raises(ValueError, match="positive"):
        alibi_slopes(0)


def test_bias_worked_example_bottom_right() -> None:
    # 2 heads (slopes 1/16, 1/256); T = 2 queries at positions 2 and 3 of S = 4 keys.
    # |i - j| for query 2: [2, 1, 0, 1]; for query 3: [3, 2, 1, 0].
    distance = torch.tensor([[2.0, 1.0, 0.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    expected = torch.stack([-distance / 16, -distance / 256])  # (H, T, S)
    bias = alibi_bias(2, 2, 4)
    assert bias.shape == (2, 2, 4) and bias.dtype == torch.float32
    assert torch.equal(bias, expected)


def test_bias_matches_the_formula_with_loops() -> None:
    h, t, s = 6, 3, 7
    slopes = alibi_slopes(h)
    bias = alibi_bias(h, t, s)
    for head in range(h):
        for i in range(t):
            for j in range(s):
                expected = -slopes[head] * abs((s - t + i) - j)
                assert bias[head, i, j] == expected


def test_module_matches_the_function() -> None:
    alibi = ALiBi(4)
    q = torch.randn(2, 4, 3, 8, dtype=torch.bfloat16)
    bias = alibi(q, 5)
    assert bias.shape == (1, 4, 3, 5) and bias.dtype == torch.float32
    assert torch.equal(bias[0], alibi_bias(4, 3, 5))
    assert "slopes" not in alibi.state_dict()
    # Casting the model to half precision keeps the bias exact (12 heads have slopes 2^-(i+0.5)).
    cast = ALiBi(12).to(torch.bfloat16)
    assert torch.equal(cast(torch.randn(1, 12, 3, 8), 5)[0], alibi_bias(12, 3, 5))
    with pytest.raises(ValueError, match="n_heads=4"):
        alibi(torch.randn(2, 3, 3, 8), 5)
    with pytest.raises(ValueError, match="S >= T"):
        alibi(q, 2)


def test_attention_with_alibi_equals_passing_the_bias_by_hand() -> None:
    n_heads, t = 4, 6
    mha = MultiHeadAttention(32, n_heads, n_kv_heads=2, score_bias=ALiBi(n_heads))
    x = torch.randn(2, t, 32)
    with_module = mha(x, causal=True)
    mha.score_bias = None
    by_hand = mha(x, causal=True, bias=alibi_bias(n_heads, t, t))
    torch.testing.assert_close(with_module, by_hand, rtol=0, atol=ATOL32)
    # The bias does something: without it the output differs.
    assert not torch.allclose(mha(x, causal=True), with_module, atol=1e-3)


def test_attention_with_alibi_decodes_with_a_cache() -> None:
    # Bottom-right alignment: the new query of each decoding step is the newest position.
    mha = MultiHeadAttention(32, 4, score_bias=ALiBi(4))
    x = torch.randn(2, 7, 32)
    full = mha(x, causal=True)
    cache = KVCache()
    prefill = mha(x[:, :4], causal=True, cache=cache)
    steps = [mha(x[:, i : i + 1], causal=True, cache=cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=0, atol=ATOL32)
