"""Knowledge distillation: the soft loss against its formula, its τ² scaling, the mix with the
hard labels, a tiny distilled run (trains, resumes, saves no teacher), and the errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

import qkv
from qkv.data import build_data, char_tokenizer
from qkv.interop import save_pretrained
from qkv.models.gpt import GPTConfig
from qkv.train import ConfigError, config_from_dict, train
from qkv.train.distill import Distillation, distillation_loss_sum, mix_losses
from qkv.train.metrics import read_metrics
from qkv.train.objectives import Batch, CausalLM, loss_sum

from .helpers import TINY_GPT, run_qkv, with_overrides, write_config

# -- the loss ---------------------------------------------------------------------------------


def _logits_and_targets(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, 11, generator=g) * 2  # (B, T, V)
    teacher = torch.randn(3, 5, 11, generator=g) * 2  # (B, T, V)
    targets = torch.randint(0, 11, (3, 5), generator=g)  # (B, T)
    targets[0, 1] = targets[2, 4] = targets[1, 0] = -100
    return student, teacher, targets


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 7.0])
def test_soft_loss_is_tau_squared_kl_summed_over_scored_targets(temperature: float) -> None:
    student, teacher, targets = _logits_and_targets()
    expected = 0.0
    for b in range(3):
        for t in range(5):
            if targets[b, t] == -100:
                continue
            p = torch.softmax(teacher[b, t].double() / temperature, -1)  # (V,)
            q = torch.softmax(student[b, t].double() / temperature, -1)  # (V,)
            expected += temperature**2 * float((p * (p / q).log()).sum())
    got = distillation_loss_sum(student, teacher, targets, temperature)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    # the same as PyTorch's KL divergence on the scored rows
    scored = targets.reshape(-1) != -100
    torch_kl = F.kl_div(
        F.log_softmax(student.reshape(-1, 11)[scored] / temperature, -1),
        F.log_softmax(teacher.reshape(-1, 11)[scored] / temperature, -1),
        log_target=True, reduction="sum",
    )  # fmt: skip
    torch.testing.assert_close(got, temperature**2 * torch_kl)


def test_soft_loss_is_zero_for_the_teacher_itself_and_ignores_unscored_positions() -> None:
    student, teacher, targets = _logits_and_targets()
    assert float(distillation_loss_sum(teacher, teacher, targets, 2.0)) == 0.0
    changed = student.clone()
    changed[targets == -100] += 100.0  # unscored positions may hold anything
    assert torch.equal(
        distillation_loss_sum(changed, teacher, targets, 2.0),
        distillation_loss_sum(student, teacher, targets, 2.0),
    )
    bf16 = distillation_loss_sum(student.bfloat16(), teacher.bfloat16(), targets, 2.0)
    assert bf16.dtype == torch.float32  # scored in float32 under autocast too


def test_tau_squared_keeps_the_soft_gradient_the_same_size_at_every_temperature() -> None:
    """d soft / d z_s = τ (p_s - p_t) -> (z_s - z_t) / V for large τ (logits of mean zero):
    without the τ² factor the gradient would shrink as 1 / τ²."""
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 4, 16, generator=g)  # (B, T, V)
    teacher = torch.randn(1, 4, 16, generator=g)  # (B, T, V)
    student, teacher = student - student.mean(-1, True), teacher - teacher.mean(-1, True)
    targets = torch.zeros(1, 4, dtype=torch.long)  # (B, T)
    limit = (student - teacher) / 16  # (B, T, V) the high-temperature gradient
    norms, unscaled = [], []
    for temperature in (10.0, 20.0, 40.0):
        z = student.clone().requires_grad_(True)
        distillation_loss_sum(z, teacher, targets, temperature).backward()
        assert z.grad is not None
        error = float((z.grad - limit).norm() / limit.norm())
        assert error < 1.0 / temperature, (temperature, error)  # first order in 1 / τ
        norms.append(float(z.grad.norm()))
        unscaled.append(norms[-1] / temperature**2)  # the plain KL's gradient
    assert max(norms) / min(norms) < 1.1  # the same size: to first order, independent of τ
    assert unscaled[0] / unscaled[-1] > 15  # without τ²: 16 times smaller at 4 times the τ


def test_mix_alpha_zero_is_the_hard_loss_exactly_and_alpha_one_the_soft_loss() -> None:
    student, teacher, targets = _logits_and_targets(2)
    hard = loss_sum(student, targets)
    soft = distillation_loss_sum(student, teacher, targets, 3.0)
    assert torch.equal(mix_losses(soft, hard, 0.0), hard)
    assert torch.equal(mix_losses(soft, hard, 1.0), soft)
    torch.testing.assert_close(mix_losses(soft, hard, 0.25), 0.25 * soft + 0.75 * hard)


def test_distillation_objective_runs_the_teacher_without_gradients() -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=13, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    student, teacher = qkv.GPT(config), qkv.GPT(config).eval().requires_grad_(False)
    base = CausalLM()
    ids = torch.randint(0, 13, (2, 8))  # (B, T)
    batch = base.prepare({"input_ids": ids}, seed=0, step=0)

    def plain() -> Any:
        import contextlib

        return contextlib.nullcontext()

    for alpha in (0.0, 0.7):
        distill = Distillation(base, teacher, temperature=2.0, alpha=alpha, autocast=plain)
        logits = distill.logits(student, batch)
        mixed = distill.loss_sum(logits, batch)
        if alpha == 0.0:
            assert torch.equal(mixed, base.loss_sum(logits, batch))
        mixed.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None for p in student.parameters())
        student.zero_grad(set_to_none=True)
    # evaluation reports the student's plain cross-entropy
    assert distill.metric_names == base.metric_names
    assert isinstance(batch, Batch)


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,words",
    [
        ({"temperature": 0}, ["distill.temperature", "positive"]),
        ({"temperature": -1.0}, ["distill.temperature", "positive"]),
        ({"alpha": 1.5}, ["distill.alpha", "[0, 1]"]),
        ({"alpha": -0.1}, ["distill.alpha", "[0, 1]"]),
        ({"alpha": "much"}, ["distill.alpha", "number"]),
        ({"teachr": "runs/x"}, ["distill.teachr", "teacher"]),
    ],
)
def test_bad_distill_settings_name_the_key(values: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"max_steps": 1}, "distill": values})
    for word in words:
        assert word in str(info.value)


def test_distill_section_round_trips_and_is_off_by_default() -> None:
    config = config_from_dict({"train": {"max_steps": 1}})
    assert config.distill.teacher == ""
    data = {"train": {"max_steps": 1}, "distill": {"teacher": "runs/t", "temperature": 4}}
    config = config_from_dict(data)
    assert (config.distill.teacher, config.distill.temperature) == ("runs/t", 4.0)
    from qkv.train.config import config_to_dict

    assert config_from_dict(config_to_dict(config)) == config


# -- tiny runs --------------------------------------------------------------------------------

STUDENT = with_overrides(
    TINY_GPT,
    model={"family": "gpt", "d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.0},
    train={"max_steps": 12, "eval_every": 6, "checkpoint_every": 6, "eval_batches": 2},
    eval={"sample_tokens": 0},
)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A tiny GPT trained for a few steps: the teacher of the tiny students."""
    run = tmp_path_factory.mktemp("distill") / "teacher"
    budget = {"max_steps": 20, "eval_every": 0, "checkpoint_every": 0}
    raw = with_overrides(TINY_GPT, train=budget, eval={"sample_tokens": 0})
    train(config_from_dict(raw), run, cache_dir=cache_dir)
    return run


def _student(teacher: Path | str, **train_values: Any) -> Any:
    raw = with_overrides(STUDENT, distill={"teacher": str(teacher), "temperature": 2.0,
                                           "alpha": 0.5}, train=train_values)  # fmt: skip
    return config_from_dict(raw)


def test_a_distilled_student_trains_resumes_and_saves_no_teacher(
    teacher_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    result = train(_student(teacher_run), tmp_path / "student", cache_dir=cache_dir)
    losses = [float(r["loss"]) for r in read_metrics(tmp_path / "student" / "metrics.csv")]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3, losses
    assert "val_loss" in result.metrics  # the student's plain cross-entropy
    # neither the checkpoints nor final/ hold the teacher: only the student's tensors
    student = qkv.from_pretrained(tmp_path / "student" / "final")
    assert student.config.d_model == 16
    for path in (tmp_path / "student" / "checkpoints").iterdir():
        weights = load_file(str(path / "model.safetensors"))
        assert set(weights) == set(student.state_dict()), path
    # stopped at step 6 and resumed, it ends where the uninterrupted run ended
    first = _student(teacher_run, max_steps=6)
    train(first, tmp_path / "resumed", cache_dir=cache_dir)
    train(_student(teacher_run), tmp_path / "resumed", resume=True, cache_dir=cache_dir)
    resumed = [float(r["loss"]) for r in read_metrics(tmp_path / "resumed" / "metrics.csv")]
    assert resumed == losses
    ours = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "student" / "final" / "model.safetensors"))
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def test_alpha_zero_trains_exactly_like_no_teacher(
    teacher_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    short = {"max_steps": 3, "eval_every": 0, "checkpoint_every": 0}
    alone = config_from_dict(with_overrides(STUDENT, train=short))
    raw = with_overrides(STUDENT, train=short,
                         distill={"teacher": str(teacher_run), "alpha": 0.0})  # fmt: skip
    train(alone, tmp_path / "alone", cache_dir=cache_dir)
    train(config_from_dict(raw), tmp_path / "alpha0", cache_dir=cache_dir)
    rows = [read_metrics(tmp_path / name / "metrics.csv") for name in ("alone", "alpha0")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


# -- bad teachers -----------------------------------------------------------------------------


def test_a_teacher_of_another_vocabulary_size_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    teacher = qkv.GPT(GPTConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2))
    teacher.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ConfigError) as info:
        train(_student(tmp_path / "teacher"), tmp_path / "run", cache_dir=cache_dir)
    message = str(info.value)
    assert "distill.teacher=" in message and "vocab_size=50" in message, message
    assert "share the vocabulary" in message
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_teacher_with_the_same_size_but_other_tokens_is_refused(
    tmp_path: Path, cache_dir: Path
) -> None:
    config = _student(tmp_path / "teacher")
    _, tokenizer = build_data(config.data, cache_dir)
    size = tokenizer.get_vocab_size()
    other = char_tokenizer(["".join(chr(0x4E00 + i) for i in range(size - 5))])  # 5 specials
    assert other.get_vocab_size() == size
    teacher = qkv.GPT(GPTConfig(vocab_size=size, d_model=16, n_layers=1, n_heads=2))
    save_pretrained(teacher, tmp_path / "teacher", tokenizer=other)
    with pytest.raises(ConfigError, match=r"another vocabulary.*share the vocabulary"):
        train(config, tmp_path / "run", cache_dir=cache_dir)


def test_missing_and_unfinished_teachers_are_refused(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"distill.teacher=.*is not a directory"):
        train(_student(tmp_path / "nowhere"), tmp_path / "run", cache_dir=cache_dir)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("preset: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"no final/ model"):
        train(_student(unfinished), tmp_path / "run", cache_dir=cache_dir)


def test_the_command_line_says_which_teacher_is_wrong(tmp_path: Path, cache_dir: Path) -> None:
    teacher = qkv.GPT(GPTConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2))
    teacher.save_pretrained(tmp_path / "teacher")
    config = write_config(tmp_path / "student.yaml", STUDENT)
    done = run_qkv([
        "train", "--config", str(config), "--distill.teacher", str(tmp_path / "teacher"),
        "--out", str(tmp_path / "run"), "--cache-dir", str(cache_dir), "--quiet",
    ])  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    assert "distill.teacher=" in done.stderr and "share the vocabulary" in done.stderr
