"""One autocast copy of an input that several products read (``qkv._kernels.autocast_input``).

Under bfloat16 autocast every ``F.linear`` casts its input itself; attention's q, k and v
products and a gated network's gate and up products read the same input, which they now cast
once and share. The output must not change at all, the input's gradient only by rounding, and
the backward pass must keep one bfloat16 copy of the input where it kept one per product.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import qkv.attention.multihead
import qkv.blocks.mlp
from qkv import MultiHeadAttention
from qkv.blocks.mlp import GatedFeedForward

# Where each module looks the helper up, and the module under test.
CASES: dict[str, tuple[object, Callable[[], nn.Module]]] = {
    "attention": (qkv.attention.multihead, lambda: MultiHeadAttention(d_model=32, n_heads=4)),
    "gated": (qkv.blocks.mlp, lambda: GatedFeedForward(32, 64, activation="silu")),
}


def _run(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Output and input gradient under bf16 autocast, and how many saved copies of x there are."""
    leaf = x.detach().requires_grad_()
    # Not a leaf, as in a model (autocast keeps one cast of a leaf that requires grad: weights).
    x = leaf.clone()
    x_bf16 = x.detach().to(torch.bfloat16)
    storages: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        same_size = t.dtype == torch.bfloat16 and t.numel() == x.numel()
        if same_size and torch.equal(t.reshape(x.shape), x_bf16):
            storages.add(t.untyped_storage().data_ptr())
        return t

    saving = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with saving, torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)  # (B, T, D)
    out.float().square().sum().backward()
    assert leaf.grad is not None
    return out.detach(), leaf.grad, len(storages)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_copy_same_output(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    where, build = CASES[case]
    torch.manual_seed(0)
    module = build()
    x = torch.randn(2, 5, 32)
    out, grad, copies = _run(module, x)
    with monkeypatch.context() as m:  # autocast's own cast in every product, as before
        m.setattr(where, "autocast_input", lambda t: t)
        out_each, grad_each, copies_each = _run(module, x)
    assert copies == 1
    assert copies_each == (3 if case == "attention" else 2)
    assert torch.equal(out, out_each)  # the same bf16 products on the same bf16 input
    # The input's gradient: three bf16 partial gradients summed in bf16 instead of float32.
    torch.testing.assert_close(grad, grad_each, rtol=2e-2, atol=2e-2 * grad_each.abs().max())
