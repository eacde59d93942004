"""GPT (GPT-2 layout): parity with transformers in both directions, presets, training sanity."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv.interop
from qkv.interop import CheckpointError
from qkv.models import gpt as gpt_module
from qkv.models.common import default_position_ids
from qkv.models.gpt import GPT, PRESETS, GPTConfig
from tests.models.decoding import (
    CACHE_KINDS,
    assert_close,
    check_left_padded_decoder,
    new_cache,
    run_decoder,
)
from tests.optional import require

ATOL = 1e-4  # float32 parity with transformers (the brief's bound)

# Exact counts with the head tied, as transformers' GPT2LMHeadModel reports them; the paper's
# Table 2 rounds to 117M / 345M / 762M / 1542M, later corrected by OpenAI to these.
EXPECTED_PARAMETERS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}
HF_SIZES = {  # (n_embd, n_layer, n_head) of OpenAI's checkpoints
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
VOCAB = 97


def _hf_model(tie: bool = True, n_inner: int | None = None):  # type: ignore[no-untyped-def]
    """A tiny random transformers GPT-2 with non-trivial LayerNorms and biases."""
    transformers = require("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=24, n_inner=n_inner,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)  # LayerNorm gains, 1 at init
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)  # zero at init
    return model


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels: one left-padded row, one right-padded, one full."""
    ids = torch.randint(0, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as for generation
    mask[1, 6:] = 0  # right padding, as for training
    labels = ids.masked_fill(mask == 0, -100)
    # A token whose prediction comes from a padding position is not a real target.
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return ids, mask, labels


def _max_diff_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over real positions; a and b are (B, T, ...)."""
    return (a - b)[mask.bool()].abs().max().item()


# ---------------------------------------------------------------------------------------------
# Hugging Face -> qkv


@pytest.mark.hf
@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_matches_transformers(tmp_path: Path, tie: bool) -> None:
    hf = _hf_model(tie=tie, n_inner=48 if not tie else None)
    hf.save_pretrained(tmp_path)
    model = qkv.interop.from_pretrained(tmp_path)
    assert isinstance(model, GPT)
    assert model.config.tie_embeddings is tie
    assert (model.lm_head.weight is model.tok_emb.weight) is tie

    ids, mask, labels = _padded_batch()
    # transformers counts positions 0 .. T-1 whatever the mask; qkv counts real tokens only
    # (cumsum - 1), which transformers' generate() passes explicitly. Give it the same.
    positions = default_position_ids(mask, ids.shape[1])
    with torch.no_grad():
        theirs = hf(
            ids, attention_mask=mask, position_ids=positions, labels=labels,
            output_hidden_states=True, output_attentions=True,
        )  # fmt: skip
        ours = model(
            ids, attention_mask=mask, labels=labels, output_hidden_states=True,
            output_attentions=True,
        )  # fmt: skip

    assert _max_diff_real(ours.logits, theirs.logits, mask) <= ATOL
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for h_ours, h_theirs in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert _max_diff_real(h_ours, h_theirs, mask) <= ATOL
    assert torch.equal(ours.hidden_states[-1], ours.last_hidden_state)  # after final_norm
    assert len(ours.attentions) == len(theirs.attentions) == 2
    for a_ours, a_theirs in zip(ours.attentions, theirs.attentions, strict=True):
        # (B, H, T, S) -> (B, T, H, S) to select the real query rows.
        diff = _max_diff_real(a_ours.transpose(1, 2), a_theirs.transpose(1, 2), mask)
        assert diff <= ATOL
    assert abs(ours.loss.item() - theirs.loss.item()) <= ATOL


@pytest.mark.hf
def test_from_hf_reads_old_gpt2_files(tmp_path: Path) -> None:
    """OpenAI's original files: no "transformer." prefix, causal-mask buffers, a stored head."""
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 24, 24))
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    old["lm_head.weight"] = old["wte.weight"].clone()
    save_file(old, tmp_path / "model.safetensors")
    model = qkv.interop.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= ATOL


@pytest.mark.hf
def test_from_hf_names_unsupported_options(tmp_path: Path) -> None:
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        qkv.interop.from_pretrained(tmp_path)


def test_from_hf_names_missing_and_extra_tensors() -> None:
    from qkv.interop.hf_gpt2 import weights_from_hf, weights_to_hf

    config = PRESETS["tiny"]
    hf = weights_to_hf(GPT(config).state_dict(), config)
    with pytest.raises(CheckpointError, match=r"h\.5\.ln_1\.weight"):
        weights_from_hf({**hf, "transformer.h.5.ln_1.weight": torch.ones(32)}, config)
    del hf["transformer.ln_f.bias"]
    with pytest.raises(CheckpointError, match=r"ln_f\.bias"):
        weights_from_hf(hf, config)


# ---------------------------------------------------------------------------------------------
# qkv -> Hugging Face


@pytest.mark.hf
@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_loads_in_transformers(tmp_path: Path, tie: bool) -> None:
    transformers = require("transformers")
    config = GPTConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=None if tie else 40,
        max_seq_len=16, tie_embeddings=tie,
    )  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.5, 0.2)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) is tie

    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= ATOL
    # ... and back again, exactly.
    again = qkv.interop.from_pretrained(tmp_path)
    assert again.config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


# ---------------------------------------------------------------------------------------------
# Presets and parameter counts


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_preset_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = GPT(PRESETS[name])
    assert model.num_parameters() == EXPECTED_PARAMETERS[name]
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(HF_SIZES))
def test_preset_parameter_counts_match_transformers(name: str) -> None:
    transformers = require("transformers")
    n_embd, n_layer, n_head = HF_SIZES[name]
    with torch.device("meta"):
        hf_config = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)
        hf = transformers.GPT2LMHeadModel(hf_config)
    assert hf.num_parameters() == EXPECTED_PARAMETERS[name]
    from qkv.interop.hf_gpt2 import config_from_hf

    assert config_from_hf(hf_config.to_dict()) == PRESETS[name]


def test_tiny_preset() -> None:
    c = PRESETS["tiny"]
    assert (c.n_layers, c.d_model, c.ff_width) == (2, 32, 128)


# ---------------------------------------------------------------------------------------------
# Behaviour


def test_forward_backward_smoke() -> None:
    model = GPT(PRESETS["tiny"])
    ids = torch.randint(0, 128, (2, 12))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 128)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_loss_decreases_on_a_repeated_batch() -> None:
    model = GPT(PRESETS["tiny"])
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_initial_loss_is_near_uniform() -> None:
    """N(0, 0.02) init: the untrained model predicts nearly uniformly, loss ~ log V."""
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (4, 32))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert abs(loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.2


def test_tied_head_is_one_parameter() -> None:
    tied = GPT(PRESETS["tiny"])
    untied = GPT(GPTConfig(**{**PRESETS["tiny"].__dict__, "tie_embeddings": False}))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 128 * 32


def test_loss_ignores_minus_100() -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (1, 8))
    labels = ids.clone()
    labels[0, 5:] = -100
    with torch.no_grad():
        full = model(ids[:, :5], labels=ids[:, :5]).loss
        masked = model(ids, labels=labels).loss
    torch.testing.assert_close(masked, full)


def test_left_padding_leaves_real_tokens_unchanged() -> None:
    """With positions counted from the mask, padding on the left changes nothing real."""
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)  # (1, 9)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1).long()
    with torch.no_grad():
        plain = model(ids).logits
        left = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(left, plain, atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_full_forward() -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    cache = model.new_cache()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in range(6, 10):
            steps.append(
                model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits
            )
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=1e-5)


def test_causal_future_tokens_do_not_matter() -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 128
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :6], model(changed).logits[:, :6])


def test_output_attentions_restores_capture_flags() -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (2, 5))
    out = model(ids, output_attentions=True, output_hidden_states=True)
    assert [a.shape for a in out.attentions] == [torch.Size([2, 4, 5, 5])] * 2
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 5))
    assert all(not layer.self_attn.capture_weights for layer in model.layers)
    assert all(layer.self_attn.last_weights is None for layer in model.layers)
    assert model(ids).attentions is None


def test_sequence_longer_than_max_seq_len_is_a_clear_error() -> None:
    model = GPT(PRESETS["tiny"])
    with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_heads": 5}, "d_model=32 is not divisible by n_heads=5"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"d_ff": 0}, "d_ff must be positive"),
        ({"activation": "tanh"}, "unknown activation 'tanh'"),
        ({"norm_eps": 0.0}, "norm_eps must be positive"),
    ],
)
def test_config_validation(changes: dict[str, object], message: str) -> None:
    base = {"vocab_size": 128, "d_model": 32, "n_layers": 2, "n_heads": 4}
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_config_is_frozen_and_keyword_only() -> None:
    config = PRESETS["tiny"]
    with pytest.raises(AttributeError):
        config.d_model = 64  # type: ignore[misc]
    with pytest.raises(TypeError):
        GPTConfig(128)  # type: ignore[misc]


def test_docstring_examples() -> None:
    result = doctest.testmod(gpt_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# The decoding protocol: new_cache(batch_size, max_len) and forward(..., cache=)


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_one_token_at_a_time_with_the_cache_equals_one_forward(kind: str) -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (2, 10))
    cache = new_cache(model, kind, 2, 10)
    cached = run_decoder(model, ids, [1] * 10, cache=cache)  # (B, T, V)
    with torch.no_grad():
        assert_close(cached, model(ids).logits)


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_chunked_prefill_equals_one_prefill(kind: str) -> None:
    model = GPT(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded prompt
    one = run_decoder(
        model, ids, [7, 1, 1], cache=new_cache(model, kind, 2, 9), attention_mask=mask
    )
    chunked = run_decoder(
        model, ids, [3, 4, 1, 1], cache=new_cache(model, kind, 2, 9), attention_mask=mask
    )
    real = mask.bool()
    assert_close(chunked[real], one[real])


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_left_padded_batch_with_the_cache_equals_each_row_alone(kind: str) -> None:
    check_left_padded_decoder(GPT(PRESETS["tiny"]).eval(), 128, kind)


def test_cache_and_decoding_past_max_seq_len_are_clear_errors() -> None:
    model = GPT(PRESETS["tiny"]).eval()  # max_seq_len = 64
    with pytest.raises(ValueError, match="max_len=65 exceeds the model's max_seq_len=64"):
        model.new_cache(1, 65)
    with pytest.raises(ValueError, match="max_len must be a positive number"):
        model.new_cache(1, 0)
    for cache in (model.new_cache(), model.new_cache(1, 64)):
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 64)), cache=cache)
            with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
                model(torch.randint(0, 128, (1, 1)), cache=cache)
    small = model.new_cache(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="static KV cache overflow"):
        model(torch.randint(0, 128, (1, 5)), cache=small)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 3)), cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask must be \(B, past \+ T\)"):
            model(torch.randint(0, 128, (1, 1)), torch.ones(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="the cache has 1 entries for 2 layers"):
        model(torch.randint(0, 128, (1, 1)), cache=cache[:1])


def test_static_cache_has_the_model_dtype_and_the_requested_room() -> None:
    model = GPT(PRESETS["tiny"]).to(torch.float64)
    cache = model.new_cache(3, 12)
    assert len(cache) == 2 and cache[0].max_len == 12 and cache[0].seq_len == 0
    kv = torch.zeros(3, 4, 1, 8, dtype=torch.float64)  # (B, H, 1, E)
    k, _ = cache[0].update(kv, kv)
    assert k.dtype == torch.float64 and k.shape == (3, 4, 1, 8)  # (B, H, S, E)


def test_token_ids_round_trip_through_the_hf_config() -> None:
    transformers = require("transformers")
    from qkv.interop.hf_gpt2 import config_from_hf, config_to_hf

    hf = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                 bos_token_id=5, eos_token_id=7)  # fmt: skip
    config = config_from_hf(hf.to_dict())
    assert (config.bos_token_id, config.eos_token_id) == (5, 7)
    back = transformers.GPT2Config(**config_to_hf(config))
    assert (back.bos_token_id, back.eos_token_id) == (5, 7)
    assert config_from_hf(config_to_hf(config)) == config
    # transformers' defaults when the keys are absent; an explicit null stays None.
    assert config_from_hf({}).eos_token_id == 50256 == PRESETS["gpt2"].eos_token_id
    assert config_from_hf({"eos_token_id": None}).eos_token_id is None
    assert config_from_hf({"eos_token_id": [50256, 3]}).eos_token_id == 50256
    with pytest.raises(ValueError, match="eos_token_id=128 is not in the vocabulary"):
        GPTConfig(vocab_size=128, eos_token_id=128)


def test_token_ids_outside_a_small_vocabulary_are_ignored(tmp_path) -> None:
    """transformers keeps GPT-2's default ids (50256) even for a 64-token model; qkv reads None."""
    transformers = require("transformers")
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    )
    hf.save_pretrained(tmp_path)
    model = qkv.interop.from_pretrained(tmp_path)
    assert model.config.bos_token_id is None and model.config.eos_token_id is None
