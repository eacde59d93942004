"""The decoding fast paths against their plain references: fused q/k/v projections, the pre-norm
inference path of ``DecoderLayer``, and GPT's position embeddings read without an index."""

from __future__ import annotations

import pytest
import torch

from qkv.attention.fused import fused_projections
from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention
from qkv.blocks.block import DecoderLayer
from qkv.generate.cached import CachedDecoder
from qkv.models.common import attention_modules
from qkv.models.gpt import GPT, PRESETS
from tests.conftest import ATOL
from tests.generate.conftest import DECODER_ONLY, tiny, vocab


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("t", [1, 5])
def test_fused_projections_equal_the_plain_ones(n_kv_heads: int, bias: bool, t: int) -> None:
    mha = MultiHeadAttention(d_model=16, n_heads=4, n_kv_heads=n_kv_heads, bias=bias).eval()
    x = torch.randn(2, t, 16)
    with torch.no_grad():
        plain = mha._plain_projections(x)
        with fused_projections([mha]):
            fused = mha._self_projections(x)
            out = mha(x, causal=True)
        reference = mha(x, causal=True)  # outside the block: the plain path
    for a, b in zip(fused, plain, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(out, reference, atol=ATOL[torch.float32], rtol=0)


def test_fused_weights_follow_parameter_changes() -> None:
    mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        with fused_projections([mha]):
            before = mha(x)
        mha.k_proj.weight.add_(torch.randn_like(mha.k_proj.weight))  # an optimizer-like step
        mha.v_proj.bias.mul_(2.0)
        with fused_projections([mha]):
            after = mha(x)
        reference = mha(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, atol=ATOL[torch.float32], rtol=0)
    mha = mha.double()  # new storage and dtype: rebuilt too
    with torch.no_grad(), fused_projections([mha]):
        fused64 = mha(x.double())
    with torch.no_grad():
        torch.testing.assert_close(fused64, mha(x.double()), atol=ATOL[torch.float64], rtol=0)


def test_fused_projections_leave_training_alone() -> None:
    mha = MultiHeadAttention(d_model=16, n_heads=4)
    x = torch.randn(2, 3, 16)
    with fused_projections([mha]):
        assert mha.fuse_projections
        mha(x).sum().backward()  # gradients on: the plain path, which reaches the parameters
    assert not mha.fuse_projections
    assert mha.q_proj.weight.grad is not None and mha.k_proj.weight.grad is not None


def test_fused_weights_built_in_inference_mode_serve_no_grad_later() -> None:
    mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
    x = torch.randn(1, 2, 16)
    with torch.inference_mode(), fused_projections([mha]):
        first = mha(x)
    with torch.no_grad(), fused_projections([mha]):  # the same cached tensors, reused
        second = mha(x)
    torch.testing.assert_close(first.clone(), second, atol=0, rtol=0)


def test_fused_projections_skip_cross_attention_shapes() -> None:
    cross = MultiHeadAttention(d_model=16, n_heads=4, d_context=8).eval()
    with torch.no_grad(), fused_projections([cross]):
        assert not cross.fuse_projections  # its keys come from another width: left plain
        out = cross(torch.randn(1, 2, 16), torch.randn(1, 5, 8))
    assert out.shape == (1, 2, 16)


@pytest.mark.parametrize("cached", [False, True])
def test_pre_norm_inference_path_equals_the_general_path(cached: bool) -> None:
    layer = DecoderLayer(d_model=16, n_heads=4, d_ff=32, norm_first=True, cross_attention=False)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        layer.train()  # dropout 0: the general path (residual_sublayer) gives the same sums
        general = layer(x, causal=True)
        layer.eval()
        if cached:  # one token at a time through the KV cache
            cache = KVCache()
            fast = torch.cat([layer(x[:, i : i + 1], cache=cache) for i in range(6)], dim=1)
        else:
            fast = layer(x, causal=True)
    torch.testing.assert_close(fast, general, atol=ATOL[torch.float32], rtol=0)


def test_gpt_positions_without_index_equal_the_checked_lookup() -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        explicit = model(ids, position_ids=torch.arange(7)).logits  # through pos_emb's checks
        masked = model(ids, torch.ones(2, 7, dtype=torch.long)).logits  # built from a mask
        sliced = model(ids).logits  # a slice of the table
        cache = model.new_cache()
        model(ids[:, :4], cache=cache)
        step = model(ids[:, 4:5], cache=cache).logits  # past = 4: row 4 of the table
    torch.testing.assert_close(sliced, explicit, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(masked, explicit, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(step[:, 0], explicit[:, 4], atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_decoding_with_fused_projections_equals_plain_decoding(family: str) -> None:
    model = tiny(family)
    prompt = torch.randint(3, vocab(model), (2, 5))
    tokens = torch.randint(3, vocab(model), (2, 4))

    def logits_per_step(fused: bool) -> torch.Tensor:
        runner = CachedDecoder(model, prompt, None, max_new_tokens=5, flat=fused)
        with torch.inference_mode(), fused_projections(attention_modules(model) if fused else []):
            steps = [runner.prefill()] + [runner.step(tokens[:, i]) for i in range(4)]
        return torch.stack(steps, dim=1).clone()  # (B, 5, V)

    torch.testing.assert_close(
        logits_per_step(True), logits_per_step(False), atol=ATOL[torch.float32], rtol=0
    )


def test_dynamic_cache_in_place_growth_equals_concatenation() -> None:
    cache = KVCache()
    keys = [torch.randn(2, 3, 5, 4)] + [torch.randn(2, 3, 1, 4) for _ in range(9)]
    keys.append(torch.randn(2, 3, 6, 4))  # several positions at once, past the storage's room
    values = [torch.randn_like(k) for k in keys]
    for i in range(len(keys)):
        k, v = cache.update(keys[i], values[i])
        torch.testing.assert_close(k, torch.cat(keys[: i + 1], dim=-2), atol=0, rtol=0)
        torch.testing.assert_close(v, torch.cat(values[: i + 1], dim=-2), atol=0, rtol=0)
    assert cache.seq_len == 20
    cache.crop(7)  # rewind, then overwrite the positions after 7
    k, _ = cache.update(keys[-1], values[-1])
    torch.testing.assert_close(k, torch.cat([*keys[:3], keys[-1]], dim=-2), atol=0, rtol=0)
    cache.reorder(torch.tensor([1, 1]))
    k, _ = cache.update(keys[1][:1].expand(2, -1, -1, -1), values[1][:1].expand(2, -1, -1, -1))
    expected = torch.cat([*keys[:3], keys[-1]], dim=-2)[[1, 1]]  # (2, 3, 13, 4)
    torch.testing.assert_close(k[:, :, :13], expected, atol=0, rtol=0)


def test_dynamic_cache_never_writes_into_the_callers_tensors() -> None:
    cache = KVCache()
    k0, v0 = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 4, 3)
    saved = k0.clone()
    cache.update(k0, v0)  # kept as given
    cache.crop(2)
    cache.update(torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3))  # must not land in k0
    torch.testing.assert_close(k0, saved, atol=0, rtol=0)
