"""Encoder and decoder layers: norm placement, dropout, causality, the KV cache, padding."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import qkv.blocks.block
import qkv.blocks.mlp
import qkv.blocks.norms
from qkv import masks
from qkv.attention.kv_cache import KVCache
from qkv.blocks import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    GatedFeedForward,
    LayerSpec,
    RMSNorm,
)
from tests.conftest import ATOL

D, H, F = 16, 4, 48  # model width, heads, feed-forward width
B, T, S = 2, 7, 5  # batch, target positions, memory positions


class ToyRotary(nn.Module):
    """Rotary position embedding (Su et al. 2021, arXiv:2104.09864), half-split pairs."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor):
        half = q.shape[-1] // 2
        freq = 10_000.0 ** (-torch.arange(half) / half)  # (E/2,)
        angle = position_ids.float()[..., None] * freq  # (T, E/2) or (B, T, E/2)
        if angle.dim() == 3:
            angle = angle[:, None]  # (B, 1, T, E/2)
        cos, sin = angle.cos(), angle.sin()

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

        return rotate(q), rotate(k)


def randomize_(module: nn.Module) -> None:
    """Random weights everywhere, so that unit norm gains and zero biases hide nothing."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)


# Norm placement -----------------------------------------------------------------------------


@pytest.mark.parametrize("layer_cls", [EncoderLayer, DecoderLayer])
def test_pre_norm_and_post_norm_differ(layer_cls: type[nn.Module]) -> None:
    post, pre = layer_cls(D, H, F, norm_first=False), layer_cls(D, H, F, norm_first=True)
    randomize_(post)
    pre.load_state_dict(post.state_dict())  # the same parameters, only their order differs
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    args = (memory,) if layer_cls is DecoderLayer else ()
    assert not torch.allclose(post(x, *args), pre(x, *args), atol=1e-3)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_post_norm_output_is_normalised_pre_norm_is_not(norm: str) -> None:
    """Post-norm ends with the norm (unit RMS per token at init); pre-norm ends with a sum."""
    post = EncoderLayer(D, H, F, norm=norm, norm_first=False)  # type: ignore[arg-type]
    pre = EncoderLayer(D, H, F, norm=norm, norm_first=True)  # type: ignore[arg-type]
    pre.load_state_dict(post.state_dict())
    x = torch.randn(B, T, D) * 5  # a residual stream far from unit scale
    rms = post(x).pow(2).mean(-1).sqrt()  # (B, T)
    torch.testing.assert_close(rms, torch.ones(B, T), atol=1e-3, rtol=0)
    assert pre(x).pow(2).mean(-1).sqrt().mean() > 2  # about 5, the scale of x


def test_submodules_follow_the_options() -> None:
    layer = DecoderLayer(D, H, F, n_kv_heads=2, gated=True, norm="rms", bias=False)
    assert isinstance(layer.mlp, GatedFeedForward) and layer.mlp.up_proj.bias is None
    assert isinstance(layer.attn_norm, RMSNorm) and isinstance(layer.cross_norm, RMSNorm)
    assert layer.self_attn.n_kv_heads == 2 and layer.self_attn.q_proj.bias is None
    gpt = DecoderLayer(D, H, F, cross_attention=False, activation="gelu")
    assert gpt.cross_attn is None and gpt.cross_norm is None and isinstance(gpt.mlp, FeedForward)
    rotary = ToyRotary()
    enc = EncoderLayer(D, H, F, rotary=rotary)
    dec = DecoderLayer(D, H, F, rotary=rotary)
    assert enc.self_attn.rotary is rotary and dec.self_attn.rotary is rotary
    assert dec.cross_attn is not None and dec.cross_attn.rotary is None  # self-attention only


# Dropout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_cls", [EncoderLayer, DecoderLayer])
def test_dropout_only_in_training(layer_cls: type[nn.Module]) -> None:
    layer = layer_cls(D, H, F, dropout=0.3)
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    args = (memory,) if layer_cls is DecoderLayer else ()
    layer.eval()
    torch.testing.assert_close(layer(x, *args), layer(x, *args), atol=0, rtol=0)
    layer.train()
    assert not torch.allclose(layer(x, *args), layer(x, *args), atol=1e-3)


def test_residual_dropout_alone_is_active_in_training() -> None:
    """With attention and hidden dropout switched off, the residual dropout still acts."""
    layer = EncoderLayer(D, H, F, dropout=0.5, norm_first=True)
    layer.self_attn.dropout = 0.0
    assert isinstance(layer.mlp, FeedForward)
    layer.mlp.dropout.p = 0.0
    x = torch.randn(B, T, D)
    assert not torch.allclose(layer(x), layer(x), atol=1e-3)
    layer.dropout.p = 0.0
    torch.testing.assert_close(layer(x), layer.eval()(x), atol=0, rtol=0)


# Properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cross_attention", [True, False], ids=["enc_dec", "decoder_only"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_decoder_is_causal(cross_attention: bool, norm_first: bool) -> None:
    layer = DecoderLayer(
        D, H, F, cross_attention=cross_attention, norm_first=norm_first, rotary=ToyRotary()
    )
    memory = torch.randn(B, S, D) if cross_attention else None
    x = torch.randn(B, T, D)
    t = 3
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(B, T - t - 1, D) * 10
    out, out_changed = layer(x, memory), layer(changed, memory)
    torch.testing.assert_close(
        out[:, : t + 1], out_changed[:, : t + 1], atol=ATOL[torch.float32], rtol=0
    )
    assert not torch.allclose(out[:, t + 1 :], out_changed[:, t + 1 :], atol=1e-3)


def test_encoder_is_permutation_equivariant_without_positions() -> None:
    layer = EncoderLayer(D, H, F, norm="rms", gated=True, activation="silu")
    x = torch.randn(B, T, D)
    perm = torch.randperm(T)
    torch.testing.assert_close(
        layer(x[:, perm]), layer(x)[:, perm], atol=ATOL[torch.float32], rtol=0
    )


def test_encoder_passes_position_ids_to_rotary() -> None:
    layer = EncoderLayer(D, H, F, rotary=ToyRotary())
    x = torch.randn(B, T, D)
    default = layer(x)
    torch.testing.assert_close(layer(x, position_ids=torch.arange(T)), default, atol=0, rtol=0)
    assert not torch.allclose(layer(x, position_ids=torch.arange(T).flip(0)), default, atol=1e-3)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_encoder_padding_does_not_change_real_tokens(norm_first: bool) -> None:
    layer = EncoderLayer(D, H, F, n_kv_heads=2, norm_first=norm_first).eval()
    lengths = torch.tensor([T, 3])
    x = torch.randn(B, T, D)
    x[1, 3:] = torch.randn(T - 3, D) * 100  # garbage in the padding
    out = layer(x, mask=masks.padding(lengths, max_len=T))  # (B, T, D)
    for b, n in enumerate(lengths.tolist()):
        alone = layer(x[b : b + 1, :n])  # the sequence on its own, no padding, no mask
        torch.testing.assert_close(out[b : b + 1, :n], alone, atol=ATOL[torch.float32], rtol=0)


def test_decoder_padding_does_not_change_real_tokens() -> None:
    layer = DecoderLayer(D, H, F, norm_first=True).eval()
    tgt_lengths, memory_lengths = torch.tensor([T, 4]), torch.tensor([2, S])
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    x[1, 4:] = torch.randn(T - 4, D) * 100
    memory[0, 2:] = torch.randn(S - 2, D) * 100
    out = layer(
        x,
        memory,
        self_mask=masks.padding(tgt_lengths, max_len=T),
        memory_mask=masks.padding(memory_lengths, max_len=S),
    )
    for b, (n, m) in enumerate(zip(tgt_lengths.tolist(), memory_lengths.tolist(), strict=True)):
        alone = layer(x[b : b + 1, :n], memory[b : b + 1, :m])
        torch.testing.assert_close(out[b : b + 1, :n], alone, atol=ATOL[torch.float32], rtol=0)


# The KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize(
    "options",
    [
        {"norm_first": False},
        {"norm_first": True, "n_kv_heads": 2, "rotary": "toy"},
        {
            "norm_first": True,
            "n_kv_heads": 1,
            "gated": True,
            "norm": "rms",
            "bias": False,
            "activation": "silu",
            "cross_attention": False,
            "rotary": "toy",
        },
    ],
    ids=["post_norm", "pre_norm_gqa_rotary", "llama_like"],
)
def test_cached_decoding_equals_full_forward(options: dict, cache_kind: str) -> None:
    options = dict(options)
    if options.pop("rotary", None):
        options["rotary"] = ToyRotary()
    layer = DecoderLayer(D, H, F, **options).eval()
    randomize_(layer)
    cross = layer.cross_attn is not None
    x = torch.randn(B, T, D)
    memory = torch.randn(B, S, D) if cross else None
    memory_mask = masks.padding(torch.tensor([S, 2]), max_len=S) if cross else None
    full = layer(x, memory, memory_mask=memory_mask)  # (B, T, D), causal

    n_kv, head_dim = layer.self_attn.n_kv_heads, layer.self_attn.head_dim
    cache = KVCache.static(B, n_kv, T, head_dim) if cache_kind == "static" else KVCache()
    cross_cache = KVCache()
    prefill = 3
    step_kwargs = {"memory_mask": memory_mask, "cache": cache, "cross_cache": cross_cache}
    steps = [layer(x[:, :prefill], memory, **step_kwargs)]  # prefill: (B, 3, D)
    steps += [layer(x[:, t : t + 1], memory, **step_kwargs) for t in range(prefill, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL[torch.float32], rtol=0)
    assert cache.seq_len == T
    assert cross_cache.seq_len == (S if cross else 0)  # filled once, never appended to again


# LayerSpec: the layer's configuration as typed data ------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_model": 0}, "d_model must be a positive integer, got 0"),
        ({"d_ff": -1}, "d_ff must be a positive integer"),
        ({"n_kv_heads": 0}, "n_kv_heads must be a positive integer"),
        ({"head_dim": 0}, "head_dim must be a positive integer"),
        ({"d_model": 18}, "d_model=18 is not divisible by n_heads=4; .* give head_dim"),
        ({"n_kv_heads": 3}, "n_heads=4 is not divisible by n_kv_heads=3"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"activation": "tanh"}, r"unknown activation 'tanh'; choose one of \['relu'"),
        ({"norm": "batch"}, r"unknown norm 'batch'; choose one of \['layer', 'rms'\]"),
        ({"norm_eps": -1e-6}, "norm_eps must be >= 0"),
    ],
)
def test_layer_spec_rejects_bad_fields_saying_what_to_change(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayerSpec(**{"d_model": D, "n_heads": H, "d_ff": F, **fields})


def test_layer_spec_is_frozen_keyword_only_data() -> None:
    spec = LayerSpec(d_model=D, n_heads=H, d_ff=F)
    with pytest.raises(TypeError):
        LayerSpec(D, H, F)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        spec.d_model = 32  # type: ignore[misc]
    assert spec.kv_heads == H  # None means one key/value head per query head
    assert LayerSpec(d_model=D, n_heads=H, d_ff=F, n_kv_heads=2).kv_heads == 2
    assert LayerSpec(d_model=18, n_heads=4, d_ff=F, head_dim=5).head_dim == 5  # D % H is fine then


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"dropout": 0.1, "norm_first": True, "activation": "gelu"},
        {"n_kv_heads": 2, "gated": True, "norm": "rms", "bias": False, "activation": "silu"},
        {"head_dim": 8, "attn_scale": 1.0, "norm_eps": 1e-6, "attn_impl": "reference"},
    ],
    ids=["defaults", "pre_norm_gelu", "llama_like", "t5_like"],
)
@pytest.mark.parametrize("kind", [EncoderLayer, DecoderLayer])
def test_keyword_form_builds_the_same_spec_and_layer(kind: type[nn.Module], fields: dict) -> None:
    spec = LayerSpec(d_model=D, n_heads=H, d_ff=F, **fields)
    positional = kind(D, H, F, **fields)
    keywords = kind(d_model=D, n_heads=H, d_ff=F, **fields)
    mixed = kind(D, n_heads=H, d_ff=F, **fields)
    from_spec = kind(spec)
    assert positional.spec == keywords.spec == mixed.spec == from_spec.spec == spec
    x, memory = torch.randn(1, 3, D), torch.randn(1, 2, D)
    args = (x, memory) if kind is DecoderLayer else (x,)
    expected = from_spec.eval()(*args)
    for layer in (positional, keywords, mixed):
        layer.load_state_dict(from_spec.state_dict())  # strict: same names, same shapes
        torch.testing.assert_close(layer.eval()(*args), expected)


def test_one_spec_serves_every_layer_and_both_kinds() -> None:
    rotary = ToyRotary()
    spec = LayerSpec(d_model=D, n_heads=H, d_ff=F, n_kv_heads=2, norm_first=True, rotary=rotary)
    enc, dec = EncoderLayer(spec), DecoderLayer(spec, cross_attention=False)
    assert enc.spec is spec and dec.spec is spec and enc.norm_first and dec.norm_first
    assert enc.self_attn.rotary is rotary and dec.self_attn.rotary is rotary
    assert enc.self_attn.n_kv_heads == dec.self_attn.n_kv_heads == 2
    assert dec.cross_attn is None and dec.cross_norm is None
    cross = DecoderLayer(spec)
    assert cross.cross_attn is not None and cross.cross_attn.rotary is None  # positions: self only
    assert spec == LayerSpec(
        d_model=D, n_heads=H, d_ff=F, n_kv_heads=2, norm_first=True, rotary=rotary
    )
    assert spec != LayerSpec(
        d_model=D, n_heads=H, d_ff=F, n_kv_heads=2, norm_first=True, rotary=ToyRotary()
    )  # a different module: a different spec


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EncoderLayer(D, H, F, normfirst=True), "unexpected keyword argument.* normfirst"),
        (lambda: EncoderLayer(D, H, F, cross_attention=False), "cross_attention.*valid ones are"),
        (lambda: DecoderLayer(D, H, F, nrom="rms"), "valid ones are d_model, .*, cross_attention"),
        (lambda: EncoderLayer(D, H), "missing d_ff"),
        (lambda: DecoderLayer(n_heads=H), "missing d_model, d_ff"),
        (lambda: EncoderLayer(D, H, F, 2), "at most 3 positional sizes"),
        (lambda: EncoderLayer(D, H, F, d_ff=F), "multiple values for d_ff"),
        (lambda: EncoderLayer(LayerSpec(d_model=D, n_heads=H, d_ff=F), dropout=0.1), "replace"),
        (lambda: DecoderLayer({"d_model": D}), "takes a LayerSpec or d_model first, got dict"),
    ],
    ids=[
        "typo",
        "decoder_only_keyword_on_encoder",
        "typo_decoder",
        "missing_one",
        "missing_two",
        "too_many_positional",
        "twice",
        "spec_and_keywords",
        "not_a_spec",
    ],
)
def test_layer_arguments_errors_name_the_valid_ones(build: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        build()  # type: ignore[operator]


# Errors and smoke ---------------------------------------------------------------------------


def test_memory_must_match_cross_attention() -> None:
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    with pytest.raises(ValueError, match="cross_attention=True"):
        DecoderLayer(D, H, F)(x)
    with pytest.raises(ValueError, match="cross_attention=False"):
        DecoderLayer(D, H, F, cross_attention=False)(x, memory)
    with pytest.raises(ValueError, match="unknown norm"):
        EncoderLayer(D, H, F, norm="batch")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "layer",
    [
        EncoderLayer(8, 2, 16, dropout=0.1),
        EncoderLayer(8, 2, 16, norm_first=True, norm="rms", gated=True, activation="gelu_tanh"),
        DecoderLayer(8, 2, 16, dropout=0.1),
        DecoderLayer(8, 2, 16, n_kv_heads=1, cross_attention=False, norm_first=True, bias=False),
    ],
    ids=["encoder", "encoder_pre_rms_geglu", "decoder", "decoder_only_mqa"],
)
def test_smoke_forward_backward(layer: nn.Module) -> None:
    x = torch.randn(2, 5, 8, requires_grad=True)
    args = (torch.randn(2, 4, 8),) if getattr(layer, "cross_attn", None) is not None else ()
    out = layer.train()(x, *args)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("module", [qkv.blocks.norms, qkv.blocks.mlp, qkv.blocks.block])
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def test_layer_spec_rates_apart_and_checked() -> None:
    spec = LayerSpec(d_model=16, n_heads=4, d_ff=32, dropout=0.1, attention_dropout=0.0,
                     activation_dropout=0.25)  # fmt: skip
    layer = EncoderLayer(spec)
    assert layer.self_attn.dropout == 0.0 and layer.mlp.dropout.p == 0.25
    same = EncoderLayer(LayerSpec(d_model=16, n_heads=4, d_ff=32, dropout=0.1))
    assert same.self_attn.dropout == 0.1 and same.mlp.dropout.p == 0.1  # None: the one rate
    with pytest.raises(ValueError, match=r"attention_dropout must be in \[0, 1\)"):
        LayerSpec(d_model=16, n_heads=4, d_ff=32, attention_dropout=1.0)
