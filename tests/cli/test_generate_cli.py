"""`qkv generate` and `qkv translate` end to end on tiny checkpoints that carry a tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import qkv
from qkv.models import GPT, Bart, BartConfig, Bert, BertConfig, GPTConfig

TEXT = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20


def byte_bpe(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>"],
    )
    tok.train_from_iterator(TEXT, trainer)
    return tok


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    tok = byte_bpe(300)
    v = tok.get_vocab_size()
    gpt = GPT(GPTConfig(vocab_size=v, d_model=32, n_layers=2, n_heads=4, max_seq_len=128))
    bart = Bart(
        BartConfig(
            vocab_size=v, d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=4,
            d_ff=64, max_seq_len=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=2,
        )
    )  # fmt: skip
    bert = Bert(BertConfig(vocab_size=v, d_model=32, n_layers=1, n_heads=4, d_ff=64))
    return {
        "gpt": qkv.save_pretrained(gpt, root / "gpt", tokenizer=tok),
        "bart": qkv.save_pretrained(bart, root / "bart", tokenizer=tok),
        "bert": qkv.save_pretrained(bert, root / "bert", tokenizer=tok),
    }


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkv", *args], capture_output=True, text=True, timeout=120
    )


def test_generate_continues_the_prompt_and_matches_the_library(checkpoints) -> None:
    result = run("generate", "--model", str(checkpoints["gpt"]), "--prompt", "the cat",
                 "--max-new-tokens", "6")  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, tok = qkv.from_pretrained(checkpoints["gpt"], return_tokenizer=True)
    tok.no_padding()
    ids = torch.tensor([tok.encode("the cat").ids])
    expected = tok.decode(model.generate(ids, max_new_tokens=6)[0, ids.shape[1] :].tolist())
    assert result.stdout.strip() == ("the cat" + expected).strip()


def test_stream_prints_the_same_text(checkpoints) -> None:
    args = ("generate", "--model", str(checkpoints["gpt"]), "--prompt", "a dog",
            "--max-new-tokens", "6")  # fmt: skip
    plain, streamed = run(*args), run(*args, "--stream")
    assert plain.returncode == streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == plain.stdout.strip()


def test_translate_with_an_encoder_decoder(checkpoints) -> None:
    result = run("translate", "--model", str(checkpoints["bart"]), "--source", "the cat sat",
                 "--max-new-tokens", "5", "--num-beams", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, tok = qkv.from_pretrained(checkpoints["bart"], return_tokenizer=True)
    tok.no_padding()
    ids = torch.tensor([tok.encode("the cat sat").ids])
    out = model.generate(ids, max_new_tokens=5, num_beams=2)
    assert result.stdout.strip() == tok.decode(out[0, 1:].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("bert", ("--prompt", "the cat"), "does not generate"),
        ("gpt", ("--prompt", ""), "empty"),
        ("gpt", ("--prompt", "the cat", "--top-p", "1.5"), "top_p"),
        ("missing", ("--prompt", "the cat"), "qkv:"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(checkpoints, tmp_path, model, extra, message) -> None:
    path = checkpoints.get(model, tmp_path / "missing")
    result = run("generate", "--model", str(path), *extra)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
