"""Objectives: BERT masking, label smoothing, and the global-token loss normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from qkv.models.gpt import GPT, GPTConfig
from qkv.models.transformer import Transformer, TransformerConfig
from qkv.train.objectives import (
    Batch,
    CausalLM,
    Classification,
    MaskedLM,
    Seq2Seq,
    ValTotals,
    loss_sum,
    mask_tokens,
)


def test_masking_rates_follow_80_10_10_and_never_touch_specials() -> None:
    vocab, specials, mask_id = 100, [0, 1, 2, 3], 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (256, 128), generator=g)  # (B, T) ordinary tokens
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    attention = torch.ones_like(ids)
    attention[:, 100:] = 0  # padding at the end of every row
    ids[:, 100:-1] = 0
    masked, labels = mask_tokens(
        ids, attention, mask_id=mask_id, vocab_size=vocab, special_ids=specials,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    chosen = labels != -100
    eligible = (attention == 1) & (ids >= 4)
    assert not (chosen & ~eligible).any()  # never a special token, never padding
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the originals
    assert torch.equal(masked[~chosen], ids[~chosen])  # everything else untouched
    n = int(eligible.sum())
    rate = chosen.sum().item() / n
    assert rate == pytest.approx(0.15, abs=0.01)  # ~25k eligible tokens: 4 sigma ~ 0.009
    k = int(chosen.sum())
    to_mask = (masked[chosen] == mask_id).sum().item() / k
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / k
    randomised = 1 - to_mask - unchanged
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.015)  # (a random pick may equal the original)
    assert randomised == pytest.approx(0.1, abs=0.015)
    assert not torch.isin(masked[chosen & (masked != mask_id)], torch.tensor(specials)).any()


def test_masking_is_a_function_of_the_generator_seed() -> None:
    ids = torch.randint(5, 50, (4, 32))
    kwargs = {"mask_id": 4, "vocab_size": 50, "special_ids": [0, 1, 2, 3, 4]}
    a = mask_tokens(ids, None, generator=torch.Generator().manual_seed(7), **kwargs)
    b = mask_tokens(ids, None, generator=torch.Generator().manual_seed(7), **kwargs)
    c = mask_tokens(ids, None, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_sum_matches_torch(eps: float) -> None:
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 7))
    targets[0, 3:] = -100
    real = int((targets != -100).sum())
    ours = loss_sum(logits, targets, eps)
    expected = F.cross_entropy(
        logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100, label_smoothing=eps
    )
    torch.testing.assert_close(ours, (expected * real).float(), atol=1e-5, rtol=1e-6)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_accumulated_micro_batches_equal_one_big_batch_causal_lm() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                          dropout=0.0)).double()  # fmt: skip
    batch = CausalLM().prepare({"input_ids": torch.randint(0, 40, (6, 13))}, seed=0, step=0)
    # Rows with very different numbers of real targets: a per-micro-batch mean would differ.
    targets = batch.targets.clone()
    targets[0, 2:] = -100
    targets[1, 6:] = -100
    targets[4, 1:] = -100
    batch = Batch(inputs=batch.inputs, targets=targets)
    objective = CausalLM()
    # One big batch, the plain mean over real targets.
    logits = objective.logits(model, batch)
    F.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1), ignore_index=-100).backward()
    reference = _grads(model)
    model.zero_grad()
    # Three micro-batches of two rows, each summed and divided by the GLOBAL count.
    n = batch.num_targets
    for i in range(3):
        part = batch.rows(2 * i, 2 * i + 2)
        (objective.loss_sum(objective.logits(model, part), part) / n).backward()
    for ours, ref in zip(_grads(model), reference, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # And the naive mean of per-micro-batch means is measurably different.
    model.zero_grad()
    for i in range(3):
        part = batch.rows(2 * i, 2 * i + 2)
        (objective.loss_sum(objective.logits(model, part), part) / part.num_targets / 3).backward()
    assert max((a - b).abs().max() for a, b in zip(_grads(model), reference, strict=True)) > 1e-4


def test_seq2seq_with_padding_accumulates_like_one_batch() -> None:
    torch.manual_seed(0)
    config = TransformerConfig(
        src_vocab_size=30, tgt_vocab_size=30, d_model=16, n_encoder_layers=1,
        n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_seq_len=16,
    )  # fmt: skip
    model = Transformer(config).double()
    lengths = [2, 9, 4, 7]
    labels = torch.full((4, 9), -100)
    for row, length in enumerate(lengths):
        labels[row, :length] = torch.randint(3, 30, (length,))
    data = {
        "input_ids": torch.randint(3, 30, (4, 6)),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
        "labels": labels, "decoder_attention_mask": (labels != -100).long(),
    }  # fmt: skip
    objective = Seq2Seq(decoder_start_token_id=1, pad_token_id=0, label_smoothing=0.1)
    batch = objective.prepare(data, seed=0, step=0)
    assert torch.equal(batch.inputs["decoder_input_ids"][:, 0], torch.ones(4, dtype=torch.long))
    (objective.loss_sum(objective.logits(model, batch), batch) / batch.num_targets).backward()
    reference = _grads(model)
    model.zero_grad()
    for i in range(2):
        part = batch.rows(2 * i, 2 * i + 2)
        (objective.loss_sum(objective.logits(model, part), part) / batch.num_targets).backward()
    for ours, ref in zip(_grads(model), reference, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_each_objective_names_and_computes_its_metrics() -> None:
    """Tallied over batches, every objective fills exactly its metric columns."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 1], [1, -100]])  # (B, T); three scored, two predicted right
    batch = Batch(inputs={}, targets=targets)
    loss = float(loss_sum(logits, targets)) / 3
    objectives = {
        "lm": CausalLM(),
        "lm_chars": CausalLM(bits_per_char=True),
        "mlm": MaskedLM(mask_id=2, vocab_size=3, special_ids=[2]),
        "seq2seq": Seq2Seq(decoder_start_token_id=0, pad_token_id=0),
    }
    for name, objective in objectives.items():
        totals = ValTotals()
        objective.tally(totals, logits, batch)
        objective.tally(totals, logits, batch)  # two batches: sums, not means
        metrics = objective.metrics(totals)
        assert metrics["val_loss"] == pytest.approx(loss)
        assert metrics["val_ppl"] == pytest.approx(math.exp(loss))
        assert metrics["val_acc"] == pytest.approx(2 / 3)
        extra = {"lm": [], "lm_chars": ["val_bpc"], "mlm": ["val_unigram_acc"],
                 "seq2seq": ["val_exact_match", "val_bleu"]}[name]  # fmt: skip
        assert objective.metric_names == ["val_loss", "val_ppl", "val_acc", *extra], name
    assert CausalLM(bits_per_char=True).metrics(totals)["val_bpc"] == pytest.approx(
        loss / math.log(2)
    )
    mlm = objectives["mlm"]
    totals = ValTotals()
    mlm.tally(totals, logits, batch)
    assert mlm.metrics(totals)["val_unigram_acc"] == pytest.approx(2 / 3)  # id 1: two of three
    images = Classification()
    totals = ValTotals()
    images.tally(totals, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), Batch({}, torch.tensor([0, 1])))
    assert images.metric_names == ["val_loss", "val_acc"]
    assert list(images.metrics(totals)) == images.metric_names
    assert images.metrics(totals)["val_acc"] == 0.5
    with pytest.raises(ValueError, match="the validation split scored no targets"):
        CausalLM().metrics(ValTotals())
