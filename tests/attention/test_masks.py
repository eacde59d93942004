"""Masks: the grids drawn in the docs, bottom-right alignment, padding forms, combinations."""

from __future__ import annotations

import pytest
import torch

from qkv import masks


def grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


def test_causal_square_and_bottom_right() -> None:
    assert torch.equal(masks.causal(3), grid(["100", "110", "111"]))
    # Two new queries over five keys (three cached): the last query sees everything.
    assert torch.equal(masks.causal(2, 5), grid(["11110", "11111"]))
    assert torch.equal(masks.causal(1, 4), grid(["1111"]))


def test_causal_rejects_more_queries_than_keys() -> None:
    with pytest.raises(ValueError, match="S >= T"):
        masks.causal(5, 3)


def test_padding_from_lengths_and_attention_mask_agree() -> None:
    lengths = torch.tensor([2, 4, 1])
    from_lengths = masks.padding(lengths, max_len=4)
    am = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    from_am = masks.padding(am)
    assert from_lengths.shape == (3, 1, 1, 4)
    assert torch.equal(from_lengths, from_am)
    assert torch.equal(masks.padding([2, 4, 1]), from_lengths)


def test_padding_left_padded_attention_mask() -> None:
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    m = masks.padding(am)[:, 0, 0]
    assert torch.equal(m, am.bool())


@pytest.mark.parametrize(
    ("arg", "kwargs", "err", "match"),
    [
        (torch.tensor([[0.5, 1.0]]), {}, TypeError, "integers or booleans"),
        (torch.tensor([1.0, 2.0]), {}, TypeError, "lengths must be integers"),
        (torch.tensor([3, -1]), {}, ValueError, "non-negative"),
        (torch.tensor([5]), {"max_len": 3}, ValueError, "does not fit"),
        (torch.zeros(1, 2, 3, dtype=torch.long), {}, ValueError, "lengths"),
    ],
)
def test_padding_bad_input(arg, kwargs, err, match) -> None:
    with pytest.raises(err, match=match):
        masks.padding(arg, **kwargs)


def test_prefix_lm() -> None:
    expected = grid(["1100", "1100", "1110", "1111"])
    assert torch.equal(masks.prefix_lm(2, 4), expected)
    assert torch.equal(masks.prefix_lm(0, 3), masks.causal(3))
    assert masks.prefix_lm(3, 3).all()
    per_row = masks.prefix_lm(torch.tensor([2, 0]), 4)
    assert per_row.shape == (2, 1, 4, 4)
    assert torch.equal(per_row[0, 0], expected)
    assert torch.equal(per_row[1, 0], masks.causal(4))
    with pytest.raises(ValueError, match="between 0 and S"):
        masks.prefix_lm(5, 4)
    # With a cache: the last query over five keys, a prefix of three.
    assert torch.equal(masks.prefix_lm(3, 1, 5), grid(["11111"]))
    assert torch.equal(masks.prefix_lm(3, 5)[-2:], masks.prefix_lm(3, 2, 5))


def test_sliding_window() -> None:
    assert torch.equal(masks.sliding_window(4, 2), grid(["1000", "1100", "0110", "0011"]))
    assert torch.equal(masks.sliding_window(3, 2, causal=False), grid(["110", "111", "011"]))
    # Bottom-right with a cache: the newest query sees the `window` latest keys.
    assert torch.equal(masks.sliding_window(1, 3, 6), grid(["000111"]))
    assert torch.equal(masks.sliding_window(5, 5), masks.causal(5))
    with pytest.raises(ValueError, match="window must be at least 1"):
        masks.sliding_window(3, 0)


def test_masks_combine_with_and_or() -> None:
    combined = masks.causal(4) & masks.padding([3], max_len=4)
    assert combined.shape == (1, 1, 4, 4)
    assert torch.equal(combined[0, 0], grid(["1000", "1100", "1110", "1110"]))
    either = masks.causal(3) | masks.sliding_window(3, 1, causal=False)
    assert torch.equal(either, masks.causal(3))
    assert combined.dtype == torch.bool


# -- Longformer and BigBird: each checked against a definition written out with plain loops -----
def longformer_by_loops(t: int, window: int, global_tokens: list[int]) -> torch.Tensor:
    """Beltagy et al. 2020: window // 2 keys on each side, global tokens see and are seen by all."""
    rows = []
    for i in range(t):
        rows.append(
            [
                abs(i - j) <= window // 2 or i in global_tokens or j in global_tokens
                for j in range(t)
            ]
        )
    return torch.tensor(rows)


@pytest.mark.parametrize(
    ("t", "window", "global_tokens"),
    [(6, 2, [0]), (9, 4, []), (9, 4, [8, 2]), (7, 6, [3]), (5, 2, [0, 1, 2, 3, 4])],
)
def test_longformer_matches_loops(t, window, global_tokens) -> None:
    got = masks.longformer(t, window, global_tokens)
    assert got.dtype == torch.bool and got.shape == (t, t)
    assert torch.equal(got, longformer_by_loops(t, window, global_tokens))
    assert torch.equal(got, got.T)  # window and global attention are both symmetric
    for g in global_tokens:
        assert got[g].all() and got[:, g].all()  # a global token's row and column


def test_longformer_window_counts_half_a_side() -> None:
    mask = masks.longformer(20, 6, [])
    assert mask[10].sum() == 7  # 3 keys before, the query itself, 3 keys after
    assert torch.equal(mask[10].nonzero().flatten(), torch.arange(7, 14))
    assert torch.equal(masks.longformer(6, 2, torch.tensor([0])), masks.longformer(6, 2, [0]))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((8, 0, []), "positive even"),
        ((8, -2, []), "positive even"),
        ((8, 3, []), "positive even.*use 4"),
        ((8, 10, []), "larger than the sequence"),
        ((8, 2, [8]), r"outside the sequence.*\[0, 8\)"),
        ((8, 2, [-1]), "outside the sequence"),
        ((8, 2, [1, 3, 1]), r"repeats \[1\]"),
    ],
)
def test_longformer_errors(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        masks.longformer(*args)


def bigbird_fixed_by_loops(
    t: int, block: int, window_blocks: int, global_blocks: int
) -> torch.Tensor:
    """BigBird without its random blocks: (window_blocks - 1) // 2 blocks a side, global blocks."""
    rows = []
    for i in range(t):
        bi = i // block
        rows.append(
            [
                abs(bi - j // block) <= (window_blocks - 1) // 2
                or bi < global_blocks
                or j // block < global_blocks
                for j in range(t)
            ]
        )
    return torch.tensor(rows)


@pytest.mark.parametrize(
    ("t", "block", "window_blocks", "global_blocks", "random_blocks"),
    [(12, 2, 3, 1, 0), (12, 2, 3, 1, 2), (64, 4, 3, 2, 3), (30, 4, 1, 0, 2), (10, 4, 3, 0, 0)],
)
def test_bigbird_matches_loops(t, block, window_blocks, global_blocks, random_blocks) -> None:
    got = masks.bigbird(t, block, window_blocks, global_blocks, random_blocks, seed=7)
    fixed = bigbird_fixed_by_loops(t, block, window_blocks, global_blocks)
    assert got.dtype == torch.bool and got.shape == (t, t)
    assert torch.equal(got & fixed, fixed)  # window and global blocks are all there
    n = -(-t // block)
    for i in range(t):
        # Whole blocks only: a query sees all or none of a key block, like the others of its block.
        row = got[i]
        assert torch.equal(row, got[(i // block) * block])
        starts = row[::block]
        assert torch.equal(row, starts.repeat_interleave(block)[:t])
        extra = int(starts.sum()) - int(fixed[i][::block].sum())
        # Global query blocks see everything anyway; the others draw exactly random_blocks more.
        assert extra == (0 if i // block < global_blocks else random_blocks)
    if random_blocks == 0:
        assert torch.equal(got, fixed)
        assert torch.equal(got, got.T)
    assert n * block >= t


def test_bigbird_seed_is_deterministic() -> None:
    a = masks.bigbird(128, 4, 3, 1, 2, seed=3)
    assert torch.equal(a, masks.bigbird(128, 4, 3, 1, 2, seed=3))
    assert not torch.equal(a, masks.bigbird(128, 4, 3, 1, 2, seed=4))
    assert not torch.equal(a, a.T)  # random blocks are not symmetric


def test_bigbird_partial_last_block_is_the_padded_mask_cropped() -> None:
    assert torch.equal(
        masks.bigbird(10, 4, 3, 1, 0, seed=0), masks.bigbird(12, 4, 3, 1, 0, seed=0)[:10, :10]
    )
    assert torch.equal(
        masks.bigbird(10, 4, 1, 0, 1, seed=5), masks.bigbird(12, 4, 1, 0, 1, seed=5)[:10, :10]
    )
    blocks = masks.bigbird_blocks(10, 4, 3, 1, 0, seed=0)
    assert blocks.shape == (3, 3)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((8, 0, 1, 0, 0, 0), "block must be at least 1"),
        ((8, 2, 2, 0, 0, 0), "window_blocks must be odd"),
        ((8, 2, 5, 0, 0, 0), "at most the 4 blocks"),
        ((8, 2, 0, 0, 0, 0), "window_blocks must be odd"),
        ((8, 2, 1, 5, 0, 0), "global_blocks must be between 0 and the 4 blocks"),
        ((8, 2, 1, 0, -1, 0), "random_blocks must be at least 0"),
        ((8, 2, 3, 1, 2, 0), "random_blocks=2 is more than query block .* can draw from"),
    ],
)
def test_bigbird_errors(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        masks.bigbird(*args)
