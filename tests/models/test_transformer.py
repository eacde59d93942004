"""The 2017 Transformer: parity with torch.nn, causality, cached decoding, checkpoints, presets."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qkv.interop
from qkv.models.transformer import PRESETS, Transformer, TransformerConfig
from qkv.positional import sinusoidal_table
from tests.models.decoding import (
    CACHE_KINDS,
    assert_close,
    check_left_padded_source,
    new_cache,
    run_encoder_decoder,
)

ATOL = 1e-5
TINY = PRESETS["tiny"]
V = TINY.tgt_vocab_size


def tiny_model(**overrides) -> Transformer:
    """The tiny preset without dropout, every parameter random (biases and gains included)."""
    model = Transformer(dataclasses.replace(TINY, dropout=0.0, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0.0, 0.2)
    return model


def batch(b: int = 3, s: int = 7, t: int = 6):
    """Source and target ids with right padding (attention masks have zeros)."""
    src, tgt = torch.randint(3, V, (b, s)), torch.randint(3, V, (b, t))
    src_mask, tgt_mask = torch.ones(b, s, dtype=torch.long), torch.ones(b, t, dtype=torch.long)
    src_mask[1, s - 3 :] = 0
    src_mask[2, s - 1 :] = 0
    tgt_mask[1, t - 2 :] = 0
    return src, src_mask, tgt, tgt_mask


def params_formula(c: TransformerConfig) -> int:
    """Count by hand: shared (V, D) embedding, 4 attention projections with biases, FFN, norms."""
    d, f = c.d_model, c.d_ff
    attn, ffn, norm = 4 * (d * d + d), d * f + f + f * d + d, 2 * d
    return (
        c.tgt_vocab_size * d
        + c.n_encoder_layers * (attn + ffn + 2 * norm)
        + c.n_decoder_layers * (2 * attn + ffn + 3 * norm)
    )


@pytest.mark.parametrize(("name", "millions"), [("transformer-base", 65), ("transformer-big", 213)])
def test_preset_parameter_counts_match_the_paper(name: str, millions: int) -> None:
    with torch.device("meta"):
        model = Transformer(PRESETS[name])
    n = model.num_parameters()
    assert n == params_formula(PRESETS[name])
    assert round(n / 1e6) == millions  # Table 3


def test_weight_tying_is_real_sharing() -> None:
    model = Transformer(TINY)
    assert model.lm_head.weight is model.tgt_emb.weight is model.src_emb.weight
    assert model.num_parameters() == params_formula(TINY)
    untied = Transformer(dataclasses.replace(TINY, share_embeddings=False, tgt_vocab_size=50))
    assert untied.lm_head.weight is untied.tgt_emb.weight
    assert untied.src_emb.weight is not untied.tgt_emb.weight
    out = untied(torch.randint(0, 64, (2, 5)), labels=torch.randint(0, 50, (2, 4)))
    assert out.logits.shape == (2, 4, 50)


@torch.no_grad()
def copy_attention(theirs: nn.MultiheadAttention, ours: nn.Module) -> None:
    """torch packs W_Q, W_K, W_V into one ``in_proj_weight`` (3 D, D), in that order."""
    theirs.in_proj_weight.copy_(
        torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
    )
    theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
    theirs.out_proj.load_state_dict(ours.out_proj.state_dict())


def torch_stacks(model: Transformer) -> tuple[nn.TransformerEncoder, nn.TransformerDecoder]:
    """torch.nn's post-norm ReLU stacks (no final norm) holding ``model``'s weights."""
    c = model.config
    enc_layer = nn.TransformerEncoderLayer(c.d_model, c.n_heads, c.d_ff, 0.0, batch_first=True)
    dec_layer = nn.TransformerDecoderLayer(c.d_model, c.n_heads, c.d_ff, 0.0, batch_first=True)
    encoder = nn.TransformerEncoder(enc_layer, c.n_encoder_layers, enable_nested_tensor=False)
    decoder = nn.TransformerDecoder(dec_layer, c.n_decoder_layers)
    for theirs, ours in zip(encoder.layers, model.encoder, strict=True):
        copy_attention(theirs.self_attn, ours.self_attn)
        theirs.linear1.load_state_dict(ours.mlp.up_proj.state_dict())
        theirs.linear2.load_state_dict(ours.mlp.down_proj.state_dict())
        theirs.norm1.load_state_dict(ours.attn_norm.state_dict())
        theirs.norm2.load_state_dict(ours.mlp_norm.state_dict())
    for theirs, ours in zip(decoder.layers, model.decoder, strict=True):
        copy_attention(theirs.self_attn, ours.self_attn)
        copy_attention(theirs.multihead_attn, ours.cross_attn)
        theirs.linear1.load_state_dict(ours.mlp.up_proj.state_dict())
        theirs.linear2.load_state_dict(ours.mlp.down_proj.state_dict())
        theirs.norm1.load_state_dict(ours.attn_norm.state_dict())
        theirs.norm2.load_state_dict(ours.cross_norm.state_dict())
        theirs.norm3.load_state_dict(ours.mlp_norm.state_dict())
    return encoder.train(), decoder.train()  # train mode with p=0: torch's plain Python path


def test_matches_torch_nn_transformer_on_padded_batches() -> None:
    model = tiny_model()
    encoder, decoder = torch_stacks(model)
    src, src_mask, tgt, tgt_mask = batch()
    d, emb = model.config.d_model, model.src_emb.weight
    pe = sinusoidal_table(16, d)  # (16, D)
    with torch.no_grad():
        out = model(src, src_mask, tgt, tgt_mask, output_hidden_states=True)
        x = emb[src] * math.sqrt(d) + pe[: src.shape[1]]  # (B, S, D)
        memory = encoder(x, src_key_padding_mask=src_mask == 0)  # (B, S, D)
        y = emb[tgt] * math.sqrt(d) + pe[: tgt.shape[1]]  # (B, T, D)
        causal = torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool).triu(1)  # True = hide
        h = decoder(
            y, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=tgt_mask == 0,
            memory_key_padding_mask=src_mask == 0,
        )  # fmt: skip
        ref_logits = h @ emb.T  # (B, T, V)
    real_src, real_tgt = src_mask.bool(), tgt_mask.bool()
    torch.testing.assert_close(
        out.encoder_last_hidden_state[real_src], memory[real_src], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(out.logits[real_tgt], ref_logits[real_tgt], atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(out.encoder_hidden_states) == 3


def test_decoder_is_causal() -> None:
    model = tiny_model()
    src, src_mask, tgt, _ = batch()
    t = 2
    changed = tgt.clone()
    changed[:, t + 1 :] = torch.randint(3, V, changed[:, t + 1 :].shape)
    with torch.no_grad():
        a = model(src, src_mask, tgt).logits
        b = model(src, src_mask, changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=0, rtol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_cached_decoding_equals_full_decoding() -> None:
    model = tiny_model()
    src, src_mask, tgt, _ = batch()
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        full = model.decode(tgt, memory, attention_mask=src_mask)
        caches = model.new_caches()
        first = model.decode(tgt[:, :2], memory, attention_mask=src_mask, caches=caches)  # prefill
        steps = [first] + [
            model.decode(tgt[:, i : i + 1], memory, attention_mask=src_mask, caches=caches)
            for i in range(2, tgt.shape[1])
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert caches[0][0].seq_len == tgt.shape[1] and caches[0][1].seq_len == src.shape[1]


def test_source_padding_does_not_change_real_outputs() -> None:
    model = tiny_model()
    src, tgt = torch.randint(3, V, (1, 5)), torch.randint(3, V, (1, 4))
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        alone = model(src, decoder_input_ids=tgt).logits
        in_batch = model(padded, mask, tgt).logits
    torch.testing.assert_close(in_batch, alone, atol=ATOL, rtol=0)


def test_labels_shift_right_into_decoder_inputs_and_loss_is_label_smoothed() -> None:
    model = tiny_model()
    src, src_mask, tgt, tgt_mask = batch()
    labels = tgt.masked_fill(tgt_mask == 0, -100)
    decoder_input_ids = model.shift_right(labels)
    assert decoder_input_ids[:, 0].eq(TINY.decoder_start_token_id).all()
    assert decoder_input_ids[1, -1] == TINY.pad_token_id  # an ignored label shifted in
    with torch.no_grad():
        out = model(src, src_mask, decoder_attention_mask=tgt_mask, labels=labels)
        explicit = model(src, src_mask, decoder_input_ids, tgt_mask, labels=labels)
    torch.testing.assert_close(out.logits, explicit.logits, atol=0, rtol=0)
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep], labels[keep], label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


def test_attentions_are_returned_and_capture_is_restored() -> None:
    model = tiny_model()
    src, src_mask, tgt, tgt_mask = batch()
    with torch.no_grad():
        out = model(src, src_mask, tgt, tgt_mask, output_attentions=True)
    b, s, t, h = src.shape[0], src.shape[1], tgt.shape[1], TINY.n_heads
    assert [a.shape for a in out.encoder_attentions] == [(b, h, s, s)] * 2
    assert [a.shape for a in out.attentions] == [(b, h, t, t)] * 2
    assert [a.shape for a in out.cross_attentions] == [(b, h, t, s)] * 2
    assert out.attentions[0][..., 0, 1:].abs().max() == 0  # causal: position 0 sees itself
    assert out.cross_attentions[0][1, :, :, -3:].abs().max() == 0  # source padding hidden
    torch.testing.assert_close(out.cross_attentions[1].sum(-1), torch.ones(b, h, t))
    attns = [m for m in model.modules() if hasattr(m, "capture_weights")]
    assert not any(m.capture_weights or m.last_weights is not None for m in attns)


def test_save_and_load_roundtrip_in_qkv_layout(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["qkv_family"] == "transformer"
    loaded = qkv.interop.from_pretrained(tmp_path)
    assert isinstance(loaded, Transformer) and loaded.config == model.config
    assert loaded.lm_head.weight is loaded.tgt_emb.weight  # still tied after loading
    src, src_mask, tgt, tgt_mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(src, src_mask, tgt, tgt_mask).logits,
            model(src, src_mask, tgt, tgt_mask).logits,
            atol=0,
            rtol=0,
        )


def test_forward_backward_smoke() -> None:
    model = Transformer(TINY).train()
    src, src_mask, tgt, tgt_mask = batch()
    out = model(src, src_mask, decoder_attention_mask=tgt_mask, labels=tgt)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_decreases_on_a_repeated_batch() -> None:
    model = Transformer(dataclasses.replace(TINY, dropout=0.0, label_smoothing=0.0)).train()
    src, src_mask, tgt, tgt_mask = batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(src, src_mask, decoder_attention_mask=tgt_mask, labels=tgt).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tgt_vocab_size": 50}, "share_embeddings=True needs one vocabulary"),
        ({"n_heads": 5}, "not divisible by n_heads"),
        ({"d_model": 15, "n_heads": 5}, "must be even"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"label_smoothing": -0.1}, "label_smoothing must be in"),
        ({"eos_token_id": 64}, "eos_token_id=64 is outside the target vocabulary"),
        ({"n_decoder_layers": 0}, "n_decoder_layers must be positive"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **overrides)


def test_decoder_inputs_are_required() -> None:
    with pytest.raises(ValueError, match="pass decoder_input_ids, or labels"):
        Transformer(TINY)(torch.randint(0, V, (1, 4)))


# The decoding protocol: new_caches(batch_size, max_len) and decode(..., caches=) ---------------


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_one_token_at_a_time_with_the_caches_equals_one_forward(kind: str) -> None:
    model = tiny_model()
    src, src_mask, tgt, _ = batch()
    cached = run_encoder_decoder(
        model, src, src_mask, tgt, [1] * 6, caches=new_cache(model, kind, 3, 6)
    )
    with torch.no_grad():
        assert_close(cached, model(src, src_mask, tgt).logits)


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_chunked_prefill_equals_one_prefill(kind: str) -> None:
    model = tiny_model()
    src, src_mask, tgt, _ = batch()
    one, chunked = (
        run_encoder_decoder(model, src, src_mask, tgt, chunks, caches=new_cache(model, kind, 3, 6))
        for chunks in ([5, 1], [2, 3, 1])
    )
    assert_close(chunked, one)


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_left_padded_source_with_the_caches_equals_each_row_alone(kind: str) -> None:
    """Source positions count real tokens, so left padding leaves the real ones unchanged."""
    check_left_padded_source(tiny_model(), V, kind, TINY.pad_token_id)


def test_cache_and_decoding_past_max_seq_len_are_clear_errors() -> None:
    model = tiny_model()  # max_seq_len = 64
    with pytest.raises(ValueError, match="max_len=65 exceeds the model's max_seq_len=64"):
        model.new_caches(1, 65)
    src, tgt = torch.randint(3, V, (1, 5)), torch.randint(3, V, (1, 64))
    with torch.no_grad():
        memory = model.encode(src)
        for caches in (model.new_caches(), model.new_caches(1, 64)):
            model.decode(tgt, memory, caches=caches)
            with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
                model.decode(tgt[:, :1], memory, caches=caches)
        with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
            model.encode(torch.randint(3, V, (1, 65)))


def test_token_ids_survive_save_and_load(tmp_path: Path) -> None:
    """No Hugging Face class: qkv's own layout keeps the ids the generation defaults read."""
    config = dataclasses.replace(TINY, pad_token_id=3, decoder_start_token_id=4, eos_token_id=5)
    Transformer(config).save_pretrained(tmp_path)
    loaded = qkv.interop.from_pretrained(tmp_path).config
    assert (loaded.pad_token_id, loaded.decoder_start_token_id, loaded.eos_token_id) == (3, 4, 5)
