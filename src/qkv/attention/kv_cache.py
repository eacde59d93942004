"""The key/value cache: why generating token n+1 need not recompute tokens 1..n.

A decoder generates one token at a time. Under a causal mask the keys and values of past
positions never change, so each attention layer keeps them and, at every step, computes q, k, v
for the new token only, appends k and v, and attends over the whole cache. Each step then costs
O(S) instead of re-running O(S^2) attention over the full prefix.

Two layouts:
    * dynamic (default): the cache grows as needed, any length. It appends in place into
      storage with room to spare (at most twice the positions it holds), and moves to storage
      twice as large when that is full, so most steps allocate nothing. (The plain way,
      ``torch.cat`` at every step, copies the whole cache every time: the same keys and
      values, more work; the tests compare the two.)
    * static (``KVCache.static``): memory for ``max_len`` positions is allocated once and filled
      in place, so shapes stay fixed; writing past the end is a clear error.

For cross-attention the cache holds the encoder's keys and values, computed once at the first
decoding step and reused afterwards.

Shape legend: B batch · K key/value heads · S cached positions · E head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer.

    Example:
        >>> import torch
        >>> cache = KVCache()
        >>> k, v = cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
        >>> k, v = cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
        >>> cache.seq_len, tuple(k.shape)
        (4, (1, 2, 4, 4))
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None  # (B, K, S_max, E) when static, (B, K, S, E) when dynamic
        self._v: Tensor | None = None
        self._len = 0
        self._static = False
        self._owned = True  # False while _k, _v are the caller's tensors (never written into)
        self.cross = False  # True once it holds a cross-attention's (encoder's) keys and values

    @classmethod
    def static(
        cls,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        head_dim_v: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache with room for ``max_len`` positions, allocated once."""
        cache = cls()
        e_v = head_dim if head_dim_v is None else head_dim_v
        cache._k = torch.zeros(
            batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device
        )
        cache._v = torch.zeros(batch_size, n_kv_heads, max_len, e_v, dtype=dtype, device=device)
        cache._static = True
        return cache

    @property
    def seq_len(self) -> int:
        """How many positions the cache holds."""
        return self._len

    @property
    def max_len(self) -> int | None:
        """Capacity of a static cache; None for a dynamic one."""
        return self._k.shape[-2] if self._static and self._k is not None else None

    @property
    def keys(self) -> Tensor | None:
        """The cached keys (B, K, S, E), or None when empty."""
        return None if self._k is None or self._len == 0 else self._k[..., : self._len, :]

    @property
    def values(self) -> Tensor | None:
        """The cached values (B, K, S, Ev), or None when empty."""
        return None if self._v is None or self._len == 0 else self._v[..., : self._len, :]

    def __len__(self) -> int:
        return self._len

    # --8<-- [start:update]
    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys and values (B, K, T, E) and return all of them (B, K, S + T, E)."""
        t = k.shape[-2]
        if not self._static and (self._k is None or self._v is None or self._len == 0):
            self._k, self._v, self._owned = k, v, False  # kept as given: a cross cache stops here
            self._len = t
            return k, v
        assert self._k is not None and self._v is not None
        if k.shape[:-2] != self._k.shape[:-2] or k.shape[-1] != self._k.shape[-1]:
            raise ValueError(
                f"keys of shape {tuple(k.shape)} do not fit the cached keys of shape "
                f"{tuple(self._k.shape)} (B, K, S, E) in batch, heads or head size"
            )
        if self._len + t > self._k.shape[-2] or not self._owned:
            if self._static:
                raise ValueError(
                    f"static KV cache overflow: it holds {self._len} of {self._k.shape[-2]} "
                    f"positions and {t} more were given; allocate a larger max_len"
                )
            # Dynamic and full: move to storage for twice the new length, so that appending
            # n tokens one by one copies the cache O(log n) times, not n times.
            room = 2 * (self._len + t)
            self._k, self._v = self._moved(self._k, room), self._moved(self._v, room)
            self._owned = True
        self._k[..., self._len : self._len + t, :] = k  # written in place: no new tensor
        self._v[..., self._len : self._len + t, :] = v
        self._len += t
        return self._k[..., : self._len, :], self._v[..., : self._len, :]  # (B, K, S + T, E)

    def _moved(self, x: Tensor, room: int) -> Tensor:
        """The first ``seq_len`` positions of ``x`` in new storage for ``room`` positions."""
        storage = x.new_empty(*x.shape[:-2], room, x.shape[-1])  # (B, K, room, E)
        storage[..., : self._len, :] = x[..., : self._len, :]
        return storage

    # --8<-- [end:update]

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on (to rewind, e.g. after a rejected draft)."""
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot crop a cache of {self._len} positions to {length}")
        self._len = length  # the positions from ``length`` on are overwritten by later updates

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (B',), e.g. the surviving hypotheses of a beam search."""
        if self._k is not None and self._v is not None:
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)
            self._owned = True  # new tensors of our own

    def reset(self) -> None:
        """Empty the cache (a static one keeps its memory)."""
        self._len = 0
        self.cross = False
        if not self._static:
            self._k = self._v = None


def kv_cache_bytes_per_token(
    n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes the KV cache keeps for each token of context: 2 x L x K x E x bytes per number.

    Every layer (L) keeps a key and a value (2) for each key/value head (K), each E numbers of
    ``dtype``. Multi-head attention has K = H; grouped-query attention shares each key/value head
    among H / K query heads and multi-query attention has K = 1, so both shrink the cache by H / K
    at the same L and E. A batch of B sequences of S tokens holds B x S times this many bytes.

    Args:
        n_layers: L, attention layers with a cache.
        n_kv_heads: K, key/value heads per layer.
        head_dim: E, the size of one key (and of one value).
        dtype: the cache's dtype.

    Returns:
        Bytes per token (per sequence of the batch).

    Example:
        >>> kv_cache_bytes_per_token(32, 32, 128, torch.float16)  # LLaMA-2-7B: MHA, 0.5 MiB
        524288
        >>> kv_cache_bytes_per_token(32, 8, 128, torch.bfloat16)  # Llama-3-8B: GQA, K = 8
        131072
    """
    for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return 2 * n_layers * n_kv_heads * head_dim * dtype.itemsize
