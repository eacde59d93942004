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

Resuming (``resume=True``) restores weights, optimizer, schedule clock, random states and the
step from the newest complete checkpoint; with a step budget the resumed run is bit-identical
to one that was never interrupted (see ``qkv.train.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from qkv._io import atomic_write_text
from qkv._kernels import onednn_available
from qkv.interop.files import CheckpointError
from qkv.models.base import FAMILIES, QkvModel, config_to_dict
from qkv.train import checkpoint as ckpt
from qkv.train.config import ConfigError, TrainConfig, config_from_dict
from qkv.train.config import config_to_dict as train_config_to_dict
from qkv.train.distributed import (
    DistContext,
    choose_backend,
    gather_full_state,
    gradient_sync,
    layer_stacks,
    local_tensor,
    setup_distributed,
    unwrap,
    visible_gpu_count,
    wrap_model,
)
from qkv.train.evaluate import Evaluator
from qkv.train.metrics import MetricsLog, StepMetrics, TrainCallback, plot_losses
from qkv.train.objectives import Batch, CausalLM, Classification, MaskedLM, Objective, Seq2Seq
from qkv.train.optim import build_optimizer
from qkv.train.runinfo import describe_run, record_run
from qkv.train.schedule import LRSchedule

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

CONFIG_FILE = "config.yaml"
FINAL = "final"

# What may change when a run is resumed: budgets and cadence, not what is being computed.
# train.device too: weights and optimizer state load onto any device, so a CPU run may go on
# on a GPU; it continues bit-exactly only on the kind of device it was saved on (under auto,
# whatever the machine offers: pin cpu or cuda to be sure).
RESUMABLE_KEYS = frozenset(
    {"train.max_steps", "train.max_time", "train.eval_every", "train.eval_batches",
     "train.checkpoint_every", "train.keep_last", "train.threads", "train.device"}
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    final_dir: Path | None
    metrics: dict[str, float]  # the last evaluation's
    train_loss: float  # the last step's


def default_cache_dir() -> Path:
    """Where tokenized corpora are cached: ``~/.cache/qkv/data``."""
    return Path.home() / ".cache" / "qkv" / "data"


# -- precision ------------------------------------------------------------------------------


def _cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none: macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 / AMX on x86, BF16 on Arm)
    and PyTorch's oneDNN runs bfloat16 products here (it refuses them on AVX2-only x86, and
    when capped below AVX-512 with ``ONEDNN_MAX_CPU_ISA``)."""
    flags = _cpuinfo()
    native = any(f in flags for f in ("avx512_bf16", "amx_bf16", " bf16"))
    if not native or not onednn_available(torch.bfloat16):
        return False
    try:  # and that torch runs a bf16 matmul here
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        return bool((a @ a).float().sum() == 64.0)
    except RuntimeError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None: plain float32).

    ``auto`` picks bfloat16 on GPUs that support it and on CPUs with native bfloat16
    instructions, float32 elsewhere (emulated bf16 is slower than float32).
    """
    if precision == "fp32":
        return None
    cuda = device.type == "cuda"
    supported = torch.cuda.is_bf16_supported() if cuda else _cpu_has_fast_bf16()
    if precision == "bf16":
        if device.type == "cuda" and not supported:
            raise ConfigError("train.precision=bf16: this GPU has no bfloat16; use fp32")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


# -- model and objective from the data ------------------------------------------------------

# Config fields the data decide when a preset leaves them out: field -> source attribute.
_FROM_SOURCE = {
    "vocab_size": "vocab_size",
    "src_vocab_size": "vocab_size",
    "tgt_vocab_size": "vocab_size",
    "pad_token_id": "pad_id",
    "bos_token_id": "bos_id",
    "eos_token_id": "eos_id",
    "decoder_start_token_id": "bos_id",
    "image_size": "image_size",
    "num_channels": "num_channels",
    "num_labels": "num_labels",
}


def resolve_model_config(config: TrainConfig, source: Any) -> Any:
    """The family's config with what the data decide filled in (see ``ModelSpec``)."""
    model_class = FAMILIES[config.model.family]
    fields = {f.name for f in dataclasses.fields(model_class.config_class)}
    options = dict(config.model.options)
    for name, attribute in _FROM_SOURCE.items():
        value = getattr(source, attribute, None)
        if name in fields and options.get(name) in (None, 0) and value is not None:
            options[name] = value
    if "max_seq_len" in fields and "max_seq_len" not in options:
        options["max_seq_len"] = config.data.seq_len
    try:
        model_config = model_class.config_class(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    limit = getattr(model_config, "max_seq_len", None)
    if limit is not None and config.data.kind != "images" and config.data.seq_len > limit:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len} is longer than model.max_seq_len={limit} (the "
            "positions the model has); lower --data.seq_len or raise --model.max_seq_len"
        )
    vocab = getattr(source, "vocab_size", None)
    for name in ("vocab_size", "src_vocab_size", "tgt_vocab_size"):
        size = getattr(model_config, name, None)
        if size is not None and vocab is not None and size < vocab:
            raise ConfigError(
                f"model.{name}={size} is smaller than the tokenizer's {vocab} tokens; leave it "
                "out (0) to take the tokenizer's size"
            )
    return model_config


def build_model(config: TrainConfig, source: Any) -> QkvModel:
    """The model, initialised from ``train.seed`` (the same weights on every rank)."""
    model_config = resolve_model_config(config, source)
    torch.manual_seed(config.train.seed)
    return FAMILIES[config.model.family](model_config)


def build_objective(config: TrainConfig, source: Any, model_config: Any) -> Objective:
    """The objective for ``data.kind``: lm, mlm, seq2seq or images."""
    kind = config.data.kind
    if kind == "lm":
        return CausalLM()
    if kind == "mlm":
        mask_id = getattr(source, "mask_id", None)
        if mask_id is None:
            raise ConfigError(
                "data.kind=mlm needs a tokenizer with a [MASK] token; use --data.tokenizer "
                "wordpiece (or char, which has one)"
            )
        return MaskedLM(
            mask_id=mask_id, vocab_size=int(source.vocab_size),
            special_ids=list(getattr(source, "special_ids", [])),
        )  # fmt: skip
    if kind == "seq2seq":
        start = getattr(model_config, "decoder_start_token_id", None)
        pad = getattr(model_config, "pad_token_id", None)
        if start is None or pad is None:
            raise ConfigError(
                f"data.kind=seq2seq needs an encoder-decoder model (transformer, t5, bart); "
                f"got model.family={config.model.family}"
            )
        return Seq2Seq(
            decoder_start_token_id=start, pad_token_id=pad,
            label_smoothing=config.train.label_smoothing,
        )  # fmt: skip
    return Classification(label_smoothing=config.train.label_smoothing)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations during backward instead of storing them.

    Every member of the model's layer lists runs under ``torch.utils.checkpoint`` (the
    non-reentrant variant, which restores the dropout RNG, so results do not change).
    """
    from torch.utils.checkpoint import checkpoint

    for layer in layer_stacks(model):
        forward = layer.forward

        def checkpointed(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


# -- run directory -------------------------------------------------------------------------


def load_run_config(run_dir: Path) -> TrainConfig:
    """The config a run directory was created with (its ``config.yaml``)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {CONFIG_FILE}: it is not a qkv training run; pass the directory "
            "`qkv train` wrote (runs/<preset>-<time>)"
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return config_from_dict(data or {})


def _flat(config: TrainConfig) -> dict[str, Any]:
    out = {}
    for section, values in train_config_to_dict(config).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def check_same_config(saved: TrainConfig, new: TrainConfig, where: str) -> None:
    """Refuse to resume ``where`` with a config that computes something else."""
    a, b = _flat(saved), _flat(new)
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_KEYS or key == "preset" or a.get(key) == b.get(key):
            continue
        raise CheckpointError(
            f"{where} was written with {key}={a.get(key)!r}, not {b.get(key)!r}: a checkpoint "
            f"only continues the config it came from; drop that override (when resuming only "
            f"{', '.join(sorted(RESUMABLE_KEYS))} may change) or start a new run with --out"
        )


def _check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    """Refuse a run directory that would be overwritten, or has nothing to resume."""
    checkpoints = run_dir / ckpt.CHECKPOINTS
    if resume:
        saved = load_run_config(run_dir)
        check_same_config(saved, config, str(run_dir))
        if ckpt.latest_checkpoint(checkpoints) is None:
            raise CheckpointError(
                f"{run_dir} has no complete checkpoint to resume from; start it again without "
                "--resume (and a new --out), or lower train.checkpoint_every next time"
            )
    elif (run_dir / CONFIG_FILE).exists() or checkpoints.exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose "
            "another --out"
        )


def _write_run_dir(run_dir: Path, config: TrainConfig, ctx: DistContext) -> None:
    """Write config.yaml and sweep what a killed run left (rank 0), once the run will start."""
    ctx.barrier()  # every rank has checked everything before rank 0 writes
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(train_config_to_dict(config), sort_keys=False, allow_unicode=True)
        atomic_write_text(run_dir / CONFIG_FILE, text)
        for removed in ckpt.sweep_checkpoints(run_dir / ckpt.CHECKPOINTS):
            log.info("removed %s left by an interrupted run", removed)
    ctx.barrier()


# -- checkpoints of the loop ----------------------------------------------------------------


def _model_file(ctx: DistContext) -> str:
    return f"model-rank{ctx.rank}.safetensors" if ctx.mode == "fsdp" else "model.safetensors"


def _optim_file(ctx: DistContext) -> str:
    return (
        f"optimizer-rank{ctx.rank}.safetensors" if ctx.mode == "fsdp" else "optimizer.safetensors"
    )


def _save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    state: dict[str, Any], ctx: DistContext,
) -> Path | None:  # fmt: skip
    """Write the checkpoint of ``step`` (every rank calls this; rank 0 commits it)."""
    tmp = root / f"{ckpt.TMP_PREFIX}step-{step:08d}"
    if ctx.is_main:
        ckpt.begin_checkpoint(root, step)
    ctx.barrier()
    sharded = ctx.mode == "fsdp"
    rng_tensors, rng_json = ckpt.get_rng_state()
    ckpt.write_tensors(tmp / f"rng-rank{ctx.rank}.safetensors", rng_tensors)
    ckpt.write_json(tmp / f"rng-rank{ctx.rank}.json", rng_json)
    if sharded or ctx.is_main:
        weights = {k: local_tensor(v) for k, v in unwrap(model).state_dict().items()}
        ckpt.write_tensors(tmp / _model_file(ctx), weights)
        ckpt.test_kill_point("checkpoint", step)  # tests: die with the checkpoint half written
        optim_state = optimizer.state_dict()  # its entries are the live state: copy, not edit
        optim_state["state"] = {
            index: {k: local_tensor(v) if isinstance(v, Tensor) else v for k, v in entry.items()}
            for index, entry in optim_state["state"].items()
        }
        tensors, data = ckpt.optimizer_state_to_files(optim_state)
        ckpt.write_tensors(tmp / _optim_file(ctx), tensors)
        if ctx.is_main:
            ckpt.write_json(tmp / ckpt.STATE, {**state, "optimizer": data})
    ctx.barrier()
    final = ckpt.finish_checkpoint(tmp, root, step) if ctx.is_main else None
    ctx.barrier()
    return final


def _load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` and ``optimizer``; returns its state.json."""
    state = ckpt.read_json(path / ckpt.STATE)
    if state.get("world_size", 1) != ctx.world_size and ctx.mode == "fsdp":
        raise CheckpointError(
            f"{path} holds FSDP shards of {state.get('world_size')} ranks; resume it with "
            f"that many processes (this run has {ctx.world_size})"
        )
    files = ckpt.read_checkpoint_files(path, [_model_file(ctx), _optim_file(ctx)])
    weights = files[_model_file(ctx)]
    target = unwrap(model).state_dict()
    missing = sorted(set(target) ^ set(weights))
    if missing:
        raise CheckpointError(
            f"{path} does not fit this model (tensors {missing[:5]} differ): it was saved from "
            "a different config; resume it with the config in its run's config.yaml"
        )
    with torch.no_grad():
        for name, tensor in target.items():
            local = local_tensor(tensor)
            if local.shape != weights[name].shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(weights[name].shape)} there and "
                    f"{tuple(local.shape)} here: it was saved from a different config"
                )
            local.copy_(weights[name])
    optim_state = ckpt.optimizer_state_from_files(files[_optim_file(ctx)], state["optimizer"])
    if ctx.mode == "fsdp":  # wrap the local shards back into DTensors like the parameters'
        from torch.distributed.tensor import DTensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        for index, entry in optim_state["state"].items():
            param = params[int(index)]
            for k, v in entry.items():
                if isinstance(param, DTensor) and v.dim() > 0:
                    entry[k] = DTensor.from_local(v, param.device_mesh, param.placements)
    optimizer.load_state_dict(optim_state)
    rng = ckpt.read_checkpoint_files(path, [f"rng-rank{ctx.rank}.safetensors"])
    ckpt.set_rng_state(
        rng[f"rng-rank{ctx.rank}.safetensors"], ckpt.read_json(path / f"rng-rank{ctx.rank}.json")
    )
    return state


# -- the loop ----------------------------------------------------------------------------------


def _autocast_factory(dtype: torch.dtype | None, device: torch.device) -> Callable[[], Any]:
    def factory() -> Any:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    return factory


def _micro_batches(batch: Batch, ctx: DistContext, grad_accum: int) -> Iterator[Batch]:
    """This rank's rows of the global batch, in ``grad_accum`` micro-batches."""
    rows = batch.num_rows  # a multiple of W x grad_accum (checked before training)
    per_rank = rows // ctx.world_size
    mine = batch.rows(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    size = per_rank // grad_accum
    for i in range(grad_accum):
        yield mine.rows(i * size, (i + 1) * size)


def _build_data(
    config: TrainConfig, cache_dir: Path, ctx: DistContext, callback: TrainCallback
) -> tuple[Any, Any]:
    from qkv.data import build_data

    progress = getattr(callback, "on_data_progress", None)
    if ctx.is_main:  # rank 0 tokenizes and caches; the others then read the cache
        result = build_data(config.data, cache_dir, progress=progress)
    ctx.barrier()
    if not ctx.is_main:
        result = build_data(config.data, cache_dir)
    return result


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
        with _deterministic(c.deterministic, ctx.device):
            return _train(config, run_dir, resume, Path(cache_dir or default_cache_dir()),
                          callback, ctx)  # fmt: skip
    finally:
        ctx.close()


@contextlib.contextmanager
def _deterministic(on: bool, device: torch.device) -> Iterator[None]:
    """PyTorch's deterministic algorithms for the run (``train.deterministic``), then the
    caller's setting back. On the CPU qkv's training ops are deterministic for a given thread
    count already; on GPUs some backward kernels (scatter-adds, some attention and cuBLAS
    reductions) are not, and this switch picks deterministic ones or raises naming the op."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if device.type == "cuda":  # cuBLAS needs a fixed workspace to reduce in a fixed order
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def _train(
    config: TrainConfig, run_dir: Path, resume: bool, cache_dir: Path,
    callback: TrainCallback, ctx: DistContext,
) -> TrainResult:  # fmt: skip
    c = config.train
    _check_run_dir(run_dir, config, resume)
    source, tokenizer = _build_data(config, cache_dir, ctx, callback)
    raw_model = build_model(config, source)
    model_config = raw_model.config
    objective = build_objective(config, source, model_config)
    if c.batch_size % (ctx.world_size * c.grad_accum):
        raise ConfigError(
            f"train.batch_size={c.batch_size} does not split into {ctx.world_size} rank(s) x "
            f"{c.grad_accum} micro-batches (train.grad_accum); make it a multiple of "
            f"{ctx.world_size * c.grad_accum}"
        )
    _write_run_dir(run_dir, config, ctx)
    evaluator = Evaluator(config, objective, source, tokenizer)
    raw_model.to(ctx.device)
    if c.activation_checkpointing:
        enable_activation_checkpointing(raw_model)
    model = wrap_model(raw_model, ctx)
    optimizer = build_optimizer(model, config.optim)
    schedule = LRSchedule(
        kind=config.schedule.kind, peak=config.optim.lr,
        warmup_steps=config.schedule.warmup_steps, min_lr_ratio=config.schedule.min_lr_ratio,
        scale=config.schedule.scale, d_model=int(getattr(model_config, "d_model", 512)),
        max_steps=c.max_steps, max_seconds=c.max_seconds,
    )  # fmt: skip
    forward_model: nn.Module = torch.compile(model) if c.compile else model  # type: ignore[assignment]
    precision = autocast_dtype(c.precision, ctx.device)
    autocast = _autocast_factory(precision, ctx.device)
    # Dropout differs across ranks (their rows differ); rank 0 draws what one process would.
    torch.manual_seed(c.seed + 1_000_003 * ctx.rank)

    checkpoints = run_dir / ckpt.CHECKPOINTS
    step, elapsed, tokens = 0, 0.0, 0
    best_loss, best_step = math.inf, None
    if resume:
        path = ckpt.latest_checkpoint(checkpoints)
        assert path is not None  # checked in _check_run_dir
        state = _load_checkpoint(path, model, optimizer, ctx)
        check_same_config(config_from_dict(state["config"]), config, str(path))
        step, elapsed, tokens = state["step"], state["elapsed"], state["tokens"]
        best_loss = state["best_loss"] if state["best_loss"] is not None else math.inf
        best_step = state["best_step"]
        log.info("resumed %s at step %d", run_dir, step)
    info = describe_run(config, source, device=ctx.device, world_size=ctx.world_size,
                        autocast=precision)  # fmt: skip
    record_run(run_dir, info, step, write=ctx.is_main)  # refuses a resume on other data
    for note in info["notes"]:
        log.info("%s", note)
    callback.on_run_info(info)
    metrics_log = None
    if ctx.is_main:
        metrics_log = MetricsLog(
            run_dir / "metrics.csv", evaluator.metric_names, start_step=step,
            tensorboard_dir=run_dir / "tensorboard",
        )  # fmt: skip
    callback.on_start(
        run_dir=run_dir, start_step=step, max_steps=c.max_steps, max_time=c.max_seconds,
        num_parameters=raw_model.num_parameters(),
    )  # fmt: skip

    max_time = c.max_seconds
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    loss_value = math.nan
    segment_start = time.perf_counter() - elapsed
    model.train()

    def budget_left(step: int, elapsed: float) -> bool:
        return (not c.max_steps or step < c.max_steps) and (max_time is None or elapsed < max_time)

    while budget_left(step, elapsed):
        step_start = time.perf_counter()
        lr = schedule.lr(step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = objective.prepare(source.train_batch(step, c.batch_size, c.seed), seed=c.seed,
                                  step=step)  # fmt: skip
        count = max(batch.num_targets, 1)  # N, over the global batch
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        micro = list(_micro_batches(batch, ctx, c.grad_accum))
        for i, part in enumerate(micro):
            part = part.to(ctx.device)
            with gradient_sync(model, ctx, sync=i == len(micro) - 1):
                with autocast():
                    logits = objective.logits(forward_model, part)
                part_sum = objective.loss_sum(logits, part)
                (part_sum * (ctx.world_size / count)).backward()
            total += part_sum.detach().double()
        ctx.all_reduce(total)
        clip = c_clip if (c_clip := config.optim.grad_clip) > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += batch.num_targets
        loss_value = float(total) / count
        step_time = time.perf_counter() - step_start
        clock = torch.tensor(time.perf_counter() - segment_start, dtype=torch.float64)
        elapsed = float(ctx.all_reduce(clock, op="max"))  # every rank stops at the same step
        done = not budget_left(step, elapsed)

        eval_metrics: dict[str, float] = {}
        if done or (c.eval_every and step % c.eval_every == 0):
            plain = _plain_model(model, config, model_config, ctx)
            eval_metrics = evaluator.evaluate(plain, autocast=autocast)
            last_eval, last_eval_step = eval_metrics, step
            text = evaluator.sample(plain, autocast=autocast, seed=c.seed)
            if text is not None and ctx.is_main:
                with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
                    f.write(f"=== step {step} ===\n{text}\n\n")
                callback.on_sample(step, text)
        metrics = StepMetrics(
            step=step, time=elapsed, lr=lr, loss=loss_value, tokens=tokens,
            tokens_per_s=batch.num_targets / max(step_time, 1e-9), grad_norm=float(grad_norm),
            progress=schedule.progress(step, elapsed) if c.max_steps or max_time else 0.0,
            eval=eval_metrics,
        )  # fmt: skip
        if metrics_log is not None:
            metrics_log.write(metrics)
        callback.on_step(metrics)
        ckpt.test_kill_point("step", step)

        if done or (c.checkpoint_every and step % c.checkpoint_every == 0):
            if last_eval_step == step and last_eval["val_loss"] < best_loss:
                best_loss, best_step = last_eval["val_loss"], step
            state = {
                "step": step, "elapsed": elapsed, "tokens": tokens,
                "best_loss": best_loss if math.isfinite(best_loss) else None,
                "best_step": best_step, "world_size": ctx.world_size,
                "config": train_config_to_dict(config),
                "model_config": config_to_dict(model_config),
                "family": config.model.family,
            }  # fmt: skip
            path = _save_checkpoint(checkpoints, step, model, optimizer, state, ctx)
            if ctx.is_main and path is not None:
                ckpt.prune_checkpoints(checkpoints, c.keep_last, best_step)
                callback.on_checkpoint(step, path)
            ctx.barrier()

    if metrics_log is not None:
        metrics_log.close()
    final_dir = _export_final(run_dir, model, model_config, config, tokenizer, ctx)
    if ctx.is_main:
        plot_losses(run_dir / "metrics.csv", run_dir / "loss.png", title=config.preset)
    summary = {
        "run_dir": str(run_dir), "steps": step, "train_loss": loss_value, **last_eval,
        "final_dir": str(final_dir) if final_dir else None, "best_step": best_step,
    }  # fmt: skip
    callback.on_end(summary)
    return TrainResult(
        run_dir=run_dir, steps=step, final_dir=final_dir, metrics=last_eval,
        train_loss=loss_value,
    )  # fmt: skip


def _export_final(
    run_dir: Path, model: nn.Module, model_config: Any, config: TrainConfig, tokenizer: Any,
    ctx: DistContext,
) -> Path | None:  # fmt: skip
    """Write the trained model (and tokenizer) to ``run_dir/final`` with qkv.save_pretrained."""
    from qkv.interop import save_pretrained

    plain = _plain_model(model, config, model_config, ctx)  # under FSDP a collective
    out = None
    if ctx.is_main:
        out = save_pretrained(plain, run_dir / FINAL, tokenizer=tokenizer)
    ctx.barrier()
    return out


def _plain_model(
    model: nn.Module, config: TrainConfig, model_config: Any, ctx: DistContext
) -> QkvModel:
    """The model as a plain module: unwrapped from DDP, or gathered from FSDP shards into a copy
    (every rank must call this then; generation's fast paths need whole weights)."""
    if ctx.mode != "fsdp":
        return unwrap(model)  # type: ignore[return-value]
    state = gather_full_state(model)
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the RNG stream
        plain = FAMILIES[config.model.family](model_config)
    plain.load_state_dict(state)
    return plain.to(ctx.device)


def evaluate_run(
    run_dir: str | Path, *, checkpoint: str = "final", cache_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, float]:  # fmt: skip
    """Evaluate a finished (or interrupted) run on its validation split.

    Args:
        run_dir: a directory ``train`` wrote.
        checkpoint: ``"final"`` (the exported model), ``"best"`` (the checkpoint with the lowest
            validation loss) or ``"latest"`` (the newest checkpoint).
        cache_dir: the tokenized-corpus cache (default ``~/.cache/qkv/data``).
        device: "auto", "cpu" or "cuda", chosen as for one training process (None: the run's
            ``train.device``).

    Returns:
        The evaluation's metrics (``val_loss``, ``val_acc``, ...).
    """
    from qkv.data import build_data
    from qkv.interop import from_pretrained, load_state_dict_strict

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    source, tokenizer = build_data(config.data, Path(cache_dir or default_cache_dir()))
    if checkpoint == "final":
        if not (run_dir / FINAL / "config.json").is_file():
            raise CheckpointError(
                f"{run_dir} has no final model (the run did not finish); evaluate a checkpoint "
                "with --checkpoint latest (or best)"
            )
        model = from_pretrained(run_dir / FINAL)
    elif checkpoint in ("best", "latest"):
        root = run_dir / ckpt.CHECKPOINTS
        latest = ckpt.latest_checkpoint(root)
        if latest is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint to evaluate")
        state = ckpt.read_json(latest / ckpt.STATE)
        path = latest
        if checkpoint == "best" and state.get("best_step") is not None:
            path = ckpt.checkpoint_dir(root, state["best_step"])
            state = ckpt.read_json(path / ckpt.STATE)
        check_same_config(config_from_dict(state["config"]), config, str(path))
        model_class = FAMILIES[state["family"]]
        from qkv.models.base import config_from_dict as model_config_from_dict

        model = model_class(model_config_from_dict(model_class.config_class, state["model_config"]))
        weights = ckpt.read_checkpoint_files(path, ["model.safetensors"])["model.safetensors"]
        load_state_dict_strict(model, weights)
    else:
        raise ValueError(f"checkpoint={checkpoint!r}: use final, best or latest")
    _, where = choose_backend(
        device or config.train.device, world_size=1, cuda_count=visible_gpu_count()
    )
    model.to(where)
    objective = build_objective(config, source, model.config)
    evaluator = Evaluator(config, objective, source, tokenizer)
    autocast = _autocast_factory(autocast_dtype(config.train.precision, model.device), model.device)
    return evaluator.evaluate(model, autocast=autocast)
