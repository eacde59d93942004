"""Prefix-LM: a bidirectional prefix, a causal rest, the loss on the rest only, checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import qkv.interop
from qkv import masks
from qkv.models.prefix_lm import PRESETS, PrefixLM, PrefixLMConfig
from tests.models.decoding import (
    CACHE_KINDS,
    assert_close,
    check_left_padded_decoder,
    new_cache,
    run_decoder,
)

ATOL = 1e-5
TINY = PRESETS["tiny"]
V = TINY.vocab_size


def tiny_model() -> PrefixLM:
    """The tiny preset without dropout, every parameter random (biases and gains included)."""
    model = PrefixLM(dataclasses.replace(TINY, dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0.0, 0.2)
    return model


def logits(
    model: PrefixLM, ids: torch.Tensor, prefix: int | torch.Tensor, **kwargs
) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, prefix_lengths=prefix, **kwargs).logits


def test_prefix_tokens_see_each_other_in_both_directions() -> None:
    model, ids, p = tiny_model(), torch.randint(0, V, (2, 8)), 4
    changed = ids.clone()
    changed[:, p - 1] = (ids[:, p - 1] + 1) % V  # the last prefix token
    a, b = logits(model, ids, p), logits(model, changed, p)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # position 0 saw position p - 1
    # Without a prefix the same change cannot reach back: plain causal language model.
    a0, b0 = logits(model, ids, 0), logits(model, changed, 0)
    torch.testing.assert_close(a0[:, : p - 1], b0[:, : p - 1], atol=0, rtol=0)


@pytest.mark.parametrize("t", [3, 5, 6])
def test_the_rest_is_causal(t: int) -> None:
    """With prefix 4 of 8: changing tokens after t >= 3 leaves the outputs up to t unchanged."""
    model, ids = tiny_model(), torch.randint(0, V, (2, 8))
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(0, V, changed[:, t + 1 :].shape)
    a, b = logits(model, ids, 4), logits(model, changed, 4)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=0, rtol=0)


def test_attention_weights_follow_the_prefix_lm_mask_with_padding() -> None:
    model = tiny_model()
    ids, prefix = torch.randint(0, V, (2, 6)), torch.tensor([2, 4])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        out = model(ids, attention_mask, prefix_lengths=prefix, output_attentions=True)
    allowed = masks.prefix_lm(prefix, 6) & masks.padding(attention_mask)  # (B, 1, T, T)
    assert allowed[1, 0, 0].tolist() == [True, True, True, True, False, False]
    for weights in out.attentions:
        assert weights.shape == (2, TINY.n_heads, 6, 6)
        assert weights.masked_select(~allowed.expand_as(weights)).abs().max() == 0
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, TINY.n_heads, 6))
    attns = [m for m in model.modules() if hasattr(m, "capture_weights")]
    assert not any(m.capture_weights for m in attns)


def test_right_padding_does_not_change_real_outputs() -> None:
    model, ids = tiny_model(), torch.randint(0, V, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    alone = logits(model, ids, 3)
    in_batch = logits(model, padded, 3, attention_mask=mask)
    torch.testing.assert_close(in_batch[:, :5], alone, atol=ATOL, rtol=0)


def test_loss_counts_only_the_continuation() -> None:
    model, ids = tiny_model(), torch.randint(0, V, (2, 8))
    prefix = torch.tensor([3, 5])
    with torch.no_grad():
        out = model(ids, prefix_lengths=prefix, labels=ids)
    # Row 0 predicts tokens 3..7 from positions 2..6, row 1 tokens 5..7 from positions 4..6.
    picked_logits = torch.cat([out.logits[0, 2:7], out.logits[1, 4:7]])
    picked_labels = torch.cat([ids[0, 3:], ids[1, 5:]])
    torch.testing.assert_close(out.loss, F.cross_entropy(picked_logits, picked_labels))
    scrambled = ids.clone()
    scrambled[0, :3], scrambled[1, :5] = 0, 0  # prefix labels do not count
    with torch.no_grad():
        again = model(ids, prefix_lengths=prefix, labels=scrambled)
    torch.testing.assert_close(again.loss, out.loss, atol=0, rtol=0)


def test_hidden_states_end_with_the_final_norm() -> None:
    model, ids = tiny_model(), torch.randint(0, V, (2, 5))
    with torch.no_grad():
        out = model(ids, prefix_lengths=2, output_hidden_states=True)
    assert len(out.hidden_states) == TINY.n_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, atol=0, rtol=0)


def test_save_and_load_roundtrip_in_qkv_layout(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["qkv_family"] == "prefix_lm"
    loaded = qkv.interop.from_pretrained(tmp_path)
    assert isinstance(loaded, PrefixLM) and loaded.config == model.config
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    ids, prefix = torch.randint(0, V, (2, 7)), torch.tensor([2, 5])
    torch.testing.assert_close(
        logits(loaded, ids, prefix), logits(model, ids, prefix), atol=0, rtol=0
    )


def params_formula(c: PrefixLMConfig) -> int:
    d, f = c.d_model, c.d_ff
    layer = 4 * (d * d + d) + (d * f + f + f * d + d) + 2 * 2 * d
    return c.vocab_size * d + c.max_seq_len * d + c.n_layers * layer + 2 * d


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = PrefixLM(PRESETS[name])
    assert model.num_parameters() == params_formula(PRESETS[name])
    if name == "prefix-lm-base":
        assert model.num_parameters() == 110_025_216  # the count quoted in the preset


def test_forward_backward_smoke() -> None:
    model = PrefixLM(TINY).train()
    ids = torch.randint(0, V, (3, 9))
    out = model(ids, prefix_lengths=torch.tensor([0, 4, 9]), labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_decreases_on_a_repeated_batch() -> None:
    model = PrefixLM(dataclasses.replace(TINY, dropout=0.0)).train()
    ids, prefix = torch.randint(0, V, (4, 12)), torch.tensor([3, 5, 6, 2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(ids, prefix_lengths=prefix, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 5}, "not divisible by n_heads"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"activation": "tanh"}, "unknown activation"),
        ({"max_seq_len": 0}, "max_seq_len must be positive"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **overrides)


def test_bad_prefix_lengths_are_named() -> None:
    model, ids = PrefixLM(TINY), torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match=r"lengths in \[0, T=5\]"):
        model(ids, prefix_lengths=torch.tensor([2, 6]))
    with pytest.raises(ValueError, match="prefix_lengths must be an int or a"):
        model(ids, prefix_lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long), prefix_lengths=1)


# The decoding protocol: the prompt is the prefix, generated tokens are causal ----------------


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_prompt_then_one_token_at_a_time_equals_one_forward(kind: str) -> None:
    """The first call with a cache reads the prompt (4 tokens) as the prefix, both ways; the
    tokens after it, one per call, are causal: one forward with prefix_lengths=4."""
    model, ids = tiny_model(), torch.randint(0, V, (2, 10))
    cached = run_decoder(model, ids, [4, 1, 1, 1, 1, 1, 1], cache=new_cache(model, kind, 2, 10))
    assert_close(cached, logits(model, ids, 4))
    # The prefix really is read both ways: as a causal LM, the prompt's logits differ.
    assert (logits(model, ids, 0)[:, :3] - cached[:, :3]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_chunked_prefill_equals_one_prefill(kind: str) -> None:
    """A prompt of 7 with a prefix of 3: given in chunks of 3 and 4, or in one call of 7."""
    model, ids = tiny_model(), torch.randint(0, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded prompt; its prefix is 1 real token
    runs = [
        run_decoder(
            model,
            ids,
            chunks,
            cache=new_cache(model, kind, 2, 9),
            attention_mask=mask,
            prefix_lengths=3,
        )
        for chunks in ([7, 1, 1], [3, 4, 1, 1])
    ]
    real = mask.bool()
    assert_close(runs[1][real], runs[0][real])
    # Without prefix_lengths, the first chunk is the prefix: the same as prefix_lengths=3.
    default = run_decoder(
        model, ids, [3, 4, 1, 1], cache=new_cache(model, kind, 2, 9), attention_mask=mask
    )
    assert_close(default[real], runs[0][real])


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_left_padded_batch_with_the_cache_equals_each_row_alone(kind: str) -> None:
    """Each row alone reads its own prompt as the prefix (prefix_lengths = its length)."""
    check_left_padded_decoder(
        tiny_model(), V, kind, alone_kwargs=lambda prompt_len: {"prefix_lengths": prompt_len}
    )


def test_cache_errors_are_clear() -> None:
    model = tiny_model()  # max_seq_len = 64
    with pytest.raises(ValueError, match="max_len=65 exceeds the model's max_seq_len=64"):
        model.new_cache(1, 65)
    for cache in (model.new_cache(), model.new_cache(1, 64)):
        with torch.no_grad():
            model(torch.randint(0, V, (1, 64)), cache=cache)
            with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
                model(torch.randint(0, V, (1, 1)), cache=cache)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, V, (2, 3)), cache=cache)
        # A prefix cannot grow into a later call: the cached positions never saw those tokens.
        with pytest.raises(ValueError, match=r"lengths in \[0, past=3\]"):
            model(torch.randint(0, V, (2, 2)), cache=cache, prefix_lengths=torch.tensor([3, 4]))


def test_token_ids_are_validated_and_saved() -> None:
    with pytest.raises(ValueError, match="bos_token_id=64 is not in the vocabulary"):
        dataclasses.replace(TINY, bos_token_id=64)
    config = dataclasses.replace(TINY, bos_token_id=1, eos_token_id=2)
    from qkv.models.base import config_from_dict, config_to_dict

    assert config_from_dict(PrefixLMConfig, config_to_dict(config)) == config
