"""The run directory: where a run's config lives, and when it may be started or resumed.

``config.yaml`` holds the exact config a run was created with. A new run refuses a directory
that already holds one; a resumed run must compute the same thing, so only the keys of
``RESUMABLE_KEYS`` (budgets, cadence, threads, device) may differ from the saved config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from qkv._io import atomic_write_text
from qkv.interop.files import CheckpointError
from qkv.train import checkpoint as ckpt
from qkv.train.config import TrainConfig, config_from_dict, config_to_dict
from qkv.train.distributed import DistContext

__all__ = [
    "CONFIG_FILE",
    "RESUMABLE_KEYS",
    "check_run_dir",
    "check_same_config",
    "default_cache_dir",
    "load_run_config",
    "write_run_dir",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"

# What may change when a run is resumed: budgets and cadence, not what is being computed.
# train.device too: weights and optimizer state load onto any device, so a CPU run may go on
# on a GPU; it continues bit-exactly only on the kind of device it was saved on (under auto,
# whatever the machine offers: pin cpu or cuda to be sure).
RESUMABLE_KEYS = frozenset(
    {"train.max_steps", "train.max_time", "train.eval_every", "train.eval_batches",
     "train.checkpoint_every", "train.keep_last", "train.threads", "train.device"}
)  # fmt: skip


def default_cache_dir() -> Path:
    """Where tokenized corpora are cached: ``~/.cache/qkv/data``."""
    return Path.home() / ".cache" / "qkv" / "data"


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
    for section, values in config_to_dict(config).items():
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


def check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
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


def write_run_dir(run_dir: Path, config: TrainConfig, ctx: DistContext) -> None:
    """Write config.yaml and sweep what a killed run left (rank 0), once the run will start."""
    ctx.barrier()  # every rank has checked everything before rank 0 writes
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
        atomic_write_text(run_dir / CONFIG_FILE, text)
        for removed in ckpt.sweep_checkpoints(run_dir / ckpt.CHECKPOINTS):
            log.info("removed %s left by an interrupted run", removed)
    ctx.barrier()
