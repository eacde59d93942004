"""A training run's state: what it trains with, and where it stands.

``setup_run`` checks the run directory and builds the parts once, in an order that keeps the
random streams of a resumed run equal to an uninterrupted one's: the data (rank 0 tokenizes,
the others read its cache), the model from ``train.seed`` (or from ``model.init_from``'s
checkpoint, with LoRA and frozen parameters: ``qkv.train.finetune``), the objective, the
model wrapped for DDP or FSDP, the optimizer and the schedule (``RunParts``). ``start_run``
then restores the newest checkpoint when resuming (``Progress``: the step, the clock, the best
validation loss) and records the run in ``run.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qkv.data.config import DataSource
from qkv.models.base import FAMILIES, QkvModel
from qkv.train import checkpoint as ckpt
from qkv.train.build import (
    autocast_dtype,
    autocast_factory,
    build_model,
    build_objective,
    enable_activation_checkpointing,
)
from qkv.train.config import ConfigError, TrainConfig, config_from_dict
from qkv.train.distill import Distillation, load_teacher
from qkv.train.distributed import DistContext, gather_full_state, unwrap, wrap_model
from qkv.train.evaluate import Evaluator
from qkv.train.experts import ROUTING_COLUMNS, ExpertLoad
from qkv.train.finetune import (
    adapt_model,
    add_lora,
    head_parameters,
    init_model,
    resolve_data_config,
    run_summary,
    write_init,
)
from qkv.train.metrics import MetricsLog, TrainCallback
from qkv.train.objectives import Objective
from qkv.train.optim import build_optimizer
from qkv.train.rundir import check_run_dir, check_same_config, write_run_dir
from qkv.train.runinfo import describe_run, record_run
from qkv.train.schedule import LRSchedule

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["Progress", "RunParts", "plain_model", "setup_run", "start_run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RunParts:
    """What one run trains with, built once by ``setup_run``."""

    config: TrainConfig
    run_dir: Path
    ctx: DistContext
    callback: TrainCallback
    source: DataSource
    tokenizer: Any
    model: nn.Module  # wrapped for ctx.mode (DDP, FSDP) and the one the optimizer updates
    forward_model: nn.Module  # the same, compiled with train.compile
    model_config: Any
    objective: Objective
    evaluator: Evaluator
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    precision: torch.dtype | None
    autocast: Callable[[], Any]
    num_parameters: int
    finetune: dict[str, Any] | None = None  # init_from, LoRA, freezing (qkv.train.finetune)
    expert_load: ExpertLoad | None = None  # routing counts of a mixture of experts

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / ckpt.CHECKPOINTS


@dataclass(kw_only=True)
class Progress:
    """Where the run stands: what a checkpoint saves, and the latest results."""

    step: int = 0
    elapsed: float = 0.0  # seconds trained, over every segment of the run
    tokens: int = 0
    best_loss: float = math.inf
    best_step: int | None = None
    loss: float = math.nan  # the last step's training loss
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1


def setup_run(
    config: TrainConfig, run_dir: Path, resume: bool, cache_dir: Path, callback: TrainCallback,
    ctx: DistContext,
) -> RunParts:  # fmt: skip
    """Check the run directory, then build the data, model, objective, optimizer and schedule."""
    c = config.train
    check_run_dir(run_dir, config, resume)
    data = resolve_data_config(config, run_dir, started=resume)  # data.tokenizer=checkpoint
    source, tokenizer = _build_data(replace(config, data=data), cache_dir, ctx, callback)
    init = None
    if config.model.init_from:  # the architecture and weights of a pretrained checkpoint
        raw_model, init = init_model(config, source, run_dir, resume=resume)
    else:
        raw_model = build_model(config, source)
    finetune = run_summary(init, adapt_model(raw_model, config, init.new if init else ()),
                           raw_model)  # fmt: skip
    objective = build_objective(config, source, raw_model.config)
    if c.batch_size % (ctx.world_size * c.grad_accum):
        raise ConfigError(
            f"train.batch_size={c.batch_size} does not split into {ctx.world_size} rank(s) x "
            f"{c.grad_accum} micro-batches (train.grad_accum); make it a multiple of "
            f"{ctx.world_size * c.grad_accum}"
        )
    teacher = None
    if config.distill.teacher:  # loaded and checked before the run directory is written
        teacher = load_teacher(config.distill, student=raw_model, tokenizer=tokenizer,
                               seq_len=config.data.seq_len, device=ctx.device)  # fmt: skip
    write_run_dir(run_dir, config, ctx)
    if init is not None and ctx.is_main and not resume:
        write_init(run_dir, init, data)
    evaluator = Evaluator(config, objective, source, tokenizer)
    raw_model.to(ctx.device)
    if c.activation_checkpointing:
        enable_activation_checkpointing(raw_model)
    model = wrap_model(raw_model, ctx)
    head = head_parameters(unwrap(model), init.new) if init is not None else []
    optimizer = build_optimizer(model, config.optim, head=head)
    schedule = LRSchedule(
        kind=config.schedule.kind, peak=config.optim.lr,
        warmup_steps=config.schedule.warmup_steps, min_lr_ratio=config.schedule.min_lr_ratio,
        scale=config.schedule.scale, d_model=int(getattr(raw_model.config, "d_model", 512)),
        max_steps=c.max_steps, max_seconds=c.max_seconds,
    )  # fmt: skip
    forward_model: nn.Module = torch.compile(model) if c.compile else model  # type: ignore[assignment]
    precision = autocast_dtype(c.precision, ctx.device)
    # Dropout differs across ranks (their rows differ); rank 0 draws what one process would.
    torch.manual_seed(c.seed + 1_000_003 * ctx.rank)
    if teacher is not None:  # the training loss only: the evaluator keeps the plain objective
        objective = Distillation(
            objective, teacher, temperature=config.distill.temperature,
            alpha=config.distill.alpha, autocast=autocast_factory(precision, ctx.device),
        )  # fmt: skip
    return RunParts(
        config=config, run_dir=run_dir, ctx=ctx, callback=callback, source=source,
        tokenizer=tokenizer, model=model, forward_model=forward_model,
        model_config=raw_model.config, objective=objective, evaluator=evaluator,
        optimizer=optimizer, schedule=schedule, precision=precision,
        autocast=autocast_factory(precision, ctx.device),
        num_parameters=raw_model.num_parameters(), finetune=finetune,
        expert_load=ExpertLoad.of(raw_model),
    )  # fmt: skip


def _build_data(
    config: TrainConfig, cache_dir: Path, ctx: DistContext, callback: TrainCallback
) -> tuple[DataSource, Tokenizer | None]:
    from qkv.data import build_data

    progress = getattr(callback, "on_data_progress", None)
    if ctx.is_main:  # rank 0 tokenizes and caches; the others then read the cache
        result = build_data(config.data, cache_dir, progress=progress)
    ctx.barrier()
    if not ctx.is_main:
        result = build_data(config.data, cache_dir)
    return result


def start_run(run: RunParts, resume: bool) -> tuple[Progress, MetricsLog | None]:
    """Restore the newest checkpoint (``resume``), record the run and open its metrics."""
    c, ctx = run.config.train, run.ctx
    progress = Progress()
    if resume:
        path = ckpt.latest_checkpoint(run.checkpoints)
        assert path is not None  # checked in check_run_dir
        state = ckpt.load_checkpoint(path, run.model, run.optimizer, ctx)
        check_same_config(config_from_dict(state["config"]), run.config, str(path))
        progress = Progress(
            step=state["step"], elapsed=state["elapsed"], tokens=state["tokens"],
            best_loss=state["best_loss"] if state["best_loss"] is not None else math.inf,
            best_step=state["best_step"],
        )  # fmt: skip
        if run.expert_load is not None and "expert_load" in state:
            run.expert_load.load_state(state["expert_load"])
        log.info("resumed %s at step %d", run.run_dir, progress.step)
    info = describe_run(run.config, run.source, device=ctx.device, world_size=ctx.world_size,
                        autocast=run.precision)  # fmt: skip
    if run.finetune is not None:  # init_from, LoRA, freezing: what was loaded, what trains
        info["finetune"] = {k: v for k, v in run.finetune.items() if k != "notes"}
        info["notes"] = [*info["notes"], *run.finetune["notes"]]
    record_run(run.run_dir, info, progress.step, write=ctx.is_main)  # refuses other data
    for note in info["notes"]:
        log.info("%s", note)
    run.callback.on_run_info(info)
    metrics_log = None
    if ctx.is_main:
        routing = list(ROUTING_COLUMNS) if run.expert_load is not None else []
        metrics_log = MetricsLog(
            run.run_dir / "metrics.csv", run.evaluator.metric_names, start_step=progress.step,
            tensorboard_dir=run.run_dir / "tensorboard", train_columns=routing,
        )  # fmt: skip
    run.callback.on_start(
        run_dir=run.run_dir, start_step=progress.step, max_steps=c.max_steps,
        max_time=c.max_seconds, num_parameters=run.num_parameters,
    )  # fmt: skip
    return progress, metrics_log


def plain_model(run: RunParts) -> QkvModel:
    """The model as a plain module: unwrapped from DDP, or gathered from FSDP shards into a copy
    (every rank must call this then; generation's fast paths need whole weights)."""
    if run.ctx.mode != "fsdp":
        return unwrap(run.model)  # type: ignore[return-value]
    state = gather_full_state(run.model)
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the RNG stream
        plain = FAMILIES[run.config.model.family](run.model_config)
        if run.config.lora.rank:  # the same adapters, to take the gathered weights
            add_lora(plain, run.config)
    plain.load_state_dict(state)
    return plain.to(run.ctx.device)
