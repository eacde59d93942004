"""What a run records: per-step metrics in CSV (and TensorBoard), the loss curve as a PNG, and
the progress events a front end (the CLI's progress bar) listens to.

``metrics.csv`` has one row per optimizer step::

    step, time, lr, loss, tokens, tokens_per_s, grad_norm, val_loss, val_ppl, ...

``loss`` is the step's training loss (the global mean over real targets), ``tokens`` the real
targets seen so far, ``time`` the training seconds so far (evaluation excluded). The val_*
columns are filled on evaluation steps only. Losses are written with ``repr`` so they read back
bit for bit (the resume test compares them exactly).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkv._io import atomic_write_text

__all__ = [
    "TRAIN_COLUMNS",
    "MetricsLog",
    "StepMetrics",
    "TrainCallback",
    "plot_losses",
    "read_metrics",
]

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ("step", "time", "lr", "loss", "tokens", "tokens_per_s", "grad_norm")


@dataclass(frozen=True, kw_only=True)
class StepMetrics:
    """One optimizer step, as reported to callbacks and written to metrics.csv."""

    step: int  # optimizer steps done, counting this one (1 = the first)
    time: float  # training seconds so far
    lr: float
    loss: float
    tokens: int  # real targets seen so far (all ranks)
    tokens_per_s: float  # over this step
    grad_norm: float  # before clipping
    progress: float  # fraction of the budget spent, 0 .. 1
    eval: dict[str, float] = field(default_factory=dict)
    # What the model reports of its own training step (a mixture of experts' routing,
    # see qkv.train.experts), every step.
    extra: dict[str, float] = field(default_factory=dict)


class TrainCallback:
    """Progress events of a run; subclass and override what you need (all default to no-ops).

    The library never prints: the CLI's rich progress bar is one of these.
    """

    def on_start(self, *, run_dir: Path, start_step: int, max_steps: int, max_time: float | None,
                 num_parameters: int) -> None:  # fmt: skip
        """Training is about to begin (``start_step`` > 0 when resuming)."""

    def on_run_info(self, info: dict[str, Any]) -> None:
        """What the run trains on and under (``run.json``; see ``qkv.train.runinfo``)."""

    def on_step(self, metrics: StepMetrics) -> None:
        """An optimizer step finished (with ``metrics.eval`` filled on evaluation steps)."""

    def on_sample(self, step: int, text: str) -> None:
        """A language model wrote a sample at an evaluation."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint was committed."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """Training finished; ``summary`` holds the final metrics and paths."""


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class MetricsLog:
    """Appends rows to ``metrics.csv`` and, when installed, to TensorBoard.

    Args:
        path: the CSV file.
        eval_columns: the evaluation's metric names (fixed for the run).
        train_columns: the names of ``StepMetrics.extra`` (fixed for the run).
        start_step: when resuming, rows after this step (from the interrupted run) are dropped.
        tensorboard_dir: where to write TensorBoard events; None or no tensorboard: skipped.
    """

    def __init__(
        self,
        path: Path,
        eval_columns: list[str],
        *,
        start_step: int = 0,
        tensorboard_dir: Path | None = None,
        train_columns: list[str] | None = None,
    ) -> None:
        self.path = path
        self.columns = [*TRAIN_COLUMNS, *(train_columns or []), *eval_columns]
        kept: list[dict[str, str]] = []
        if start_step > 0 and path.is_file():
            kept = [r for r in read_metrics(path) if r.get("step") and int(r["step"]) <= start_step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, buffer.getvalue())
        self._file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._writer = csv.DictWriter(
            self._file, self.columns, extrasaction="ignore", lineterminator="\n"
        )
        self._tb: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s only", path)

    def write(self, metrics: StepMetrics) -> None:
        row = {name: getattr(metrics, name) for name in TRAIN_COLUMNS}
        row.update(metrics.extra)
        row.update(metrics.eval)
        self._writer.writerow({k: _format(v) for k, v in row.items()})
        self._file.flush()
        if self._tb is not None:
            train = {n: getattr(metrics, n) for n in ("loss", "lr", "tokens_per_s", "grad_norm")}
            for name, value in {**train, **metrics.extra}.items():
                self._tb.add_scalar(f"train/{name}", value, metrics.step)
            for name, value in metrics.eval.items():
                self._tb.add_scalar(f"val/{name.removeprefix('val_')}", value, metrics.step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv (complete lines only), as dicts of strings."""
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):  # a line cut short by a kill
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def _floats(rows: list[dict[str, str]], column: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(column, "")
        if value:
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def plot_losses(metrics_csv: Path, out: Path, title: str = "") -> Path | None:
    """Train and validation loss against step, as a PNG (matplotlib's Agg backend).

    Returns:
        ``out``, or None when there is nothing to plot yet.
    """
    rows = read_metrics(metrics_csv)
    steps, losses = _floats(rows, "loss")
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
    window = max(1, len(losses) // 50)
    if window > 1:  # a running mean shows the trend through the noise
        windows = [losses[max(0, i - window + 1) : i + 1] for i in range(len(losses))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label=f"train (mean of {window})")
    val_steps, val_losses = _floats(rows, "val_loss")
    if val_steps:
        ax.plot(val_steps, val_losses, "o-", color="tab:orange", label="validation")
    finite = [v for v in losses + val_losses if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    from qkv._io import atomic_write

    atomic_write(out, write)
    plt.close(fig)
    return out
