"""``qkv quantize`` end to end on a toy run and a model directory, and every bad input's error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qkv
from qkv.blocks.quant import Int4Linear, Int8Linear
from qkv.cli.main import main

TOY = ["--model.d_model", "64", "--model.n_layers", "1", "--model.n_heads", "2",
       "--train.max_steps", "2", "--train.max_time", "", "--train.batch_size", "4",
       "--data.seq_len", "32", "--train.eval_every", "2", "--train.eval_batches", "2",
       "--train.checkpoint_every", "0", "--eval.sample_tokens", "8", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qkv-data-cache")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("quantize") / "toy"
    code = main(["train", "--preset", "gpt-char", *TOY, "--out", str(out),
                 "--cache-dir", str(cache_dir)])  # fmt: skip
    assert code == 0
    return out


def _metrics(text: str) -> dict[str, float]:
    pairs = (line.split() for line in text.splitlines() if line.startswith("  "))
    return {name: float(value) for name, value in pairs}


@pytest.mark.parametrize(("bits", "extra"), [("8", []), ("4", ["--group-size", "32"])])
def test_a_quantised_run_is_evaluated_and_sampled(
    run_dir: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    bits: str, extra: list[str],
) -> None:  # fmt: skip
    out = tmp_path / f"int{bits}"
    assert main(["quantize", str(run_dir), "--bits", bits, *extra, "--out", str(out)]) == 0
    assert "quantised 6 linear layers" in capsys.readouterr().out
    assert (out / "config.yaml").is_file() and (out / "final" / "tokenizer.json").is_file()
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["quantization"]["bits"] == int(bits)
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # no pickles
    model = qkv.from_pretrained(out / "final")
    assert isinstance(model.layers[0].mlp.down_proj, Int8Linear if bits == "8" else Int4Linear)

    assert main(["eval", str(run_dir), "--cache-dir", str(cache_dir)]) == 0
    plain = _metrics(capsys.readouterr().out)
    assert main(["eval", str(out), "--cache-dir", str(cache_dir)]) == 0
    quantised = _metrics(capsys.readouterr().out)
    assert abs(quantised["val_loss"] - plain["val_loss"]) < 0.05 * plain["val_loss"]

    assert main(["sample", str(out), "--prompt", "The ", "--max-new-tokens", "8",
                 "--seed", "0"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("The ")
    assert main(["generate", "--model", str(out / "final"), "--prompt", "The ",
                 "--max-new-tokens", "8"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("The ")


def test_a_model_directory_gives_a_model_directory(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model-int8"
    assert main(["quantize", str(run_dir / "final"), "--bits", "8", "--out", str(out)]) == 0
    assert "qkv generate --model" in capsys.readouterr().out
    assert (out / "config.json").is_file() and not (out / "config.yaml").exists()
    assert main(["generate", "--model", str(out), "--prompt", "a", "--max-new-tokens", "4"]) == 0


def test_bad_input_is_a_clear_error(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = tmp_path / "done"
    assert main(["quantize", str(run_dir), "--bits", "8", "--out", str(done)]) == 0
    capsys.readouterr()
    cases = [
        (["quantize", str(done), "--bits", "4", "--out", str(tmp_path / "a")], "already quantised"),
        (["quantize", str(run_dir), "--bits", "4", "--group-size", "48", "--out",
          str(tmp_path / "b")], "group_size=48 does not divide the input width 64"),
        (["quantize", str(run_dir), "--bits", "8", "--group-size", "32", "--out",
          str(tmp_path / "c")], "group_size is for int4"),
        (["quantize", str(run_dir), "--bits", "8", "--out", str(done)], "is not empty"),
        (["quantize", str(tmp_path / "nothing"), "--bits", "8", "--out", str(tmp_path / "d")],
         "neither a finished training run"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("qkv quantize: ") and message in err, err
    for name in "abcd":
        assert not (tmp_path / name).exists()  # nothing written on error
    with pytest.raises(SystemExit):
        main(["quantize", str(run_dir), "--bits", "3", "--out", str(tmp_path / "e")])
