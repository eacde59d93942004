"""DataConfig: every bad value is refused with a message that says what to change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qkv.data import DataConfig, step_generator


def test_defaults() -> None:
    config = DataConfig()
    assert (config.kind, config.corpus, config.tokenizer) == ("lm", "python-docs", "char")
    assert (config.seq_len, config.val_fraction) == (256, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seq_len = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        DataConfig("lm")  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "audio", "not one of lm, mlm, seq2seq, images"),
        ("corpus", "", "corpus is empty"),
        ("tokenizer", "", "tokenizer is empty"),
        ("vocab_size", -1, "use 0 for the default"),
        ("seq_len", 1, "at least 2"),
        ("val_fraction", 0.0, "between 0 and 1"),
        ("val_fraction", 1.0, "between 0 and 1"),
        ("max_bytes", -5, "use 0 for the whole corpus"),
        ("num_examples", -1, "use 0 for 500"),
    ],
)
def test_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**{field: value})  # type: ignore[arg-type]


def test_step_generator_depends_on_seed_step_and_stream_only() -> None:
    def draw(*args: object) -> torch.Tensor:
        return torch.randint(0, 1 << 30, (4,), generator=step_generator(*args))  # type: ignore[arg-type]

    assert torch.equal(draw(0, 1), draw(0, 1))
    assert len({tuple(draw(s, t).tolist()) for s in range(3) for t in range(3)}) == 9
    assert not torch.equal(draw(0, 1), draw(0, 1, "val"))
    assert not torch.equal(draw(1, 0), draw(0, 1))
