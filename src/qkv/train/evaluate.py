"""Evaluation: how well the model does on data it was not trained on.

Every objective reports the validation loss (nats per target, summed over real targets and
divided by their count, as in training), perplexity exp(loss) and the accuracy of the argmax
prediction. Then, by kind:

    lm        bits per character, loss / ln 2, when each token is one character (char
              tokenizers); a sample from a fixed prompt (``sample``)
    mlm       accuracy on the masked positions, and the unigram baseline: the accuracy of always
              guessing the most frequent masked token (what a model that ignores context gets)
    seq2seq   exact match and BLEU (sacrebleu, ``pip install 'qkv[data]'``) of greedy decoding
              (``qkv.generate``) on the first ``eval.generate_examples`` validation examples
    images    classification accuracy

Masking of the validation batches is seeded by the batch index, so every evaluation scores the
same positions. Evaluation leaves the global random state alone (the resume test relies on it).

``evaluate_run`` scores what a run left: its final model, or its best or latest checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkv.interop.files import CheckpointError
from qkv.models.base import FAMILIES, QkvModel
from qkv.models.common import IGNORE_INDEX
from qkv.train import checkpoint as ckpt
from qkv.train.build import autocast_dtype, autocast_factory, build_objective
from qkv.train.config import TrainConfig, config_from_dict
from qkv.train.distributed import choose_backend, visible_gpu_count
from qkv.train.objectives import Objective
from qkv.train.rundir import check_same_config, default_cache_dir, load_run_config

__all__ = ["FINAL", "Evaluator", "evaluate_run"]

log = logging.getLogger(__name__)

FINAL = "final"  # the run's exported model, under the run directory


def _trim(ids: list[int], eos: int | None) -> list[int]:
    """Ids up to (not including) the first end-of-sequence token."""
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


class Evaluator:
    """Scores a model on the validation split of a data source.

    Args:
        config: the run's config (data kind, eval settings, batch sizes).
        objective: the training objective (prepares batches and scores logits).
        source: the data source (``val_batches``, token ids).
        tokenizer: decodes samples and BLEU references; None for images.
    """

    def __init__(
        self, config: TrainConfig, objective: Objective, source: Any, tokenizer: Any
    ) -> None:
        self.config = config
        self.objective = objective
        self.source = source
        self.tokenizer = tokenizer
        self.kind = config.data.kind
        self.char_level = config.data.tokenizer == "char"

    @property
    def metric_names(self) -> list[str]:
        """The columns this evaluation fills, in order."""
        names = ["val_loss", "val_ppl", "val_acc"]
        if self.kind == "lm" and self.char_level:
            names.append("val_bpc")
        if self.kind == "mlm":
            names.append("val_unigram_acc")
        if self.kind == "seq2seq":
            names += ["val_exact_match", "val_bleu"]
        if self.kind == "images":
            names.remove("val_ppl")
        return names

    def _val_batches(self) -> Any:
        c = self.config.train
        return self.source.val_batches(c.batch_size, c.eval_batches or None)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, autocast: Any) -> dict[str, float]:
        """Every metric of ``metric_names`` for ``model`` (switched to eval mode and back).

        Args:
            model: what the loop trains (unwrapped from DDP; FSDP-sharded models work when
                every rank calls this).
            autocast: a context manager factory for the forward passes (mixed precision).
        """
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total = correct = count = 0.0
        targets_seen: Counter[int] = Counter()
        for index, raw in enumerate(self._val_batches()):
            batch = self.objective.prepare(raw, seed=self.config.train.seed, step=-1 - index)
            batch = batch.to(device)
            with autocast():
                logits = self.objective.logits(model, batch)
            total += float(self.objective.loss_sum(logits, batch))
            real = batch.targets != IGNORE_INDEX  # (B, T) or (B,)
            correct += float(((logits.argmax(-1) == batch.targets) & real).sum())
            count += float(real.sum())
            if self.kind == "mlm":
                targets_seen.update(batch.targets[real].tolist())
        if count == 0:
            raise ValueError(
                "the validation split scored no targets; use a larger corpus or a smaller "
                "data.seq_len / data.val_fraction"
            )
        loss = total / count
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_acc": correct / count}
        if "val_bpc" in self.metric_names:
            out["val_bpc"] = loss / math.log(2)
        if self.kind == "mlm":
            out["val_unigram_acc"] = max(targets_seen.values()) / count
        if self.kind == "seq2seq":
            out.update(self._decode_metrics(model, autocast))
        if self.kind == "images":
            out.pop("val_ppl")
        model.train(was_training)
        return out

    def _decode_metrics(self, model: nn.Module, autocast: Any) -> dict[str, float]:
        """Exact match and BLEU of greedy decoding on the first validation examples."""
        from qkv.generate import generate

        limit = self.config.eval.generate_examples
        eos = getattr(self.source, "eos_id", None)
        pad = getattr(self.source, "pad_id", None)
        device = next(model.parameters()).device
        hypotheses: list[str] = []
        references: list[str] = []
        exact = seen = 0
        for raw in self._val_batches():
            if seen >= limit:
                break
            rows = min(limit - seen, raw["input_ids"].shape[0])
            labels: Tensor = raw["labels"][:rows]  # (B, T)
            longest = min(int(labels.shape[1]) + 1, self.config.eval.max_new_tokens)
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
                if self.tokenizer is not None:
                    hypotheses.append(self.tokenizer.decode(predicted, skip_special_tokens=True))
                    references.append(self.tokenizer.decode(target, skip_special_tokens=True))
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

    @torch.no_grad()
    def sample(self, model: nn.Module, *, autocast: Any, seed: int) -> str | None:
        """A language model's continuation of the sample prompt (None for other kinds).

        The prompt is ``eval.sample_prompt``, or else the first 32 tokens of the validation
        split; sampling uses its own seeded generator.
        """
        settings = self.config.eval
        if self.kind != "lm" or self.tokenizer is None or settings.sample_tokens == 0:
            return None
        from qkv.generate import generate

        limit = getattr(getattr(model, "config", None), "max_seq_len", None)
        if settings.sample_prompt:
            prompt = self.tokenizer.encode(settings.sample_prompt).ids
        else:  # the start of the validation text, at most a quarter of the positions
            first = next(iter(self.source.val_batches(1, 1)))["input_ids"][0]
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
        return self.tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def evaluate_run(
    run_dir: str | Path, *, checkpoint: str = "final", cache_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, float]:  # fmt: skip
    """Evaluate a finished (or interrupted) run on its validation split.

    Args:
        run_dir: a directory ``train`` wrote.
        checkpoint: ``"final"`` (the exported model), ``"best"`` (the checkpoint with the lowest
            validation loss) or ``"latest"`` (the newest checkpoint); checkpoints of FSDP runs
            are joined from their ranks' shards.
        cache_dir: the tokenized-corpus cache (default ``~/.cache/qkv/data``).
        device: "auto", "cpu" or "cuda", chosen as for one training process (None: the run's
            ``train.device``).

    Returns:
        The evaluation's metrics (``val_loss``, ``val_acc``, ...).
    """
    from qkv.data import build_data
    from qkv.interop import from_pretrained

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
        model = _model_of_checkpoint(run_dir, config, best=checkpoint == "best")
    else:
        raise ValueError(f"checkpoint={checkpoint!r}: use final, best or latest")
    _, where = choose_backend(
        device or config.train.device, world_size=1, cuda_count=visible_gpu_count()
    )
    model.to(where)
    objective = build_objective(config, source, model.config)
    evaluator = Evaluator(config, objective, source, tokenizer)
    autocast = autocast_factory(autocast_dtype(config.train.precision, model.device), model.device)
    return evaluator.evaluate(model, autocast=autocast)


def _model_of_checkpoint(run_dir: Path, config: TrainConfig, *, best: bool) -> QkvModel:
    """The model of the run's newest checkpoint, or of its best one."""
    from qkv.interop import load_state_dict_strict
    from qkv.models.base import config_from_dict as model_config_from_dict

    root = run_dir / ckpt.CHECKPOINTS
    path = ckpt.latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint to evaluate")
    state = ckpt.read_json(path / ckpt.STATE)
    if best and state.get("best_step") is not None:
        path = ckpt.checkpoint_dir(root, state["best_step"])
        state = ckpt.read_json(path / ckpt.STATE)
    check_same_config(config_from_dict(state["config"]), config, str(path))
    model_class = FAMILIES[state["family"]]
    model = model_class(model_config_from_dict(model_class.config_class, state["model_config"]))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    load_state_dict_strict(model, ckpt.read_model_weights(path, state, shapes))
    return model
