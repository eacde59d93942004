"""Block-sparse attention: the loop and flex paths against the dense masked reference, its memory
(T x window, not T x T), the fully masked row, the errors."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from qkv.attention import masks
from qkv.attention.backends import repeat_kv
from qkv.attention.core import reference_attention
from qkv.attention.variants import sparse
from qkv.attention.variants.sparse import BlockLayout, block_sparse_attention, block_sparse_loop
from tests.conftest import ATOL

# (name, layout from the pattern, the same pattern as a dense mask from masks.py), for T tokens.
PATTERNS: list[tuple[str, Callable[[int], BlockLayout], Callable[[int], torch.Tensor]]] = [
    (
        "sliding_window",
        lambda t: BlockLayout.sliding_window(t, 9, block=16),
        lambda t: masks.sliding_window(t, 9),
    ),
    (
        "sliding_window_both_sides",
        lambda t: BlockLayout.sliding_window(t, 5, block=8, causal=False),
        lambda t: masks.sliding_window(t, 5, causal=False),
    ),
    ("causal", lambda t: BlockLayout.causal(t, block=16), lambda t: masks.causal(t)),
    (
        "longformer",
        lambda t: BlockLayout.longformer(t, 6, [1, t - 3], block=16),
        lambda t: masks.longformer(t, 6, [1, t - 3]),
    ),
    (
        "bigbird",
        lambda t: BlockLayout.bigbird(t, 8, 3, 1, 1, seed=11),
        lambda t: masks.bigbird(t, 8, 3, 1, 1, seed=11),
    ),
]
HEADS = [pytest.param(4, 4, id="MHA"), pytest.param(4, 2, id="GQA"), pytest.param(4, 1, id="MQA")]


def inputs(h: int, kv: int, t: int, e: int = 8) -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, h, t, e), torch.randn(2, kv, t, e), torch.randn(2, kv, t, e))


def reference_and_grads(q, k, v, mask, bias=None):
    """Output and gradients of the dense masked reference in float64, grouped heads repeated."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    n_rep = q.shape[-3] // k.shape[-3]
    bias = None if bias is None else bias.double()
    out, _ = reference_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, bias=bias)
    out.backward(GRAD_OUT.double() if GRAD_OUT.shape == out.shape else torch.ones_like(out))
    return out, (q.grad, k.grad, v.grad)


GRAD_OUT = torch.empty(0)


def ours_and_grads(fn, q, k, v):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(GRAD_OUT if GRAD_OUT.shape == out.shape else torch.ones_like(out))
    return out, (q.grad, k.grad, v.grad)


def assert_matches(ours, ref) -> None:
    (out, grads), (ref_out, ref_grads) = ours, ref
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL[torch.float32], rtol=0)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), rg, atol=ATOL[torch.float32], rtol=0, msg=name)


@pytest.fixture(autouse=True)
def _random_grad_out() -> None:
    global GRAD_OUT
    GRAD_OUT = torch.empty(0)


@pytest.mark.parametrize("t", [37, 70])  # not multiples of the block sizes (8, 16)
@pytest.mark.parametrize(("h", "kv"), HEADS)
@pytest.mark.parametrize(("name", "layout_of", "mask_of"), PATTERNS, ids=[p[0] for p in PATTERNS])
def test_pattern_layout_matches_dense_reference(name, layout_of, mask_of, h, kv, t) -> None:
    global GRAD_OUT
    layout, mask = layout_of(t), mask_of(t)
    assert torch.equal(layout.dense_mask(), mask)  # the tiles and rule are exactly the pattern
    q, k, v = inputs(h, kv, t)
    GRAD_OUT = torch.randn(2, h, t, 8)
    ref = reference_and_grads(q, k, v, mask)
    assert_matches(ours_and_grads(lambda *x: block_sparse_attention(*x, layout), q, k, v), ref)


@pytest.mark.parametrize(("h", "kv"), HEADS)
@pytest.mark.parametrize(("name", "layout_of", "mask_of"), PATTERNS, ids=[p[0] for p in PATTERNS])
def test_registered_backend_matches_reference(name, layout_of, mask_of, h, kv) -> None:
    global GRAD_OUT
    t = 150  # three backend tiles of 64, the last one short
    mask = mask_of(t)
    q, k, v = inputs(h, kv, t)
    GRAD_OUT = torch.randn(2, h, t, 8)
    ref = reference_and_grads(q, k, v, mask)

    def ours(q, k, v):
        return qkv.scaled_dot_product_attention(q, k, v, mask, impl="block_sparse")

    assert_matches(ours_and_grads(ours, q, k, v), ref)


def test_backend_per_batch_mask_bias_and_fully_masked_rows() -> None:
    t = 90
    mask = masks.padding([40, 90], max_len=t) & masks.causal(t)  # (2, 1, T, S): differs per batch
    mask = mask & ~torch.isin(torch.arange(t), torch.tensor([3, 70]))[:, None]  # 2 rows see nothing
    bias = torch.randn(1, 4, t, t)
    q, k, v = inputs(4, 2, t)
    ref = reference_and_grads(q, k, v, mask, bias)

    def ours(q, k, v):
        return qkv.scaled_dot_product_attention(q, k, v, mask, bias=bias, impl="block_sparse")

    out, grads = ours_and_grads(ours, q, k, v)
    assert_matches((out, grads), ref)
    assert out[:, :, [3, 70]].abs().max() == 0  # no visible key: zero output ...
    assert grads[0][:, :, [3, 70]].abs().max() == 0  # ... and zero gradient


def test_fully_masked_rows_and_empty_query_blocks_are_zero() -> None:
    t = 48
    mask = masks.causal(t).clone()
    mask[16:32] = False  # a whole query block of 16 sees nothing: its tiles are all skipped
    mask[5] = False  # one row inside a kept block sees nothing
    layout = BlockLayout.from_mask(mask, block=16)
    assert layout.kv_blocks[1] == ()
    q, k, v = inputs(2, 2, t)
    ref = reference_and_grads(q, k, v, mask)
    out, grads = ours_and_grads(lambda *x: block_sparse_attention(*x, layout), q, k, v)
    assert_matches((out, grads), ref)
    assert out[:, :, 16:32].abs().max() == 0 and out[:, :, 5].abs().max() == 0
    assert grads[0][:, :, 16:32].abs().max() == 0 and grads[0][:, :, 5].abs().max() == 0
    assert not out.isnan().any()


def test_a_planted_error_is_caught() -> None:
    """The comparison can fail: a layout that drops one tile differs from the reference."""
    t = 40
    good = BlockLayout.sliding_window(t, 9, block=8)
    dropped = (good.kv_blocks[2][1:], *good.kv_blocks[3:])
    bad = BlockLayout(t, t, 8, (*good.kv_blocks[:2], *dropped), good.rule)
    q, k, v = inputs(2, 2, t)
    ref = reference_and_grads(q, k, v, masks.sliding_window(t, 9))
    with pytest.raises(AssertionError):
        assert_matches(ours_and_grads(lambda *x: block_sparse_attention(*x, bad), q, k, v), ref)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def largest_during_forward_and_backward(layout: BlockLayout, b: int, h: int, e: int) -> int:
    q, k, v = (torch.randn(b, h, layout.t, e, requires_grad=True) for _ in range(3))
    with LargestTensor() as seen:
        block_sparse_attention(q, k, v, layout, impl="loop").sum().backward()
    return seen.largest


def test_memory_grows_with_t_times_window_not_t_squared() -> None:
    b, h, t, e, window, block = 1, 2, 4096, 16, 64, 64
    # Built from the pattern: no (T, T) tensor anywhere. The largest tensors are q, k, v, the
    # output and their gradients (B, H, T, E); one block's scores are (B, H, 64, 3 x 64).
    largest = largest_during_forward_and_backward(
        BlockLayout.sliding_window(t, window, block, causal=False), b, h, e
    )
    assert largest <= b * h * t * e  # 131,072 ...
    assert largest * 100 <= t * t  # ... against 16,777,216 for T x T
    # A global token's query block sees every key: that one row of tiles is (B, H, block, T).
    largest = largest_during_forward_and_backward(
        BlockLayout.longformer(t, window, [0], block=block), b, h, e
    )
    assert largest <= b * h * max(t * e, block * t)


def test_backward_keeps_only_q_k_v() -> None:
    """Autograd keeps q, k and v for the backward, which recomputes each block's scores; the
    plain loop keeps each block's weights twice, 2 x T x (window + block) x H numbers."""
    b, h, t, e = 1, 2, 1024, 16
    layout = BlockLayout.sliding_window(t, 128, 64)
    q, k, v = (torch.randn(b, h, t, e, requires_grad=True) for _ in range(3))
    saved: dict[str, list[int]] = {"attention": [], "loop": []}
    for name, fn in (("attention", block_sparse_attention), ("loop", block_sparse_loop)):
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda x, name=name: saved[name].append(x.numel()) or x, lambda x: x
        )
        with hooks:
            out = fn(q, k, v, layout)
        out.sum().backward()
    assert sum(saved["attention"]) <= 3 * b * h * t * e
    assert sum(saved["loop"]) >= 2 * b * h * t * 128  # the comparison can fail


def test_memory_at_16k_tokens_without_a_dense_mask() -> None:
    t, window, block = 16384, 64, 64
    layout = BlockLayout.sliding_window(t, window, block, causal=False)
    q, k, v = (torch.randn(1, 1, t, 8) for _ in range(3))
    with torch.no_grad(), LargestTensor() as seen:
        out = block_sparse_attention(q, k, v, layout, impl="loop")
    assert out.shape == (1, 1, t, 8)
    assert seen.largest <= t * 8  # the output itself; T x T would be 268 million
    # Spot check a few queries against attention over their window, written directly.
    for i in (0, 5000, t - 1):
        keys = torch.arange(max(0, i - window + 1), min(t, i + window))
        w = torch.softmax(q[0, 0, i] @ k[0, 0, keys].T / 8**0.5, -1)
        torch.testing.assert_close(
            out[0, 0, i], w @ v[0, 0, keys], atol=ATOL[torch.float32], rtol=0
        )


@pytest.mark.slow  # compiles flex_attention (about 10 s on a 2-core CPU)
def test_flex_matches_loop_when_supported() -> None:
    t, device = 100, "cuda" if torch.cuda.is_available() else "cpu"
    why_not = sparse._flex_failure(device, torch.float32, 16)
    if why_not is not None:
        pytest.skip(f"flex_attention cannot run here: {why_not}")
    mask = masks.sliding_window(t, 9) & masks.padding([60], t)[0, 0] | masks.sliding_window(t, 1)
    mask[5] = False  # a query that sees nothing
    q = torch.randn(2, 4, t, 16, device=device)
    k, v = torch.randn(2, 2, t, 16, device=device), torch.randn(2, 2, t, 16, device=device)
    for layout in (BlockLayout.from_mask(mask, 16), BlockLayout.longformer(t, 6, [3, 50], 16)):
        flex = block_sparse_attention(q, k, v, layout, impl="flex")
        loop = block_sparse_attention(q, k, v, layout, impl="loop")
        torch.testing.assert_close(flex, loop, atol=ATOL[torch.float32], rtol=0)
    assert flex.shape == (2, 4, t, 16)


def test_flex_falls_back_to_the_loop_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    sparse._warn_fallback.cache_clear()
    t = 40
    layout = BlockLayout.from_mask(masks.padding([30, 40], t) & masks.causal(t), 16)  # per batch
    q, k, v = inputs(2, 2, t)
    with caplog.at_level(logging.WARNING, logger="qkv.attention.variants.sparse"):
        out = block_sparse_attention(q, k, v, layout, impl="flex")
    assert torch.equal(out, block_sparse_attention(q, k, v, layout, impl="loop"))
    assert "flex_attention cannot run" in caplog.text and "block_sparse_loop" in caplog.text
    assert "differs between batches" in caplog.text


def test_loop_alone_equals_reference_with_dropout_off() -> None:
    t = 33
    layout = BlockLayout.bigbird(t, 4, 3, 2, 1, seed=0)
    q, k, v = inputs(3, 3, t)
    out = block_sparse_loop(q, k, v, layout)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), layout.dense_mask())
    torch.testing.assert_close(out.double(), ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize(
    ("build", "err", "match"),
    [
        (lambda: BlockLayout.sliding_window(10, 0), ValueError, "window must be between 1 and"),
        (lambda: BlockLayout.sliding_window(10, 11), ValueError, "window must be between 1 and"),
        (lambda: BlockLayout.sliding_window(10, 3, block=0), ValueError, "block must be at least"),
        (lambda: BlockLayout.longformer(10, 3, []), ValueError, "positive even"),
        (lambda: BlockLayout.longformer(10, 2, [10]), ValueError, "outside the sequence"),
        (lambda: BlockLayout.bigbird(10, 2, 3, 1, 9, 0), ValueError, "random_blocks=9"),
        (lambda: BlockLayout.from_mask(torch.ones(4, 4)), TypeError, "must be a boolean"),
        (lambda: BlockLayout(8, 8, 4, ((0,),), lambda q, k: q >= k), ValueError, "needs 2"),
        (lambda: BlockLayout(8, 8, 4, ((0,), (2,)), lambda q, k: q >= k), ValueError, "outside"),
    ],
)
def test_layout_errors(build, err, match) -> None:
    with pytest.raises(err, match=match):
        build()


def test_attention_errors() -> None:
    layout = BlockLayout.causal(10, block=4)
    q = torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match="layout is for T=10 queries and S=10 keys"):
        block_sparse_attention(q, q, q, layout)
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="impl must be 'auto', 'loop' or 'flex'"):
        block_sparse_attention(q, q, q, layout, impl="dense")  # type: ignore[arg-type]
    assert "block_sparse" in qkv.available_backends()
