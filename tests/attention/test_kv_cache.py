"""The dynamic KV cache's in-place growth against plain concatenation."""

from __future__ import annotations

import torch

from qkv.attention.kv_cache import KVCache


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
