"""Experts in place of a layer's feed-forward network: ``LayerSpec(experts=...)``, the spec's
checks, and the router losses a model adds to its training loss."""

from __future__ import annotations

import pytest
import torch

from qkv.blocks.block import DecoderLayer, EncoderLayer, LayerSpec
from qkv.blocks.mlp import FeedForward, GatedFeedForward
from qkv.blocks.moe import Experts, MixtureOfExperts, experts_regularizer
from tests.conftest import ATOL

TOL = ATOL[torch.float32]


@pytest.mark.parametrize("layer_class", [EncoderLayer, DecoderLayer])
@pytest.mark.parametrize("gated", [False, True])
def test_each_expert_has_the_shape_of_the_network_it_replaces(
    layer_class: type, gated: bool
) -> None:
    spec = LayerSpec(d_model=16, n_heads=4, d_ff=24, gated=gated, activation="gelu", bias=True,
                     dropout=0.1, activation_dropout=0.2,
                     experts=Experts(n_experts=3, top_k=2))  # fmt: skip
    dense = layer_class(LayerSpec(**{**vars(spec), "experts": None})).mlp
    moe = layer_class(spec).mlp
    assert isinstance(moe, MixtureOfExperts) and len(moe.experts) == 3 and moe.top_k == 2
    assert isinstance(dense, GatedFeedForward if gated else FeedForward)
    for expert in moe.experts:
        assert type(expert) is type(dense)
        shapes = {n: p.shape for n, p in expert.named_parameters()}
        assert shapes == {n: p.shape for n, p in dense.named_parameters()}
        assert repr(expert) == repr(dense)  # activation, bias and dropout rate too


def test_a_layer_with_one_expert_computes_the_dense_layer() -> None:
    """One expert, top-1, gates over the chosen: the gate is 1 and the layer is the dense one."""
    torch.manual_seed(0)
    base = LayerSpec(d_model=16, n_heads=4, d_ff=32, norm_first=True, gated=True,
                     activation="silu", norm="rms", bias=False)  # fmt: skip
    dense = DecoderLayer(base, cross_attention=False).eval()
    one = LayerSpec(**{**vars(base), "experts": Experts(n_experts=1, top_k=1)})
    moe = DecoderLayer(one, cross_attention=False)
    state = {k.replace("mlp.", "mlp.experts.0."): v for k, v in dense.state_dict().items()}
    state["mlp.router.weight"] = moe.state_dict()["mlp.router.weight"]
    moe.load_state_dict(state)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(moe.eval()(x), dense(x),
                               atol=TOL, rtol=0.0)  # fmt: skip


def test_the_regularizer_is_the_mean_over_layers_of_the_weighted_losses() -> None:
    torch.manual_seed(1)
    spec = Experts(n_experts=4, top_k=2, aux_loss_coef=0.3, z_loss_coef=0.05)
    layers = torch.nn.Sequential(
        *(MixtureOfExperts.from_spec(spec, 8, 16, gated=False, activation="gelu", bias=True,
                                     dropout=0.0) for _ in range(3))
    )  # fmt: skip
    assert experts_regularizer(layers) is None  # no forward yet
    layers(torch.randn(2, 5, 8))
    outputs = [m.last_output for m in layers if isinstance(m, MixtureOfExperts)]
    want = sum(0.3 * o.aux_loss + 0.05 * o.z_loss for o in outputs if o is not None) / 3
    got = experts_regularizer(layers)
    assert got is not None and got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0.0)
    got.backward()  # the gradient reaches every router
    assert all(m.router.weight.grad is not None for m in layers if isinstance(m, MixtureOfExperts))
    assert experts_regularizer(torch.nn.Linear(2, 2)) is None  # no experts: nothing to add


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({"n_experts": 4, "top_k": 5}, ValueError, "lower top_k or add experts"),
        ({"n_experts": 4, "capacity_factor": 0}, ValueError, "capacity_factor must be > 0"),
        ({"n_experts": 4, "aux_loss_coef": -1}, ValueError, "must be >= 0"),
        ({"n_experts": 4, "topk": 2}, ValueError, r"unknown experts field\(s\) \['topk'\]"),
        ([4, 2], TypeError, "mapping of Experts fields"),
    ],
)
def test_bad_experts_settings_are_clear_errors(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Experts.of(value)  # type: ignore[arg-type]


def test_of_passes_a_spec_and_none_through() -> None:
    spec = Experts(n_experts=2, top_k=1)
    assert Experts.of(spec) is spec and Experts.of(None) is None
    assert Experts.of({"n_experts": 2, "top_k": 1}) == spec
