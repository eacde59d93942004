"""Repeatable runs: a step budget on the command line gives the same run every time, also
after ``kill -9`` and resume; what a run trained on and under is recorded in ``run.json``."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qkv.cli.main import main
from qkv.interop.files import CheckpointError
from qkv.train import TrainCallback, config_from_dict, train
from qkv.train.checkpoint import complete_checkpoints
from qkv.train.metrics import read_metrics
from qkv.train.runinfo import RUN_INFO

from .helpers import TINY_GPT, run_qkv, with_overrides

# The gpt-char preset (max_time: 3m) made tiny, with the step budget given as a user would.
SMALL = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2",
         "--train.batch_size", "8", "--data.seq_len", "32", "--train.eval_every", "10",
         "--train.eval_batches", "2", "--train.checkpoint_every", "5",
         "--eval.sample_tokens", "8", "--schedule.warmup_steps", "5", "--quiet"]  # fmt: skip


def _saved_train(run: Path) -> dict[str, object]:
    return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["train"]


def test_a_command_line_budget_replaces_the_presets_other_budget(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ["--cache-dir", str(cache_dir)]
    steps = tmp_path / "steps"
    assert main(["train", "--preset", "gpt-char", *SMALL, "--max-steps", "2",
                 "--out", str(steps), *cache]) == 0  # fmt: skip
    assert _saved_train(steps)["max_steps"] == 2 and _saved_train(steps)["max_time"] == ""
    assert "--max-steps replaces the train.max_time=3m" in capsys.readouterr().err
    run_info = json.loads((steps / RUN_INFO).read_text(encoding="utf-8"))
    assert run_info["follows_clock"] is False and run_info["notes"] == []

    # The long spelling counts as a command-line budget too.
    long = tmp_path / "long"
    assert main(["train", "--preset", "gpt-char", *SMALL, "--train.max_steps", "1",
                 "--out", str(long), *cache]) == 0  # fmt: skip
    assert _saved_train(long)["max_time"] == ""
    assert "--max-steps replaces" in capsys.readouterr().err

    # Both given: both kept, and the run says it follows the clock.
    both = tmp_path / "both"
    assert main(["train", "--preset", "gpt-char", *SMALL, "--max-steps", "2", "--max-time",
                 "10m", "--out", str(both), *cache]) == 0  # fmt: skip
    assert _saved_train(both)["max_steps"] == 2 and _saved_train(both)["max_time"] == "10m"
    assert "replaces" not in capsys.readouterr().err
    run_info = json.loads((both / RUN_INFO).read_text(encoding="utf-8"))
    assert run_info["follows_clock"] is True
    assert "learning rate follows the clock" in run_info["notes"][0]

    # A time budget alone replaces a config's step budget.
    config = tmp_path / "steps.yaml"
    config.write_text(yaml.safe_dump(TINY_GPT), encoding="utf-8")
    timed = tmp_path / "timed"
    assert main(["train", "--config", str(config), "--max-time", "2s", "--quiet",
                 "--out", str(timed), *cache]) == 0  # fmt: skip
    assert _saved_train(timed)["max_steps"] == 0 and _saved_train(timed)["max_time"] == "2s"


def _losses(run: Path) -> list[tuple[str, str, str, str]]:
    rows = read_metrics(run / "metrics.csv")
    return [(r["step"], r["loss"], r["lr"], r["val_loss"]) for r in rows]


@pytest.mark.slow
def test_step_budget_runs_of_a_preset_are_repeatable_and_survive_two_kills(
    tmp_path: Path, cache_dir: Path
) -> None:
    """The issue's report, on the path a user takes: the same preset and --max-steps twice
    gives identical losses, and a run killed twice (mid-checkpoint, then between
    checkpoints) and resumed matches them, weights included."""
    common = ["--cache-dir", str(cache_dir)]
    first, second, killed = tmp_path / "first", tmp_path / "second", tmp_path / "killed"
    args = ["train", "--preset", "gpt-char", "--max-steps", "30", *SMALL, *common]
    for out in (first, second):
        done = run_qkv([*args, "--out", str(out)])
        assert done.returncode == 0, done.stderr
    assert len(_losses(first)) == 30
    assert _losses(first) == _losses(second)

    died = run_qkv([*args, "--out", str(killed)], kill_at="checkpoint:15")
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert [s for s, _ in complete_checkpoints(killed / "checkpoints")][-1] == 10
    died = run_qkv(["train", "--resume", str(killed), *common, "--quiet"],
                   kill_at="step:23")  # fmt: skip
    assert died.returncode == -signal.SIGKILL, died.stderr
    done = run_qkv(["train", "--resume", str(killed), *common, "--quiet"])
    assert done.returncode == 0, done.stderr

    assert _losses(killed) == _losses(first)  # every step's loss, lr and val loss, exactly
    ours = load_file(str(killed / "final" / "model.safetensors"))
    theirs = load_file(str(first / "final" / "model.safetensors"))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    segments = json.loads((killed / RUN_INFO).read_text(encoding="utf-8"))["segments"]
    assert [s["start_step"] for s in segments] == [0, 10, 20]


TINY = with_overrides(TINY_GPT, train={"max_steps": 4, "checkpoint_every": 2, "eval_every": 2})


def test_resume_on_other_data_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    train(config_from_dict(TINY), run, cache_dir=cache_dir)
    info = json.loads((run / RUN_INFO).read_text(encoding="utf-8"))
    # As if the run had started on another Python, whose python-docs differ.
    info["data"]["sha256"] = "0" * 64
    (run / RUN_INFO).write_text(json.dumps(info), encoding="utf-8")
    longer = with_overrides(TINY, train={"max_steps": 6})
    with pytest.raises(CheckpointError, match=r"python-docs.*other text.*--out"):
        train(config_from_dict(longer), run, resume=True, cache_dir=cache_dir)
    assert len(read_metrics(run / "metrics.csv")) == 4  # nothing was trained or written


def test_callback_hears_what_the_run_trains_on(tmp_path: Path, cache_dir: Path) -> None:
    heard: list[dict[str, object]] = []

    class Listener(TrainCallback):
        def on_run_info(self, info: dict[str, object]) -> None:
            heard.append(info)

    train(config_from_dict(TINY), tmp_path / "run", cache_dir=cache_dir, callback=Listener())
    [info] = heard
    assert info == {k: v for k, v in json.loads((tmp_path / "run" / RUN_INFO).read_text()).items()
                    if k != "segments"}  # fmt: skip
    data = info["data"]
    assert isinstance(data, dict) and data["corpus"] == "python-docs"
    assert data["vocab_size"] == data["distinct_characters"] + 5  # a char vocabulary


def test_deterministic_runs_are_equal_and_the_setting_is_restored(
    tmp_path: Path, cache_dir: Path
) -> None:
    config = config_from_dict(with_overrides(TINY, train={"deterministic": True}))
    assert not torch.are_deterministic_algorithms_enabled()
    a = train(config, tmp_path / "a", cache_dir=cache_dir)
    b = train(config, tmp_path / "b", cache_dir=cache_dir)
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
    assert a.train_loss == b.train_loss
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
