"""Every wrong input fails before any model runs, with a message that says what to change."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models

from qkv.generate import generate, stream
from tests.generate.conftest import tiny

PROMPT = torch.tensor([[5, 6, 7]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, r"max_new_tokens must be at least 1, got 0"),
        ({"max_new_tokens": -3}, r"max_new_tokens must be at least 1"),
        ({"max_new_tokens": 2.5}, r"max_new_tokens must be an int"),
        ({"do_sample": True, "temperature": 0.0}, r"temperature must be > 0 when sampling"),
        ({"do_sample": True, "temperature": -1.0}, r"temperature must be > 0 when sampling"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, r"top_k must be an int >= 1"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be > 0"),
        ({"num_beams": 0}, r"num_beams \(the beam width\) must be an int >= 1, got 0"),
        ({"num_beams": 2, "do_sample": True}, r"beam search with sampling .* is not supported"),
        ({"num_beams": 2, "streamer": print}, r"a streamer needs num_beams=1"),
        ({"early_stopping": "sometimes"}, r"early_stopping must be True, False or 'never'"),
        ({"stop": [128]}, r"unknown stop token id 128: not in the model's vocabulary \[0, 128\)"),
        ({"stop": [-1]}, r"unknown stop token id -1"),
        ({"stop": 3.5}, r"stop entry 3.5 is neither a token id \(int\) nor a string"),
        ({"stop": ["the end"]}, r"stop strings \['the end'\] need tokenizer="),
        ({"pad_token_id": 500}, r"pad_token_id 500 is not in the vocabulary"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], message: str) -> None:
    model = tiny("gpt")
    options = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, PROMPT, **options)


def test_bad_prompts() -> None:
    model = tiny("gpt")  # 64 positions
    with pytest.raises(ValueError, match=r"empty prompt: input_ids has shape \(1, 0\)"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"empty prompt in row\(s\) \[1\]"):
        generate(model, torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]),
                 max_new_tokens=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\).* input_ids.unsqueeze\(0\)"):
        generate(model, torch.ones(3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match=r"input_ids must hold integer token ids .*torch.float32"):
        generate(model, PROMPT.float(), max_new_tokens=2)  # the same check as the forward's
    with pytest.raises(ValueError, match=r"attention_mask \(1, 2\) must have input_ids' shape"):
        generate(model, PROMPT, torch.ones(1, 2), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the prompt has 65 tokens, longer than the model's 64"):
        generate(model, torch.ones(1, 65, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"= 65 exceeds the model's 64 positions .* at most 4"):
        generate(model, torch.ones(1, 60, dtype=torch.long), max_new_tokens=5)
    assert generate(model, torch.ones(1, 60, dtype=torch.long), max_new_tokens=4).shape == (1, 64)


def test_bad_sources() -> None:
    model = tiny("bart")  # 64 positions
    with pytest.raises(ValueError, match=r"empty source"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the source has 70 tokens, longer than the model's 64"):
        generate(model, torch.ones(1, 70, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"exceed the decoder's 64 positions"):
        generate(model, PROMPT, max_new_tokens=64)


def test_stop_strings_need_a_tokenizer_and_stream_needs_one_prompt() -> None:
    model = tiny("gpt")
    tok = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    out = generate(model, PROMPT, max_new_tokens=2, stop=["zz"], tokenizer=tok, pad_token_id=0)
    assert out.shape[0] == 1
    with pytest.raises(ValueError, match=r"there is no pad_token_id and no eos_token_id"):
        generate(model, PROMPT, max_new_tokens=2, stop=["zz"], tokenizer=tok)
    with pytest.raises(ValueError, match=r"stream takes one prompt"):
        stream(model, torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"use generate for beam search"):
        stream(model, PROMPT, max_new_tokens=2, num_beams=2)


def test_end_ids_outside_the_vocabulary_never_stop() -> None:
    """An end id no token has (say V) switches stopping off, as eos_token_id=[] does."""
    model = tiny("gpt")
    out = generate(model, PROMPT, max_new_tokens=5, eos_token_id=128)
    assert torch.equal(out, generate(model, PROMPT, max_new_tokens=5, eos_token_id=[]))
