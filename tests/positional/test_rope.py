"""Rotary position embeddings: properties, an independent complex-number reference, attention."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.attention import KVCache, MultiHeadAttention
from qkv.positional import RotaryEmbedding, apply_rotary, rope_frequencies, rotate_half

ATOL32 = 1e-5  # float32 against a float64 reference, as in tests/conftest.py


def complex_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Independent reference in float64: pair i is the complex number x[i] + i x[i + E/2],
    multiplied by e^{i p θ_i} with θ_i = base^(-2i/E)."""
    e = x.shape[-1]
    x = x.double()
    z = torch.complex(x[..., : e // 2], x[..., e // 2 :])  # (..., T, E/2)
    theta = base ** (-torch.arange(e // 2, dtype=torch.float64) * 2 / e)  # (E/2,)
    angle = positions.double().unsqueeze(-1) * theta  # (..., T, E/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)  # (..., T, E)


def test_frequencies_and_rotate_half_worked_values() -> None:
    # E = 4: θ_0 = 10000^0 = 1, θ_1 = 10000^(-2/4) = 1/100.
    torch.testing.assert_close(rope_frequencies(4), torch.tensor([1.0, 0.01]), rtol=1e-7, atol=0)
    assert torch.equal(
        rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0])
    )
    with pytest.raises(ValueError, match="head_dim=5 must be even"):
        rope_frequencies(5)


def test_golden_two_dims() -> None:
    # E = 2, one pair with θ = 1: the unit vector (1, 0) at position p turns to (cos p, sin p).
    rope = RotaryEmbedding(2)
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 3, 2)
    q_rot, _ = rope(q, q, torch.tensor([0, 1, 2]))
    expected = torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [math.cos(2), math.sin(2)]])
    torch.testing.assert_close(q_rot[0, 0], expected, rtol=0, atol=1e-7)


def test_matches_complex_number_reference() -> None:
    rope = RotaryEmbedding(16)
    q = torch.rand(2, 4, 6, 16) * 2 - 1  # |x| <= 1 keeps float32 angle errors below 1e-5
    k = torch.rand(2, 2, 6, 16) * 2 - 1
    pos = torch.randint(0, 64, (2, 6))
    q_rot, k_rot = rope(q, k, pos)
    torch.testing.assert_close(q_rot.double(), complex_rope(q, pos[:, None]), rtol=0, atol=ATOL32)
    torch.testing.assert_close(k_rot.double(), complex_rope(k, pos[:, None]), rtol=0, atol=ATOL32)


def test_position_zero_is_the_identity() -> None:
    rope = RotaryEmbedding(8)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    q_rot, k_rot = rope(q, k, torch.zeros(4, dtype=torch.long))
    assert torch.equal(q_rot, q) and torch.equal(k_rot, k)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    k_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    t=st.integers(1, 9),
    half_e=st.integers(1, 16),
    offset=st.integers(0, 1000),
)
def test_rotation_preserves_every_norm(
    b: int, k_heads: int, group: int, t: int, half_e: int, offset: int
) -> None:
    e = 2 * half_e
    rope = RotaryEmbedding(e)
    q, k = torch.randn(b, k_heads * group, t, e), torch.randn(b, k_heads, t, e)
    q_rot, k_rot = rope(q, k, torch.arange(offset, offset + t))
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_scores_depend_only_on_the_offset() -> None:
    # The same q and k vectors placed at every position m and n: score[m, n] must depend only on
    # n - m, i.e. the matrix of scores is constant along its diagonals.
    t, e = 24, 16
    rope = RotaryEmbedding(e)
    q0, k0 = torch.randn(e), torch.randn(e)
    q0, k0 = q0 / q0.norm(), k0 / k0.norm()
    q, k = q0.expand(1, 1, t, e), k0.expand(1, 1, t, e)
    q_rot, k_rot = rope(q, k, torch.arange(t))
    scores = (q_rot @ k_rot.transpose(-2, -1))[0, 0]  # (T, T)
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], rtol=0, atol=ATOL32)
    # and they do change with the offset (without any rotation every score would be the same)
    assert (scores[0] - scores[0, 0]).abs().max() > 1e-2


def test_per_row_positions_equal_rotating_each_row() -> None:
    # A left-padded batch: row b's tokens start at position offsets[b].
    rope = RotaryEmbedding(8)
    q, k = torch.randn(3, 4, 5, 8), torch.randn(3, 2, 5, 8)
    offsets = torch.tensor([0, 7, 2])
    pos = torch.arange(5) + offsets[:, None]  # (B, T)
    q_rot, k_rot = rope(q, k, pos)
    for b in range(3):
        q_b, k_b = rope(q[b : b + 1], k[b : b + 1], pos[b])
        torch.testing.assert_close(q_rot[b : b + 1], q_b, rtol=0, atol=1e-6)
        torch.testing.assert_close(k_rot[b : b + 1], k_b, rtol=0, atol=1e-6)


def test_grouped_kv_heads_are_rotated_like_query_heads() -> None:
    rope = RotaryEmbedding(8)
    q = torch.randn(2, 6, 5, 8)
    k = q[:, :2].clone()  # K = 2 != H = 6
    q_rot, k_rot = rope(q, k, torch.arange(3, 8))
    assert k_rot.shape == (2, 2, 5, 8)
    assert torch.equal(k_rot, q_rot[:, :2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_dtype(dtype: torch.dtype) -> None:
    rope = RotaryEmbedding(16)
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    pos = torch.arange(10, 16)
    q_half, k_half = rope(q.to(dtype), k.to(dtype), pos)
    assert q_half.dtype == dtype and k_half.dtype == dtype
    q32, k32 = rope(q, k, pos)
    eps = torch.finfo(dtype).eps  # q, cos, sin and the products each round once; ~4 eps seen
    torch.testing.assert_close(q_half.float(), q32, rtol=0, atol=16 * eps)
    torch.testing.assert_close(k_half.float(), k32, rtol=0, atol=16 * eps)


def test_cos_sin_shapes_and_dtype() -> None:
    rope = RotaryEmbedding(8)
    cos, sin = rope.cos_sin(torch.arange(5), torch.bfloat16)
    assert cos.shape == sin.shape == (5, 8) and cos.dtype == torch.bfloat16
    cos, sin = rope.cos_sin(torch.arange(5).expand(3, 5), torch.float32)
    assert cos.shape == (3, 5, 8)
    # Both halves share the angles: pair (i, i + E/2) turns together.
    assert torch.equal(cos[..., :4], cos[..., 4:]) and torch.equal(sin[..., :4], sin[..., 4:])
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos))
    q = torch.randn(3, 5, 8)
    torch.testing.assert_close(apply_rotary(q, cos, sin), complex_rope(q, torch.arange(5)).float())


def test_casting_the_module_keeps_float32_angles() -> None:
    # model.to(torch.bfloat16) casts every floating buffer, inv_freq included.
    rope = RotaryEmbedding(16)
    cast = RotaryEmbedding(16).to(torch.bfloat16)
    assert cast.inv_freq.dtype == torch.bfloat16
    pos = torch.arange(1000, 1010)
    (cos, sin), (cos_ref, sin_ref) = (
        cast.cos_sin(pos, torch.float32),
        rope.cos_sin(pos, torch.float32),
    )
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)


def test_errors_are_clear() -> None:
    rope = RotaryEmbedding(8, max_seq_len=16)
    q = torch.randn(1, 2, 4, 8)
    rope(q, q, torch.arange(12, 16))  # the last allowed position
    with pytest.raises(ValueError, match="sequence of 17 positions exceeds max_seq_len=16"):
        rope(q, q, torch.arange(13, 17))
    with pytest.raises(ValueError, match="same T positions"):
        rope(q, q, torch.arange(3))
    with pytest.raises(ValueError, match="batch size"):
        rope(q, q, torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match="head_dim=8"):
        rope(torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 6), torch.arange(4))
    with pytest.raises(TypeError, match=r"torch\.long"):
        rope(q, q, torch.arange(4.0))
    assert "inv_freq" not in rope.state_dict()
    # Without max_seq_len any position works (no overflow check, no device sync).
    RotaryEmbedding(8)(q, q, torch.arange(10**6, 10**6 + 4))


def test_attention_with_rope_sees_only_relative_positions() -> None:
    mha = MultiHeadAttention(32, 4, n_kv_heads=2, rotary=RotaryEmbedding(8))
    x = torch.randn(2, 6, 32)
    out = mha(x, causal=True)
    shifted = mha(x, causal=True, position_ids=torch.arange(6) + 9)
    torch.testing.assert_close(shifted, out, rtol=0, atol=ATOL32)
    # The positions matter: the same tokens without rotation give different outputs.
    mha.rotary = None
    assert not torch.allclose(mha(x, causal=True), out, atol=1e-3)


def test_attention_with_rope_decodes_with_a_cache() -> None:
    mha = MultiHeadAttention(32, 4, n_kv_heads=2, rotary=RotaryEmbedding(8))
    x = torch.randn(2, 7, 32)
    full = mha(x, causal=True)
    cache = KVCache()
    prefill = mha(x[:, :5], causal=True, cache=cache)
    steps = [mha(x[:, i : i + 1], causal=True, cache=cache) for i in range(5, 7)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=0, atol=ATOL32)
