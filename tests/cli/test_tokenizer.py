"""`qkv tokenizer train` end to end through the command's main()."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkv.cli.main import main
from qkv.data import load_tokenizer


def test_train_bpe_on_python_docs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["tokenizer", "train", "--corpus", "python-docs", "--kind", "bpe", "--vocab-size", "500",
         "--out", str(tmp_path / "bpe")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    tok = load_tokenizer(tmp_path / "bpe" / "tokenizer.json")
    assert tok.get_vocab_size() == 500
    assert "500 tokens" in out and "pieces:" in out and "ids:" in out
    text = "Unicode ✓ and 😀"
    assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize("kind", ["char", "wordpiece"])
def test_train_other_kinds_to_a_json_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    (tmp_path / "c.txt").write_text("the cat sat on the mat\n" * 50, encoding="utf-8")
    out_file = tmp_path / "out" / f"{kind}.json"
    code = main(
        ["tokenizer", "train", "--corpus", str(tmp_path / "c.txt"), "--kind", kind,
         "--vocab-size", "60", "--out", str(out_file)]
    )  # fmt: skip
    assert code == 0
    tok = load_tokenizer(out_file)
    if kind == "char":
        assert tok.get_vocab_size() == 5 + len(set("the cat sat on the mat\n"))
    else:
        assert "the" in tok.get_vocab() and "[MASK]" in tok.get_vocab()
    assert str(out_file) in capsys.readouterr().out.replace("\n", "")


def test_train_on_a_task_alphabet_and_capped_code(tmp_path: Path) -> None:
    assert main(["tokenizer", "train", "--corpus", "dates", "--kind", "char",
                 "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    assert load_tokenizer(tmp_path / "d").token_to_id("9") is not None
    assert main(["tokenizer", "train", "--corpus", "python-code", "--max-bytes", "100000",
                 "--vocab-size", "400", "--out", str(tmp_path / "p")]) == 0  # fmt: skip
    assert load_tokenizer(tmp_path / "p").get_vocab_size() == 400


def test_bad_input_is_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["tokenizer", "train", "--corpus", str(tmp_path / "nope.txt"),
                 "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "neither a built-in name" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    code = main(["tokenizer", "train", "--corpus", "python-docs", "--vocab-size", "100",
                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "too small for byte-level BPE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--corpus", "python-docs", "--vocab-size", "-3",
              "--out", str(tmp_path / "o")])  # fmt: skip
