"""What the model families share: the causal LM loss, teacher forcing's shift, default
positions, finding attention modules, and the checks of a forward's inputs (every text family
gives the same clear errors)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from qkv.attention.kv_cache import KVCache
from qkv.attention.multihead import MultiHeadAttention
from qkv.blocks import DecoderLayer, EncoderLayer
from qkv.models import FAMILIES
from qkv.models.common import (
    IGNORE_INDEX,
    attention_modules,
    causal_lm_loss,
    check_attention_mask,
    check_labels,
    check_token_ids,
    default_position_ids,
    new_kv_caches,
    past_length,
    shift_right,
)


def test_causal_lm_loss_scores_each_position_on_the_next_token() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    terms = [
        -F.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]]
        for b in range(2)
        for t in range(4)
        if labels[b, t + 1] != IGNORE_INDEX
    ]
    expected = torch.stack(terms).mean()
    loss = causal_lm_loss(logits, labels)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_causal_lm_loss_is_computed_in_float32() -> None:
    logits = torch.zeros(1, 3, 4, dtype=torch.bfloat16)  # uniform: loss log 4 at each position
    loss = causal_lm_loss(logits, torch.tensor([[0, 1, 2]]))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(math.log(4)), atol=1e-6, rtol=0)


def test_shift_right() -> None:
    labels = torch.tensor([[5, 6, 7], [8, -100, -100]])
    expected = torch.tensor([[0, 5, 6], [0, 8, 0]])
    assert torch.equal(shift_right(labels, start_token_id=0, pad_token_id=0), expected)


def test_shift_right_with_distinct_start_and_pad() -> None:
    labels = torch.tensor([[7, 8, 9], [7, -100, -100]])
    assert shift_right(labels, 2, 1).tolist() == [[2, 7, 8], [2, 7, 1]]


def test_default_position_ids() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
    assert torch.equal(default_position_ids(mask, 5), expected)
    assert torch.equal(default_position_ids(mask, 2), expected[:, 3:])  # the last 2 of a cache
    assert torch.equal(default_position_ids(None, 3, past=4), torch.tensor([4, 5, 6]))


def test_attention_modules_in_layer_order() -> None:
    encoder = torch.nn.ModuleList(EncoderLayer(16, 2, 32) for _ in range(2))
    decoder = torch.nn.ModuleList(DecoderLayer(16, 2, 32) for _ in range(2))
    assert attention_modules(encoder) == [layer.self_attn for layer in encoder]
    self_attn = [layer.self_attn for layer in decoder]
    cross_attn = [layer.cross_attn for layer in decoder]
    assert attention_modules(decoder, "self_attn") == self_attn
    assert attention_modules(decoder, "cross_attn") == cross_attn
    both = attention_modules(decoder)
    assert both == [self_attn[0], cross_attn[0], self_attn[1], cross_attn[1]]
    assert all(isinstance(m, MultiHeadAttention) for m in both)


def test_new_kv_caches_dynamic_static_and_limits() -> None:
    def make(batch_size: int, max_len: int | None) -> list[KVCache]:
        return new_kv_caches(3, batch_size, max_len, n_kv_heads=2, head_dim=4, max_seq_len=16,
                             dtype=torch.float64, device=torch.device("cpu"))  # fmt: skip

    dynamic = make(2, None)
    assert len(dynamic) == 3 and all(c.max_len is None for c in dynamic)
    assert dynamic[0] is not dynamic[1]  # one cache per layer, not one shared
    static = make(2, 16)
    k, _ = static[0].update(torch.ones(2, 2, 5, 4), torch.ones(2, 2, 5, 4))  # (B, K, S, E)
    assert static[0].max_len == 16 and k.shape == (2, 2, 5, 4) and k.dtype == torch.float64
    with pytest.raises(ValueError, match="max_len=17 exceeds the model's max_seq_len=16"):
        make(2, 17)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        make(0, 8)


def test_past_length_and_the_mask_rule() -> None:
    assert past_length(None, 2) == 0
    caches = [KVCache(), KVCache()]
    caches[0].update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    assert past_length(caches, 2) == 3
    assert past_length([(caches[0], KVCache()), (caches[1], KVCache())], 2) == 3
    with pytest.raises(ValueError, match="the cache has 2 entries for 4 layers"):
        past_length(caches, 4)
    check_attention_mask(None, 5)
    check_attention_mask(torch.ones(2, 5), 5)
    with pytest.raises(ValueError, match=r"decoder_attention_mask must be \(B, past \+ T\)"):
        check_attention_mask(torch.ones(2, 4), 5, "decoder_attention_mask")


def test_check_token_ids() -> None:
    check_token_ids(torch.zeros(2, 3, dtype=torch.long))
    check_token_ids(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"for one sequence, pass input_ids\.unsqueeze\(0\)"):
        check_token_ids(torch.zeros(3, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"^decoder_input_ids must be \(B, T\), got shape \(1, 2, 3\)$"
    ):
        check_token_ids(torch.zeros(1, 2, 3, dtype=torch.long), "decoder_input_ids")
    for dtype in (torch.float32, torch.bool, torch.uint8):
        with pytest.raises(TypeError, match=f"integer token ids .*got {dtype}"):
            check_token_ids(torch.zeros(2, 3, dtype=dtype))


def test_check_attention_mask_rows_and_span() -> None:
    check_attention_mask(torch.ones(2, 5), 5, batch=2)
    check_attention_mask(torch.ones(1, 5), 5, batch=2)  # one mask shared by every row
    with pytest.raises(ValueError, match=r"with B = 2 and past \+ T = 5 .*got shape \(3, 5\)"):
        check_attention_mask(torch.ones(3, 5), 5, batch=2)
    with pytest.raises(ValueError, match=r"^attention_mask must be \(B, S\) with S = 4, 1 = real"):
        check_attention_mask(torch.ones(4), 4, span="S")
    with pytest.raises(ValueError, match=r"got shape \(\)$"):
        check_attention_mask(torch.tensor(1), 4, batch=2)  # a scalar, not an IndexError


def test_check_labels() -> None:
    logits = torch.zeros(2, 3, 7)
    check_labels(torch.zeros(2, 3, dtype=torch.long), logits)
    with pytest.raises(ValueError, match=r"labels must be \(B, T\) = \(2, 3\).*got shape \(2, 4\)"):
        check_labels(torch.zeros(2, 4, dtype=torch.long), logits)
    with pytest.raises(ValueError, match=r"labels must be \(B, T\) = \(2, 3\)"):
        causal_lm_loss(logits, torch.zeros(3, 2, dtype=torch.long))  # same count, wrong shape


# Every text family, built tiny; a family added later is checked too (ViT reads pixels).
TEXT_FAMILIES = sorted(
    family
    for family, model_class in FAMILIES.items()
    if model_class.__module__.startswith("qkv.models.") and family != "vit"
)
SEQ2SEQ = {"bart", "t5", "transformer"}


def _tiny(family: str) -> Any:
    model_class = FAMILIES[family]
    config = importlib.import_module(model_class.__module__).PRESETS["tiny"]
    return model_class(config).eval()


def _call(family: str) -> Callable[..., Any]:
    """The family's forward on (B, T) ids, as ``call(ids, mask=None, labels=None)``; an
    encoder-decoder gets a (B, 3) target."""
    model = _tiny(family)

    def call(ids: torch.Tensor, mask: torch.Tensor | None = None, labels: Any = None) -> Any:
        if family in SEQ2SEQ:
            target = torch.ones(2, 3, dtype=torch.long)
            return model(ids, mask, target, labels=labels)
        if family == "transformer_xl":  # no attention mask: its segments are unpadded
            return model(ids, labels=labels)
        return model(ids, mask, labels=labels)

    return call


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_every_family_checks_its_inputs_the_same_way(family: str) -> None:
    call = _call(family)
    ids = torch.randint(1, 10, (2, 4))  # (B, T)
    with torch.no_grad():
        call(ids)  # well-formed inputs pass
        with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got shape \(4,\)"):
            call(ids[0])
        with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
            call(ids.float())
        if family != "transformer_xl":
            with pytest.raises(ValueError, match=r"attention_mask must be \(B, "):
                call(ids, torch.ones(2, 5, dtype=torch.long))
            with pytest.raises(ValueError, match=r"attention_mask must be \(B, .*B = 2"):
                call(ids, torch.ones(3, 4, dtype=torch.long))
        if family != "bert":  # BERT's labels depend on its head
            with pytest.raises(ValueError, match=r"labels must be \(B, T\)"):
                call(ids, labels=torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_an_encoder_decoder_checks_its_target_against_the_source(family: str) -> None:
    model = _tiny(family)
    ids = torch.randint(1, 10, (2, 4))  # (B, S)
    with torch.no_grad():
        memory = model.encode(ids)  # (B, S, D)
        with pytest.raises(ValueError, match=r"decoder_input_ids must be \(B, T\)"):
            model.decode(torch.ones(3, dtype=torch.long), memory)
        with pytest.raises(ValueError, match=r"must have the same B, .* got 1 and 2"):
            model.decode(torch.ones(1, 3, dtype=torch.long), memory)
        with pytest.raises(
            ValueError, match=r"attention_mask must be \(B, S\) with B = 2 and S = 4"
        ):
            model.decode(
                torch.ones(2, 3, dtype=torch.long), memory, attention_mask=torch.ones(2, 5)
            )
        with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
            model.encode(ids[0])
