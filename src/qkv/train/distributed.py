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
average of W such gradients is then exactly the gradient of the one-process loss. Backend:
NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch import distributed as dist

__all__ = ["DistContext", "gather_full_state", "setup_distributed", "wrap_model"]


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
        """Sum (or max) ``tensor`` over ranks in place; a no-op in one process."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(mode: str) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment, if any.

    Args:
        mode: "none", "ddp", "fsdp", or "auto" (ddp when WORLD_SIZE > 1, else none).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        mode = "ddp" if world_size > 1 else "none"
    cuda = torch.cuda.is_available()
    if mode == "none":
        if world_size > 1:
            raise ValueError(
                f"train.distributed=none, but WORLD_SIZE={world_size}: use ddp or fsdp under "
                "torchrun, or run a single process"
            )
        return DistContext(mode="none", device=torch.device("cuda" if cuda else "cpu"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
        owns = True
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return DistContext(mode=mode, rank=rank, world_size=world_size, device=device, owns_group=owns)


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
