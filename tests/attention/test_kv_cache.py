"""The dynamic KV cache's in-place growth against plain concatenation, and its size per token."""

from __future__ import annotations

import pytest
import torch

from qkv.attention.kv_cache import KVCache, kv_cache_bytes_per_token


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


# (L, H, K, E): multi-head (K = H), grouped-query (K = H / 4) and multi-query (K = 1) attention.
KV_CONFIGS = {"mha": (3, 8, 8, 16), "gqa": (3, 8, 2, 16), "mqa": (3, 8, 1, 16)}


def filled_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, dtype, tokens: int) -> int:
    """Bytes of the keys and values held by one KVCache per layer, after a prompt of 5 tokens
    and one token at a time up to ``tokens``, batch 1."""
    total = 0
    for _ in range(n_layers):
        cache = KVCache()
        cache.update(*(torch.randn(1, n_kv_heads, 5, head_dim).to(dtype) for _ in range(2)))
        while cache.seq_len < tokens:
            cache.update(*(torch.randn(1, n_kv_heads, 1, head_dim).to(dtype) for _ in range(2)))
        assert cache.keys is not None and cache.values is not None
        total += sum(x.numel() * x.element_size() for x in (cache.keys, cache.values))
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", KV_CONFIGS.values(), ids=KV_CONFIGS.keys())
def test_kv_cache_bytes_per_token_is_what_a_filled_cache_holds(config, dtype) -> None:
    n_layers, _, n_kv_heads, head_dim = config
    tokens = 12
    measured = filled_cache_bytes(n_layers, n_kv_heads, head_dim, dtype, tokens)
    assert kv_cache_bytes_per_token(n_layers, n_kv_heads, head_dim, dtype) * tokens == measured


def test_kv_cache_shrinks_by_query_heads_per_kv_head() -> None:
    per_token = {
        name: kv_cache_bytes_per_token(n_layers, n_kv_heads, head_dim, torch.float16)
        for name, (n_layers, _, n_kv_heads, head_dim) in KV_CONFIGS.items()
    }
    assert per_token["mha"] == 4 * per_token["gqa"] == 8 * per_token["mqa"]
    assert per_token["mqa"] == 2 * 3 * 1 * 16 * 2  # 2 (k and v) x L x K x E x 2 bytes


def test_kv_cache_bytes_per_token_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError, match="n_kv_heads must be at least 1"):
        kv_cache_bytes_per_token(2, 0, 64)
