"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is a directory ``checkpoints/step-00001200/``::

    model.safetensors        the weights (per rank ``model-rank{r}.safetensors`` under FSDP,
                             where each rank holds a shard)
    optimizer.safetensors    AdamW's tensors (moments, step counts), keyed "state.{i}.{name}"
    state.json               the rest, as JSON: the step, the optimizer's scalars and parameter
                             groups, the schedule's clock, the best validation loss, the config
    rng-rank{r}.json         random states of rank r: torch CPU (and CUDA), Python, NumPy
    manifest.json            written LAST: the files and their sizes; no manifest = not a
                             checkpoint

No pickle anywhere: tensors go to safetensors and everything else to JSON.

Writing is atomic: the files go into a temporary directory ``.qkv-tmp-step-...`` (each file
fsync'ed), the manifest last, then one ``rename`` gives it its final name. A process killed at
any moment leaves either the previous checkpoints untouched plus a stale temporary (swept at
the next start), or a complete new checkpoint. Old checkpoints are removed the same way in
reverse: renamed to a temporary name first, deleted after.

Batches are pure functions of (seed, step), so the step is the data position: a resumed run
draws exactly the batches the uninterrupted run would have drawn.

The loop writes and restores its checkpoints with ``save_checkpoint`` and ``load_checkpoint``
(every rank calls them; rank 0 commits); ``read_model_weights`` gives the whole weights of a
checkpoint back, joining FSDP's rank shards.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from qkv._io import TMP_PREFIX, sweep_stale_temporaries
from qkv.interop.files import CheckpointError
from qkv.train.distributed import DistContext, local_tensor, unwrap

__all__ = [
    "CHECKPOINTS",
    "MANIFEST",
    "checkpoint_dir",
    "complete_checkpoints",
    "fault_point",
    "get_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_state_from_files",
    "optimizer_state_to_files",
    "prune_checkpoints",
    "read_json",
    "read_model_weights",
    "save_checkpoint",
    "set_rng_state",
    "sweep_checkpoints",
]

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Fault injection, for the tests only (tests/train/killer.py installs it to SIGKILL a run):
# called with ("checkpoint", step) halfway through writing the checkpoint of step, and with
# ("step", step) right after step was logged.
_fault_hook: Callable[[str, int], None] | None = None


def fault_point(point: str, step: int) -> None:
    """A point where a test may interrupt the run (nothing happens unless one installed a hook)."""
    if _fault_hook is not None:
        _fault_hook(point, step)


def checkpoint_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root`` (the run's checkpoints/)."""
    return root / f"step-{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Save tensors to safetensors (copies: tied weights share storage, which it refuses)."""
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    _fsync_file(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); the checkpoint is damaged") from None


# -- random states ----------------------------------------------------------------------------


def get_rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every random generator's state: tensors (torch) and JSON (Python, NumPy)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    json_state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, json_state


def set_rng_state(tensors: dict[str, Tensor], json_state: dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, mt, gauss = json_state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- optimizer state without pickle -----------------------------------------------------------


def optimizer_state_to_files(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], Any]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON data."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def optimizer_state_from_files(tensors: dict[str, Tensor], data: Any) -> dict[str, Any]:
    """Inverse of ``optimizer_state_to_files``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in data["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in data["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# -- finding, sweeping, pruning ---------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in files.items())  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and _is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _remove_dir(path: Path) -> None:
    """Delete a directory so that a crash midway leaves only a temporary (swept later)."""
    doomed = path.with_name(f"{TMP_PREFIX}old-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_checkpoints(root: Path) -> list[Path]:
    """Remove temporaries and incomplete checkpoints left by a killed run; returns them."""
    if not root.is_dir():
        return []
    removed = sweep_stale_temporaries(root)
    for path in root.iterdir():
        if _STEP_DIR.match(path.name) is not None and not _is_complete(path):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def prune_checkpoints(root: Path, keep_last: int, best_step: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and the best one."""
    found = complete_checkpoints(root)
    keep = {step for step, _ in found[-keep_last:]}
    if best_step is not None:
        keep.add(best_step)
    removed = []
    for step, path in found:
        if step not in keep:
            _remove_dir(path)
            removed.append(path)
    return removed


def begin_checkpoint(root: Path, step: int) -> Path:
    """Create (afresh) the temporary directory the checkpoint of ``step`` is written into."""
    tmp = root / f"{TMP_PREFIX}step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(tmp: Path, root: Path, step: int) -> Path:
    """Write the manifest into ``tmp`` and rename it to its final name (the commit point)."""
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
    write_json(tmp / MANIFEST, {"step": step, "files": files, "format": 1})
    _fsync_dir(tmp)
    final = checkpoint_dir(root, step)
    if final.exists():
        _remove_dir(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def read_checkpoint_files(path: Path, names: list[str]) -> dict[str, dict[str, Tensor]]:
    """Load the named safetensors files of a checkpoint (never pickle)."""
    out = {}
    for name in names:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} has no {name}; the checkpoint is incomplete")
        out[name] = load_file(str(file))
    return out


# -- the loop's checkpoints ---------------------------------------------------------------------


def _model_file(ctx: DistContext) -> str:
    return f"model-rank{ctx.rank}.safetensors" if ctx.mode == "fsdp" else "model.safetensors"


def _optim_file(ctx: DistContext) -> str:
    return (
        f"optimizer-rank{ctx.rank}.safetensors" if ctx.mode == "fsdp" else "optimizer.safetensors"
    )


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    state: dict[str, Any], ctx: DistContext,
) -> Path | None:  # fmt: skip
    """Write the checkpoint of ``step`` (every rank calls this; rank 0 commits it).

    Args:
        root: the run's checkpoints/ directory.
        step: the optimizer steps taken.
        model: what the loop trains (DDP-wrapped, FSDP-sharded or plain).
        optimizer: its optimizer.
        state: the loop's JSON state (step, clock, best loss, config, ``world_size``).
        ctx: this process's place in the run; under FSDP every rank writes its shards.

    Returns:
        The committed checkpoint's directory on rank 0, None on the other ranks.
    """
    tmp = root / f"{TMP_PREFIX}step-{step:08d}"
    if ctx.is_main:
        begin_checkpoint(root, step)
    ctx.barrier()
    sharded = ctx.mode == "fsdp"
    rng_tensors, rng_json = get_rng_state()
    write_tensors(tmp / f"rng-rank{ctx.rank}.safetensors", rng_tensors)
    write_json(tmp / f"rng-rank{ctx.rank}.json", rng_json)
    if sharded or ctx.is_main:
        weights = {k: local_tensor(v) for k, v in unwrap(model).state_dict().items()}
        write_tensors(tmp / _model_file(ctx), weights)
        fault_point("checkpoint", step)  # tests: die with the checkpoint half written
        optim_state = optimizer.state_dict()  # its entries are the live state: copy, not edit
        optim_state["state"] = {
            index: {k: local_tensor(v) if isinstance(v, Tensor) else v for k, v in entry.items()}
            for index, entry in optim_state["state"].items()
        }
        tensors, data = optimizer_state_to_files(optim_state)
        write_tensors(tmp / _optim_file(ctx), tensors)
        if ctx.is_main:
            write_json(tmp / STATE, {**state, "optimizer": data})
    ctx.barrier()
    final = finish_checkpoint(tmp, root, step) if ctx.is_main else None
    ctx.barrier()
    return final


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` and ``optimizer``, and the random states of this
    rank; returns its state.json."""
    state = read_json(path / STATE)
    if state.get("world_size", 1) != ctx.world_size and ctx.mode == "fsdp":
        raise CheckpointError(
            f"{path} holds FSDP shards of {state.get('world_size')} ranks; resume it with "
            f"that many processes (this run has {ctx.world_size})"
        )
    files = read_checkpoint_files(path, [_model_file(ctx), _optim_file(ctx)])
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
    optim_state = optimizer_state_from_files(files[_optim_file(ctx)], state["optimizer"])
    if ctx.mode == "fsdp":  # wrap the local shards back into DTensors like the parameters'
        from torch.distributed.tensor import DTensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        for index, entry in optim_state["state"].items():
            param = params[int(index)]
            for k, v in entry.items():
                if isinstance(param, DTensor) and v.dim() > 0:
                    entry[k] = DTensor.from_local(v, param.device_mesh, param.placements)
    optimizer.load_state_dict(optim_state)
    rng = read_checkpoint_files(path, [f"rng-rank{ctx.rank}.safetensors"])
    rng_json = read_json(path / f"rng-rank{ctx.rank}.json")
    set_rng_state(rng[f"rng-rank{ctx.rank}.safetensors"], rng_json)
    return state


def read_model_weights(
    path: Path, state: dict[str, Any], shapes: dict[str, torch.Size]
) -> dict[str, Tensor]:
    """The whole weights of a checkpoint, in one process, whatever wrote them.

    One process and DDP write ``model.safetensors``. FSDP2 writes each rank's shard,
    ``model-rank{r}.safetensors`` of ``state["world_size"]`` ranks: it shards every parameter
    along dim 0 (``Shard(0)``) in ``torch.chunk``'s even pieces, rank r holding piece r (the
    last ranks' pieces may be shorter or empty), and keeps buffers whole on every rank. So the
    ranks' pieces joined along dim 0 in rank order, cut to the model's length, are the whole
    tensor (for a whole buffer: rank 0's copy).

    Args:
        path: the checkpoint's directory.
        state: its state.json.
        shapes: name -> shape of the model's state dict (what the weights must fit).

    Raises:
        CheckpointError: a file is missing, or the pieces do not make the model's tensors.
    """
    if (path / "model.safetensors").is_file():
        return read_checkpoint_files(path, ["model.safetensors"])["model.safetensors"]
    names = [f"model-rank{r}.safetensors" for r in range(int(state.get("world_size", 1)))]
    files = read_checkpoint_files(path, names)
    shards = [files[name] for name in names]
    weights = {}
    for name, pieces in ((k, [s[k] for s in shards if k in s]) for k in shards[0]):
        if pieces[0].dim() == 0 or len(pieces) != len(shards):
            weights[name] = pieces[0]
            continue
        whole = torch.cat(pieces)
        expected = shapes.get(name)
        if expected is not None and len(expected) == whole.dim() and whole.shape[0] > expected[0]:
            whole = whole[: expected[0]]
        weights[name] = whole
    for name, expected in shapes.items():
        if name in weights and weights[name].shape != expected:
            raise CheckpointError(
                f"{path}: the shards of {name} make shape {tuple(weights[name].shape)}, not "
                f"{tuple(expected)}: it was saved from a different config"
            )
    return weights
