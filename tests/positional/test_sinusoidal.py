"""Sinusoidal (Vaswani et al. 2017) and learned absolute position encodings."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.positional import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    sinusoidal_table,
)


def test_worked_values() -> None:
    # D = 4: frequencies 1 / 10000^(0/4) = 1 and 1 / 10000^(2/4) = 1/100.
    table = sinusoidal_table(3, 4)
    expected = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0],
            [math.sin(1), math.cos(1), math.sin(1 / 100), math.cos(1 / 100)],
            [math.sin(2), math.cos(2), math.sin(2 / 100), math.cos(2 / 100)],
        ]
    )
    assert table.shape == (3, 4) and table.dtype == torch.float32
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-7)


def test_base_changes_the_frequencies() -> None:
    # base = 16, D = 4: frequencies 1 and 1/16^(1/2) = 1/4.
    row = sinusoidal_table(2, 4, base=16.0)[1]
    expected = torch.tensor([math.sin(1), math.cos(1), math.sin(0.25), math.cos(0.25)])
    torch.testing.assert_close(row, expected, rtol=0, atol=1e-7)


def test_each_pair_lies_on_the_unit_circle() -> None:
    table = sinusoidal_table(50, 16).double()
    radius = table[:, 0::2] ** 2 + table[:, 1::2] ** 2  # (N, D/2)
    torch.testing.assert_close(radius, torch.ones_like(radius), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 17])
def test_shift_by_k_is_a_fixed_rotation_of_each_pair(k: int) -> None:
    # [sin(ω(p + k)), cos(ω(p + k))] = [[cos ωk, sin ωk], [-sin ωk, cos ωk]] [sin ωp, cos ωp],
    # the same matrix for every position p.
    n, d = 64, 8
    table = sinusoidal_table(n, d).double()  # (N, D)
    for i in range(d // 2):
        omega = 10000.0 ** (-2 * i / d)
        c, s = math.cos(omega * k), math.sin(omega * k)
        rotation = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
        pair = table[:, 2 * i : 2 * i + 2]  # (N, 2)
        torch.testing.assert_close(pair[:-k] @ rotation.T, pair[k:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("d", [2, 4, 16])
def test_halves_layout_is_the_interleaved_table_with_permuted_columns(d: int) -> None:
    interleaved = sinusoidal_table(40, d)
    halves = sinusoidal_table(40, d, interleaved=False)
    # Column i of the halves layout: sin of frequency i for i < D/2, else cos of i - D/2.
    order = [*range(0, d, 2), *range(1, d, 2)]
    assert torch.equal(halves, interleaved[:, order])
    other_base = sinusoidal_table(40, d, base=16.0)
    assert torch.equal(sinusoidal_table(40, d, base=16.0, interleaved=False), other_base[:, order])


def test_module_in_halves_layout() -> None:
    pe = SinusoidalPositionalEncoding(8, max_len=16, interleaved=False)
    ids = torch.tensor([[0, 3, 15]])
    assert torch.equal(pe(ids), sinusoidal_table(16, 8, interleaved=False)[ids])
    assert "table" not in pe.state_dict()
    assert "interleaved=False" in repr(pe)
    assert "interleaved" not in repr(SinusoidalPositionalEncoding(8, max_len=16))


def test_odd_width_is_an_error() -> None:
    with pytest.raises(ValueError, match="d_model=5 must be even"):
        sinusoidal_table(4, 5)
    with pytest.raises(ValueError, match="must be even"):
        SinusoidalPositionalEncoding(7)


def test_module_looks_up_rows_of_the_table() -> None:
    pe = SinusoidalPositionalEncoding(8, max_len=32)
    table = sinusoidal_table(32, 8)
    ids = torch.randint(0, 32, (3, 5))
    assert torch.equal(pe(ids), table[ids])
    assert pe(ids).shape == (3, 5, 8)
    assert torch.equal(pe(torch.arange(5)), table[:5])
    assert "table" not in pe.state_dict()  # recomputed, never saved


def test_module_follows_dtype_casts() -> None:
    pe = SinusoidalPositionalEncoding(8, max_len=16).to(torch.float64)
    assert pe(torch.arange(3)).dtype == torch.float64


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_overflow_and_bad_ids_are_clear_errors(kind: str) -> None:
    pe: torch.nn.Module
    if kind == "sinusoidal":
        pe = SinusoidalPositionalEncoding(8, max_len=16)
    else:
        pe = LearnedPositionalEmbedding(max_len=16, d_model=8)
    pe(torch.arange(16))  # the last position fits
    with pytest.raises(
        ValueError, match=r"sequence of 17 positions exceeds max_len=16; raise max_len"
    ):
        pe(torch.arange(17))
    with pytest.raises(ValueError, match="non-negative"):
        pe(torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match=r"torch\.long"):
        pe(torch.arange(4).float())
    with pytest.raises(ValueError, match=r"\(T,\) or \(B, T\)"):
        pe(torch.zeros(1, 2, 3, dtype=torch.long))


def test_learned_embedding_looks_up_its_weights() -> None:
    pe = LearnedPositionalEmbedding(max_len=10, d_model=6)
    ids = torch.tensor([[0, 1, 2], [4, 5, 6]])
    out = pe(ids)
    assert out.shape == (2, 3, 6)
    assert torch.equal(out, pe.emb.weight[ids])
    assert set(pe.state_dict()) == {"emb.weight"}
    assert 0.01 < pe.emb.weight.std().item() < 0.03  # N(0, 0.02^2) init


def test_learned_embedding_offset_shifts_the_rows_it_reads() -> None:
    pe = LearnedPositionalEmbedding(max_len=10, d_model=6, offset=2)
    assert pe.emb.weight.shape == (12, 6)  # max_len + offset rows
    assert set(pe.state_dict()) == {"emb.weight"}  # the same key as without an offset
    ids = torch.tensor([[0, 1, 2], [7, 8, 9]])
    assert torch.equal(pe(ids), pe.emb.weight[ids + 2])
    pe(torch.arange(10))  # the last position fits
    with pytest.raises(ValueError, match="exceeds max_len=10"):
        pe(torch.arange(11))
    with pytest.raises(ValueError, match="non-negative"):
        pe(torch.tensor([-1]))  # would read an unused row: refused, not shifted into range
    with pytest.raises(ValueError, match="offset"):
        LearnedPositionalEmbedding(max_len=10, d_model=6, offset=-1)


def test_learned_embedding_trains_only_the_rows_it_used() -> None:
    pe = LearnedPositionalEmbedding(max_len=10, d_model=6)
    pe(torch.tensor([1, 3])).sum().backward()
    grad = pe.emb.weight.grad
    assert grad is not None
    used = torch.zeros(10, dtype=torch.bool)
    used[[1, 3]] = True
    assert torch.all(grad[used] == 1.0) and torch.all(grad[~used] == 0.0)


def test_int32_positions_are_accepted() -> None:
    pe = SinusoidalPositionalEncoding(4, max_len=8)
    assert torch.equal(pe(torch.arange(3, dtype=torch.int32)), pe(torch.arange(3)))
