"""T5: parity with transformers' T5ForConditionalGeneration (v1.0 and v1.1), presets, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

import qkv.interop
from qkv.interop import CheckpointError
from qkv.interop.hf_t5 import (
    t5_config_from_hf,
    t5_config_to_hf,
    t5_weights_from_hf,
    t5_weights_to_hf,
)
from qkv.models.t5 import PRESETS, T5, T5Config
from tests.models.decoding import (
    CACHE_KINDS,
    assert_close,
    check_left_padded_source,
    new_cache,
    run_encoder_decoder,
)
from tests.optional import require

ATOL = 1e-4  # float32, a whole encoder-decoder against transformers

# transformers' own counts (T5ForConditionalGeneration on the meta device, see
# test_preset_counts_match_transformers); the v1.1 ones include the untied lm_head.
EXPECTED_PARAMS = {
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "t5-v1_1-small": 76_961_152,
    "t5-v1_1-base": 247_577_856,
    "tiny": 45_504,
}

# Tiny Hugging Face configs. v1.1 has 3 heads of width d_kv=8 (3 * 8 != d_model) and a deeper
# decoder, so that d_kv and num_decoder_layers are exercised. 8 buckets and a max distance of 20
# with sequences of 9 and 11 use both the exact and the logarithmic buckets.
HF_SIZES = {
    "v1.0": dict(num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(
        num_heads=3, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False
    ),
}
HF_COMMON = dict(
    vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, relative_attention_num_buckets=8,
    relative_attention_max_distance=20, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0,
)  # fmt: skip


def _qkv_config(kind: str) -> T5Config:
    v11 = kind == "v1.1"
    return T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, n_layers=2, n_decoder_layers=3 if v11 else None,
        n_heads=3 if v11 else 4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward="gated-gelu" if v11 else "relu",
        tie_embeddings=not v11,
    )  # fmt: skip


def _hf_model(kind: str, *, untie: bool = True) -> nn.Module:
    """A random transformers T5; norm gains and position biases re-randomised (not 1, small)."""
    transformers = require("transformers")
    config = transformers.T5Config(**HF_COMMON, **HF_SIZES[kind])
    config._attn_implementation = "eager"  # the path that returns attention probabilities
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
        if kind == "v1.1" and untie:
            # transformers 5 ties lm_head to shared even for v1.1 configs (it only turns the
            # rescaling off); the real v1.1 checkpoints have their own lm_head, so untie it.
            model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight))
            model.config.tie_word_embeddings = False
    return model.eval()


def _batch(vocab: int = 96) -> dict[str, Tensor]:
    """Encoder batch (2, 11), row 1 padded after 8; decoder batch (2, 9), row 0 after 6."""
    ids, dec = torch.randint(2, vocab, (2, 11)), torch.randint(2, vocab, (2, 9))
    mask, dmask = torch.ones(2, 11, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)
    mask[1, 8:] = ids[1, 8:] = 0
    dmask[0, 6:] = dec[0, 6:] = 0
    return dict(
        input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask
    )


def _close(ours: Tensor, theirs: Tensor, rows: Tensor, what: str) -> None:
    """Compare the real positions ``rows`` (B, T) of (B, T, ...) or (B, H, T, S) tensors."""
    if ours.dim() == 4:  # attention (B, H, T, S): index the query rows
        ours, theirs = ours.transpose(1, 2), theirs.transpose(1, 2)
    assert ours.shape == theirs.shape, what
    diff = (ours[rows.bool()] - theirs[rows.bool()]).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.2e}"


# Hugging Face -> qkv ---------------------------------------------------------------------------


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["v1.0", "v1.1", "v1.1-shared-head"])
def test_hf_to_qkv(kind: str, tmp_path) -> None:
    hf = _hf_model(kind[:4], untie=kind == "v1.1")
    hf.save_pretrained(tmp_path)
    model = qkv.interop.from_pretrained(tmp_path)
    assert isinstance(model, T5)
    assert model.config == _qkv_config(kind[:4])
    batch = _batch()
    enc_rows, dec_rows = batch["attention_mask"], batch["decoder_attention_mask"]
    flags = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        theirs, ours = hf(**batch, **flags), model(**batch, **flags)
    _close(ours.logits, theirs.logits, dec_rows, "logits")
    _close(ours.encoder_last_hidden_state, theirs.encoder_last_hidden_state, enc_rows, "memory")
    for name, ours_h, theirs_h, rows in [
        ("encoder", ours.encoder_hidden_states, theirs.encoder_hidden_states, enc_rows),
        ("decoder", ours.hidden_states, theirs.decoder_hidden_states, dec_rows),
    ]:
        assert len(ours_h) == len(theirs_h)  # embeddings + one per layer (the last normed)
        for i, (a, b) in enumerate(zip(ours_h, theirs_h, strict=True)):
            _close(a, b, rows, f"{name} hidden state {i}")
    _close(ours.encoder_attentions[1], theirs.encoder_attentions[1], enc_rows, "encoder attn")
    _close(ours.attentions[0], theirs.decoder_attentions[0], dec_rows, "decoder self-attn")
    _close(ours.cross_attentions[-1], theirs.cross_attentions[-1], dec_rows, "cross-attn")
    # The training loss: decoder inputs shifted from the labels, -100 ignored.
    labels = batch["decoder_input_ids"].masked_fill(dec_rows == 0, -100)
    batch_labels = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    with torch.no_grad():
        theirs, ours = hf(**batch_labels, labels=labels), model(**batch_labels, labels=labels)
    _close(ours.logits, theirs.logits, dec_rows, "logits from labels")
    assert abs(ours.loss.item() - theirs.loss.item()) <= ATOL


# qkv -> Hugging Face ---------------------------------------------------------------------------


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
def test_qkv_to_hf(kind: str, tmp_path) -> None:
    transformers = require("transformers")
    model = T5(_qkv_config(kind)).eval()
    with torch.no_grad():  # norm gains start at 1: randomise them so that they matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (hf.lm_head.weight is hf.shared.weight) == (kind == "v1.0")
    batch = _batch()
    with torch.no_grad():
        ours, theirs = model(**batch), hf(**batch)
        again = qkv.interop.from_pretrained(tmp_path)(**batch)
    _close(ours.logits, theirs.logits, batch["decoder_attention_mask"], "logits")
    torch.testing.assert_close(again.logits, ours.logits, rtol=0, atol=0)


def test_config_round_trip() -> None:
    for config in [*PRESETS.values(), _qkv_config("v1.1")]:
        assert t5_config_from_hf(t5_config_to_hf(config)) == config


def test_weights_round_trip_and_errors() -> None:
    for kind in ("v1.0", "v1.1"):
        config = _qkv_config(kind)
        state = T5(config).state_dict()
        hf = t5_weights_to_hf(state, config)
        assert ("lm_head.weight" in hf) == (kind == "v1.1")
        back = t5_weights_from_hf(hf, config)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
    config = _qkv_config("v1.0")
    hf = t5_weights_to_hf(T5(config).state_dict(), config)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from shared\.weight"):
        t5_weights_from_hf({**hf, "lm_head.weight": torch.randn(96, 32)}, config)
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-silu'"):
        t5_config_from_hf({**t5_config_to_hf(config), "feed_forward_proj": "gated-silu"})


# Presets, smoke, training -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = T5(PRESETS[name])
    assert model.num_parameters() == EXPECTED_PARAMS[name]


@pytest.mark.hf
def test_preset_counts_match_transformers() -> None:
    transformers = require("transformers")
    for name, config in PRESETS.items():
        hf_config = transformers.T5Config.from_dict(t5_config_to_hf(config))
        with torch.device("meta"):
            hf = transformers.T5ForConditionalGeneration(hf_config)
            if not config.tie_embeddings:  # untied as in the v1.1 checkpoints (see _hf_model)
                hf.lm_head.weight = nn.Parameter(torch.empty_like(hf.lm_head.weight))
        assert hf.num_parameters() == EXPECTED_PARAMS[name], name


def test_tied_embeddings_are_one_tensor() -> None:
    tied, untied = T5(_qkv_config("v1.0")), T5(_qkv_config("v1.1"))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())
    assert tied.num_parameters() < sum(p.numel() for p in tied.state_dict().values())


@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
def test_forward_backward_smoke(kind: str) -> None:
    model = T5(dataclasses.replace(PRESETS["tiny"], **_variant(kind))).train()
    batch = _batch(vocab=128)
    labels = batch.pop("decoder_input_ids")
    out = model(**batch, labels=labels)
    assert out.logits.shape == (2, 9, 128)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _variant(kind: str) -> dict[str, object]:
    return {} if kind == "v1.0" else dict(feed_forward="gated-gelu", tie_embeddings=False)


def test_loss_decreases_on_a_repeated_batch() -> None:
    model = T5(dataclasses.replace(PRESETS["tiny"], dropout=0.0))
    batch = _batch(vocab=128)
    labels = batch.pop("decoder_input_ids").masked_fill(batch["decoder_attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
def test_encode_and_decode_equal_forward(kind: str) -> None:
    """encode -> memory (B, S, D), decode -> logits (B, T, V): forward's pieces."""
    model = T5(_qkv_config(kind)).eval()
    batch = _batch()
    src, src_mask = batch["input_ids"], batch["attention_mask"]
    dec, dec_mask = batch["decoder_input_ids"], batch["decoder_attention_mask"]
    with torch.no_grad():
        out = model(**batch)
        memory = model.encode(src, src_mask)
        logits = model.decode(dec, memory, attention_mask=src_mask, decoder_attention_mask=dec_mask)
    assert isinstance(memory, Tensor) and memory.shape == (2, 11, 32)
    torch.testing.assert_close(memory, out.encoder_last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(logits, out.logits, atol=0, rtol=0)


# The decoding protocol: new_caches(batch_size, max_len) and decode(..., caches=) ---------------


@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
@pytest.mark.parametrize("cache", CACHE_KINDS)
def test_one_token_at_a_time_with_the_caches_equals_one_forward(kind: str, cache: str) -> None:
    model = T5(_qkv_config(kind)).eval()
    batch = _batch()
    src, src_mask, tgt = batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]
    caches = new_cache(model, cache, 2, 9)
    cached = run_encoder_decoder(model, src, src_mask, tgt, [1] * 9, caches=caches)
    with torch.no_grad():
        assert_close(cached, model(src, src_mask, tgt).logits)


@pytest.mark.parametrize("cache", CACHE_KINDS)
def test_chunked_prefill_equals_one_prefill(cache: str) -> None:
    model = T5(_qkv_config("v1.1")).eval()
    batch = _batch()
    src, src_mask, tgt = batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]
    one, chunked = (
        run_encoder_decoder(model, src, src_mask, tgt, chunks, caches=new_cache(model, cache, 2, 9))
        for chunks in ([6, 1, 1, 1], [2, 4, 1, 1, 1])
    )
    assert_close(chunked, one)


@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
@pytest.mark.parametrize("cache", CACHE_KINDS)
def test_left_padded_source_with_the_caches_equals_each_row_alone(kind: str, cache: str) -> None:
    check_left_padded_source(T5(_qkv_config(kind)).eval(), 96, cache, pad_id=0)


def test_cache_errors_are_clear() -> None:
    """T5's positions are relative: no max_seq_len, so only a static cache's room limits it."""
    model = T5(_qkv_config("v1.0")).eval()
    with pytest.raises(ValueError, match="max_len must be a positive number"):
        model.new_caches(1, 0)
    src, tgt = torch.randint(2, 96, (1, 5)), torch.randint(2, 96, (1, 4))
    caches = model.new_caches(1, 3)
    assert caches[0][0].max_len == 3 and caches[0][1].max_len is None  # cross: dynamic
    with torch.no_grad():
        memory = model.encode(src)
        model.decode(tgt[:, :3], memory, caches=caches)
        with pytest.raises(ValueError, match="static KV cache overflow"):
            model.decode(tgt[:, 3:], memory, caches=caches)
        with pytest.raises(ValueError, match=r"decoder_attention_mask must be \(B, past \+ T\)"):
            model.decode(tgt, memory, decoder_attention_mask=torch.ones(1, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="the cache has 1 entries for 2 layers"):
            model.decode(tgt, memory, caches=caches[:1])


@pytest.mark.hf
def test_token_ids_round_trip_through_the_hf_config() -> None:
    transformers = require("transformers")
    ids = dict(pad_token_id=3, eos_token_id=4, decoder_start_token_id=5)
    hf = transformers.T5Config(**{**HF_COMMON, **HF_SIZES["v1.0"], **ids})
    config = t5_config_from_hf(hf.to_dict())
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (3, 4, 5)
    back = transformers.T5Config(**t5_config_to_hf(config))
    assert {k: getattr(back, k) for k in ids} == ids
    # Without decoder_start_token_id (transformers 5 drops it), T5 starts from the pad token.
    no_start = {k: v for k, v in hf.to_dict().items() if k != "decoder_start_token_id"}
    assert t5_config_from_hf(no_start).decoder_start_token_id == 3


def test_padding_leaves_real_positions_unchanged() -> None:
    model = T5(_qkv_config("v1.0")).eval()
    batch = _batch()
    with torch.no_grad():
        padded = model(**batch).logits[1]
        trimmed = model(
            batch["input_ids"][1:, :8], None, batch["decoder_input_ids"][1:]
        ).logits[0]  # fmt: skip
    torch.testing.assert_close(padded, trimmed, rtol=1e-5, atol=1e-5)


def test_forward_needs_decoder_inputs_or_labels() -> None:
    with pytest.raises(ValueError, match="pass decoder_input_ids, or labels"):
        T5(PRESETS["tiny"])(torch.randint(0, 128, (1, 4)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_kv": 0}, "d_kv must be a positive integer"),
        ({"n_decoder_layers": 0}, "n_decoder_layers must be >= 1 or None"),
        ({"feed_forward": "swiglu"}, "feed_forward must be 'relu'"),
        ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets >= 4"),
        ({"relative_attention_max_distance": 4}, "relative_attention_max_distance >"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"decoder_start_token_id": 128}, "decoder_start_token_id=128 is not a token id"),
    ],
)
def test_config_validation(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["tiny"], **change)
