"""The Mixtral-style decoder: config, loss with the router losses, decoding, presets.

Parity with transformers' ``MixtralForCausalLM`` is in ``tests/interop/test_hf_mixtral.py``.
"""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch

import qkv.models.mixtral
from qkv.blocks.moe import MixtureOfExperts, load_balancing_loss, router_z_loss
from qkv.models.common import causal_lm_loss
from qkv.models.mixtral import PRESETS, Mixtral, MixtralConfig
from tests.models.decoding import CACHE_KINDS, assert_close, new_cache, run_decoder

TINY = PRESETS["tiny"]


def _model(**changes: object) -> Mixtral:
    model = Mixtral(dataclasses.replace(TINY, **changes))  # type: ignore[arg-type]
    with torch.no_grad():  # routers sharp enough that the choice of experts matters
        for moe in model.moe_layers():
            moe.router.weight.normal_(0.0, 0.5)
    return model


def test_every_layer_has_a_mixture_of_experts() -> None:
    model = Mixtral(TINY)
    assert all(isinstance(layer.mlp, MixtureOfExperts) for layer in model.layers)
    moe = model.moe_layers()[0]
    assert (moe.n_experts, moe.top_k, moe.capacity_factor) == (4, 2, None)


@pytest.mark.parametrize(("name", "count"), [("mixtral-8x7b", 46_702_792_704), ("tiny", 63_904)])
def test_preset_parameter_counts(name: str, count: int) -> None:
    """8x7B: what transformers' MixtralForCausalLM has with the same sizes (on the meta device)."""
    with torch.device("meta"):
        model = Mixtral(PRESETS[name])
    assert model.num_parameters() == count


def test_loss_adds_the_router_losses() -> None:
    model = _model(router_aux_loss_coef=0.3, router_z_loss_coef=0.01)
    ids = torch.randint(0, 128, (2, 7))  # (B, T)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding: left out of the router losses
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, mask, labels=labels)
    logits = torch.cat(out.router_logits)  # (L N, X), every layer's tokens
    real = mask.reshape(-1).repeat(2)  # (L N,)
    aux, z = load_balancing_loss(logits, 2, real), router_z_loss(logits, real)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.z_loss, z)
    expected = causal_lm_loss(out.logits, labels) + 0.3 * aux + 0.01 * z
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    router_grad = model.moe_layers()[0].router.weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0
    without = model(ids, mask)  # the router losses are there for a trainer to add
    assert without.loss is None and len(without.router_logits) == 2
    torch.testing.assert_close(without.aux_loss, aux)


def test_loop_and_sorted_models_agree() -> None:
    fast = _model(capacity_factor=0.75).eval()
    loop = Mixtral(dataclasses.replace(fast.config, moe_impl="loop")).eval()
    loop.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 128, (3, 8))
    with torch.no_grad():
        assert_close(loop(ids).logits, fast(ids).logits)
    for a, b in zip(fast.router_stats(), loop.router_stats(), strict=True):
        assert torch.equal(a.dropped_per_expert, b.dropped_per_expert)  # the same tokens dropped
    assert sum(s.dropped_fraction for s in fast.router_stats()) > 0


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_one_token_at_a_time_with_the_cache_equals_one_forward(kind: str) -> None:
    model, ids = _model().eval(), torch.randint(0, 128, (2, 10))
    cached = run_decoder(model, ids, [1] * 10, cache=new_cache(model, kind, 2, 10))
    with torch.no_grad():
        assert_close(cached, model(ids).logits)


def test_forward_backward_smoke_and_training_lowers_the_loss() -> None:
    model = Mixtral(TINY)
    ids = torch.randint(0, 128, (2, 8)).repeat(2, 1)  # (B, T), a tiny repeated batch
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_router_stats_need_a_forward() -> None:
    model = Mixtral(TINY)
    with pytest.raises(RuntimeError, match="run the model first"):
        model.router_stats()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"top_k": 5}, "lower top_k or add experts"),
        ({"n_experts": 0}, "n_experts must be positive"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
        ({"router_aux_loss_coef": -1.0}, "must be >= 0"),
        ({"d_model": 30}, "d_model"),  # LLaMA's own checks still apply
    ],
)
def test_config_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MixtralConfig(**{**dataclasses.asdict(TINY), **changes})


def test_wrong_config_type() -> None:
    with pytest.raises(TypeError, match="MixtralConfig"):
        Mixtral(qkv.models.llama.PRESETS["tiny"])  # type: ignore[arg-type]


def test_docstring_examples() -> None:
    results = doctest.testmod(qkv.models.mixtral, raise_on_error=False)
    assert results.failed == 0 and results.attempted > 0
