"""The LLaMA-style decoder: parity with transformers' Llama and Mistral, presets, training."""

from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch
from torch import nn

import qkv.models.llama
from qkv.interop import from_pretrained
from qkv.interop.files import CheckpointError
from qkv.interop.hf_llama import llama_config_from_hf
from qkv.models.llama import PRESETS, Llama, LlamaConfig
from tests.models.decoding import (
    CACHE_KINDS,
    assert_close,
    check_left_padded_decoder,
    new_cache,
    run_decoder,
)
from tests.optional import require

TOL = 1e-4  # float32, two implementations with differently ordered sums


def _scramble(model: nn.Module, std: float = 0.15) -> nn.Module:
    """Weights large enough that attention is far from uniform; norm gains away from 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model


def _batch(vocab: int, t: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences: full, right-padded, left-padded."""
    ids = torch.randint(0, vocab, (3, t))  # (B, T)
    mask = torch.ones(3, t, dtype=torch.long)  # (B, T)
    mask[1, -3:] = 0
    mask[2, :4] = 0
    return ids, mask


def _hf_config(kind: str, **extra: object):
    transformers = require("transformers")
    sizes = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=500.0, attn_implementation="eager",
    )  # fmt: skip
    sizes.update(extra)
    if kind == "mistral":
        config = transformers.MistralConfig(sliding_window=3, **sizes)
        return config, transformers.MistralForCausalLM
    return transformers.LlamaConfig(**sizes), transformers.LlamaForCausalLM


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.2e}"


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_hf_to_qkv(kind: str, tmp_path) -> None:
    hf_config, hf_class = _hf_config(kind)
    hf = _scramble(hf_class(hf_config)).eval()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, Llama)
    assert ours.config.sliding_window == (3 if kind == "mistral" else None)
    assert ours.config.rope_base == 500.0 and ours.config.n_kv_heads == 2

    ids, mask = _batch(97)  # T = 9 > sliding window 3
    # Score only tokens predicted from a real position: padding, and the first real token of the
    # left-padded row (its predictor is a padding position, whose output is undefined).
    predictor_is_real = torch.cat([torch.ones(3, 1, dtype=torch.long), mask[:, :-1]], dim=1)
    labels = ids.masked_fill((mask * predictor_is_real) == 0, -100)  # (B, T)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what qkv derives from the mask
    with torch.no_grad():
        theirs = hf(
            ids, attention_mask=mask, position_ids=position_ids, labels=labels,
            output_hidden_states=True, output_attentions=True,
        )  # fmt: skip
        mine = ours(
            ids, attention_mask=mask, labels=labels, output_hidden_states=True,
            output_attentions=True,
        )  # fmt: skip
    real = mask.bool()  # (B, T): padded positions are undefined
    _close(mine.logits[real], theirs.logits[real], "logits")
    assert len(mine.hidden_states) == len(theirs.hidden_states) == 3
    for i, (a, b) in enumerate(zip(mine.hidden_states, theirs.hidden_states, strict=True)):
        _close(a[real], b[real], f"hidden state {i}")
    for i, (a, b) in enumerate(zip(mine.attentions, theirs.attentions, strict=True)):
        assert a.shape == b.shape == (3, 4, 9, 9)
        rows = real[:, None, :, None].expand_as(a)  # real query rows, all heads and keys
        _close(a[rows], b[rows], f"attention probabilities of layer {i}")
    _close(mine.loss, theirs.loss, "loss")
    if kind == "mistral":  # the window is really there: a query sees exactly 3 keys
        assert (mine.attentions[0][0, :, -1, :-3] == 0).all()


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["llama", "mistral", "tied"])
def test_qkv_to_hf(kind: str, tmp_path) -> None:
    transformers = require("transformers")
    config = dataclasses.replace(
        PRESETS["tiny"],
        sliding_window=3 if kind == "mistral" else None,
        tie_embeddings=kind == "tied",
    )
    ours = _scramble(Llama(config)).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    expected = "MistralForCausalLM" if kind == "mistral" else "LlamaForCausalLM"
    assert type(theirs).__name__ == expected
    ids = torch.randint(0, config.vocab_size, (2, 8))  # (B, T), T > window
    with torch.no_grad():
        _close(ours(ids).logits, theirs(ids).logits, "logits")
    # And back: qkv reads what it wrote, tied weights still one parameter.
    again = from_pretrained(tmp_path)
    assert again.config == config
    assert (again.lm_head.weight is again.tok_emb.weight) == (kind == "tied")
    with torch.no_grad():
        _close(again(ids).logits, ours(ids).logits, "logits after a round trip")


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("llama-7b", 6_738_415_616),
        ("llama2-7b", 6_738_415_616),
        ("mistral-7b", 7_241_732_096),
        ("tiny", 31_392),
    ],
)
def test_preset_parameter_counts(name: str, count: int) -> None:
    with torch.device("meta"):
        model = Llama(PRESETS[name])
    assert model.num_parameters() == count


def test_tied_embeddings_are_one_parameter() -> None:
    untied = Llama(PRESETS["tiny"])
    tied = Llama(dataclasses.replace(PRESETS["tiny"], tie_embeddings=True))
    assert tied.lm_head.weight is tied.tok_emb.weight
    v, d = PRESETS["tiny"].vocab_size, PRESETS["tiny"].d_model
    assert untied.num_parameters() - tied.num_parameters() == v * d


def test_forward_backward_smoke() -> None:
    model = Llama(PRESETS["tiny"])
    ids, mask = _batch(PRESETS["tiny"].vocab_size)
    out = model(ids, mask, labels=ids, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (3, 9, 128) and out.last_hidden_state.shape == (3, 9, 32)
    assert len(out.hidden_states) == 3 and out.attentions[0].shape == (3, 4, 9, 9)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Capturing was switched on for that forward only.
    assert not any(layer.self_attn.capture_weights for layer in model.layers)
    assert model(ids).attentions is None


def test_loss_decreases() -> None:
    model = Llama(PRESETS["tiny"])
    ids = torch.randint(0, 128, (2, 8)).repeat(2, 1)  # (B, T), a tiny repeated batch
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_left_padding_does_not_change_real_tokens() -> None:
    model = _scramble(Llama(PRESETS["tiny"])).eval()
    ids = torch.randint(0, 128, (1, 6))  # (1, T)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)  # (1, 3 + T)
    mask = torch.tensor([[0, 0, 0] + [1] * 6])
    with torch.no_grad():
        _close(model(padded, mask).logits[:, 3:], model(ids).logits, "left-padded logits")


@pytest.mark.parametrize("window", [None, 3])
def test_causal_future_tokens_do_not_matter(window: int | None) -> None:
    config = dataclasses.replace(PRESETS["tiny"], sliding_window=window)
    model = _scramble(Llama(config)).eval()
    ids = torch.randint(0, 128, (2, 10))  # (B, T)
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 128, (2, 4))
    with torch.no_grad():
        _close(model(ids).logits[:, :6], model(changed).logits[:, :6], "logits before t")


def test_sliding_window_forgets_old_tokens_in_one_layer() -> None:
    config = dataclasses.replace(PRESETS["tiny"], n_layers=1, sliding_window=3)
    model = _scramble(Llama(config)).eval()
    ids = torch.randint(0, 128, (1, 8))  # (1, T)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 128
    with torch.no_grad():  # position 7 sees 5, 6, 7 only
        _close(model(ids).logits[:, 3:], model(changed).logits[:, 3:], "logits past the window")


def test_reference_and_fast_attention_agree() -> None:
    fast = _scramble(Llama(PRESETS["tiny"])).eval()
    ref = Llama(dataclasses.replace(PRESETS["tiny"], attn_impl="reference")).eval()
    ref.load_state_dict(fast.state_dict())
    ids, mask = _batch(128)
    with torch.no_grad():
        real = mask.bool()
        _close(fast(ids, mask).logits[real], ref(ids, mask).logits[real], "sdpa vs reference")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": 30}, "not divisible by n_heads"),
        ({"n_kv_heads": 3}, "not divisible by n_kv_heads"),
        ({"d_model": 20, "n_heads": 4}, "must be even"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"n_layers": 0}, "n_layers must be positive"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_validation(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["tiny"], **changes)


def test_wrong_config_type_and_positions_past_max_seq_len() -> None:
    with pytest.raises(TypeError, match="LlamaConfig"):
        Llama(object())  # type: ignore[arg-type]
    model = Llama(LlamaConfig(vocab_size=10, d_model=16, n_heads=2, n_kv_heads=2, max_seq_len=4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_unsupported_hf_configs_are_refused() -> None:
    base = {
        "model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2,
    }  # fmt: skip
    assert llama_config_from_hf({**base, "rope_theta": 5e5}).rope_base == 5e5
    v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    assert llama_config_from_hf(v5).rope_base == 7.0
    llama3 = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    with pytest.raises(CheckpointError, match=r"'llama3' .* unsupported"):
        llama_config_from_hf({**base, "rope_parameters": llama3})
    with pytest.raises(CheckpointError, match=r"'yarn' .* unsupported"):
        llama_config_from_hf({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="attention_bias"):
        llama_config_from_hf({**base, "attention_bias": True})
    with pytest.raises(CheckpointError, match="head_dim"):
        llama_config_from_hf({**base, "head_dim": 4})
    # A "llama" config never applies a sliding window, even if the key is there.
    assert llama_config_from_hf({**base, "sliding_window": 4}).sliding_window is None


def test_docstring_examples() -> None:
    results = doctest.testmod(qkv.models.llama, raise_on_error=False)
    assert results.failed == 0 and results.attempted > 0


# The decoding protocol: new_cache(batch_size, max_len) and forward(..., cache=) ---------------

WINDOWS = [None, 3]  # LLaMA, and Mistral's sliding window (shorter than the sequences below)


def _model(window: int | None) -> Llama:
    return _scramble(Llama(dataclasses.replace(PRESETS["tiny"], sliding_window=window))).eval()


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_one_token_at_a_time_with_the_cache_equals_one_forward(
    kind: str, window: int | None
) -> None:
    model, ids = _model(window), torch.randint(0, 128, (2, 10))
    cached = run_decoder(model, ids, [1] * 10, cache=new_cache(model, kind, 2, 10))
    with torch.no_grad():
        assert_close(cached, model(ids).logits)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_chunked_prefill_equals_one_prefill(kind: str, window: int | None) -> None:
    model, ids = _model(window), torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded prompt
    runs = [
        run_decoder(model, ids, chunks, cache=new_cache(model, kind, 2, 9), attention_mask=mask)
        for chunks in ([7, 1, 1], [3, 4, 1, 1])
    ]
    real = mask.bool()
    assert_close(runs[1][real], runs[0][real])


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_left_padded_batch_with_the_cache_equals_each_row_alone(
    kind: str, window: int | None
) -> None:
    check_left_padded_decoder(_model(window), 128, kind)


def test_cache_and_decoding_past_max_seq_len_are_clear_errors() -> None:
    model = _model(None)  # max_seq_len = 64
    with pytest.raises(ValueError, match="max_len=65 exceeds the model's max_seq_len=64"):
        model.new_cache(1, 65)
    for cache in (model.new_cache(), model.new_cache(1, 64)):
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 64)), cache=cache)
            with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
                model(torch.randint(0, 128, (1, 1)), cache=cache)
    with torch.no_grad(), pytest.raises(ValueError, match=r"attention_mask must be \(B, past"):
        model(torch.randint(0, 128, (1, 2)), torch.ones(1, 3, dtype=torch.long))


def test_static_cache_holds_the_grouped_kv_heads() -> None:
    model = _model(None).to(torch.float64)
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 5)), cache=cache)
    keys = cache[0].keys
    assert keys is not None and keys.dtype == torch.float64
    assert keys.shape == (2, 2, 5, 8)  # (B, K, S, E): K = n_kv_heads = 2, not n_heads = 4
    assert cache[0].max_len == 16


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_token_ids_round_trip_through_the_hf_config(kind: str) -> None:
    from qkv.interop.hf_llama import llama_config_to_hf

    hf_config, _ = _hf_config(kind, bos_token_id=5, eos_token_id=7)
    config = llama_config_from_hf(hf_config.to_dict())
    assert (config.bos_token_id, config.eos_token_id) == (5, 7)
    back = type(hf_config)(**llama_config_to_hf(config))
    assert (back.bos_token_id, back.eos_token_id) == (5, 7)
    assert llama_config_from_hf(llama_config_to_hf(config)) == config


def test_token_ids_default_to_llamas() -> None:
    base = {
        "model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2,
    }  # fmt: skip
    config = llama_config_from_hf(base)  # absent: transformers' defaults, "<s>" and "</s>"
    assert (config.bos_token_id, config.eos_token_id) == (1, 2) == (
        PRESETS["llama2-7b"].bos_token_id, PRESETS["llama2-7b"].eos_token_id
    )  # fmt: skip
    several = llama_config_from_hf({**base, "bos_token_id": None, "eos_token_id": [2, 9]})
    assert (several.bos_token_id, several.eos_token_id) == (None, 2)
    with pytest.raises(ValueError, match="eos_token_id=10 is not in the vocabulary"):
        dataclasses.replace(config, eos_token_id=10)
