"""The decoding loop: the KV cache changes nothing but the cost, padding changes nothing at all,
stops end rows, and streaming hands out exactly what generate returns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from qkv.generate import generate, stream
from qkv.generate.settings import GenerationSettings
from qkv.models.bert import PRESETS as BERT_PRESETS
from qkv.models.bert import Bert
from qkv.models.vit import PRESETS as VIT_PRESETS
from qkv.models.vit import ViT
from tests.generate.conftest import (
    DECODER_ONLY,
    ENCODER_DECODER,
    greedy_without_cache,
    is_encoder_decoder,
    source_vocab,
    tiny,
    vocab,
)


def _prompt(model: torch.nn.Module, b: int = 2, t: int = 5) -> torch.Tensor:
    return torch.randint(3, source_vocab(model), (b, t))


def _left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch and its mask."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    return ids, mask


def test_cache_equals_recomputing(family: str) -> None:
    model = tiny(family)
    prompt = _prompt(model)
    expected = greedy_without_cache(model, prompt, 8)
    out = generate(model, prompt, max_new_tokens=8, eos_token_id=[])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_cache_equals_recomputing_with_left_padding(name: str) -> None:
    model = tiny(name)
    ids, mask = _left_pad([torch.randint(3, vocab(model), (n,)) for n in (3, 6)])
    expected = greedy_without_cache(model, ids, 7, mask)
    out = generate(model, ids, mask, max_new_tokens=7, eos_token_id=[])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_static_cache_equals_dynamic(family: str) -> None:
    model = tiny(family)
    prompt = _prompt(model)
    dynamic = generate(model, prompt, max_new_tokens=6, eos_token_id=[])
    static = generate(model, prompt, max_new_tokens=6, eos_token_id=[], static_cache=True)
    torch.testing.assert_close(static, dynamic, atol=0, rtol=0)


def test_one_more_step_continues(family: str) -> None:
    """generate(k) followed by one more step is generate(k + 1)."""
    model = tiny(family)
    prompt = _prompt(model)
    k = 5
    out_k = generate(model, prompt, max_new_tokens=k, eos_token_id=[])
    out_k1 = generate(model, prompt, max_new_tokens=k + 1, eos_token_id=[])
    if is_encoder_decoder(model):  # one more decoder step on the whole decoder sequence
        with torch.no_grad():
            memory = model.encode(prompt)
            nxt = model.decode(out_k, memory)[:, -1].argmax(-1, keepdim=True)
        continued = torch.cat([out_k, nxt], dim=1)
    elif family == "prefix_lm":
        # A new generate call would read all of out_k as its prefix, both ways. The
        # one more step keeps the prompt as the prefix and the generated tokens causal, as
        # generate(k + 1) does.
        with torch.no_grad():
            logits = model(out_k, prefix_lengths=prompt.shape[1]).logits  # (B, T + k, V)
        continued = torch.cat([out_k, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    else:
        continued = generate(model, out_k, max_new_tokens=1, eos_token_id=[])
    torch.testing.assert_close(continued, out_k1, atol=0, rtol=0)


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_left_padded_batch_equals_each_prompt_alone(name: str) -> None:
    model = tiny(name)
    rows = [torch.randint(3, vocab(model), (n,)) for n in (2, 7, 4)]
    ids, mask = _left_pad(rows)
    batch = generate(model, ids, mask, max_new_tokens=6, eos_token_id=[])
    for i, row in enumerate(rows):
        alone = generate(model, row[None], max_new_tokens=6, eos_token_id=[])
        torch.testing.assert_close(batch[i, -6:], alone[0, -6:], atol=0, rtol=0)


@pytest.mark.parametrize("name", ENCODER_DECODER)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_sources_equal_each_source_alone(name: str, side: str) -> None:
    model = tiny(name)
    rows = [torch.randint(3, source_vocab(model), (n,)) for n in (3, 8, 5)]
    ids, mask = _left_pad(rows, pad=model.config.pad_token_id)
    if side == "right":
        ids, mask = _left_pad([r.flip(0) for r in rows], model.config.pad_token_id)
        ids, mask = ids.flip(1), mask.flip(1)
    batch = generate(model, ids, mask, max_new_tokens=6, eos_token_id=[])
    for i, row in enumerate(rows):
        alone = generate(model, row[None], max_new_tokens=6, eos_token_id=[])
        torch.testing.assert_close(batch[i], alone[0], atol=0, rtol=0)


def _cut(row: list[int], hit: int, pad: int, width: int) -> list[int]:
    """The row as generation leaves it when it stops after position ``hit``: padded after."""
    return row[: hit + 1] + [pad] * (width - hit - 1)


@pytest.mark.parametrize("name", ["gpt", "t5"])
def test_stop_token_ends_rows_and_pads_them(name: str) -> None:
    model = tiny(name)
    prompt = _prompt(model, b=3, t=4)
    free = generate(model, prompt, max_new_tokens=10, eos_token_id=[])
    start = free.shape[1] - 10
    new = free[:, start:].tolist()
    stop_id = new[0][3]  # row 0 produces it by step 4 at the latest
    pad = 1 if stop_id != 1 else 2
    out = generate(
        model, prompt, max_new_tokens=10, eos_token_id=[], stop=[stop_id], pad_token_id=pad
    )
    expected = []
    for row in new:
        hit = row.index(stop_id) if stop_id in row else len(row) - 1
        expected.append(_cut(row, hit, pad, len(row)))
    width = max(min(r.index(stop_id) + 1 if stop_id in r else 10, 10) for r in new)
    assert out.shape[1] == start + width  # ends as soon as every row has stopped
    assert out[:, start:].tolist() == [r[:width] for r in expected]
    # The same through eos_token_id; the padding is then the config's pad id where it names
    # one (T5's), else the end id itself (the tiny GPT names none).
    by_eos = generate(model, prompt, max_new_tokens=10, eos_token_id=stop_id)
    default = getattr(model.config, "pad_token_id", None)
    default = stop_id if default is None else default
    eos_expected = [_cut(r, r.index(stop_id) if stop_id in r else 9, default, 10) for r in new]
    assert by_eos[:, start:].tolist() == [r[:width] for r in eos_expected]


def _char_tokenizer(v: int) -> Tokenizer:
    """One character per token id (Greek and beyond), decoded without separators."""
    vocab_map = {chr(0x3B1 + i): i for i in range(v)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token=chr(0x3B1)))
    tok.decoder = decoders.Fuse()
    return tok


def test_stop_string_ends_rows() -> None:
    model = tiny("gpt")
    tok = _char_tokenizer(vocab(model))
    prompt = _prompt(model, b=2, t=4)
    free = generate(model, prompt, max_new_tokens=10, eos_token_id=[])
    new = free[:, 4:].tolist()
    text = tok.decode(new[0])
    needle = text[2:4]  # two tokens row 0 generates
    out = generate(
        model, prompt, max_new_tokens=10, eos_token_id=[], stop=[needle], tokenizer=tok,
        pad_token_id=0,
    )  # fmt: skip
    expected = []
    for row in new:
        hits = [k for k in range(len(row)) if needle in tok.decode(row[: k + 1])]
        expected.append(_cut(row, hits[0] if hits else len(row) - 1, 0, len(row)))
    width = out.shape[1] - 4
    assert out[:, 4:].tolist() == [r[:width] for r in expected]
    assert needle in tok.decode(out[0, 4:].tolist())


def test_streamer_sees_each_step_in_order(family: str) -> None:
    model = tiny(family)
    prompt = _prompt(model)
    seen: list[torch.Tensor] = []
    out = generate(model, prompt, max_new_tokens=6, eos_token_id=[], streamer=seen.append)
    assert len(seen) == 6 and all(s.shape == (2,) for s in seen)
    torch.testing.assert_close(torch.stack(seen, dim=1), out[:, -6:], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["gpt", "bart"])
def test_stream_yields_what_generate_returns(name: str) -> None:
    model = tiny(name)
    prompt = _prompt(model, b=1)
    out = generate(model, prompt, max_new_tokens=7, eos_token_id=[])
    ids = list(stream(model, prompt, max_new_tokens=7, eos_token_id=[]))
    assert ids == out[0, -7:].tolist()
    sampled = generate(model, prompt, max_new_tokens=7, eos_token_id=[], do_sample=True, seed=3)
    streamed = stream(model, prompt[0], max_new_tokens=7, eos_token_id=[], do_sample=True, seed=3)
    assert list(streamed) == sampled[0, -7:].tolist()
    tok = _char_tokenizer(vocab(model))
    pieces = list(stream(model, prompt, max_new_tokens=7, eos_token_id=[], tokenizer=tok))
    assert "".join(pieces) == tok.decode(ids) and len(pieces) == 7


def test_stream_stops_at_the_end_token() -> None:
    model = tiny("gpt")
    prompt = _prompt(model, b=1)
    free = generate(model, prompt, max_new_tokens=8, eos_token_id=[])[0, -8:].tolist()
    eos = free[2]
    assert (
        list(stream(model, prompt, max_new_tokens=8, eos_token_id=eos))
        == free[: free.index(eos) + 1]
    )


def test_model_method_and_modes() -> None:
    model = tiny("llama")
    prompt = _prompt(model)
    expected = generate(model, prompt, max_new_tokens=4, eos_token_id=[])
    model.train()  # dropout would change the tokens: generation runs in eval mode
    out = model.generate(prompt, max_new_tokens=4, eos_token_id=[])
    assert model.training  # and gives the model back as it came
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert not out.is_inference()  # an ordinary tensor, usable in autograd code


def test_encoder_decoder_output_starts_with_the_start_token() -> None:
    model = tiny("t5")
    out = generate(model, _prompt(model), max_new_tokens=3, eos_token_id=[])
    assert out.shape == (2, 4)
    assert (out[:, 0] == model.config.decoder_start_token_id).all()


def test_models_that_do_not_generate_say_so() -> None:
    bert = Bert(BERT_PRESETS["tiny"])
    with pytest.raises(TypeError, match="Bert does not generate"):
        bert.generate(torch.randint(0, 100, (1, 4)), max_new_tokens=2)
    vit = ViT(VIT_PRESETS["tiny"])
    with pytest.raises(TypeError, match="ViT does not generate"):
        vit.generate(torch.randn(1, 3, 32, 32), max_new_tokens=2)


def test_settings_record_equals_keywords() -> None:
    """A GenerationSettings record, keywords, and a record with keyword overrides agree."""
    model = tiny("gpt")
    prompt = _prompt(model)
    keywords = generate(model, prompt, max_new_tokens=5, do_sample=True, top_k=5, seed=1)
    settings = GenerationSettings(max_new_tokens=5, do_sample=True, top_k=5, seed=1)
    assert torch.equal(generate(model, prompt, None, settings), keywords)
    assert torch.equal(model.generate(prompt, settings=settings), keywords)
    greedy = GenerationSettings(max_new_tokens=3, eos_token_id=[])
    overridden = generate(model, prompt, settings=greedy, max_new_tokens=5, do_sample=True,
                          top_k=5, seed=1, eos_token_id=None)  # fmt: skip
    assert torch.equal(overridden, keywords)
    assert greedy.max_new_tokens == 3  # the record itself is left as it was
    streamed = stream(model, prompt[:1], settings=settings)
    assert list(streamed) == generate(model, prompt[:1], settings=settings)[0, 5:].tolist()


def test_settings_are_resolved_against_the_model() -> None:
    model = tiny("gpt")
    settings = GenerationSettings(max_new_tokens=2, eos_token_id=[3, 500], stop=[4, 3])
    assert settings.eos_token_id == (3, 500)  # stored as a tuple
    resolved = settings.resolved_for(model.config)
    assert resolved.eos_token_id == (3,)  # 500 is outside the vocabulary: never produced
    assert resolved.stop_token_ids == (3, 4)  # end ids first, no repeats
    assert resolved.pad_token_id == 3  # the first end id
    assert resolved.resolved_for(model.config) == resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.max_new_tokens = 3  # type: ignore[misc]


def test_unknown_options_name_the_valid_ones() -> None:
    model = tiny("gpt")
    message = r"option\(s\) \['top_kk'\] \(did you mean 'top_k'\?\); the options are: max_new_"
    with pytest.raises(TypeError, match=message):
        generate(model, _prompt(model), max_new_tokens=2, top_kk=3)
    with pytest.raises(TypeError, match=r"unknown generation option\(s\) \['streamer'\]"):
        stream(model, _prompt(model, b=1), max_new_tokens=2, streamer=print)
    with pytest.raises(TypeError, match=r"max_new_tokens is required"):
        generate(model, _prompt(model))
    with pytest.raises(TypeError, match=r"settings must be a GenerationSettings"):
        generate(model, _prompt(model), None, {"max_new_tokens": 2})  # type: ignore[arg-type]
