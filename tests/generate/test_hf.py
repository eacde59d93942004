"""Against transformers' generate on the very same random weights: identical token ids.

Each model is built tiny in transformers (vocabulary 24, so that a chosen end token really gets
produced), saved, and loaded into qkv through ``qkv.interop.from_pretrained``. Both libraries
get the same prompts, end, pad and start ids, and transformers gets a ``GenerationConfig``
holding only the compared settings, so none of its extra defaults (forced tokens, minimum
lengths) applies.

The models and prompts come from fixed seeds: exact ids are compared, and a fixed case keeps a
rare near-tie between two logits from making the test flaky.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from qkv.generate import generate
from qkv.interop import from_pretrained
from tests.optional import require

transformers = require("transformers")

pytestmark = pytest.mark.hf

V = 24
# A rare, non-zero pad: transformers' beam search fills with eos when pad_token_id == 0.
PAD = V - 1


def _gpt2() -> Any:
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _llama() -> Any:
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.3, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _t5() -> Any:
    config = transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        initializer_factor=5.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _bart() -> Any:
    config = transformers.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, init_std=0.3, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


# family -> (builder, start id for encoder-decoders, pad side of the prompts)
FAMILIES: dict[str, tuple[Callable[[], Any], int | None, str]] = {
    "gpt2": (_gpt2, None, "left"),
    "llama": (_llama, None, "left"),
    "t5": (_t5, 0, "left"),
    # transformers' BART numbers source positions from the first column, padding included, so
    # its sources are padded on the right (as its tokenizers do).
    "bart": (_bart, 2, "right"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    build, start, side = FAMILIES[request.param]
    torch.manual_seed(0)
    hf = build().eval()
    hf.generation_config = transformers.GenerationConfig()  # no defaults from the model config
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    ours = from_pretrained(Path(directory))
    lengths = (4, 7, 5)
    ids = torch.randint(4, V - 1, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, -n:] = 1
        else:
            mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, PAD)
    return {"hf": hf, "qkv": ours, "ids": ids, "mask": mask, "start": start}


def _hf_generate(pair: dict, **settings: Any) -> torch.Tensor:
    if pair["start"] is not None:
        settings["decoder_start_token_id"] = pair["start"]
    config = transformers.GenerationConfig(do_sample=False, pad_token_id=PAD, **settings)
    with torch.no_grad():
        return pair["hf"].generate(
            pair["ids"], attention_mask=pair["mask"], generation_config=config
        )


def _qkv_generate(pair: dict, **settings: Any) -> torch.Tensor:
    return generate(pair["qkv"], pair["ids"], pair["mask"], pad_token_id=PAD, **settings)


def _end_token(pair: dict) -> int:
    """A token that ends some best hypotheses, not all of them at once: the first such token
    among those transformers' free beam search produces."""
    if "eos" not in pair:
        start = 1 if pair["start"] is not None else pair["ids"].shape[1]
        free = _hf_generate(pair, max_new_tokens=10, num_beams=3)[:, start:]  # (B, 10)
        candidates = [t for t in dict.fromkeys(free.T.flatten().tolist()) if t != PAD]
        for token in candidates:
            outs = [
                _qkv_generate(
                    pair, max_new_tokens=10, num_beams=3, length_penalty=lp, eos_token_id=token
                )[:, start:]
                for lp in (0.6, 1.5)
            ]
            if all((out == token).any() for out in outs) and max(o.shape[1] for o in outs) > 2:
                pair["eos"] = token
                break
        else:
            pytest.fail(f"no token of {free.tolist()} ends a hypothesis; change the seed")
    return pair["eos"]


def test_greedy_matches_transformers(pair: dict) -> None:
    free = _hf_generate(pair, max_new_tokens=10)
    assert torch.equal(_qkv_generate(pair, max_new_tokens=10, eos_token_id=[]), free)
    eos = int(free[1, -6])
    expected = _hf_generate(pair, max_new_tokens=10, eos_token_id=eos)
    ours = _qkv_generate(pair, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(ours, expected)
    assert (ours == eos).any()


@pytest.mark.parametrize("early_stopping", [False, True])
@pytest.mark.parametrize("length_penalty", [0.6, 1.5])
def test_beam_search_matches_transformers(
    pair: dict, length_penalty: float, early_stopping: bool
) -> None:
    eos = _end_token(pair)
    settings = dict(
        max_new_tokens=10, num_beams=3, length_penalty=length_penalty,
        early_stopping=early_stopping, eos_token_id=eos,
    )  # fmt: skip
    expected = _hf_generate(pair, **settings)
    ours = _qkv_generate(pair, **settings)
    assert torch.equal(ours, expected), f"transformers:\n{expected}\nqkv:\n{ours}"


def test_beam_search_ends_on_the_end_token(pair: dict) -> None:
    """The cases above do exercise finished hypotheses: best beams end with eos and are padded."""
    eos = _end_token(pair)
    for lp in (0.6, 1.5):
        out = _qkv_generate(
            pair, max_new_tokens=10, num_beams=3, length_penalty=lp, eos_token_id=eos
        )
        assert (out == eos).any()


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_default_padding_follows_the_checkpoints_pad_id(family: str, tmp_path: Path) -> None:
    """With no pad id given, rows that ended are filled as transformers fills them by default:
    with the config's ``pad_token_id`` (not the end id) when the checkpoint names one."""
    build, start, _ = FAMILIES[family]
    torch.manual_seed(0)
    hf = build().eval()
    hf.config.pad_token_id = PAD
    hf.generation_config = transformers.GenerationConfig.from_model_config(hf.config)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.pad_token_id == PAD
    ids = torch.randint(4, V - 1, (3, 6))
    extra = {} if start is None else {"decoder_start_token_id": start}
    with torch.no_grad():
        free = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, **extra)
    new = free[:, -10:] if start is None else free[:, 1:]
    eos = int(new[1, 3])  # row 1 ends after 4 tokens; the others may run on
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, **extra)
    got = generate(ours, ids, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(got, expected), f"transformers:\n{expected}\nqkv:\n{got}"
    assert (got == PAD).any()  # a row ended early and was padded with the config's pad id
