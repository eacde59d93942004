"""Data-parallel training: the same loop on several processes, each on a slice of the batch.

Under ``torchrun`` every process (rank) builds the same model from the same seed and the same
GLOBAL batch for each step (batches are pure functions of (seed, step)), then keeps only its
rows: rank r of W takes rows [r B/W, (r + 1) B/W). Gradients are combined across ranks:

    ddp    DistributedDataParallel: every rank holds the whole model; gradients are all-reduced
    fsdp   FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer
           state are sharded; each layer is all-gathered for its forward/backward and its
           gradients reduce-scattered

Both AVERAGE gradients over ranks. Each rank's loss is its summed target losses divided by the
global target count N (see ``qkv.train.objectives``), so the trainer multiplies it by W: the
average of W such gradients is then exactly the gradient of the one-process loss.

Where each process computes is ``train.device`` (``--device``), resolved by ``choose_backend``:

    cpu    the CPU, ranks talking over gloo, even on a machine with GPUs
    cuda   GPU number LOCAL_RANK, ranks talking over NCCL; an error if there is no GPU, or fewer
           GPUs on this machine than processes (LOCAL_WORLD_SIZE)
    auto   cuda when every process of this machine gets a GPU of its own, else the CPU with
           gloo (with a logged note when GPUs are there but too few)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch import distributed as dist

from qkv.train.config import ConfigError

__all__ = [
    "DistContext",
    "choose_backend",
    "gather_full_state",
    "setup_distributed",
    "visible_gpu_count",
    "wrap_model",
]

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class DistContext:
    """Where this process stands in a (possibly one-process) run."""

    mode: str  # "none", "ddp" or "fsdp"
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this context initialised the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, metrics and checkpoint metadata."""
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (or max) ``tensor`` over ranks in place; a no-op in one process.

        The collective runs on this rank's device (NCCL reduces only GPU tensors), so a CPU
        tensor such as the clock travels there and back.
        """
        if self.world_size > 1:
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            tensor.copy_(on_device)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def visible_gpu_count() -> int:
    """How many CUDA GPUs this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_backend(
    device: str, *, world_size: int, local_world_size: int | None = None, local_rank: int = 0,
    cuda_count: int,
) -> tuple[str, torch.device]:  # fmt: skip
    """The process-group backend and this process's device for ``train.device``.

    A pure decision (nothing is initialised), so the processes of one machine all make the same
    one (on machines with different GPU counts, set ``train.device`` explicitly). NCCL needs one
    GPU per process: ``cuda`` (and ``auto``) put local rank r on GPU r only when the machine has
    at least as many GPUs as processes.

    Args:
        device: "auto", "cpu" or "cuda" (``train.device``).
        world_size: processes in the whole run (1: a single process).
        local_world_size: processes on this machine (None: all ``world_size`` of them).
        local_rank: this process's index on this machine.
        cuda_count: CUDA GPUs visible here (``visible_gpu_count()``).

    Returns:
        ("nccl", cuda:local_rank) or ("gloo", cpu).

    Raises:
        ConfigError: an unknown ``device``, or ``cuda`` without a GPU for every local process.

    Example:
        >>> choose_backend("auto", world_size=2, local_rank=1, cuda_count=2)
        ('nccl', device(type='cuda', index=1))
        >>> choose_backend("cpu", world_size=2, cuda_count=2)
        ('gloo', device(type='cpu'))
    """
    if device not in DEVICES:
        raise ConfigError(f"train.device={device!r} is unknown; choose one of {', '.join(DEVICES)}")
    cpu = ("gloo", torch.device("cpu"))
    if device == "cpu":
        return cpu
    if cuda_count == 0:
        if device == "cuda":
            raise ConfigError(
                "train.device=cuda but no CUDA GPU is visible; use --device cpu or auto"
            )
        return cpu
    if local_world_size is None:
        local_world_size = world_size
    if cuda_count < local_world_size:  # NCCL cannot share one GPU between two ranks
        counts = f"{cuda_count} CUDA GPU(s) for {local_world_size} processes on this machine"
        if device == "cuda":
            raise ConfigError(
                f"train.device=cuda needs one GPU per process, but there are {counts}: start at "
                f"most {cuda_count} (torchrun --nproc_per_node {cuda_count}), or pass "
                "--device cpu to train on the CPU with gloo"
            )
        if local_rank == 0:  # every rank decides the same; one note per machine
            log.warning(
                "train.device=auto: %s, so every process trains on the CPU with gloo; start at "
                "most %d (torchrun --nproc_per_node %d) to use the GPUs, or pass --device cpu "
                "to choose the CPU without this note", counts, cuda_count, cuda_count,
            )  # fmt: skip
        return cpu
    return "nccl", torch.device("cuda", local_rank)


def setup_distributed(mode: str, device: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes in the environment, if any.

    Args:
        mode: "none", "ddp", "fsdp", or "auto" (ddp when WORLD_SIZE > 1, else none).
        device: "auto", "cpu" or "cuda": where to compute (see ``choose_backend``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun sets it; else assume one machine
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if mode == "auto":
        mode = "ddp" if world_size > 1 else "none"
    if mode == "none" and world_size > 1:
        raise ValueError(
            f"train.distributed=none, but WORLD_SIZE={world_size}: use ddp or fsdp under "
            "torchrun, or run a single process"
        )
    backend, where = choose_backend(
        device, world_size=world_size, local_world_size=None if local is None else int(local),
        local_rank=local_rank, cuda_count=visible_gpu_count(),
    )  # fmt: skip
    if mode == "none":
        return DistContext(mode="none", device=where)
    if where.type == "cuda":
        torch.cuda.set_device(where)  # before the group forms: NCCL binds to the current GPU
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        owns = True
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(mode=mode, rank=rank, world_size=world_size, device=where, owns_group=owns)


def layer_stacks(model: nn.Module) -> list[nn.Module]:
    """The members of the model's outermost ``nn.ModuleList``s: its layers, in order."""
    layers: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(t + ".") for t in taken):
            taken.append(name)
            layers.extend(module)
    return layers


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The model wrapped for ``ctx.mode``: itself, DDP, or sharded in place with FSDP2."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if ctx.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layer_stacks(model):  # each layer is gathered just for its own compute
            fully_shard(layer)
        fully_shard(model)  # the rest: embeddings, final norm, head
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (FSDP2 shards the model in place: it is its own module)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, nn.Module) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, ctx: DistContext, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches that are not the last of a step."""
    if ctx.mode == "ddp" and not sync:
        with model.no_sync():  # type: ignore[operator]
            yield
        return
    if ctx.mode == "fsdp":
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
    yield


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, gathered from every rank if sharded (a collective under FSDP)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_full_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's whole state dict on the CPU (every rank must call this under FSDP)."""
    return {k: full_tensor(v).detach().cpu() for k, v in unwrap(model).state_dict().items()}
