"""The training loop: one trainer for every model family and objective.

Each optimizer step s::

    batch   = data.train_batch(s, B, seed)            the GLOBAL batch, a pure function of (seed, s)
    batch   = objective.prepare(batch)                inputs and targets (-100 = not scored)
    N       = real targets in the global batch
    for each micro-batch m of this rank's rows:       (rank r of W keeps rows r B/W .. (r+1) B/W)
        backward( W * loss_sum(model(m)) / N )        gradients accumulate; DDP/FSDP average over W
    clip the global gradient norm; lr = schedule(s); AdamW step
    every eval_every steps: validation metrics, a sample; every checkpoint_every: a checkpoint

Because every micro-batch is scaled by the global N, the accumulated gradient is the gradient
of the mean loss over the whole global batch whatever the split: one process with accumulation,
several ranks, or one big batch all take the same step (up to float rounding).

A run lives in one directory::

    config.yaml    the exact config         metrics.csv   one row per step (+ eval columns)
    run.json       data fingerprint, versions, device, precision, whether it follows the clock
    checkpoints/   the last K and the best  samples.txt   samples of language models
    loss.png       train and val loss       final/        the model + tokenizer.json, loadable
                                                          with qkv.from_pretrained / qkv generate
    experts.json   a mixture of experts' tokens per expert over the run (qkv.train.experts)

Resuming (``resume=True``) restores weights, optimizer, schedule clock, random states and the
step from the newest complete checkpoint; with a step budget the resumed run is bit-identical
to one that was never interrupted (see ``qkv.train.checkpoint``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from qkv.models.base import config_to_dict
from qkv.train import checkpoint as ckpt
from qkv.train.build import autocast_dtype, build_model, build_objective, deterministic_algorithms
from qkv.train.config import LoopConfig, TrainConfig
from qkv.train.config import config_to_dict as train_config_to_dict
from qkv.train.distributed import DistContext, gradient_sync, setup_distributed
from qkv.train.evaluate import FINAL, evaluate_run
from qkv.train.finetune import export_final
from qkv.train.metrics import StepMetrics, TrainCallback, plot_losses
from qkv.train.objectives import Batch
from qkv.train.rundir import RESUMABLE_KEYS, default_cache_dir, load_run_config
from qkv.train.state import Progress, RunParts, plain_model, setup_run, start_run

__all__ = [
    "RESUMABLE_KEYS",
    "TrainResult",
    "autocast_dtype",
    "build_model",
    "build_objective",
    "default_cache_dir",
    "evaluate_run",
    "load_run_config",
    "train",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    final_dir: Path | None
    metrics: dict[str, float]  # the last evaluation's
    train_loss: float  # the last step's


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    callback: TrainCallback | None = None,
) -> TrainResult:
    """Train a model as ``config`` says, writing everything into ``run_dir``.

    Args:
        config: the run (see ``qkv.train.config``).
        run_dir: the run's directory; must not hold a run yet unless ``resume``.
        resume: continue from the newest complete checkpoint in ``run_dir``.
        cache_dir: where tokenized corpora are cached (default ``~/.cache/qkv/data``).
        callback: receives progress events (the CLI draws a progress bar from them).

    Returns:
        A ``TrainResult``; the model itself is in ``run_dir/final``.

    Raises:
        ConfigError, CheckpointError, FileNotFoundError, FileExistsError: bad input, each
            with a message that says what to change. Nothing already written is removed.
    """
    run_dir = Path(run_dir)
    callback = callback or TrainCallback()
    c = config.train
    if c.threads:
        torch.set_num_threads(c.threads)
    ctx = setup_distributed(c.distributed, c.device)
    try:
        with deterministic_algorithms(c.deterministic, ctx.device):
            return _train(config, run_dir, resume, Path(cache_dir or default_cache_dir()),
                          callback, ctx)  # fmt: skip
    finally:
        ctx.close()


# -- the loop ----------------------------------------------------------------------------------


def _budget_left(c: LoopConfig, progress: Progress) -> bool:
    max_time = c.max_seconds
    return (not c.max_steps or progress.step < c.max_steps) and (
        max_time is None or progress.elapsed < max_time
    )


def _train(
    config: TrainConfig, run_dir: Path, resume: bool, cache_dir: Path,
    callback: TrainCallback, ctx: DistContext,
) -> TrainResult:  # fmt: skip
    c = config.train
    run = setup_run(config, run_dir, resume, cache_dir, callback, ctx)
    progress, metrics_log = start_run(run, resume)
    segment_start = time.perf_counter() - progress.elapsed
    run.model.train()
    while _budget_left(c, progress):
        step_start = time.perf_counter()
        lr = run.schedule.lr(progress.step, progress.elapsed)
        progress.loss, targets, grad_norm = _train_step(run, progress.step, lr)
        progress.step += 1
        progress.tokens += targets
        step_time = time.perf_counter() - step_start
        clock = torch.tensor(time.perf_counter() - segment_start, dtype=torch.float64)
        progress.elapsed = float(ctx.all_reduce(clock, op="max"))  # all ranks stop together
        done = not _budget_left(c, progress)
        step, elapsed = progress.step, progress.elapsed
        evaluate = done or (c.eval_every and step % c.eval_every == 0)
        pause_start = time.perf_counter()  # evaluation, logging and checkpoints: not training
        routing = run.expert_load.end_step(ctx.all_reduce) if run.expert_load is not None else {}
        eval_metrics = _evaluate(run, progress) if evaluate else {}
        metrics = StepMetrics(
            step=step, time=elapsed, lr=lr, loss=progress.loss, tokens=progress.tokens,
            tokens_per_s=targets / max(step_time, 1e-9), grad_norm=grad_norm,
            progress=run.schedule.progress(step, elapsed) if c.max_steps or c.max_seconds else 0.0,
            eval=eval_metrics, extra=routing,
        )  # fmt: skip
        if metrics_log is not None:
            metrics_log.write(metrics)
        callback.on_step(metrics)
        ckpt.fault_point("step", step)
        if done or (c.checkpoint_every and step % c.checkpoint_every == 0):
            _checkpoint(run, progress)
        segment_start += time.perf_counter() - pause_start  # the clock counts training only
    if metrics_log is not None:
        metrics_log.close()
    return _finish(run, progress)


def _train_step(run: RunParts, step: int, lr: float) -> tuple[float, int, float]:
    """One optimizer step at ``lr``: returns the mean loss over the global batch, its number
    of targets and the gradient norm before clipping."""
    c, ctx, objective = run.config.train, run.ctx, run.objective
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # optim.head_lr's groups: head_lr / lr
    batch = objective.prepare(run.source.train_batch(step, c.batch_size, c.seed), seed=c.seed,
                              step=step)  # fmt: skip
    count = max(batch.num_targets, 1)  # N, over the global batch
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    micro = list(_micro_batches(batch, ctx, c.grad_accum))
    for i, part in enumerate(micro):
        part = part.to(ctx.device)
        with gradient_sync(run.model, ctx, sync=i == len(micro) - 1):
            with run.autocast():
                logits = objective.logits(run.forward_model, part)
            part_sum = objective.loss_sum(logits, part)
            if run.expert_load is not None:
                run.expert_load.add()  # the routing of this forward, for the logs
            regularizer = _regularizer(run.model)  # e.g. MoE router losses, a mean
            if regularizer is not None:
                part_sum = part_sum + regularizer.float() * part.num_targets
            (part_sum * (ctx.world_size / count)).backward()
        total += part_sum.detach().double()
    ctx.all_reduce(total)
    clip = c_clip if (c_clip := run.config.optim.grad_clip) > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(total) / count, batch.num_targets, float(grad_norm)


def _regularizer(model: nn.Module) -> Tensor | None:
    """The model's own training regularizer (``QkvModel.training_regularizer``) of its last
    forward, looked up through a DDP wrapper."""
    inner = getattr(model, "module", model)
    regularizer = getattr(inner, "training_regularizer", None)
    return regularizer() if callable(regularizer) else None


def _micro_batches(batch: Batch, ctx: DistContext, grad_accum: int) -> Iterator[Batch]:
    """This rank's rows of the global batch, in ``grad_accum`` micro-batches."""
    rows = batch.num_rows  # a multiple of W x grad_accum (checked before training)
    per_rank = rows // ctx.world_size
    mine = batch.rows(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    size = per_rank // grad_accum
    for i in range(grad_accum):
        yield mine.rows(i * size, (i + 1) * size)


def _evaluate(run: RunParts, progress: Progress) -> dict[str, float]:
    """Validation metrics now, and a sample for language models (into samples.txt)."""
    plain = plain_model(run)
    metrics = run.evaluator.evaluate(plain, autocast=run.autocast)
    progress.last_eval, progress.last_eval_step = metrics, progress.step
    text = run.evaluator.sample(plain, autocast=run.autocast, seed=run.config.train.seed)
    if text is not None and run.ctx.is_main:
        with open(run.run_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {progress.step} ===\n{text}\n\n")
        run.callback.on_sample(progress.step, text)
    return metrics


def _checkpoint(run: RunParts, progress: Progress) -> None:
    """Save the checkpoint of this step, then keep the last ``train.keep_last`` and the best."""
    val_loss = progress.last_eval.get("val_loss", math.inf)
    if progress.last_eval_step == progress.step and val_loss < progress.best_loss:
        progress.best_loss, progress.best_step = val_loss, progress.step
    state = {
        "step": progress.step, "elapsed": progress.elapsed, "tokens": progress.tokens,
        "best_loss": progress.best_loss if math.isfinite(progress.best_loss) else None,
        "best_step": progress.best_step, "world_size": run.ctx.world_size,
        "config": train_config_to_dict(run.config),
        "model_config": config_to_dict(run.model_config),
        "family": run.config.model.family,
    }  # fmt: skip
    if run.expert_load is not None:  # a resumed run goes on counting
        state["expert_load"] = run.expert_load.state()
    path = ckpt.save_checkpoint(
        run.checkpoints, progress.step, run.model, run.optimizer, state, run.ctx
    )
    if run.ctx.is_main and path is not None:
        ckpt.prune_checkpoints(run.checkpoints, run.config.train.keep_last, progress.best_step)
        run.callback.on_checkpoint(progress.step, path)
    run.ctx.barrier()


# -- the end -----------------------------------------------------------------------------------


def _finish(run: RunParts, progress: Progress) -> TrainResult:
    """Export the final model, plot the losses and report."""
    plain = plain_model(run)  # under FSDP a collective
    final_dir = None
    if run.ctx.is_main:  # with LoRA: merged, and the adapters in PEFT's layout in final/adapter
        final_dir = export_final(plain, run.run_dir / FINAL, tokenizer=run.tokenizer,
                                 config=run.config)  # fmt: skip
        plot_losses(run.run_dir / "metrics.csv", run.run_dir / "loss.png", title=run.config.preset)
        if run.expert_load is not None:  # `qkv train` draws it as experts.png
            run.expert_load.save(run.run_dir, progress.step)
    run.ctx.barrier()
    summary = {
        "run_dir": str(run.run_dir), "steps": progress.step, "train_loss": progress.loss,
        **progress.last_eval, "final_dir": str(final_dir) if final_dir else None,
        "best_step": progress.best_step,
    }  # fmt: skip
    run.callback.on_end(summary)
    return TrainResult(
        run_dir=run.run_dir, steps=progress.step, final_dir=final_dir,
        metrics=progress.last_eval, train_loss=progress.loss,
    )  # fmt: skip
