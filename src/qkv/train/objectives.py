"""Training objectives: what the model predicts, and the loss it is trained on.

Every objective turns a data batch into model inputs and integer targets (``-100`` = not
scored), then scores the model's logits with cross-entropy::

    causal LM        inputs x_1 .. x_{T-1}, targets x_2 .. x_T         (GPT, LLaMA)
    masked LM        15% of the real, non-special tokens are chosen; of those 80% become
                     [MASK], 10% a random token, 10% stay; targets = the chosen originals
                     (Devlin et al., "BERT", 2018, arXiv:1810.04805, section 3.1)
    seq2seq          teacher forcing: the decoder reads [start, y_1 .. y_{T-1}] and predicts
                     y_1 .. y_T; optional label smoothing (Vaswani et al. 2017, section 5.4)
    classification   one target per example (ViT on images, BERT on paragraphs)

The loss the trainer minimises is a SUM over the real targets of the whole (global) batch
divided by their count N::

    loss = (1 / N) * sum_{i : y_i != -100} CE(logits_i, y_i)

A micro-batch contributes ``loss_sum(micro) / N`` with the global N, so accumulating gradients
over micro-batches (and summing them over ranks) gives exactly the gradient of one big batch,
even when micro-batches hold different numbers of real tokens (padding, masking). A mean per
micro-batch would weight a token of a short micro-batch more than one of a long one.

Each objective also says how a model trained on it is evaluated (``qkv.train.evaluate``):
every one reports the validation loss, perplexity exp(loss) and the accuracy of the argmax
prediction, then::

    causal LM        bits per character, loss / ln 2, when each token is one character; a
                     sample from a fixed prompt
    masked LM        the unigram baseline: the accuracy of always guessing the most frequent
                     masked token (what a model that ignores context gets)
    seq2seq          exact match and BLEU of greedy decoding on the first validation examples
    classification   no perplexity (one class per example, not a sequence); for text, the
                     majority baseline: the accuracy of always guessing the most frequent class

Shape legend: B batch · T target positions · S source positions · V vocabulary · C classes.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkv.data.config import DataSource, step_generator
from qkv.models.common import IGNORE_INDEX, shift_right

if TYPE_CHECKING:
    from qkv.train.config import EvalConfig

__all__ = [
    "Batch",
    "CausalLM",
    "Classification",
    "MaskedLM",
    "Objective",
    "Seq2Seq",
    "ValTotals",
    "loss_sum",
    "mask_tokens",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """Model inputs and the targets they are scored against (``-100`` = not scored).

    Every tensor has the batch on dim 0, so a batch slices into micro-batches and rank shards
    row-wise (``rows``).
    """

    inputs: dict[str, Tensor]
    targets: Tensor  # (B, T) token ids or (B,) class ids

    @property
    def num_targets(self) -> int:
        """N: how many targets are scored (not -100)."""
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_rows(self) -> int:
        return int(self.targets.shape[0])

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` of every tensor."""
        return Batch(
            inputs={k: v[start:stop] for k, v in self.inputs.items()},
            targets=self.targets[start:stop],
        )

    def to(self, device: torch.device) -> Batch:
        return Batch(
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            targets=self.targets.to(device),
        )


# --8<-- [start:loss]
def loss_sum(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Summed cross-entropy over the scored targets (divide by the global count yourself).

    Args:
        logits: (B, T, V) or (B, C), any float dtype (scored in float32).
        targets: (B, T) or (B,) int64; ``-100`` marks positions left out.
        label_smoothing: ε: the target distribution is (1 - ε) one-hot + ε / V uniform.

    Returns:
        A float32 scalar: sum_i CE(logits_i, y_i) over targets != -100.

    Example:
        >>> loss_sum(torch.zeros(1, 2, 4), torch.tensor([[1, -100]]))  # one target: log 4
        tensor(1.3863)
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (B * T, V)
    return F.cross_entropy(
        flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
        label_smoothing=label_smoothing,
    )  # fmt: skip


# --8<-- [end:loss]


@dataclass
class ValTotals:
    """Sums over the validation batches, from which an objective computes its metrics."""

    loss: float = 0.0  # summed cross-entropy of the scored targets
    correct: float = 0.0  # scored targets the argmax predicts
    count: float = 0.0  # scored targets
    targets: Counter[int] = field(default_factory=Counter)  # scored target ids (masked LM)


class Objective:
    """Turns data batches into ``Batch`` records and runs the model on them.

    Subclasses implement ``prepare``; ``logits`` calls the model with the inputs as keywords.
    For evaluation, ``tally`` adds a batch to the validation totals, ``metrics`` turns the
    totals into the ``metric_names`` columns, and ``decoded_metrics`` and ``sample`` are what
    an objective adds by generating (nothing, here).
    """

    name = "objective"
    label_smoothing = 0.0

    def prepare(self, batch: dict[str, Tensor], *, seed: int, step: int) -> Batch:
        """Inputs and targets for a data batch; ``(seed, step)`` seeds any randomness."""
        raise NotImplementedError

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """The model's scores for ``batch``: (B, T, V) or (B, C)."""
        out = model(**batch.inputs)
        return out.logits

    def loss_sum(self, logits: Tensor, batch: Batch) -> Tensor:
        """Summed cross-entropy of ``logits`` against ``batch.targets`` (a float32 scalar)."""
        return loss_sum(logits, batch.targets, self.label_smoothing)

    # -- evaluation -------------------------------------------------------------------------

    @property
    def metric_names(self) -> list[str]:
        """The columns an evaluation fills, in order."""
        return ["val_loss", "val_ppl", "val_acc"]

    def tally(self, totals: ValTotals, logits: Tensor, batch: Batch) -> None:
        """Add one validation batch to ``totals``: its loss sum, argmax hits and targets."""
        totals.loss += float(self.loss_sum(logits, batch))
        real = batch.targets != IGNORE_INDEX  # (B, T) or (B,)
        totals.correct += float(((logits.argmax(-1) == batch.targets) & real).sum())
        totals.count += float(real.sum())

    def metrics(self, totals: ValTotals) -> dict[str, float]:
        """The metrics of the validation totals (``decoded_metrics`` adds the rest).

        Raises:
            ValueError: no target was scored.
        """
        if totals.count == 0:
            raise ValueError(
                "the validation split scored no targets; use a larger corpus or a smaller "
                "data.seq_len / data.val_fraction"
            )
        loss = totals.loss / totals.count
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 700.0)),
            "val_acc": totals.correct / totals.count,
        }

    def decoded_metrics(
        self, model: nn.Module, batches: Iterable[dict[str, Tensor]], *, source: DataSource,
        tokenizer: Any, settings: EvalConfig, autocast: Callable[[], Any],
    ) -> dict[str, float]:  # fmt: skip
        """Metrics of what ``model`` generates for the validation ``batches`` (none here)."""
        return {}

    def sample(
        self, model: nn.Module, *, source: DataSource, tokenizer: Any, settings: EvalConfig,
        autocast: Callable[[], Any], seed: int,
    ) -> str | None:  # fmt: skip
        """A text that shows what ``model`` learned (None: this objective shows none)."""
        return None


class CausalLM(Objective):
    """Predict token t + 1 from tokens 1 .. t: inputs ``ids[:, :-1]``, targets ``ids[:, 1:]``.

    Args:
        bits_per_char: each token is one character (a char tokenizer): report the loss in
            bits per character too.
    """

    name = "causal_lm"

    def __init__(self, *, bits_per_char: bool = False) -> None:
        self.bits_per_char = bits_per_char

    def prepare(self, batch: dict[str, Tensor], *, seed: int, step: int) -> Batch:
        ids = batch["input_ids"]  # (B, T)
        return Batch(inputs={"input_ids": ids[:, :-1]}, targets=ids[:, 1:])  # (B, T - 1)

    @property
    def metric_names(self) -> list[str]:
        return super().metric_names + (["val_bpc"] if self.bits_per_char else [])

    def metrics(self, totals: ValTotals) -> dict[str, float]:
        out = super().metrics(totals)
        if self.bits_per_char:
            out["val_bpc"] = out["val_loss"] / math.log(2)
        return out

    def sample(
        self, model: nn.Module, *, source: DataSource, tokenizer: Any, settings: EvalConfig,
        autocast: Callable[[], Any], seed: int,
    ) -> str | None:  # fmt: skip
        """The model's continuation of ``settings.sample_prompt``, or else of the first 32
        tokens of the validation split (None without a tokenizer or room to sample); sampling
        uses its own seeded generator."""
        if tokenizer is None or settings.sample_tokens == 0:
            return None
        if not callable(getattr(model, "new_cache", None)):
            return None  # a model that does not decode with a cache (Transformer-XL: a memory)
        from qkv.generate import generate

        limit = getattr(getattr(model, "config", None), "max_seq_len", None)
        if settings.sample_prompt:
            prompt = tokenizer.encode(settings.sample_prompt).ids
        else:  # the start of the validation text, at most a quarter of the positions
            first = next(iter(source.val_batches(1, 1)))["input_ids"][0]
            prompt = first[: min(32, max(1, (limit or 128) // 4))].tolist()
        if not prompt:
            return None
        new = settings.sample_tokens
        if limit is not None:
            new = min(new, limit - len(prompt))
        if new < 1:
            return None
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with autocast():
            out = generate(
                model, torch.tensor([prompt], device=device), max_new_tokens=new,
                do_sample=True, temperature=settings.temperature,
                top_k=settings.top_k or None, seed=seed, eos_token_id=[],
            )  # fmt: skip
        model.train(was_training)
        return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


# --8<-- [start:masking]
def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    generator: torch.Generator,
    rate: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: choose ``rate`` of the real, non-special tokens; of those, 80% become
    ``mask_id``, 10% a random non-special token, 10% stay as they are.

    Args:
        input_ids: (B, T) int64.
        attention_mask: (B, T), 1 = real token; padding is never chosen. None: all real.
        mask_id: the [MASK] token.
        vocab_size: V; random replacements are drawn from the non-special ids below it.
        special_ids: ids never chosen (and never drawn as replacements): [CLS], [SEP], [PAD]...
        generator: a seeded CPU generator (the same generator state, the same masking).
        rate: the fraction of tokens chosen.

    Returns:
        ``(masked_ids, labels)``, both (B, T): labels hold the original id where a token was
        chosen and -100 elsewhere.
    """
    special = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
    special[list(special_ids)] = True
    candidates = ~special[input_ids]  # (B, T)
    if attention_mask is not None:
        candidates &= attention_mask.bool()
    chosen = (torch.rand(input_ids.shape, generator=generator) < rate) & candidates  # (B, T)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)  # (B, T)
    action = torch.rand(input_ids.shape, generator=generator)  # (B, T) in [0, 1)
    allowed = (~special).nonzero().squeeze(1)  # (V',) ids a random replacement may take
    pick = torch.randint(len(allowed), input_ids.shape, generator=generator)  # (B, T)
    masked = torch.where(chosen & (action < 0.8), mask_id, input_ids)  # 80%: [MASK]
    randomised = chosen & (action >= 0.8) & (action < 0.9)  # 10%: a random token
    masked = torch.where(randomised, allowed[pick], masked)  # (B, T); the last 10% stay
    return masked, labels


# --8<-- [end:masking]


class MaskedLM(Objective):
    """Predict the chosen tokens of a masked window (see ``mask_tokens``).

    Args:
        mask_id, vocab_size, special_ids: from the data source.
        rate: the fraction of tokens chosen (BERT: 0.15).
    """

    name = "masked_lm"

    def __init__(
        self, *, mask_id: int, vocab_size: int, special_ids: Sequence[int], rate: float = 0.15
    ) -> None:
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.special_ids = list(special_ids)
        self.rate = rate

    def prepare(self, batch: dict[str, Tensor], *, seed: int, step: int) -> Batch:
        attention_mask = batch.get("attention_mask")
        masked, labels = mask_tokens(
            batch["input_ids"], attention_mask, mask_id=self.mask_id,
            vocab_size=self.vocab_size, special_ids=self.special_ids,
            generator=step_generator(seed, step, "mlm"), rate=self.rate,
        )  # fmt: skip
        inputs = {"input_ids": masked}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return Batch(inputs=inputs, targets=labels)

    @property
    def metric_names(self) -> list[str]:
        return [*super().metric_names, "val_unigram_acc"]

    def tally(self, totals: ValTotals, logits: Tensor, batch: Batch) -> None:
        super().tally(totals, logits, batch)
        totals.targets.update(batch.targets[batch.targets != IGNORE_INDEX].tolist())

    def metrics(self, totals: ValTotals) -> dict[str, float]:
        out = super().metrics(totals)
        out["val_unigram_acc"] = max(totals.targets.values()) / totals.count
        return out


class Seq2Seq(Objective):
    """Teacher forcing: the decoder reads the targets shifted right behind a start token.

    Args:
        decoder_start_token_id: the decoder's first input (the model config's).
        pad_token_id: fills the shifted positions of ignored (-100) labels.
        label_smoothing: ε of the targets.
    """

    name = "seq2seq"

    def __init__(
        self, *, decoder_start_token_id: int, pad_token_id: int, label_smoothing: float = 0.0
    ) -> None:
        self.decoder_start_token_id = decoder_start_token_id
        self.pad_token_id = pad_token_id
        self.label_smoothing = label_smoothing

    def prepare(self, batch: dict[str, Tensor], *, seed: int, step: int) -> Batch:
        labels = batch["labels"]  # (B, T)
        decoder_input_ids = shift_right(labels, self.decoder_start_token_id, self.pad_token_id)
        return Batch(
            inputs={
                "input_ids": batch["input_ids"],  # (B, S)
                "attention_mask": batch["attention_mask"],  # (B, S)
                "decoder_input_ids": decoder_input_ids,  # (B, T)
                "decoder_attention_mask": batch["decoder_attention_mask"],  # (B, T)
            },
            targets=labels,
        )

    @property
    def metric_names(self) -> list[str]:
        return [*super().metric_names, "val_exact_match", "val_bleu"]

    def decoded_metrics(
        self, model: nn.Module, batches: Iterable[dict[str, Tensor]], *, source: DataSource,
        tokenizer: Any, settings: EvalConfig, autocast: Callable[[], Any],
    ) -> dict[str, float]:  # fmt: skip
        """Exact match and BLEU (sacrebleu, ``pip install 'qkv[data]'``) of greedy decoding
        (``qkv.generate``) on the first ``settings.generate_examples`` examples."""
        from qkv.generate import generate

        limit = settings.generate_examples
        eos = getattr(source, "eos_id", None)
        pad = getattr(source, "pad_id", None)
        device = next(model.parameters()).device
        hypotheses: list[str] = []
        references: list[str] = []
        exact = seen = 0
        for raw in batches:
            if seen >= limit:
                break
            rows = min(limit - seen, raw["input_ids"].shape[0])
            labels: Tensor = raw["labels"][:rows]  # (B, T)
            longest = min(int(labels.shape[1]) + 1, settings.max_new_tokens)
            with autocast():
                out = generate(
                    model, raw["input_ids"][:rows].to(device),
                    raw["attention_mask"][:rows].to(device), max_new_tokens=longest,
                    eos_token_id=eos, pad_token_id=pad,
                )  # fmt: skip
            for row in range(rows):
                predicted = _trim(out[row, 1:].tolist(), eos)  # drop the decoder start
                target = _trim([t for t in labels[row].tolist() if t != IGNORE_INDEX], eos)
                exact += predicted == target
                if tokenizer is not None:
                    hypotheses.append(tokenizer.decode(predicted, skip_special_tokens=True))
                    references.append(tokenizer.decode(target, skip_special_tokens=True))
            seen += rows
        metrics = {"val_exact_match": exact / max(seen, 1)}
        try:
            import sacrebleu
        except ImportError:
            log.info("sacrebleu is not installed (pip install 'qkv[data]'): no BLEU")
            return metrics
        if hypotheses:
            metrics["val_bleu"] = sacrebleu.corpus_bleu(hypotheses, [references]).score
        return metrics


def _trim(ids: list[int], eos: int | None) -> list[int]:
    """Ids up to (not including) the first end-of-sequence token."""
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


class Classification(Objective):
    """One class per example: every other entry of the batch (``pixel_values``, or
    ``input_ids`` and ``attention_mask``) in, ``labels`` (B,) as targets.

    Args:
        label_smoothing: ε of the targets.
        majority_baseline: also report ``val_majority_acc``, the accuracy of always guessing
            the class most frequent among the validation targets (the masked LM's unigram
            baseline, for classes).
    """

    name = "classification"

    def __init__(self, *, label_smoothing: float = 0.0, majority_baseline: bool = False) -> None:
        self.label_smoothing = label_smoothing
        self.majority_baseline = majority_baseline

    def prepare(self, batch: dict[str, Tensor], *, seed: int, step: int) -> Batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return Batch(inputs=inputs, targets=batch["labels"])

    @property
    def metric_names(self) -> list[str]:
        names = [name for name in super().metric_names if name != "val_ppl"]
        return names + (["val_majority_acc"] if self.majority_baseline else [])

    def tally(self, totals: ValTotals, logits: Tensor, batch: Batch) -> None:
        super().tally(totals, logits, batch)
        totals.targets.update(batch.targets[batch.targets != IGNORE_INDEX].tolist())

    def metrics(self, totals: ValTotals) -> dict[str, float]:
        out = super().metrics(totals)
        out.pop("val_ppl")
        if self.majority_baseline:
            out["val_majority_acc"] = max(totals.targets.values()) / totals.count
        return out
