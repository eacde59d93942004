"""Relative positions: T5's bucketed bias (Raffel et al. 2020), Shaw et al.'s relative keys."""

from __future__ import annotations

import pytest
import torch

from qkv.attention import KVCache, MultiHeadAttention
from qkv.positional import ShawRelativeKeys, T5RelativeBias, t5_relative_bucket

ATOL32 = 1e-5  # float32 paths, as in tests/conftest.py


def bucket(
    rel: list[int], *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> list[int]:
    out = t5_relative_bucket(
        torch.tensor(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    assert out.dtype == torch.long
    return out.tolist()


def test_bidirectional_buckets_worked_example() -> None:
    # num_buckets=8 -> 4 per sign, offsets > 0 add 4. In each half max_exact = 2: distances 0, 1
    # get buckets 0, 1; distance n >= 2 gets 2 + floor(log(n / 2) / log(16 / 2) * (4 - 2)):
    #   n = 2..5: log(n/2)/log 8 * 2 = 0, 0.39, 0.67, 0.88 -> 2
    #   n = 6: log 3 / log 8 * 2 = 1.06 -> 3;  n = 15: 1.94 -> 3;  n >= 16: >= 2 -> clamped to 3
    rel = [-100, -16, -6, -5, -2, -1, 0, 1, 2, 5, 6, 15, 16, 100]
    expected = [3, 3, 3, 2, 2, 1, 0, 5, 6, 6, 7, 7, 7, 7]
    assert bucket(rel, bidirectional=True, num_buckets=8, max_distance=16) == expected


def test_unidirectional_buckets_worked_example() -> None:
    # Keys after the query (offset > 0) count as distance 0. All 8 buckets serve the past:
    # max_exact = 4, so distances 0..3 are exact; n >= 4 gets 4 + floor(log(n/4) / log 4 * 4):
    #   n = 4, 5: 0, 0.64 -> 4;  n = 6, 7: 1.17, 1.61 -> 5;  n = 8: 2 -> 6;  n = 11: 2.92 -> 6;
    #   n = 12: 3.17 -> 7;  n >= 16: >= 4 -> clamped to 7
    rel = [5, 1, 0, -1, -3, -4, -5, -6, -7, -8, -11, -12, -16, -100]
    expected = [0, 0, 0, 1, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7]
    assert bucket(rel, bidirectional=False, num_buckets=8, max_distance=16) == expected


def test_default_t5_buckets() -> None:
    # num_buckets=32, max_distance=128, bidirectional: 16 per sign, exact below 8,
    # n = 20: 8 + floor(log(20/8) / log(16) * 8) = 8 + floor(2.64) = 10.
    rel = [-200, -128, -20, -8, -7, 0, 1, 7, 20, 127, 128]
    expected = [15, 15, 10, 8, 7, 0, 17, 23, 26, 31, 31]
    assert bucket(rel) == expected


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(8, 16), (32, 128), (10, 50)])
def test_buckets_are_monotone_exact_near_zero_and_in_range(
    bidirectional: bool, num_buckets: int, max_distance: int
) -> None:
    distance = torch.arange(0, 3 * max_distance)
    past, future = (
        t5_relative_bucket(
            rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
        for rel in (-distance, distance)
    )
    for b in (past, future):
        assert torch.all(b[1:] >= b[:-1])  # never decreases as |offset| grows
        assert b.min() >= 0 and b.max() <= num_buckets - 1
    half = num_buckets // 2 if bidirectional else num_buckets
    n_exact = half // 2
    assert torch.equal(past[:n_exact], distance[:n_exact])  # one bucket per small distance
    assert past[-1] == half - 1  # far offsets share the last bucket
    if bidirectional:
        assert torch.equal(future[1:n_exact], distance[1:n_exact] + half)
        assert future[-1] == num_buckets - 1
    else:
        assert torch.all(future == 0)  # the future is not told apart


def test_t5_bias_is_the_embedding_of_the_buckets() -> None:
    rel_bias = T5RelativeBias(3, bidirectional=True, num_buckets=8, max_distance=16)
    q = torch.randn(2, 3, 4, 8)
    out = rel_bias(q, 10)
    assert out.shape == (1, 3, 4, 10)
    # Queries aligned bottom-right: query i is at position 10 - 4 + i.
    rel = torch.arange(10)[None, :] - torch.arange(6, 10)[:, None]  # (T, S)
    buckets = t5_relative_bucket(rel, bidirectional=True, num_buckets=8, max_distance=16)
    weight = rel_bias.relative_attention_bias.weight  # (buckets, H)
    assert torch.equal(out, weight[buckets].permute(2, 0, 1).unsqueeze(0))
    for h in range(3):
        for i in range(4):
            for j in range(10):
                assert out[0, h, i, j] == weight[buckets[i, j], h]
    assert set(rel_bias.state_dict()) == {"relative_attention_bias.weight"}
    with pytest.raises(ValueError, match="n_heads=3"):
        rel_bias(torch.randn(2, 4, 4, 8), 10)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_from_sizes_equals_the_score_bias(bidirectional: bool) -> None:
    rel_bias = T5RelativeBias(3, bidirectional=bidirectional, num_buckets=8, max_distance=16)
    q = torch.randn(2, 3, 4, 8)  # (B, H, T, E)
    for s in (4, 10):
        assert torch.equal(rel_bias.bias(4, s), rel_bias(q, s))  # (1, H, T, S)
    assert rel_bias.bias(0, 5).shape == (1, 3, 0, 5)
    with pytest.raises(ValueError, match="S >= T"):
        rel_bias.bias(4, 3)


def shaw_by_loops(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, m: int) -> torch.Tensor:
    """e_ij = q_i (k_j + a_ij)^T / sqrt(E), a_ij = table[clip(j - i, -m, m) + m], in float64."""
    b, h, t, e = q.shape
    s = k.shape[-2]
    q, k, table = q.double(), k.double(), table.double()
    out = torch.empty(b, h, t, s, dtype=torch.float64)
    for i in range(t):
        for j in range(s):
            offset = j - (s - t + i)  # query i sits at position s - t + i
            a_ij = table[max(-m, min(m, offset)) + m]  # (E,)
            out[:, :, i, j] = (q[:, :, i] * (k[:, :, j] + a_ij)).sum(-1) / e**0.5
    return out


def test_shaw_bias_plus_scores_is_the_papers_formula() -> None:
    shaw = ShawRelativeKeys(head_dim=8, max_distance=2)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 7, 8)
    scores = q @ k.transpose(-2, -1) * 8**-0.5 + shaw(q, 7)  # (B, H, T, S)
    expected = shaw_by_loops(q, k, shaw.table.weight.detach(), 2)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=ATOL32)


def test_shaw_clips_far_offsets() -> None:
    shaw = ShawRelativeKeys(head_dim=4, max_distance=1)
    q = torch.randn(1, 2, 1, 4)
    bias = shaw(q, 6)[0, :, 0]  # the query is at position 5: offsets -5 .. 0
    # Offsets -5 .. -1 all clip to -1 and share one vector; offset 0 has its own.
    assert torch.equal(bias[:, :5], bias[:, :1].expand(2, 5))
    expected = q[0, :, 0] @ shaw.table.weight[[0, 1]].T / 2  # rows for offsets -1 and 0
    torch.testing.assert_close(bias[:, [0, 5]], expected)
    assert shaw.table.weight.shape == (3, 4)


def test_shaw_gradient_reaches_the_table() -> None:
    shaw = ShawRelativeKeys(head_dim=4, max_distance=3)
    shaw(torch.randn(1, 1, 2, 4), 2).sum().backward()
    grad = shaw.table.weight.grad
    assert grad is not None
    # T = S = 2 uses offsets -1, 0, 1 only: rows 2, 3, 4 of 7.
    used = grad.abs().sum(-1) > 0
    assert used.tolist() == [False, False, True, True, True, False, False]


@pytest.mark.parametrize("kind", ["t5", "shaw"])
def test_attention_with_a_relative_score_bias(kind: str) -> None:
    score_bias = (
        T5RelativeBias(4, bidirectional=False, num_buckets=8, max_distance=16)
        if kind == "t5"
        else ShawRelativeKeys(8, max_distance=3)
    )
    mha = MultiHeadAttention(32, 4, n_kv_heads=2, score_bias=score_bias)
    x = torch.randn(2, 6, 32)
    full = mha(x, causal=True)
    assert full.shape == (2, 6, 32)
    # Decoding with a cache gives the same outputs (bottom-right alignment of the bias).
    cache = KVCache()
    prefill = mha(x[:, :4], causal=True, cache=cache)
    steps = [mha(x[:, i : i + 1], causal=True, cache=cache) for i in range(4, 6)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=0, atol=ATOL32)
    # Gradients reach the bias's parameters.
    full.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in score_bias.parameters())


def test_attention_with_shaw_keys_equals_the_papers_attention() -> None:
    shaw = ShawRelativeKeys(8, max_distance=2)
    mha = MultiHeadAttention(16, 2, bias=False, score_bias=shaw)
    x = torch.randn(1, 5, 16)
    q = mha.q_proj(x).view(1, 5, 2, 8).transpose(1, 2)  # (B, H, T, E)
    k = mha.k_proj(x).view(1, 5, 2, 8).transpose(1, 2)  # (B, H, S, E)
    v = mha.v_proj(x).view(1, 5, 2, 8).transpose(1, 2).double()  # (B, H, S, E)
    e = shaw_by_loops(q, k, shaw.table.weight.detach(), 2)  # (B, H, T, S)
    heads = torch.softmax(e, dim=-1) @ v  # (B, H, T, E)
    expected = heads.transpose(1, 2).reshape(1, 5, 16) @ mha.out_proj.weight.double().T
    torch.testing.assert_close(mha(x).double(), expected, rtol=0, atol=ATOL32)
