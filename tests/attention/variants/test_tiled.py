"""Tiled attention (``impl="tiled"``) against the reference: outputs and gradients of q, k, v and
the bias, every mask kind, MHA/GQA/MQA, T != S, sizes that are no multiple of the blocks, half
precision, dropout, ``is_causal`` through the dispatcher; and the claims of its docstring: no
(T, S) tensor is ever allocated (``is_causal`` included: no causal mask is built for it), hidden
blocks are skipped, and only the tiles a mask or the diagonal cuts through are masked.

Shape legend: B batch · T query positions · S key/value positions · H query heads ·
K key/value heads · E head dim.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import qkv
from qkv import masks
from qkv.attention import backends
from qkv.attention.variants import tiled as tiled_module
from qkv.attention.variants.tiled import tiled_attention
from qkv.models.gpt import GPT, PRESETS
from tests.attention.test_core import HEADS, make_mask, make_qkv
from tests.conftest import ATOL

MASK_KINDS = ["none", "causal", "padding", "sliding_window", "random", "empty_row"]
# (T, S): self-attention, and a chunk of new queries over a longer past (decoding: masks aligned
# bottom-right); neither a multiple of the 8-wide test blocks.
SHAPES = {"square": (19, 19), "decode": (5, 21)}
BLOCKS = {"block_q": 8, "block_k": 8}
# Tighter than conftest's HALF_FACTOR (2.0): the tiled path computes in float32, D = rowsum(dO * O)
# included, and rounds each result once, so its largest error is the reference's or less (6,000
# random cases: at most 1.0x). Forming D from the rounded output put about 7% of the cases above
# 1.0x, up to 2.2x.
TILED_HALF_FACTOR = 1.1


def tiled(q, k, v, mask=None, bias=None, dropout_p=0.0, is_causal=False, **blocks):
    """Small blocks by default, so that every test crosses several of them in both directions."""
    blocks = {**BLOCKS, **blocks}
    out, weights = tiled_attention(
        q, k, v, mask, bias=bias, scale=None, dropout_p=dropout_p, is_causal=is_causal, **blocks
    )
    assert weights is None
    return out


def reference(q, k, v, mask=None, bias=None, is_causal=False):
    return qkv.scaled_dot_product_attention(
        q, k, v, mask, bias=bias, is_causal=is_causal, impl="reference"
    )


@pytest.fixture
def small_block_tiled():
    """The tiled backend with 8-wide blocks, registered as "tiled" is (grouped heads and
    ``is_causal`` handled inside): a toy model's 20 positions cross several blocks."""
    name = "test-tiled-8"
    backend = functools.partial(tiled_attention, **BLOCKS)
    qkv.register_backend(name, backend, grouped_kv=True, causal=True)
    try:
        yield name
    finally:
        qkv.unregister_backend(name)


def out_and_grads(fn, inputs, grad_out):
    """fn's output and the gradients of every input that requires one."""
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [x.grad for x in inputs if x.requires_grad]


def test_registered_with_grouped_kv_and_causal() -> None:
    assert "tiled" in qkv.available_backends()
    assert backends.handles_grouped_kv("tiled")  # k, v are never repeated for it
    assert backends.handles_causal("tiled")  # is_causal arrives as a flag, not a (T, S) mask


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_float32_output_and_gradients_match_the_reference(
    shape: str, heads: str, mask_kind: str, with_bias: bool
) -> None:
    h, kv = HEADS[heads]
    (t, s), b, e = SHAPES[shape], 2, 16
    q, k, v = (x.requires_grad_() for x in make_qkv(b, h, kv, t, s, e, torch.float32))
    mask = make_mask(mask_kind, b, t, s)
    inputs = [q, k, v]
    if with_bias:
        inputs.append(torch.randn(h, t, s, requires_grad=True))  # per head, like ALiBi or T5
    grad_out = torch.randn(b, h, t, e)

    def run(fn, *xs):
        return fn(*xs[:3], mask, xs[3] if with_bias else None)

    got = out_and_grads(functools.partial(run, tiled), inputs, grad_out)
    # The reference in float64 on the same float32 values: the exact answer to compare with.
    exact = out_and_grads(
        functools.partial(run, reference), [x.double() for x in inputs], grad_out.double()
    )
    names = ["output", "dq", "dk", "dv", "dbias"]
    for name, g, x in zip(names, got, exact, strict=False):
        assert g.dtype == torch.float32, name
        # Gradients of k and v sum over T queries (and G heads): 1e-5 on the largest of them.
        atol = ATOL[torch.float32] * max(1.0, x.abs().max().item())
        torch.testing.assert_close(g.double(), x, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("shape", [*SHAPES, "uneven"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("extra", ["none", "padding", "sliding_window", "bias"])
def test_is_causal_through_the_dispatcher_is_the_causal_mask(
    shape: str, heads: str, extra: str, small_block_tiled: str
) -> None:
    """``is_causal=True`` (bottom-right aligned, joined with any mask) gives what the reference
    gives with ``masks.causal(T, S) & mask``: outputs and gradients of q, k, v and the bias."""
    h, kv = HEADS[heads]
    (t, s), b, e = {**SHAPES, "uneven": (13, 40)}[shape], 2, 16
    q, k, v = (x.requires_grad_() for x in make_qkv(b, h, kv, t, s, e, torch.float32))
    mask = None
    if extra in ("padding", "sliding_window"):
        mask = make_mask(extra, b, t, s)
    inputs = [q, k, v]
    if extra == "bias":
        inputs.append(torch.randn(h, t, s, requires_grad=True))
    grad_out = torch.randn(b, h, t, e)
    causal = masks.causal(t, s) if mask is None else mask & masks.causal(t, s)

    def fast(q, k, v, bias=None):
        return qkv.scaled_dot_product_attention(
            q, k, v, mask, bias=bias, is_causal=True, impl=small_block_tiled
        )

    got = out_and_grads(fast, inputs, grad_out)
    exact = out_and_grads(
        lambda q, k, v, bias=None: reference(q, k, v, causal, bias),
        [x.double() for x in inputs],
        grad_out.double(),
    )
    for name, g, x in zip(["output", "dq", "dk", "dv", "dbias"], got, exact, strict=False):
        atol = ATOL[torch.float32] * max(1.0, x.abs().max().item())
        torch.testing.assert_close(g.double(), x, atol=atol, rtol=0, msg=name)


def test_is_causal_with_more_queries_than_keys_is_a_clear_error() -> None:
    q, k, v = make_qkv(1, 2, 2, 9, 5, 8, torch.float32)
    with pytest.raises(ValueError, match="S >= T"):
        tiled(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "is_causal", "padding", "empty_row"])
def test_half_precision_is_as_accurate_as_the_reference(
    dtype: torch.dtype, heads: str, mask_kind: str
) -> None:
    """Output and gradients: the error against float64 is at most TILED_HALF_FACTOR
    times the reference's own error in the same dtype."""
    h, kv = HEADS[heads]
    b, t, s, e = 2, 24, 40, 32
    q, k, v = (x.to(dtype) for x in make_qkv(b, h, kv, t, s, e))  # rounded once
    is_causal = mask_kind == "is_causal"
    mask = None if is_causal else make_mask(mask_kind, b, t, s)
    bias = torch.randn(h, t, s).to(dtype)
    grad_out = torch.randn(b, h, t, e).to(dtype)
    inputs = [x.requires_grad_() for x in (q, k, v)]

    def run(fn, q, k, v):
        return fn(q, k, v, mask, bias.to(q.dtype), is_causal=is_causal)

    exact = out_and_grads(
        functools.partial(run, reference), [x.double() for x in inputs], grad_out.double()
    )
    ref = out_and_grads(functools.partial(run, reference), inputs, grad_out)
    fast = out_and_grads(functools.partial(run, tiled), inputs, grad_out)
    for name, x, r, f in zip(["output", "dq", "dk", "dv"], exact, ref, fast, strict=True):
        assert f.dtype == dtype
        ref_err = (r.double() - x).abs().max().item()
        fast_err = (f.double() - x).abs().max().item()
        assert fast_err <= TILED_HALF_FACTOR * ref_err, (name, fast_err, ref_err)


@pytest.mark.parametrize("causal", ["mask", "is_causal", "is_causal_and_padding"])
def test_gradcheck_float64_with_bias_mask_and_grouped_heads(causal: str) -> None:
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 4, 2, 5, 7, 3))
    bias = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    mask = {
        "mask": masks.causal(5, 7),
        "is_causal": None,
        "is_causal_and_padding": masks.padding(torch.tensor([6]), max_len=7),
    }[causal]

    def f(q, k, v, bias):
        return tiled(q, k, v, mask, bias, is_causal=causal != "mask", block_q=2, block_k=3)

    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("bias_shape", [(1, 1, 1, 21), (2, 1, 5, 1), (5, 21)])
def test_bias_that_broadcasts_gets_its_own_shape_of_gradient(bias_shape: tuple[int, ...]) -> None:
    q, k, v = make_qkv(2, 4, 2, 5, 21, 8, torch.float32)
    bias = torch.randn(bias_shape, requires_grad=True)
    mask = make_mask("causal", 2, 5, 21)
    grad_out = torch.randn(2, 4, 5, 8)
    (got,) = torch.autograd.grad(tiled(q, k, v, mask, bias), bias, grad_out)
    (want,) = torch.autograd.grad(reference(q, k, v, mask, bias), bias, grad_out)
    assert got.shape == bias.shape
    torch.testing.assert_close(got, want, atol=ATOL[torch.float32], rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_row_is_zero_with_zero_grad(dtype: torch.dtype) -> None:
    q, k, v = (x.to(dtype).requires_grad_() for x in make_qkv(2, 2, 2, 12, 17, 8))
    mask = torch.ones(2, 1, 12, 17, dtype=torch.bool)
    mask[:, :, 9] = False  # query 9 sees nothing
    bias = torch.randn(2, 12, 17, dtype=dtype)  # a bias must not resurrect a masked row
    for b in (None, bias):
        out = tiled(q, k, v, mask, b)
        assert not out.isnan().any()
        assert (out[:, :, 9] == 0).all()
        grad_q, grad_k = torch.autograd.grad(out.float().square().sum(), (q, k))
        assert not grad_q.isnan().any() and not grad_k.isnan().any()
        assert (grad_q[:, :, 9] == 0).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_dispatcher_runs_it_with_its_default_blocks(is_causal: bool) -> None:
    """Through ``impl="tiled"``: GQA heads shared inside, 300 queries over several blocks of the
    default size, below 1200 keys (a causal mask given, or ``is_causal``)."""
    t, s = 300, 1200
    q, k, v = make_qkv(1, 4, 2, t, s, 16, torch.float32)
    mask = None if is_causal else masks.causal(t, s)
    out = qkv.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, impl="tiled")
    exact = reference(q.double(), k.double(), v.double(), masks.causal(t, s))
    torch.testing.assert_close(out.double(), exact, atol=ATOL[torch.float32], rtol=0)


# -- the memory claim -----------------------------------------------------------------------------
class LargestAllocation(TorchDispatchMode):
    """Records the most elements of any tensor an operation creates (views of existing storage
    are not allocations and do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            x.untyped_storage().data_ptr()
            for x in tree_leaves((args, kwargs))
            if isinstance(x, torch.Tensor)
        }
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, x.untyped_storage().nbytes() // x.element_size())
        return out


@pytest.mark.parametrize("fn", ["tiled", "reference"])
def test_no_tensor_grows_with_t_times_s(fn: str) -> None:
    """Forward and backward allocate nothing larger than q itself (B * H * T * E elements); the
    reference, which forms the (B, H, T, S) scores, fails this check: it can fail."""
    b, h, t, s, e = 1, 2, 256, 256, 16
    q, k, v = (x.requires_grad_() for x in make_qkv(b, h, h, t, s, e, torch.float32))
    mask = masks.causal(t, s)  # (T, S): the caller's, allocated before we start counting
    grad_out = torch.randn(b, h, t, e)
    run = tiled if fn == "tiled" else reference
    with LargestAllocation() as spy:
        out = run(q, k, v, mask, block_q=32, block_k=32) if fn == "tiled" else run(q, k, v, mask)
        out.backward(grad_out)
    linear = b * h * t * e  # the size of q, of the output and of each gradient
    if fn == "tiled":
        assert spy.largest <= linear, spy.largest
    else:
        assert spy.largest >= b * h * t * s > linear


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [True, False], ids=["handles_causal", "gets_a_mask"])
def test_is_causal_builds_no_t_by_s_mask(padded: bool, causal: bool) -> None:
    """Through the dispatcher with ``is_causal=True`` (and a (B, 1, 1, S) padding mask): nothing
    as large as T x S is allocated, forward or backward. Registered without ``causal=True``, the
    same backend receives the dispatcher's (T, S) causal mask and fails the check: it can fail."""
    b, h, t, s, e = 2, 2, 256, 320, 16
    q, k, v = (x.requires_grad_() for x in make_qkv(b, h, h, t, s, e, torch.float32))
    mask = masks.padding(torch.tensor([s, s - 50]), max_len=s) if padded else None
    grad_out = torch.randn(b, h, t, e)
    name = "test-tiled-memory"
    backend = functools.partial(tiled_attention, block_q=64, block_k=64)  # a tile: B H 64 64
    qkv.register_backend(name, backend, grouped_kv=True, causal=causal)
    try:
        with LargestAllocation() as spy:
            out = qkv.scaled_dot_product_attention(q, k, v, mask, is_causal=True, impl=name)
            out.backward(grad_out)
    finally:
        qkv.unregister_backend(name)
    linear = b * h * max(t, s) * e  # the size of q or k, and of their gradients
    if causal:
        assert spy.largest <= linear < t * s, spy.largest
    else:
        assert spy.largest >= t * s


def test_blocks_hidden_by_the_mask_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Causal, 64 positions in 16-blocks: 10 of the 16 tiles hold a visible key (4 + 3 + 2 + 1
    on and below the diagonal); the others are never computed, forward or backward."""
    computed = []
    real = tiled_module._scores

    def counting(*args, **kwargs):
        s_ij = real(*args, **kwargs)
        computed.append(s_ij is not None)
        return s_ij

    monkeypatch.setattr(tiled_module, "_scores", counting)
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 2, 64, 64, 8, torch.float32))
    out, _ = tiled_attention(
        q, k, v, masks.causal(64), bias=None, scale=None, dropout_p=0.0, block_q=16, block_k=16
    )
    assert computed.count(True) == 10 and len(computed) == 16
    out.sum().backward()
    assert computed.count(True) == 20 and len(computed) == 32


class CountMaskedFills(TorchDispatchMode):
    """Counts the masked_fill operations that hide scores, in place or not."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.masked_fill, torch.ops.aten.masked_fill_):
            value = args[2] if len(args) > 2 else kwargs["value"]
            self.count += value == float("-inf")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("t", "length", "visited", "computed", "masked"),
    [(64, None, 10, 10, 4), (64, 40, 10, 9, 4), (16, None, 4, 4, 1)],
    ids=["square", "padded", "decode"],
)
def test_is_causal_visits_only_visible_tiles_and_masks_only_where_needed(
    t: int, length: int | None, visited: int, computed: int, masked: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """64 keys in 16-blocks, forward. Square: the 10 tiles on and below the diagonal are visited,
    none above, and only the 4 it crosses are masked. Padded (keys 40.. are padding): of those
    10, the one in the last key block is all padding and skipped; the diagonal tiles and the one
    below it that the padding cuts, (48:64, 32:48), are masked; none else. Decode (16 queries,
    the last 16 of 64 positions): 4 tiles, only the last crossed by the diagonal."""
    calls = []
    real = tiled_module._scores

    def counting(*args, **kwargs):
        s_ij = real(*args, **kwargs)
        calls.append(s_ij is not None)
        return s_ij

    monkeypatch.setattr(tiled_module, "_scores", counting)
    q, k, v = make_qkv(1, 2, 2, t, 64, 8, torch.float32)
    mask = None if length is None else masks.padding(torch.tensor([length]), max_len=64)
    with CountMaskedFills() as fills:
        out = tiled(q, k, v, mask, is_causal=True, block_q=16, block_k=16)
    assert (len(calls), calls.count(True), fills.count) == (visited, computed, masked)
    exact = reference(q.double(), k.double(), v.double(), mask, is_causal=True)
    torch.testing.assert_close(out.double(), exact, atol=ATOL[torch.float32], rtol=0)


# -- dropout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_drops_the_reference_weights_and_rescales_the_rest(is_causal: bool) -> None:
    """With v = identity, the output is the dropped weight matrix itself (causal by a mask, or
    by ``is_causal``)."""
    p, t, s = 0.3, 40, 48
    q, k, _ = make_qkv(2, 2, 2, t, s, 8, torch.float32)
    eye = torch.eye(s).expand(2, 2, s, s)  # (B, H, S, Ev=S)
    mask = masks.causal(t, s)
    _, weights = qkv.reference_attention(q, k, eye, mask)  # (B, H, T, S)
    given = None if is_causal else mask
    dropped = tiled(q, k, eye, given, dropout_p=p, is_causal=is_causal)  # (B, H, T, S)
    kept = dropped != 0
    visible = mask.expand_as(kept)
    assert not kept[~visible].any()  # hidden keys stay hidden
    assert abs(kept[visible].float().mean().item() - (1 - p)) < 0.05
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p), atol=1e-6, rtol=1e-5)


def test_dropout_follows_the_global_seed_and_its_gradients_are_exact() -> None:
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 1, 6, 9, 4))
    bias = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    mask = make_mask("padding", 1, 6, 9)

    def f(q, k, v, bias):  # the same seed, the same dropout masks: a deterministic function
        torch.manual_seed(1234)
        return tiled(q, k, v, mask, bias, dropout_p=0.4, block_q=4, block_k=4)

    assert torch.equal(f(q, k, v, bias), f(q, k, v, bias))
    assert not torch.equal(f(q, k, v, bias), tiled(q, k, v, mask, bias, dropout_p=0.4))
    # The backward pass redraws the forward's masks: the analytic gradient matches finite
    # differences only if it does.
    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-5)


# -- in a model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_gpt_gives_the_reference_logits_and_gradients(padded: bool, small_block_tiled) -> None:
    config = replace(PRESETS["tiny"], dropout=0.0, attn_impl="reference")
    ref_model = GPT(config)
    models = {"reference": ref_model}
    for impl in ("tiled", small_block_tiled):
        models[impl] = GPT(replace(config, attn_impl=impl))
        models[impl].load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, config.vocab_size, (3, 20))
    attention_mask = None
    if padded:  # left padding: the padded queries of row 2 see no key at all
        attention_mask = torch.ones(3, 20, dtype=torch.long)
        attention_mask[1, :5] = 0
        attention_mask[2, :11] = 0
    results = {}
    for impl, model in models.items():
        out = model(ids, attention_mask, labels=ids)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results[impl] = (out.logits.detach(), grads)
    ref_logits, ref_grads = results["reference"]
    for impl in models:
        logits, grads = results[impl]
        torch.testing.assert_close(logits, ref_logits, atol=ATOL[torch.float32], rtol=0)
        # Parameter gradients sum over every position, head and layer: 1e-4 relative on top of
        # ATOL, as test_core.py holds sdpa's gradients to the reference's.
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=ATOL[torch.float32], rtol=1e-4)
