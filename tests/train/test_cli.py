"""``qkv train`` / ``qkv eval`` / ``qkv sample`` end to end, and every bad input's error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from qkv.cli.main import main
from qkv.train.metrics import read_metrics

from .helpers import TINY_GPT, write_config

TOY = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
       "--train.max_steps", "4", "--train.max_time", "", "--train.batch_size", "4",
       "--data.seq_len", "32", "--train.eval_every", "2", "--train.eval_batches", "2",
       "--train.checkpoint_every", "2", "--eval.sample_tokens", "8", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "toy"
    code = main(["train", "--preset", "gpt-char", *TOY, "--out", str(out),
                 "--cache-dir", str(cache_dir)])  # fmt: skip
    assert code == 0
    return out


def test_train_writes_the_run_directory(run_dir: Path) -> None:
    for name in ("config.yaml", "metrics.csv", "samples.txt", "loss.png", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert rows[1]["val_loss"] and rows[3]["val_bpc"] and not rows[0]["val_loss"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004",
    ]  # fmt: skip
    assert "=== step 4 ===" in (run_dir / "samples.txt").read_text(encoding="utf-8")


def test_loss_png_is_not_blank(run_dir: Path) -> None:
    pixels = np.asarray(image.imread(run_dir / "loss.png"))  # (H, W, 4) floats
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
    assert len(colours) > 20  # lines, text and axes, not one flat colour


def test_eval_and_sample(
    run_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(run_dir), "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out and "val_bpc" in out
    assert main(["eval", str(run_dir), "--checkpoint", "best", "--cache-dir", str(cache_dir)]) == 0
    assert "val_loss" in capsys.readouterr().out
    assert main(["sample", str(run_dir), "--prompt", "The ", "--max-new-tokens", "5",
                 "--seed", "3"]) == 0  # fmt: skip
    first = capsys.readouterr().out
    assert first.startswith("The ")
    assert main(["sample", str(run_dir), "--prompt", "The ", "--max-new-tokens", "5",
                 "--seed", "3"]) == 0  # fmt: skip
    assert capsys.readouterr().out == first  # seeded: reproducible
    assert main(["generate", "--model", str(run_dir / "final"), "--prompt", "a",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip


def test_resume_continues_to_a_larger_budget(
    run_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    code = main(["train", "--resume", str(copy), "--train.max_steps", "6", "--quiet",
                 "--cache-dir", str(cache_dir)])  # fmt: skip
    assert code == 0
    assert [int(r["step"]) for r in read_metrics(copy / "metrics.csv")] == [1, 2, 3, 4, 5, 6]


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line
    return lines[0]


def test_bad_inputs_are_one_line_errors(
    tmp_path: Path, cache_dir: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ["--cache-dir", str(cache_dir), "--quiet"]
    out = ["--out", str(tmp_path / "never")]
    msg = _error(["train", "--preset", "gpt-xl", *cache, *out], capsys)
    assert "unknown preset 'gpt-xl'" in msg and "gpt-char" in msg
    msg = _error(["train", "--preset", "gpt-char", "--model.n_layer", "2", *cache, *out], capsys)
    assert "model.n_layer" in msg and "n_layers" in msg
    msg = _error(["train", "--preset", "gpt-char", "--optimiser.lr", "1", *cache, *out], capsys)
    assert "optimiser" in msg and "optim" in msg
    msg = _error(["train", "--preset", "gpt-char", "--train.precision", "fp16", *cache, *out],
                 capsys)  # fmt: skip
    assert "train.precision" in msg and "'bf16'" in msg
    msg = _error(["train", "--preset", "gpt-char", "--train.batch_size", "many", *cache, *out],
                 capsys)  # fmt: skip
    assert "train.batch_size" in msg and "integer" in msg
    msg = _error(["train", "--preset", "gpt-char", *TOY, "--data.corpus",
                  str(tmp_path / "missing.txt"), *cache, *out], capsys)  # fmt: skip
    assert "missing.txt" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    msg = _error(["train", "--preset", "gpt-char", *TOY, "--data.corpus", str(empty), *cache,
                  *out], capsys)  # fmt: skip
    assert "empty" in msg
    msg = _error(["train", "--preset", "gpt-char", *TOY, "--model.max_seq_len", "16", *cache,
                  *out], capsys)  # fmt: skip
    assert "data.seq_len=32" in msg and "max_seq_len=16" in msg
    msg = _error(["train", "--config", str(tmp_path / "nope.yaml"), *cache, *out], capsys)
    assert "nope.yaml" in msg
    msg = _error(["train", *cache, *out], capsys)
    assert "--preset" in msg
    assert not (tmp_path / "never").exists()  # nothing written for a run that never started

    # --resume with nothing to resume: not a run, and a run without checkpoints.
    msg = _error(["train", "--resume", str(tmp_path), *cache], capsys)
    assert "config.yaml" in msg
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    write_config(fresh / "config.yaml", {**TINY_GPT})
    msg = _error(["train", "--resume", str(fresh), *cache], capsys)
    assert "no complete checkpoint" in msg

    # A checkpoint from a different config; an existing run without --resume.
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    msg = _error(["train", "--resume", str(run_dir), "--model.n_layers", "2", *cache], capsys)
    assert "model.n_layers=1, not 2" in msg and "--out" in msg
    msg = _error(["train", "--preset", "gpt-char", *TOY, "--out", str(run_dir), *cache], capsys)
    assert "already holds a run" in msg and "--resume" in msg
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # nothing already written was touched

    msg = _error(["eval", str(tmp_path / "nothing"), "--cache-dir", str(cache_dir)], capsys)
    assert "config.yaml" in msg
    msg = _error(["sample", str(fresh)], capsys)
    assert "final" in msg


def test_budget_shortcuts(tmp_path: Path, cache_dir: Path) -> None:
    """--max-steps and --max-time set train.max_steps and train.max_time."""
    out = tmp_path / "short"
    code = main(["train", "--preset", "gpt-char", *TOY, "--max-steps", "2", "--max-time", "5m",
                 "--out", str(out), "--cache-dir", str(cache_dir)])  # fmt: skip
    assert code == 0
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == ["1", "2"]
    saved = (out / "config.yaml").read_text(encoding="utf-8")
    assert "max_steps: 2" in saved and "max_time: 5m" in saved


def test_device_shortcut(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--device sets train.device; it may change on --resume; eval takes it too."""
    out = tmp_path / "cpu"
    cache = ["--cache-dir", str(cache_dir)]
    code = main(["train", "--preset", "gpt-char", *TOY, "--max-steps", "2", "--device", "cpu",
                 "--out", str(out), *cache])  # fmt: skip
    assert code == 0
    assert "device: cpu" in (out / "config.yaml").read_text(encoding="utf-8")
    # Weights and optimizer state are device-free: a CPU run may continue where auto says.
    code = main(["train", "--resume", str(out), "--max-steps", "3", "--device", "auto", "--quiet",
                 *cache])  # fmt: skip
    assert code == 0
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == ["1", "2", "3"]
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu", *cache]) == 0
    assert "val_loss" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--preset", "gpt-char", "--device", "gpu", *cache])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
