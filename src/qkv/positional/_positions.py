"""Small helpers shared by the position encodings and the masks: positions and their checks.

Shape legend: B batch · T query positions · S key/value positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["aligned_positions", "check_position_ids", "relative_positions"]

_INTEGER_DTYPES = (torch.int64, torch.int32)


def check_position_ids(
    position_ids: Tensor, limit: int | None = None, name: str = "max_len"
) -> None:
    """Raise a clear error unless ``position_ids`` are integer positions of shape (T,) or (B, T).

    Args:
        position_ids: the positions to check, (T,) or (B, T).
        limit: when given, every position must lie in [0, limit). On the CPU the values are
            read and a ValueError names the bad one; on a GPU and inside ``torch.compile`` the
            device checks them without making the host wait, and the step fails with a
            RuntimeError naming the range.
        name: the argument that sets ``limit``, quoted in the error message.
    """
    if position_ids.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"position_ids must be torch.long (or torch.int32), got {position_ids.dtype}"
        )
    if position_ids.dim() not in (1, 2):
        raise ValueError(
            f"position_ids must be (T,) or (B, T), got shape {tuple(position_ids.shape)}"
        )
    if limit is None or position_ids.numel() == 0:
        return
    if position_ids.device.type != "cpu" or torch.compiler.is_compiling():
        # Reading the values would make the GPU wait (and break a compiled graph): the device
        # checks them itself, failing the step with this message if one is out of range.
        torch._assert_async(
            ((position_ids >= 0) & (position_ids < limit)).all(),
            f"position_ids out of range: every position must lie in [0, {name}={limit})",
        )
        return
    lo, hi = (int(v) for v in torch.aminmax(position_ids))
    if lo < 0:
        raise ValueError(f"position_ids must be non-negative, got {lo}")
    if hi >= limit:
        raise ValueError(f"sequence of {hi + 1} positions exceeds {name}={limit}; raise {name}")


# --8<-- [start:aligned]
def aligned_positions(
    t: int, s: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Absolute positions of the queries (T, 1) and keys (1, S), aligned bottom-right."""
    if t < 0 or s < 0:
        raise ValueError(f"T and S must be non-negative, got T={t}, S={s}")
    if t > s:
        raise ValueError(
            f"T={t} queries cannot be aligned bottom-right with fewer keys S={s}; "
            "S counts the cached keys plus the new ones, so S >= T"
        )
    query_pos = torch.arange(s - t, s, device=device).unsqueeze(-1)  # (T, 1)
    key_pos = torch.arange(s, device=device).unsqueeze(0)  # (1, S)
    return query_pos, key_pos


# --8<-- [end:aligned]


def relative_positions(t: int, s: int, device: torch.device | str | None = None) -> Tensor:
    """Key position minus query position, j - i, with the T queries aligned bottom-right.

    With a key/value cache the T new queries are the last T of the S positions: query i sits at
    absolute position S - T + i and key j at j.

    >>> relative_positions(2, 3)
    tensor([[-1,  0,  1],
            [-2, -1,  0]])

    Returns:
        (T, S) long tensor.
    """
    query_pos, key_pos = aligned_positions(t, s, device)  # (T, 1), (1, S)
    return key_pos - query_pos  # (T, S)
