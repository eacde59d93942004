"""Reading and writing checkpoint files: safetensors only, never pickle, every failure named.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Files in PyTorch's pickle format (``pytorch_model.bin``,
``*.pt``) are refused: unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from qkv._io import atomic_write, atomic_write_json

__all__ = [
    "CheckpointError",
    "read_config",
    "read_safetensors",
    "read_weights",
    "write_checkpoint",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes) and then the '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") + 8 <= path.stat().st_size


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    # PyTorch's zip-based format starts with "PK"; a raw pickle with the PROTO opcode 0x80.
    return head == b"PK" or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    )


def read_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory, as a dict."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {CONFIG_NAME}; a checkpoint directory needs one beside its "
            "weights (save models with model.save_pretrained(directory))"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore or re-save it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# --8<-- [start:read_safetensors]
def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of one safetensors file; pickles and damaged files are named errors."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if not _looks_like_safetensors(path) and _looks_like_pickle(path):
        raise CheckpointError(
            f"{path} is a pickle (PyTorch .bin/.pt) file, not safetensors; qkv never unpickles "
            "files, since unpickling can run code. Convert it where you trust it, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} ({size} bytes) is not a readable safetensors file ({e}); it may be "
            "truncated or damaged: download or save it again"
        ) from None


# --8<-- [end:read_safetensors]


# --8<-- [start:read_weights]
def read_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory, from one file or from the shards of an index."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid safetensors index") from None
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(directory / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index} lists tensors its shards do not hold: {missing[:5]}")
        return tensors
    pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); qkv reads "
            "safetensors only, since unpickling can run code. Convert them with "
            "safetensors.torch.save_file where you trust the file"
        )
    raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} (nor {INDEX_NAME})")


# --8<-- [end:read_weights]


def write_checkpoint(
    directory: str | os.PathLike[str],
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` atomically; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory: write each as its own contiguous copy.
    plain = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(plain, tmp, metadata=meta))
    atomic_write_json(out / CONFIG_NAME, config)
    return out


def tensor_bytes(tensors: dict[str, Tensor]) -> int:
    """Total size of ``tensors`` in bytes."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def to_dtype(tensors: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating-point tensors cast to ``dtype`` (others untouched); no-op for None."""
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
