"""Expert utilisation during training: how a mixture of experts routes its tokens.

A run whose model has ``qkv.blocks.moe.MixtureOfExperts`` layers (Mixtral, or any model built
with experts in place of its feed-forward networks) records, after every optimizer step, two
columns of ``metrics.csv``:

    moe_dropped     the share of this step's routing choices that went over an expert's
                    capacity (0 without a capacity factor)
    moe_max_share   the largest share of one layer's choices that one expert took
                    (1 / X when the router balances its load, 1.0 when it has collapsed)

and, over the whole run, every layer's tokens per expert in ``experts.json`` (the counts a
checkpoint also keeps, so a resumed run goes on counting). ``qkv train`` draws that file as
``experts.png`` with ``qkv.viz.moe.plot_expert_load``.

Shape legend: L layers with experts · X experts per layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkv._io import atomic_write_text
from qkv.blocks.moe import MixtureOfExperts

__all__ = ["EXPERTS_FILE", "ROUTING_COLUMNS", "ExpertLoad", "read_expert_load"]

EXPERTS_FILE = "experts.json"
ROUTING_COLUMNS = ("moe_dropped", "moe_max_share")


class ExpertLoad:
    """Counts a model's routing: per step for the metrics, summed over the run for the plot.

    Call ``add()`` after each training forward (each micro-batch), ``end_step()`` once per
    optimizer step. The counts stay on the model's device until a step ends.

    Args:
        layers: the model's mixture-of-experts layers, first layer first.

    Example:
        >>> moe = MixtureOfExperts(8, 16, n_experts=4, top_k=2, capacity_factor=1.0)
        >>> load = ExpertLoad([moe])
        >>> _ = moe(torch.randn(2, 6, 8)); load.add()
        >>> row = load.end_step()
        >>> sorted(row), int(load.tokens.sum())  # 2 x 6 tokens, 2 choices each
        (['moe_dropped', 'moe_max_share'], 24)
    """

    def __init__(self, layers: list[MixtureOfExperts]) -> None:
        if not layers:
            raise ValueError("ExpertLoad needs at least one MixtureOfExperts layer")
        widths = {layer.n_experts for layer in layers}
        if len(widths) != 1:
            raise ValueError(f"every layer must have the same number of experts, got {widths}")
        self.layers = layers
        shape = (len(layers), layers[0].n_experts)  # (L, X)
        self.tokens = torch.zeros(shape, dtype=torch.long)  # over the run
        self.dropped = torch.zeros(shape, dtype=torch.long)
        self._step: list[tuple[Tensor, Tensor]] = []  # this step's micro-batches

    @classmethod
    def of(cls, model: nn.Module) -> ExpertLoad | None:
        """The counter for ``model``'s mixture-of-experts layers; None when it has none."""
        layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
        return cls(layers) if layers else None

    def add(self) -> None:
        """Count what the layers' last forward routed (call after each training forward)."""
        stats = [layer.last_stats for layer in self.layers]
        if any(s is None for s in stats):
            return  # a layer the forward did not reach (cannot happen in the models of qkv)
        routed = torch.stack([s.tokens_per_expert for s in stats if s is not None])  # (L, X)
        dropped = torch.stack([s.dropped_per_expert for s in stats if s is not None])  # (L, X)
        self._step.append((routed, dropped))

    def end_step(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """This step's routing columns; its counts join the run's totals.

        Args:
            reduce: sums a tensor over ranks in place (``DistContext.all_reduce``), so that
                every rank logs the counts of the global batch.
        """
        if not self._step:
            return {}
        counts = torch.stack([torch.stack(pair) for pair in self._step]).sum(0)  # (2, L, X)
        self._step.clear()
        if reduce is not None:
            counts = reduce(counts)
        routed, dropped = counts.cpu()  # (L, X) each
        self.tokens += routed
        self.dropped += dropped
        choices = routed.sum(1).clamp(min=1)  # (L,)
        return {
            "moe_dropped": float(dropped.sum()) / float(choices.sum()),
            "moe_max_share": float((routed / choices[:, None]).max()),
        }

    def state(self) -> dict[str, Any]:
        """The run's counts as JSON-ready data (a checkpoint keeps them; ``experts.json``)."""
        return {
            "tokens_per_expert": self.tokens.tolist(),
            "dropped_per_expert": self.dropped.tolist(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Go on from the counts of ``state()`` (a resumed run)."""
        tokens = torch.tensor(state["tokens_per_expert"], dtype=torch.long)
        if tokens.shape != self.tokens.shape:
            raise ValueError(
                f"the checkpoint counts {tuple(tokens.shape)} layers x experts, the model has "
                f"{tuple(self.tokens.shape)}"
            )
        self.tokens = tokens
        self.dropped = torch.tensor(state["dropped_per_expert"], dtype=torch.long)

    def save(self, run_dir: Path, step: int) -> Path:
        """Write the run's counts to ``run_dir/experts.json`` (atomically)."""
        path = run_dir / EXPERTS_FILE
        atomic_write_text(path, json.dumps({"step": step, **self.state()}, indent=1) + "\n")
        return path


def read_expert_load(path: str | Path) -> dict[str, Any]:
    """An ``experts.json``: ``step``, ``tokens_per_expert`` and ``dropped_per_expert`` (L x X).

    Raises:
        FileNotFoundError: no such file. ValueError: it is not a run's expert counts.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "tokens_per_expert" not in data:
        raise ValueError(f"{path} is not an experts.json written by qkv train (no counts)")
    return data
