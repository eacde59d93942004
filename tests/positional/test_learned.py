"""Learned positional embeddings: the range check that holds inside compiled code."""

from __future__ import annotations

import pytest
import torch

from qkv.positional import LearnedPositionalEmbedding


def test_inside_torch_compile_the_range_check_runs_on_the_device() -> None:
    """Compiled, the check does not read the values (no graph break, no wait) and still fails."""
    pe = LearnedPositionalEmbedding(max_len=8, d_model=4)
    compiled = torch.compile(pe, fullgraph=True)  # fullgraph: a value read would fail to trace
    torch.testing.assert_close(compiled(torch.arange(8)), pe.emb.weight[:8])
    with pytest.raises(RuntimeError, match=r"position_ids out of range.*max_len=8"):
        compiled(torch.arange(9))
