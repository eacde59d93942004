"""Each logits processor equals its formula on hand-made numbers; sampling is reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.generate import (
    generate,
    greedy,
    min_p_filter,
    process_logits,
    repetition_penalty,
    sample,
    temperature,
    top_k_filter,
    top_p_filter,
)
from tests.generate.conftest import source_vocab, tiny

INF = float("inf")


def test_greedy_takes_the_argmax() -> None:
    assert greedy(torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.0, 3.0]])).tolist() == [1, 0]


def test_temperature_divides_the_logits() -> None:
    z = torch.tensor([[2.0, -1.0, 0.5]])
    torch.testing.assert_close(temperature(z, 0.5), torch.tensor([[4.0, -2.0, 1.0]]))
    # p ∝ exp(z / τ): a lower temperature sharpens the distribution.
    assert temperature(z, 0.5).softmax(-1)[0, 0] > z.softmax(-1)[0, 0]


def test_top_k_keeps_the_k_largest() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, -1.0, 2.0, 3.0]])
    assert top_k_filter(z, 2).tolist() == [[-INF, 3.0, 2.0, -INF], [4.0, -INF, -INF, 3.0]]
    assert top_k_filter(z, 10).tolist() == z.tolist()  # k beyond V keeps everything


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    z = probs.log()
    # Sorted: 0.5, 0.3, 0.15, 0.05. Mass before each: 0, 0.5, 0.8, 0.95.
    kept = lambda p: (top_p_filter(z, p) > -INF)[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.6
    assert kept(0.9) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # always at least one token
    # The kept logits are unchanged.
    assert top_p_filter(z, 0.6)[0, 1] == z[0, 1]


def test_min_p_keeps_tokens_near_the_most_likely() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.15, 0.5, 0.35]])
    out = min_p_filter(probs.log(), 0.4)  # bars: 0.24 and 0.2
    assert (out > -INF).tolist() == [[True, True, False], [False, True, True]]
    assert (min_p_filter(probs.log(), 0.0) > -INF).all()
    assert (min_p_filter(probs.log(), 1.0) > -INF).sum().item() == 2  # only each row's max


def test_repetition_penalty_matches_its_definition() -> None:
    z = torch.tensor([[2.0, -1.0, 3.0, -4.0], [1.0, 1.0, -2.0, 0.5]])
    seen = torch.tensor([[0, 1, 1], [3, 2, 3]])  # repeats count once
    theta = 2.0
    expected = z.clone()
    for b, row in enumerate(seen.tolist()):
        for v in set(row):
            x = z[b, v].item()
            expected[b, v] = x / theta if x > 0 else x * theta
    torch.testing.assert_close(repetition_penalty(z, seen, theta), expected, atol=0, rtol=0)
    assert repetition_penalty(z, seen, theta).tolist() == [
        [1.0, -2.0, 3.0, -4.0],
        [1.0, 1.0, -4.0, 0.25],
    ]


def test_process_logits_skips_unset_steps_and_keeps_the_order() -> None:
    z = torch.randn(3, 11)
    assert process_logits(z) is z  # nothing set: no work at all
    seen = torch.tensor([[1], [2], [3]])
    steps = repetition_penalty(z, seen, 1.3)
    steps = top_p_filter(top_k_filter(temperature(steps, 0.7), 5), 0.9)
    expected = min_p_filter(steps, 0.05)
    out = process_logits(z, seen=seen, repetition=1.3, tau=0.7, top_k=5, top_p=0.9, min_p=0.05)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_sample_follows_the_distribution_and_the_seed() -> None:
    z = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1), -INF]]).expand(20_000, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample(z, g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.02, rtol=0)
    assert freq[3] == 0  # -inf is never drawn
    again = sample(z, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("name", ["gpt", "t5"])
def test_seeded_sampling_is_reproducible(name: str) -> None:
    model = tiny(name)
    prompt = torch.randint(3, source_vocab(model), (2, 5))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=2.0, eos_token_id=[])
    a = generate(model, prompt, seed=7, **kw)
    b = generate(model, prompt, seed=7, **kw)
    c = generate(model, prompt, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_filters_that_leave_one_token_equal_greedy(name: str) -> None:
    model = tiny(name)
    prompt = torch.randint(3, source_vocab(model), (2, 5))
    expected = generate(model, prompt, max_new_tokens=8, eos_token_id=[])
    kw = dict(max_new_tokens=8, do_sample=True, eos_token_id=[], seed=0)
    assert torch.equal(generate(model, prompt, top_k=1, **kw), expected)
    assert torch.equal(generate(model, prompt, top_p=1e-6, **kw), expected)
    assert torch.equal(generate(model, prompt, min_p=1.0, **kw), expected)


def test_repetition_penalty_in_generation_matches_a_plain_loop() -> None:
    model = tiny("gpt")
    prompt = torch.randint(3, 128, (1, 4))
    theta = 1.8
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            logits = model(ids).logits[:, -1]
            logits = repetition_penalty(logits, ids, theta)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    out = generate(model, prompt, max_new_tokens=10, eos_token_id=[], repetition_penalty=theta)
    assert torch.equal(out, ids)
