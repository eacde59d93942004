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
