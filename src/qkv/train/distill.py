"""Knowledge distillation: a small student learns from a trained teacher's softened predictions.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015,
arXiv:1503.02531. A trained model's whole distribution over the next token says more than the
one true token does: after "def " an identifier is likely and a digit is not. Dividing the
logits by a temperature τ > 1 (the paper's T; here T is the letter of positions) softens the
distribution, so that these small probabilities carry weight, and the student learns to match
the teacher's softened distribution as well as the true labels::

    p_t = softmax(z_t / τ)                  the teacher's softened distribution     (B, T, V)
    p_s = softmax(z_s / τ)                  the student's                           (B, T, V)
    soft_i = τ² KL(p_t,i || p_s,i)          per scored target i (y_i != -100)
    loss = (1 / N) sum_i [α soft_i + (1 - α) CE(z_s,i, y_i)]

Why τ²: the gradient of KL(p_t || p_s) with respect to the student's logits is
(p_s - p_t) / τ, and for a large τ (logits of mean zero) p ≈ (1 + z / τ) / V, so it is about
(z_s - z_t) / (V τ²). Multiplying by τ² makes the soft term's gradients about the same size at
every temperature, so α keeps its meaning when τ changes.

The soft loss is a SUM over the scored targets, like ``loss_sum``: the trainer divides both
terms by the global count N, so gradient accumulation and several ranks stay exact. The teacher
runs in eval mode, without gradients, under the student's autocast; it is not part of the
trained model, so it is never in the student's checkpoints or its exported ``final/``.
Validation scores the student's plain cross-entropy, so a distilled student and one trained
alone are compared on the same number; the training loss the loop logs is the mixed one.

Shape legend: B batch · T target positions · V vocabulary (or C classes) · N scored targets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.data.config import DataSource
from qkv.models.common import IGNORE_INDEX
from qkv.train.config import ConfigError, DistillConfig
from qkv.train.objectives import Batch, Objective, ValTotals

if TYPE_CHECKING:
    from qkv.train.config import EvalConfig

__all__ = ["Distillation", "distillation_loss_sum", "load_teacher", "mix_losses"]

log = logging.getLogger(__name__)


# --8<-- [start:loss]
def distillation_loss_sum(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float
) -> Tensor:
    """τ² KL(softmax(teacher / τ) || softmax(student / τ)), summed over the scored targets.

    Args:
        student_logits: (B, T, V) or (B, C), any float dtype (scored in float32).
        teacher_logits: the same shape, the teacher's scores of the same inputs.
        targets: (B, T) or (B,) int64; positions with ``-100`` are left out.
        temperature: τ > 0; 1 leaves the distributions as they are.

    Returns:
        A float32 scalar: sum_i τ² KL(p_t,i || p_s,i) over targets != -100.

    Example:
        >>> z = torch.randn(1, 3, 5)
        >>> distillation_loss_sum(z, z, torch.tensor([[1, 2, -100]]), 2.0)  # the same: 0
        tensor(0.)
    """
    scored = targets.reshape(-1) != IGNORE_INDEX  # (B * T,)
    student = student_logits.reshape(-1, student_logits.shape[-1])[scored].float()  # (N, V)
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])[scored].float()  # (N, V)
    log_p_s = F.log_softmax(student / temperature, dim=-1)  # (N, V) softened student
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)  # (N, V) softened teacher
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (N,) KL(p_t || p_s) per target
    return temperature**2 * kl.sum()  # τ² keeps the gradient's size independent of τ


def mix_losses(soft_sum: Tensor, hard_sum: Tensor, alpha: float) -> Tensor:
    """α soft + (1 - α) hard: α = 0 is the plain cross-entropy, exactly; α = 1 the teacher only."""
    return alpha * soft_sum + (1.0 - alpha) * hard_sum


# --8<-- [end:loss]


class Distillation(Objective):
    """The run's objective with a teacher's softened predictions mixed into the training loss.

    Batches, logits and everything evaluation reports are the wrapped objective's: only
    ``loss_sum``, the training loss, changes (see the module docstring).

    Args:
        base: the run's objective (causal LM, masked LM, seq2seq, classification).
        teacher: the trained teacher, on the student's device, in eval mode.
        temperature: τ > 0.
        alpha: the weight of the soft loss; 1 - alpha goes to the hard labels.
        autocast: the factory of the student's autocast context; the teacher runs in it too.
    """

    def __init__(
        self, base: Objective, teacher: nn.Module, *, temperature: float, alpha: float,
        autocast: Callable[[], Any],
    ) -> None:  # fmt: skip
        self.base = base
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.autocast = autocast
        self.name = f"{base.name}+distillation"
        self.label_smoothing = base.label_smoothing

    def prepare(self, batch: dict[str, Tensor], *, seed: int, step: int) -> Batch:
        return self.base.prepare(batch, seed=seed, step=step)

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return self.base.logits(model, batch)

    def loss_sum(self, logits: Tensor, batch: Batch) -> Tensor:
        """α τ² KL(teacher || student) + (1 - α) CE(student, targets), summed over targets."""
        hard = self.base.loss_sum(logits, batch)
        with torch.no_grad(), self.autocast():
            teacher_logits = self.base.logits(self.teacher, batch)  # (B, T, V)
        soft = distillation_loss_sum(logits, teacher_logits, batch.targets, self.temperature)
        return mix_losses(soft, hard, self.alpha)

    # -- evaluation: the student's own loss and metrics, as without a teacher ---------------

    @property
    def metric_names(self) -> list[str]:
        return self.base.metric_names

    def tally(self, totals: ValTotals, logits: Tensor, batch: Batch) -> None:
        self.base.tally(totals, logits, batch)

    def metrics(self, totals: ValTotals) -> dict[str, float]:
        return self.base.metrics(totals)

    def decoded_metrics(
        self, model: nn.Module, batches: Iterable[dict[str, Tensor]], *, source: DataSource,
        tokenizer: Any, settings: EvalConfig, autocast: Callable[[], Any],
    ) -> dict[str, float]:  # fmt: skip
        return self.base.decoded_metrics(
            model, batches, source=source, tokenizer=tokenizer, settings=settings,
            autocast=autocast,
        )  # fmt: skip

    def sample(
        self, model: nn.Module, *, source: DataSource, tokenizer: Any, settings: EvalConfig,
        autocast: Callable[[], Any], seed: int,
    ) -> str | None:  # fmt: skip
        return self.base.sample(
            model, source=source, tokenizer=tokenizer, settings=settings, autocast=autocast,
            seed=seed,
        )  # fmt: skip


# -- the teacher ---------------------------------------------------------------------------

# The config field that sets the width of a model's logits, in the order they are looked for:
# encoder-decoders predict target tokens, language models tokens, classifiers labels.
_OUTPUT_SIZES = ("tgt_vocab_size", "vocab_size", "num_labels")


def _output_size(model_config: Any) -> tuple[str, int] | None:
    """The name and value of the field that sets the width of the logits (None: none found)."""
    for name in _OUTPUT_SIZES:
        value = getattr(model_config, name, None)
        if value is not None:
            return name, int(value)
    return None


def _model_directory(path: str) -> Path:
    """The model directory of ``distill.teacher``: a run directory's exported ``final/``, or
    a directory holding ``config.json`` and the weights (``save_pretrained``'s layout)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(
            f"distill.teacher={path} is not a directory; pass a qkv run directory "
            "(runs/<preset>-<time>) or a model directory (config.json and the weights)"
        )
    if (directory / "final" / "config.json").is_file():
        return directory / "final"
    if (directory / "config.yaml").is_file() and not (directory / "config.json").is_file():
        raise ConfigError(
            f"distill.teacher={path}: that run has no final/ model (its training did not "
            "finish); finish it (qkv train --resume) or pass a model directory"
        )
    return directory


def _check_same_vocabulary(
    path: str, teacher: nn.Module, teacher_tokenizer: Any, student: nn.Module, tokenizer: Any
) -> None:
    """Refuse a teacher whose logits do not mean what the student's mean."""
    ours, theirs = _output_size(student.config), _output_size(getattr(teacher, "config", None))
    if ours is not None and theirs is not None and ours[1] != theirs[1]:
        raise ConfigError(
            f"distill.teacher={path} has {theirs[0]}={theirs[1]}, the student "
            f"{ours[0]}={ours[1]}: teacher and student must share the vocabulary; train the "
            "teacher with the student's data.corpus and data.tokenizer"
        )
    if tokenizer is None or teacher_tokenizer is None:
        return
    vocab, teacher_vocab = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vocab != teacher_vocab:
        differ = sorted(
            set(vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: (item[1], item[0])
        )
        token, _ = differ[0]
        raise ConfigError(
            f"distill.teacher={path} has another vocabulary: its tokenizer has "
            f"{len(teacher_vocab)} tokens, the student's {len(vocab)}, and token {token!r} is "
            f"{teacher_vocab.get(token)} there and {vocab.get(token)} here; teacher and "
            "student must share the vocabulary (the same data.corpus and data.tokenizer)"
        )


def load_teacher(
    settings: DistillConfig, *, student: nn.Module, tokenizer: Any, seq_len: int,
    device: torch.device,
) -> nn.Module:  # fmt: skip
    """The teacher of ``distill.teacher``: loaded, checked against the student, frozen.

    Args:
        settings: the run's ``distill`` section.
        student: the freshly built student (its config and parameter dtype are read).
        tokenizer: the run's tokenizer (None for images), compared with the teacher's.
        seq_len: ``data.seq_len``: the teacher must have that many positions.
        device: where the student trains.

    Returns:
        The teacher, in eval mode, on ``device``, in the student's parameter dtype, with no
        parameter requiring gradients.

    Raises:
        ConfigError: no such model, a run that has not finished, or another vocabulary.
    """
    from qkv.interop import from_pretrained
    from qkv.interop.files import CheckpointError
    from qkv.interop.pretrained import TOKENIZER_NAME

    path = settings.teacher
    directory = _model_directory(path)
    dtype = next(student.parameters()).dtype
    try:
        with torch.random.fork_rng(devices=[]):  # building it must not move the RNG stream
            teacher = from_pretrained(directory, dtype=dtype, device=device)
    except CheckpointError as e:
        raise ConfigError(f"distill.teacher={path}: {e}") from None
    teacher_tokenizer = None
    if (directory / TOKENIZER_NAME).is_file():
        from tokenizers import Tokenizer

        teacher_tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_NAME))
    _check_same_vocabulary(path, teacher, teacher_tokenizer, student, tokenizer)
    limit = getattr(getattr(teacher, "config", None), "max_seq_len", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"distill.teacher={path} has {limit} positions, fewer than data.seq_len={seq_len}; "
            f"lower --data.seq_len to {limit} or less"
        )
    teacher.eval().requires_grad_(False)
    size = sum(p.numel() for p in teacher.parameters())
    log.info("distilling from %s (%s parameters)", directory, f"{size:,}")
    return teacher
