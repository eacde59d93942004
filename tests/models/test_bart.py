"""BART and Marian: qkv's Bart against transformers' BartForConditionalGeneration and
MarianMTModel (both directions, through qkv's converter), parameter counts, and properties.

The Hugging Face models are built tiny (2 + 2 layers, width 32) with random weights, LayerNorm
gains and every bias included, so that nothing agrees by being zero or one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import qkv.interop
from qkv.attention.multihead import MultiHeadAttention
from qkv.interop import CheckpointError
from qkv.interop.hf_bart import config_from_hf, config_to_hf
from qkv.models.bart import PRESETS, Bart, BartConfig
from qkv.positional import sinusoidal_table
from tests.models.decoding import (
    CACHE_KINDS,
    assert_close,
    check_left_padded_source,
    new_cache,
    run_encoder_decoder,
)
from tests.optional import require

ATOL = 1e-4  # float32, a whole model deep
FAMILIES = ["bart", "marian"]
TINY = {"bart": "tiny", "marian": "tiny-marian"}


def hf_model(transformers: Any, family: str, **overrides: Any) -> Any:
    """A tiny random transformers model of ``family``, eager attention, in eval mode."""
    config = config_to_hf(dataclasses.replace(PRESETS[TINY[family]], max_seq_len=32))
    config.update(overrides)
    del config["model_type"], config["architectures"]
    if family == "bart":
        model_class, config_class = (
            transformers.BartForConditionalGeneration,
            transformers.BartConfig,
        )
    else:
        model_class, config_class = transformers.MarianMTModel, transformers.MarianConfig
    model = model_class(config_class(**config, attn_implementation="eager"))
    randomize_(model)
    return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Random weights, LayerNorm gains around 1, random biases (fixed sinusoids stay fixed)."""
    for name, p in model.named_parameters():
        if "embed_positions" in name and not p.requires_grad:  # Marian's fixed table
            continue
        if name.endswith("weight") and ("norm" in name or "layernorm" in name):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.2)
    for name, b in model.named_buffers():
        if "final_logits_bias" in name:
            b.normal_(0.0, 0.5)


def batch(config: BartConfig) -> dict[str, Tensor]:
    """Padded source (B=3, S=7) and target (B=3, T=5); padding holds the pad token."""
    v, pad = config.vocab_size, config.pad_token_id
    src_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])  # (B, S)
    tgt_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])  # (B, T)
    src = torch.randint(3, v - 1, (3, 7)).masked_fill(src_mask == 0, pad)  # (B, S)
    tgt = torch.randint(3, v - 1, (3, 5)).masked_fill(tgt_mask == 0, pad)  # (B, T)
    return {
        "input_ids": src,
        "attention_mask": src_mask,
        "decoder_input_ids": tgt,
        "decoder_attention_mask": tgt_mask,
    }


def close(ours: Tensor, theirs: Tensor, keep: Tensor | None = None) -> None:
    """Equal within ATOL, at the positions ``keep`` (a boolean prefix of the shape)."""
    if keep is not None:
        ours, theirs = ours[keep], theirs[keep]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0.0)


def rows(weights: Tensor, keep: Tensor) -> Tensor:
    """The attention rows (B, H, T, S) of real queries, as (N, H, S)."""
    return weights.transpose(1, 2)[keep]


@pytest.mark.hf
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_qkv(family: str, tmp_path: Path) -> None:
    transformers = require("transformers")
    theirs = hf_model(transformers, family)
    theirs.save_pretrained(tmp_path)
    ours = qkv.interop.from_pretrained(tmp_path)
    assert isinstance(ours, Bart)
    inputs = batch(ours.config)
    src_keep, tgt_keep = inputs["attention_mask"].bool(), inputs["decoder_attention_mask"].bool()
    flags = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        expected = theirs(**inputs, **flags)
        got = ours(**inputs, **flags)
    close(got.logits, expected.logits, tgt_keep)
    close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, src_keep)
    assert len(got.encoder_hidden_states) == len(expected.encoder_hidden_states) == 3
    for a, b in zip(got.encoder_hidden_states, expected.encoder_hidden_states, strict=True):
        close(a, b, src_keep)
    assert len(got.hidden_states) == len(expected.decoder_hidden_states) == 3
    for a, b in zip(got.hidden_states, expected.decoder_hidden_states, strict=True):
        close(a, b, tgt_keep)
    for layer in range(2):
        close(rows(got.encoder_attentions[layer], src_keep),
              rows(expected.encoder_attentions[layer], src_keep))  # fmt: skip
        close(rows(got.attentions[layer], tgt_keep),
              rows(expected.decoder_attentions[layer], tgt_keep))  # fmt: skip
        close(rows(got.cross_attentions[layer], tgt_keep),
              rows(expected.cross_attentions[layer], tgt_keep))  # fmt: skip
    # The loss: labels shifted right make the decoder's input; -100 is left out.
    labels = inputs["decoder_input_ids"].masked_fill(~tgt_keep, -100)
    del inputs["decoder_input_ids"], inputs["decoder_attention_mask"]
    with torch.no_grad():
        expected_loss = theirs(**inputs, labels=labels).loss
        got_loss = ours(**inputs, labels=labels).loss
    torch.testing.assert_close(got_loss, expected_loss, atol=ATOL, rtol=0.0)


@pytest.mark.hf
@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_to_hf(family: str, tmp_path: Path) -> None:
    transformers = require("transformers")
    ours = Bart(PRESETS[TINY[family]]).eval()
    randomize_(ours)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == family
    model_class = {
        "bart": transformers.BartForConditionalGeneration,
        "marian": transformers.MarianMTModel,
    }[family]
    theirs, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = batch(ours.config)
    with torch.no_grad():
        close(ours(**inputs).logits, theirs.eval()(**inputs).logits)
    # And back: qkv reads what it wrote.
    again = qkv.interop.from_pretrained(tmp_path)
    with torch.no_grad():
        close(again(**inputs).logits, ours(**inputs).logits)


@pytest.mark.hf
def test_bare_bart_model_checkpoint(tmp_path: Path) -> None:
    """A ``BartModel`` checkpoint (no ``model.`` prefix, no LM head) loads too."""
    transformers = require("transformers")
    config = config_to_hf(dataclasses.replace(PRESETS["tiny"], max_seq_len=32))
    del config["model_type"], config["architectures"]
    theirs = transformers.BartModel(transformers.BartConfig(**config))
    randomize_(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = qkv.interop.from_pretrained(tmp_path)
    inputs = batch(ours.config)
    with torch.no_grad():
        expected, got = theirs(**inputs), ours(**inputs)
    keep = inputs["decoder_attention_mask"].bool()
    close(got.last_hidden_state, expected.last_hidden_state, keep)
    assert not ours.final_logits_bias.any()


@pytest.mark.hf
def test_marian_table_matches_transformers() -> None:
    modeling = require("transformers.models.marian.modeling_marian")
    theirs = modeling.MarianSinusoidalPositionalEmbedding(50, 16).create_weight()
    ours = sinusoidal_table(50, 16, interleaved=False)  # Marian's layout
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0.0)


def test_marian_checkpoint_with_a_wrong_table_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    Bart(PRESETS["tiny-marian"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    table = sinusoidal_table(64, 32, interleaved=False)
    tensors["model.encoder.embed_positions.weight"] = table  # the right table is accepted
    save_file(tensors, tmp_path / "model.safetensors")
    qkv.interop.from_pretrained(tmp_path)
    tensors["model.decoder.embed_positions.weight"] = table.flip(0)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="sinusoid"):
        qkv.interop.from_pretrained(tmp_path)


# Hugging Face's num_parameters() for the same configs (checked against transformers below).
PUBLISHED = {"bart-base": 139_420_416, "bart-large": 406_291_456, "marian-en-de": 73_886_208}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = Bart(PRESETS[name])
    assert model.num_parameters() == PUBLISHED[name]


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_transformers(name: str) -> None:
    transformers = require("transformers")
    config = config_to_hf(PRESETS[name])
    family = config.pop("model_type")
    del config["architectures"]
    if family == "bart":
        build = transformers.BartForConditionalGeneration, transformers.BartConfig
    else:
        build = transformers.MarianMTModel, transformers.MarianConfig
    with torch.device("meta"):
        theirs = build[0](build[1](**config))
    # transformers stores Marian's two fixed sinusoid tables as frozen parameters.
    frozen = sum(p.numel() for p in theirs.parameters() if not p.requires_grad)
    assert frozen == (2 * 512 * 512 if family == "marian" else 0)
    assert theirs.num_parameters() - frozen == PUBLISHED[name]


@pytest.mark.parametrize("name", ["tiny", "tiny-marian"])
def test_tiny_forward_backward(name: str) -> None:
    model = Bart(PRESETS[name])
    inputs = batch(model.config)
    labels = inputs.pop("decoder_input_ids")
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (3, 5, model.config.vocab_size)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.lm_head.weight is model.tok_emb.weight  # tied: one tensor
    assert model.num_parameters() < sum(p.numel() for p in model.state_dict().values())


def test_loss_decreases() -> None:
    model = Bart(dataclasses.replace(PRESETS["tiny"], dropout=0.0))
    src, labels = torch.randint(3, 96, (4, 8)), torch.randint(3, 96, (4, 6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(src, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", ["tiny", "tiny-marian"])
def test_cached_decoding_equals_one_forward(name: str) -> None:
    model = Bart(PRESETS[name]).eval()
    inputs = batch(model.config)
    src, src_mask, tgt = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
    with torch.no_grad():
        full = model(src, src_mask, tgt).logits  # (B, T, V)
        memory = model.encode(src, src_mask)
        caches = model.new_caches()
        steps = [
            model.decode(tgt[:, t : t + 1], memory, attention_mask=src_mask, caches=caches)
            for t in range(tgt.shape[1])
        ]
    close(torch.cat(steps, dim=1), full)


def test_padding_does_not_change_real_tokens() -> None:
    model = Bart(PRESETS["tiny"]).eval()
    src, tgt = torch.randint(3, 96, (1, 5)), torch.randint(3, 96, (1, 4))
    padded_src = torch.cat([src, torch.full((1, 3), model.config.pad_token_id)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        close(model(padded_src, mask, tgt).logits, model(src, None, tgt).logits)


def test_attention_capture_is_restored() -> None:
    model = Bart(PRESETS["tiny"]).eval()
    src, tgt = torch.randint(3, 96, (2, 5)), torch.randint(3, 96, (2, 4))
    out = model(src, None, tgt, output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape == (2, 4, 4, 4)
    assert out.cross_attentions is not None and out.cross_attentions[1].shape == (2, 4, 4, 5)
    assert out.encoder_attentions is not None and len(out.encoder_attentions) == 2
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 4))
    assert not any(m.capture_weights for m in model.modules() if hasattr(m, "capture_weights"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads"),
        ({"positions": "rotary"}, "positions must be"),
        ({"positions": "sinusoidal", "d_model": 33, "n_heads": 3}, "even d_model"),
        ({"activation": "tanh"}, "unknown activation"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"pad_token_id": 96}, "pad_token_id=96 is not in the vocabulary"),
        ({"n_heads": 0}, "n_heads must be positive"),
    ],
)
def test_config_validation(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["tiny"], **change)


def test_too_long_and_unconvertible() -> None:
    model = Bart(PRESETS["tiny"])
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        model.encode(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="no Hugging Face counterpart"):
        config_to_hf(dataclasses.replace(PRESETS["tiny"], layernorm_embedding=False))
    with pytest.raises(ValueError, match="decoder_input_ids, or labels"):
        model(torch.zeros(1, 3, dtype=torch.long))


# The decoding protocol: new_caches(batch_size, max_len) and decode(..., caches=) ---------------


def random_model(name: str) -> Bart:
    model = Bart(dataclasses.replace(PRESETS[name], dropout=0.0))
    randomize_(model)  # every weight, bias and gain random: nothing agrees by being zero
    return model.eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-marian"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_one_token_at_a_time_with_the_caches_equals_one_forward(name: str, kind: str) -> None:
    model = random_model(name)
    inputs = batch(model.config)
    src, src_mask, tgt = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
    caches = new_cache(model, kind, 3, 5)
    cached = run_encoder_decoder(model, src, src_mask, tgt, [1] * 5, caches=caches)
    with torch.no_grad():
        assert_close(cached, model(src, src_mask, tgt).logits)


@pytest.mark.parametrize("name", ["tiny", "tiny-marian"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_chunked_prefill_equals_one_prefill(name: str, kind: str) -> None:
    model = random_model(name)
    inputs = batch(model.config)
    src, src_mask, tgt = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
    one, chunked = (
        run_encoder_decoder(model, src, src_mask, tgt, chunks, caches=new_cache(model, kind, 3, 5))
        for chunks in ([4, 1], [1, 3, 1])
    )
    assert_close(chunked, one)


@pytest.mark.parametrize("name", ["tiny", "tiny-marian"])
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_left_padded_source_with_the_caches_equals_each_row_alone(name: str, kind: str) -> None:
    """Source positions count real tokens, so left padding leaves the real ones unchanged."""
    model = random_model(name)
    check_left_padded_source(model, model.config.vocab_size, kind, model.config.pad_token_id)


def test_cache_and_decoding_past_max_seq_len_are_clear_errors() -> None:
    model = random_model("tiny")  # max_seq_len = 64
    with pytest.raises(ValueError, match="max_len=65 exceeds the model's max_seq_len=64"):
        model.new_caches(1, 65)
    src, tgt = torch.randint(3, 95, (1, 5)), torch.randint(3, 95, (1, 64))
    with torch.no_grad():
        memory = model.encode(src)
        for caches in (model.new_caches(), model.new_caches(1, 64)):
            assert caches[0][1].max_len is None  # the cross-attention cache is dynamic
            model.decode(tgt, memory, caches=caches)
            with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
                model.decode(tgt[:, :1], memory, caches=caches)
        with pytest.raises(ValueError, match=r"decoder_attention_mask must be \(B, past \+ T\)"):
            model.decode(tgt[:, :2], memory, decoder_attention_mask=torch.ones(1, 3).long())


@pytest.mark.hf
@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_round_trip_through_the_hf_config(family: str) -> None:
    transformers = require("transformers")
    ids = dict(pad_token_id=5, bos_token_id=6, eos_token_id=7, decoder_start_token_id=8)
    hf = config_to_hf(PRESETS[TINY[family]])
    del hf["model_type"], hf["architectures"]
    config_class = {"bart": transformers.BartConfig, "marian": transformers.MarianConfig}[family]
    config = config_from_hf(config_class(**{**hf, **ids}).to_dict())
    assert {k: getattr(config, k) for k in ids} == ids
    back = config_class(**config_to_hf(config))
    assert {k: getattr(back, k) for k in ids} == ids


def test_the_three_dropout_rates_reach_their_places() -> None:
    """BART sets the attention-weight and feed-forward rates apart from the residual one."""
    config = dataclasses.replace(
        PRESETS["tiny"], dropout=0.1, attention_dropout=0.2, activation_dropout=0.3
    )
    model = Bart(config)
    layers = [*model.encoder, *model.decoder]
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert attentions and all(a.dropout == 0.2 for a in attentions)
    assert all(layer.mlp.dropout.p == 0.3 for layer in layers)
    assert all(layer.spec.dropout == 0.1 for layer in layers)  # the residual branches
