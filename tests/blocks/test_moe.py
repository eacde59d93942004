"""The mixture-of-experts block: the sorted path against the loop, routing, capacity, losses."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

import qkv.blocks.moe
from qkv.blocks.mlp import FeedForward, GatedFeedForward
from qkv.blocks.moe import (
    MixtureOfExperts,
    expert_capacity,
    experts_loop,
    experts_sorted,
    load_balancing_loss,
    route,
    router_z_loss,
)
from tests.conftest import ATOL

TOL = ATOL[torch.float32]


def _pair(**kwargs: object) -> tuple[MixtureOfExperts, MixtureOfExperts]:
    """Two blocks with the same weights: the loop and the sorted implementation."""
    loop = MixtureOfExperts(16, 24, 4, impl="loop", **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():  # a router sharp enough that some experts get most tokens
        loop.router.weight.normal_(0.0, 0.5)
    fast = MixtureOfExperts(16, 24, 4, impl="sorted", **kwargs)  # type: ignore[arg-type]
    fast.load_state_dict(loop.state_dict())
    return loop, fast


def _grads(module: MixtureOfExperts, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = module.forward_with_losses(x)
    weight = torch.randn_like(out.output, generator=torch.Generator().manual_seed(1))
    (out.output * weight).sum().backward()
    assert x.grad is not None
    return x.grad, [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()
    ]


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("gated", "gate_softmax"), [(True, "top_k"), (False, "all")])
def test_sorted_equals_loop(
    capacity_factor: float | None, top_k: int, gated: bool, gate_softmax: str
) -> None:
    loop, fast = _pair(
        top_k=top_k, gated=gated, capacity_factor=capacity_factor, gate_softmax=gate_softmax,
        activation="silu" if gated else "gelu",
    )  # fmt: skip
    x = torch.randn(3, 11, 16)  # (B, T, D)
    a, b = loop.forward_with_losses(x), fast.forward_with_losses(x)
    torch.testing.assert_close(b.output, a.output, atol=TOL, rtol=0.0)
    assert torch.equal(a.stats.tokens_per_expert, b.stats.tokens_per_expert)
    assert torch.equal(a.stats.dropped_per_expert, b.stats.dropped_per_expert)  # same drops
    if capacity_factor == 0.5:
        assert a.stats.dropped_fraction > 0  # the case really drops tokens
    x_grad_a, grads_a = _grads(loop, x)
    x_grad_b, grads_b = _grads(fast, x)
    torch.testing.assert_close(x_grad_b, x_grad_a, atol=TOL, rtol=0.0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, atol=TOL, rtol=0.0)


@pytest.mark.parametrize("capacity", [None, 1, 3, 5])
def test_both_paths_serve_the_same_choices(capacity: int | None) -> None:
    experts = nn.ModuleList(FeedForward(8, 12) for _ in range(3))
    x = torch.randn(10, 8)  # (N, D)
    gates, chosen = route(torch.randn(10, 3), top_k=2)  # (N, k)
    out_a, served_a = experts_loop(x, experts, gates, chosen, capacity)
    out_b, served_b = experts_sorted(x, experts, gates, chosen, capacity)
    assert torch.equal(served_a, served_b)
    torch.testing.assert_close(out_b, out_a, atol=TOL, rtol=0.0)


def test_capacity_serves_first_choices_first_then_by_position() -> None:
    """Expert 0 takes 3 tokens: the first choices of tokens 1 and 3, then token 0's second."""
    chosen = torch.tensor([[1, 0], [0, 1], [2, 0], [0, 2], [1, 0]])  # (N, k), N = 5
    gates = torch.full((5, 2), 0.5)
    experts = nn.ModuleList(FeedForward(4, 8) for _ in range(3))
    x = torch.randn(5, 4)
    expected = torch.tensor(
        [[True, True], [True, True], [True, False], [True, True], [True, False]]
    )  # expert 0 is each token's choice: 0 (2nd), 1 (1st), 2 (2nd), 3 (1st), 4 (2nd)
    for impl in (experts_loop, experts_sorted):
        out, served = impl(x, experts, gates, chosen, 3)
        assert torch.equal(served, expected), impl.__name__
        # Token 2 keeps only its first choice: expert 2, gate 0.5; expert 0 adds nothing.
        torch.testing.assert_close(out[2], 0.5 * experts[2](x[2:3])[0], atol=TOL, rtol=0.0)


def test_dropped_tokens_count_and_give_zero() -> None:
    moe = MixtureOfExperts(8, 16, 4, top_k=1, capacity_factor=0.25)  # C = ceil(N / 16)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # every token with a positive sum prefers expert 0
    x = torch.rand(1, 16, 8) + 0.1  # (B, T, D), all positive: all go to expert 0
    out = moe(x)
    stats = moe.last_stats
    assert stats is not None and stats.capacity == 1
    assert stats.tokens_per_expert.tolist() == [16, 0, 0, 0]
    assert stats.dropped_per_expert.tolist() == [15, 0, 0, 0]
    assert stats.dropped_fraction == 15 / 16
    assert (out[0, 1:] == 0).all() and (out[0, 0] != 0).any()  # only the first token served
    torch.testing.assert_close(stats.load_share, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_capacity_formula() -> None:
    assert expert_capacity(10, 4, 2, None) is None
    assert expert_capacity(10, 4, 2, 1.0) == 5  # ceil(1.0 * 10 * 2 / 4)
    assert expert_capacity(10, 4, 1, 1.25) == math.ceil(1.25 * 10 / 4) == 4


def test_top_k_gates_are_a_softmax_over_the_chosen_logits() -> None:
    logits = torch.randn(7, 5)
    gates, chosen = route(logits, top_k=2, gate_softmax="top_k")
    assert torch.equal(chosen, logits.topk(2).indices)
    probs = logits.softmax(-1).gather(-1, chosen)  # renormalised probabilities (transformers)
    torch.testing.assert_close(gates, probs / probs.sum(-1, keepdim=True), atol=TOL, rtol=0.0)
    torch.testing.assert_close(gates.sum(-1), torch.ones(7), atol=TOL, rtol=0.0)
    switch, top1 = route(logits, top_k=1, gate_softmax="all")
    torch.testing.assert_close(switch[:, 0], logits.softmax(-1).max(-1).values)
    assert torch.equal(top1[:, 0], logits.argmax(-1))


def test_switch_router_learns_from_the_main_loss() -> None:
    """With top-1 and Switch's gates (p < 1) the router's weights get a gradient from the
    output alone; with a softmax over one logit (gate 1) they do not."""
    for gate_softmax, learns in (("all", True), ("top_k", False)):
        moe = MixtureOfExperts(8, 16, 4, top_k=1, gate_softmax=gate_softmax)  # type: ignore[arg-type]
        moe(torch.randn(2, 5, 8)).square().sum().backward()
        grad = moe.router.weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == learns, gate_softmax


def test_load_balancing_loss_against_the_formula() -> None:
    n, x_experts, k = 12, 5, 2
    logits = torch.randn(n, x_experts)
    probs = logits.softmax(-1)
    f = torch.zeros(x_experts)
    for t in range(n):
        for i in logits[t].topk(k).indices.tolist():
            f[i] += 1 / n  # share of tokens with expert i among their choices
    p = probs.mean(0)  # mean router probability
    expected = x_experts * sum(f[i] * p[i] for i in range(x_experts))
    torch.testing.assert_close(load_balancing_loss(logits, k), expected, atol=TOL, rtol=0.0)
    # Even routing scores k; a mask leaves rows out exactly.
    torch.testing.assert_close(load_balancing_loss(torch.zeros(8, 4), 2), torch.tensor(2.0))
    mask = torch.tensor([1, 0] * 6)
    torch.testing.assert_close(
        load_balancing_loss(logits, k, mask), load_balancing_loss(logits[::2], k)
    )


def test_router_z_loss_against_the_formula() -> None:
    logits = 3 * torch.randn(9, 4)
    expected = logits.exp().sum(-1).log().square().mean()
    torch.testing.assert_close(router_z_loss(logits), expected, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(router_z_loss(torch.zeros(3, 8)), torch.tensor(math.log(8) ** 2))
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1, 0])
    torch.testing.assert_close(router_z_loss(logits, mask), router_z_loss(logits[mask.bool()]))


def test_the_block_returns_its_losses_and_stats() -> None:
    moe = MixtureOfExperts(8, 16, 4, top_k=2)
    x = torch.randn(2, 5, 8)
    out = moe.forward_with_losses(x)
    assert out.output.shape == x.shape and out.router_logits.shape == (10, 4)
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(out.router_logits, 2))
    torch.testing.assert_close(out.z_loss, router_z_loss(out.router_logits))
    assert out.stats.tokens_per_expert.sum() == 20 and out.stats.dropped_fraction == 0.0
    assert moe.last_stats is None  # forward_with_losses keeps nothing; forward does
    moe(x)
    assert moe.last_output is not None and moe.last_output.aux_loss.requires_grad


@pytest.mark.parametrize("gated", [True, False])
def test_one_expert_is_the_plain_feed_forward(gated: bool) -> None:
    moe = MixtureOfExperts(8, 16, 1, top_k=1, gated=gated, activation="silu")
    assert isinstance(moe.experts[0], GatedFeedForward if gated else FeedForward)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(moe(x), moe.experts[0](x), atol=TOL, rtol=0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_experts": 0}, "n_experts must be at least 1"),
        ({"top_k": 5}, "lower top_k or add experts"),
        ({"top_k": 0}, "top_k=0 must be between 1"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
        ({"capacity_factor": -1.0}, "or None for no limit"),
        ({"impl": "fast"}, r"choose one of \['loop', 'sorted'\]"),
        ({"gate_softmax": "sparse"}, "gate_softmax must be"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    args = {"n_experts": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        MixtureOfExperts(8, 16, **args)


def test_docstring_examples() -> None:
    results = doctest.testmod(qkv.blocks.moe, raise_on_error=False)
    assert results.failed == 0 and results.attempted > 0


@pytest.mark.parametrize("impl", ["loop", "sorted"])
def test_under_bfloat16_autocast_the_sum_stays_in_the_stream_dtype(impl: str) -> None:
    """Under autocast the experts return bfloat16; both paths sum them into float32 tokens."""
    loop, fast = _pair(top_k=2)
    module = loop if impl == "loop" else fast
    x = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    exact = module(x)
    # bfloat16 products are ~1% off; a token whose top-2 is a near tie may route differently
    # under bfloat16 and change entirely, so judge the tokens, most of which must agree.
    error = (out - exact).abs().amax(-1)  # (B, T)
    close = error < 0.05 * exact.abs().amax()
    assert close.float().mean() >= 0.75, error
