"""Per-head statistics and attention rollout on hand-made weights with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.viz.stats import (
    attention_rollout,
    entropy,
    mean_distance,
    patch_positions,
    special_attention,
    special_token_mask,
)


def random_weights(*shape: int) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_entropy_of_one_hot_uniform_and_mixed_rows() -> None:
    one_hot = torch.eye(4)[None]  # (H, T, S) = (1, 4, 4): each query on one key
    uniform = torch.full((1, 3, 5), 0.2)  # spread over 5 keys
    mixed = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # (0 + log 2) / 2
    assert entropy(one_hot).tolist() == [0.0]
    torch.testing.assert_close(entropy(uniform), torch.tensor([math.log(5)]))
    torch.testing.assert_close(entropy(mixed), torch.tensor([math.log(2) / 2]))


def test_entropy_matches_its_definition_per_head() -> None:
    w = random_weights(2, 3, 6, 6)  # (L, H, T, S)
    by_hand = torch.tensor([[-(w[i, h] * w[i, h].log()).sum(-1).mean() for h in range(3)]
                            for i in range(2)], dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(entropy(w), by_hand)


def test_rows_that_see_no_key_do_not_count() -> None:
    w = torch.tensor([[0.0, 0.0], [0.5, 0.5]])  # query 0 is fully masked
    torch.testing.assert_close(entropy(w), torch.tensor(math.log(2)))
    torch.testing.assert_close(mean_distance(w), torch.tensor(0.5))
    torch.testing.assert_close(special_attention(w, torch.tensor([True, False])), torch.tensor(0.5))


def test_mean_distance_in_tokens() -> None:
    previous = torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])  # (T, S)
    assert mean_distance(previous).item() == pytest.approx(3 / 4)  # 0, 1, 1, 1
    assert mean_distance(torch.eye(4)).item() == 0.0  # every token on itself
    first = torch.zeros(4, 4)
    first[:, 0] = 1.0  # every token on the first one: distances 0, 1, 2, 3
    assert mean_distance(first).item() == pytest.approx(1.5)
    # Fewer queries than keys (a cache): the 2 queries are positions 2 and 3.
    assert mean_distance(first[2:]).item() == pytest.approx(2.5)
    w = random_weights(3, 5, 5)
    by_hand = (w * (torch.arange(5)[:, None] - torch.arange(5)).abs()).sum(-1).mean(-1)
    torch.testing.assert_close(mean_distance(w), by_hand)


def test_mean_distance_over_image_patches() -> None:
    coords = patch_positions((2, 2), patch_size=16, cls=False)  # (N, 2), in pixels
    assert coords.tolist() == [[0, 0], [0, 16], [16, 0], [16, 16]]
    w = torch.zeros(4, 4)
    w[:, 3] = 1.0  # every patch looks at the bottom-right one
    expected = (math.hypot(16, 16) + 16 + 16 + 0) / 4
    got = mean_distance(w, coords, coords)
    assert got.item() == pytest.approx(expected)
    with_cls = patch_positions((2, 2))
    assert with_cls[0].tolist() == [0.5, 0.5]  # [CLS] sits at the centre


def test_attention_to_special_tokens() -> None:
    tokens = ["[CLS]", "the", "cat", ".", "[SEP]"]
    special = special_token_mask(tokens)
    assert special.tolist() == [True, False, False, False, True]
    assert special_token_mask(["<s>", "a", "</s>", "<|endoftext|>", "<pad>", "<3"]).tolist() == [
        True, False, True, True, True, False,
    ]  # fmt: skip
    assert special_token_mask(tokens, special=["."]).tolist() == [False, False, False, True, False]
    w = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0, 0.0]])  # (T, S)
    assert special_attention(w, special).item() == pytest.approx((0.7 + 0.0) / 2)
    heads = random_weights(2, 4, 5)  # (H, T, S)
    torch.testing.assert_close(
        special_attention(heads, special), (heads[..., 0] + heads[..., 4]).mean(-1)
    )


def test_rollout_of_a_two_layer_case_worked_by_hand() -> None:
    # Layer 1, two heads whose mean is [[1, 0], [.5, .5]]; layer 2, one pattern in both heads.
    layer1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # (H, T, T)
    layer2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]).expand(2, 2, 2)
    weights = torch.stack([layer1, layer2])  # (L, H, T, T) = (2, 2, 2, 2)
    # (A + I) / 2 per layer:  A1 -> [[1, 0], [.25, .75]],  A2 -> [[.5, .5], [0, 1]]
    # R = A2 A1 = [[.5 * 1 + .5 * .25, .5 * .75], [.25, .75]]
    expected = torch.tensor([[0.625, 0.375], [0.25, 0.75]])
    torch.testing.assert_close(attention_rollout(weights), expected)
    # Without the residual: the plain product of the head means.
    plain = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # [[0, 1], [0, 1]] @ [[1, 0], [.5, .5]]
    torch.testing.assert_close(attention_rollout(weights, residual=False), plain)


def test_rollout_rows_sum_to_one_and_batches() -> None:
    w = random_weights(3, 4, 2, 6, 6)  # (B, L, H, T, T)
    r = attention_rollout(w)  # (B, T, T)
    assert r.shape == (3, 6, 6)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 6, dtype=torch.float64))
    torch.testing.assert_close(r[1], attention_rollout(w[1]))
    one = attention_rollout(w[0, :1])  # a single layer: (mean of heads + I) / 2
    torch.testing.assert_close(one, (w[0, 0].mean(0) + torch.eye(6, dtype=torch.float64)) / 2)


def test_rollout_needs_square_self_attention() -> None:
    with pytest.raises(ValueError, match="self-attention"):
        attention_rollout(random_weights(2, 2, 3, 5))
