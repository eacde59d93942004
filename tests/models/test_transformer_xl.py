"""Transformer-XL: the relative shift against the plain per-pair scores, segments with memory
against one forward over the whole text, the stop-gradient, training, clear errors."""

from __future__ import annotations

import doctest
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import qkv.interop
from qkv.attention.masks import causal
from qkv.attention.variants import xl_relative
from qkv.attention.variants.xl_relative import (
    XLRelativeAttention,
    relative_shift,
    xl_position_scores,
    xl_position_scores_reference,
)
from qkv.models import transformer_xl as xl_module
from qkv.models.transformer_xl import (
    PRESETS,
    TransformerXL,
    TransformerXLConfig,
    evaluate_with_memory,
)
from qkv.positional.sinusoidal import sinusoidal_table
from tests.conftest import ATOL


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Width-32 models gain nothing from intra-op threads, and on a busy machine waiting for a
    descheduled worker thread makes every tiny matmul cost milliseconds (as in
    tests/generate/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(**fields: int | float) -> TransformerXLConfig:
    base: dict[str, int | float] = dict(
        vocab_size=50, d_model=32, n_layers=3, n_heads=4, mem_len=64, dropout=0.0
    )
    return TransformerXLConfig(**{**base, **fields})  # type: ignore[arg-type]


# -- the relative shift -------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "m"), [(1, 0), (5, 0), (5, 3), (4, 9)])
def test_shifted_position_scores_equal_the_plain_per_pair_scores(t: int, m: int) -> None:
    s = m + t
    q = torch.randn(2, 3, t, 8, dtype=torch.float64)  # (B, H, T, E)
    r = torch.randn(3, s, 8, dtype=torch.float64)  # (H, S, E)
    expected = xl_position_scores_reference(q, r)  # (B, H, T, S), float64
    fast = xl_position_scores(q.float(), r.float())  # float32
    keep = causal(t, s).expand_as(expected)
    torch.testing.assert_close(
        fast[keep].double(), expected[keep], atol=ATOL[torch.float32], rtol=0
    )
    # The test can fail: without the shift, the scores sit at the wrong distances.
    unshifted = q.float() @ r.float().flip(-2).transpose(-2, -1)
    if t > 1:
        assert not torch.allclose(unshifted[keep].double(), expected[keep], atol=1e-3)


def test_reference_scores_pair_each_query_with_its_distance() -> None:
    # Golden case worked by hand: one head, E = 1, r_d = d + 1, q = (1, 10); T = 2, M = 1.
    q = torch.tensor([1.0, 10.0]).view(1, 1, 2, 1)  # queries at positions 1 and 2
    r = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1)  # distances 0, 1, 2
    # query 0 (position 1): keys 0, 1 at distances 1, 0; key 2 is its future (clamped to 0).
    # query 1 (position 2): keys 0, 1, 2 at distances 2, 1, 0.
    expected = torch.tensor([[2.0, 1.0, 1.0], [30.0, 20.0, 10.0]])
    assert torch.equal(xl_position_scores_reference(q, r)[0, 0], expected)
    assert torch.equal(xl_position_scores(q, r)[0, 0][causal(2, 3)], expected[causal(2, 3)])


def test_the_attention_computes_the_papers_two_terms() -> None:
    # The module (shift, fused attention) against the equation written out with the plain
    # per-pair scores: softmax(((q + u) k^T + (q + v) r_{i-j}^T) / sqrt(E), causal) v.
    attn = XLRelativeAttention(d_model=16, n_heads=2).double()
    x, memory = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 4, 16).double()
    h = torch.cat([memory, x], dim=1)  # (B, S, D), S = 7

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.unflatten(-1, (2, 8)).transpose(-3, -2)  # (..., H, n, E)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
    table = sinusoidal_table(7, 16, interleaved=False).double()  # R_0 .. R_6
    r = heads(attn.pos_proj(table))  # (H, S, E)
    content = (q + attn.u_bias[:, None]) @ k.transpose(-2, -1)  # (B, H, T, S)
    position = xl_position_scores_reference(q + attn.v_bias[:, None], r)  # (B, H, T, S)
    scores = (content + position) / 8**0.5  # E = 8
    weights = scores.masked_fill(~causal(3, 7), float("-inf")).softmax(-1)  # (B, H, T, S)
    out = weights @ v  # (B, H, T, E)
    expected = attn.out_proj(out.transpose(1, 2).flatten(-2))  # (B, T, D)
    torch.testing.assert_close(attn(x, memory), expected, atol=ATOL[torch.float64], rtol=0)


def test_relative_shift_moves_each_row_by_its_distance_to_the_last_query() -> None:
    t, s = 3, 5
    distance = (torch.arange(s - 1, -1, -1)).expand(t, s)  # column k holds distance S - 1 - k
    shifted = relative_shift(distance)
    expected = torch.arange(s - t, s)[:, None] - torch.arange(s)[None]  # i - j, bottom-right
    assert torch.equal(shifted[causal(t, s)], expected[causal(t, s)])


# -- recurrence: segments with memory equal one forward -------------------------------------


def test_segments_with_memory_equal_one_forward_over_the_whole_text() -> None:
    # Layer l's memory holds what layer l - 1 computed for the earlier positions; a causal layer
    # computes the same for them whether or not later tokens follow, and relative positions do
    # not care where a segment starts. So, with memory for all of it, every layer of every
    # segment equals the full forward (three layers, uneven segments).
    model = TransformerXL(small(mem_len=20)).double().eval()
    ids = torch.randint(0, 50, (2, 20))
    full = model(ids)
    memory, pieces = None, []
    for start, stop in [(0, 7), (7, 13), (13, 20)]:
        out = model(ids[:, start:stop], memory)
        pieces.append(out.logits)
        memory = out.memory
    torch.testing.assert_close(
        torch.cat(pieces, dim=1), full.logits, atol=ATOL[torch.float64], rtol=0
    )
    assert memory is not None and memory.shape == (3, 2, 20, 32)
    # The test can fail: without the memory, the second segment's outputs differ.
    alone = model(ids[:, 7:13]).logits
    assert not torch.allclose(alone, full.logits[:, 7:13], atol=1e-3)


def test_one_layer_with_a_short_memory_sees_a_sliding_window() -> None:
    # One layer's memory is the embeddings, so mem_len = m keeps exactly the last m tokens.
    model = TransformerXL(small(n_layers=1, mem_len=4)).double().eval()
    ids = torch.randint(0, 50, (2, 14))
    first = model(ids[:, :8])
    assert first.memory is not None and first.memory.shape == (1, 2, 4, 32)
    second = model(ids[:, 8:], first.memory).logits
    window = model(ids[:, 4:]).logits[:, 4:]
    torch.testing.assert_close(second, window, atol=ATOL[torch.float64], rtol=0)


def test_mem_len_zero_reads_each_segment_alone() -> None:
    model = TransformerXL(small(mem_len=0)).eval()
    ids = torch.randint(0, 50, (1, 10))
    first = model(ids[:, :5])
    assert first.memory is not None and first.memory.shape == (3, 1, 0, 32)
    torch.testing.assert_close(
        model(ids[:, 5:], first.memory).logits, model(ids[:, 5:]).logits, atol=0, rtol=0
    )


# -- the stop-gradient --------------------------------------------------------------------------


def test_no_gradient_flows_into_the_memory() -> None:
    model = TransformerXL(small())
    ids = torch.randint(0, 50, (2, 6))
    first = model(ids, labels=ids)
    assert first.memory is not None
    assert not first.memory.requires_grad and first.memory.grad_fn is None
    memory = torch.randn(3, 2, 6, 32, requires_grad=True)
    out = model(ids, memory, labels=ids)
    assert out.loss is not None
    out.loss.backward()
    assert memory.grad is None
    assert all(p.grad is not None for p in model.parameters())


def test_the_memory_changes_the_attention_but_gets_no_gradient() -> None:
    attn = XLRelativeAttention(d_model=16, n_heads=2)
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 4, 16, requires_grad=True)
    out = attn(x, memory)
    assert not torch.allclose(out, attn(x))
    out.sum().backward()
    assert memory.grad is None


# -- training ---------------------------------------------------------------------------------


def _next_token_loss(model: TransformerXL, ids: torch.Tensor, t: int) -> torch.Tensor:
    """Train segment by segment with memory: the mean loss of the segments (B, N + 1 ids)."""
    memory, total, n = None, torch.zeros(()), 0
    for start in range(0, ids.shape[1] - 1, t):
        window = ids[:, start : start + t + 1]
        out = model(window[:, :-1], memory)
        total = total + F.cross_entropy(out.logits.flatten(0, 1), window[:, 1:].flatten())
        memory, n = out.memory, n + 1
    return total / n


def test_a_tiny_model_learns_a_repeated_pattern() -> None:
    model = TransformerXL(small(vocab_size=16, n_layers=1, mem_len=8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 16, (1, 5)).repeat(4, 4)[:, :17]  # (4, 17): one pattern of 5
    losses = []
    for _ in range(30):
        loss = _next_token_loss(model, ids, t=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_memory_helps_where_the_dependency_is_longer_than_a_segment() -> None:
    # Each row repeats a random block of P = 6 tokens; segments hold T = 4. Within a segment the
    # token P back is never there, so only the memory can tell what comes next.
    vocab, period, t = 16, 6, 4

    def texts(rows: int, n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (rows, period)).repeat(1, n // period + 1)[:, :n]

    model = TransformerXL(small(vocab_size=vocab, n_layers=1, n_heads=2, mem_len=8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = _next_token_loss(model, texts(32, 3 * t + 1), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = texts(16, 24)
    with_memory = evaluate_with_memory(model, ids, t, use_memory=True)
    without = evaluate_with_memory(model, ids, t, use_memory=False)
    assert model.training  # evaluate_with_memory restores the mode
    # Perfect copying would score 5 of 23 tokens at log 16 (0.60); guessing scores log 16 (2.77).
    assert with_memory < 0.6 * math.log(vocab) and with_memory < 0.5 * without


def test_evaluate_with_memory_scores_every_next_token_once() -> None:
    model = TransformerXL(small(mem_len=0))
    ids = torch.randint(0, 50, (2, 9))
    # With one segment covering the text, it is one plain forward's loss over all 8 targets.
    with torch.no_grad():
        logits = model.eval()(ids[:, :-1]).logits  # (2, 8, V)
    expected = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert evaluate_with_memory(model, ids, 8, use_memory=False) == pytest.approx(float(expected))
    assert math.isfinite(evaluate_with_memory(model, ids[0], 3, use_memory=True))


# -- errors, presets, saving --------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        (2, 2, 4, 32),  # from a model with 2 layers
        (3, 2, 4, 16),  # from a model 16 wide
        (3, 1, 4, 32),  # for another batch
        (3, 2, 65, 32),  # longer than mem_len
        (2, 4, 32),  # one layer's memory only
    ],
)
def test_a_memory_of_the_wrong_shape_names_the_expected_one(shape: tuple[int, ...]) -> None:
    model = TransformerXL(small())
    with pytest.raises(ValueError, match=r"memory must be \(L, B, M, D\) = \(3, 2, M, 32\)"):
        model(torch.randint(0, 50, (2, 5)), torch.zeros(shape))


def test_a_memory_from_another_model_is_refused() -> None:
    other = TransformerXL(small(n_layers=2))
    memory = other(torch.randint(0, 50, (1, 4))).memory
    with pytest.raises(ValueError, match="mem_len=64"):
        TransformerXL(small())(torch.randint(0, 50, (1, 4)), memory)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mem_len": -1}, "mem_len must be >= 0"),
        ({"d_model": 15, "n_heads": 5}, "must be even"),
        ({"n_heads": 5}, "not divisible by n_heads"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_configs_say_what_to_change(fields: dict[str, int | float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small(**fields)


def test_input_ids_must_be_a_batch() -> None:
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        TransformerXL(small())(torch.randint(0, 50, (5,)))


def test_presets_build_and_the_tiny_one_trains_a_step() -> None:
    assert TransformerXL(PRESETS["enwik8-base"]).num_parameters() > 40_000_000
    model = TransformerXL(PRESETS["tiny"])
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids)
    assert out.loss is not None
    out.loss.backward()
    assert out.logits.shape == (2, 8, 128)


def test_runs_under_bfloat16_autocast() -> None:
    # How the trainer runs it on a CPU: projections in bf16, u and v follow q's dtype.
    model = TransformerXL(PRESETS["tiny"])
    ids = torch.randint(0, 128, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(ids, labels=ids)
        second = model(ids, first.memory, labels=ids)
    assert second.loss is not None and torch.isfinite(second.loss)
    second.loss.backward()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = TransformerXL(small()).eval()
    model.save_pretrained(tmp_path)
    loaded = qkv.interop.from_pretrained(tmp_path)
    assert isinstance(loaded, TransformerXL) and loaded.config == model.config
    ids = torch.randint(0, 50, (1, 6))
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("module", [xl_module, xl_relative])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0
