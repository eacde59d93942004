"""Every preset loads, builds its model and trains a few steps at toy size."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import qkv
from qkv.models.gpt import GPTConfig
from qkv.train import config_from_dict, list_presets, load_preset, merge_overrides, train

# Overrides that shrink each preset to a toy (the fields differ by family).
TOY: dict[str, dict[str, Any]] = {
    "gpt-char": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2},
    "llama-char": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
                   "model.n_kv_heads": 1, "model.d_ff": 64},
    "gpt-code": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
                 "data.max_bytes": 40000, "data.vocab_size": 300},
    "gpt2-code": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
                  "data.max_bytes": 40000, "data.vocab_size": 300, "train.device": "cpu"},
    "bert-mlm": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
                 "model.d_ff": 64, "data.max_bytes": 60000, "data.vocab_size": 300},
    "transformer-dates": {"model.d_model": 32, "model.n_encoder_layers": 1,
                          "model.n_decoder_layers": 1, "model.d_ff": 64,
                          "data.num_examples": 16, "eval.generate_examples": 4},
    "t5-tasks": {"model.d_model": 32, "model.n_layers": 1, "model.d_kv": 8, "model.d_ff": 64,
                 "data.num_examples": 16, "eval.generate_examples": 4},
    "vit-digits": {"model.d_model": 32, "model.n_layers": 1, "model.d_ff": 64},
    # from scratch at toy size (tests/train/test_finetune.py runs it from MiniLM)
    "minilm-classify": {"model.init_from": "", "data.tokenizer": "wordpiece",
                        "data.vocab_size": 300, "optim.head_lr": 0, "model.d_model": 32,
                        "model.n_layers": 1, "model.n_heads": 2, "model.d_ff": 64},
}  # fmt: skip
COMMON = {
    "train.max_steps": 2, "train.max_time": "", "train.batch_size": 4, "train.eval_every": 0,
    "train.eval_batches": 1, "train.checkpoint_every": 0, "eval.sample_tokens": 4,
    "train.threads": 1,
}  # fmt: skip


def test_every_preset_has_a_toy_size() -> None:
    assert sorted(TOY) == list_presets()


@pytest.mark.parametrize("name", sorted(TOY))
def test_preset_trains_two_steps(name: str, tmp_path: Path, cache_dir: Path) -> None:
    overrides = {**COMMON, **TOY[name]}
    if name.endswith(("-char", "-code", "-mlm")):
        overrides["data.seq_len"] = 24
    config = config_from_dict(merge_overrides(load_preset(name), overrides))
    assert config.preset == name
    result = train(config, tmp_path / "run", cache_dir=cache_dir)
    assert result.steps == 2
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert "val_loss" in result.metrics and result.metrics["val_loss"] > 0
    assert result.final_dir is not None
    model = qkv.from_pretrained(result.final_dir)
    assert model.family == config.model.family
    assert (tmp_path / "run" / "checkpoints").is_dir()  # the final checkpoint


@pytest.mark.parametrize("family", ["transformer_xl", "mixtral"])
def test_the_newer_families_train_and_evaluate(
    family: str, tmp_path: Path, cache_dir: Path
) -> None:
    """Families added after the presets train through the same loop; Transformer-XL, which
    decodes with a memory instead of a cache, is evaluated without the text sample."""
    model = {"family": family, "d_model": 32, "n_layers": 2, "n_heads": 4}
    if family == "mixtral":
        model |= {"n_kv_heads": 2, "n_experts": 4, "top_k": 2}
    config = config_from_dict({
        "model": model,
        "data": {"kind": "lm", "corpus": "python-docs", "tokenizer": "char", "seq_len": 24},
        "train": {"batch_size": 4, "max_steps": 2, "eval_every": 2, "eval_batches": 1,
                  "threads": 1},
        "eval": {"sample_tokens": 8},
    })  # fmt: skip
    result = train(config, tmp_path / "run", cache_dir=cache_dir)
    assert result.steps == 2 and math.isfinite(result.metrics["val_loss"])
    assert qkv.from_pretrained(result.final_dir).family == family


def test_gpt2_code_is_gpt2_small_shaped_and_asks_for_a_gpu() -> None:
    config = config_from_dict(load_preset("gpt2-code"))
    options = config.model.options
    assert (options["n_layers"], options["n_heads"], options["d_model"]) == (12, 12, 768)
    assert config.data.seq_len == 1024 and config.data.tokenizer == "bpe"
    with torch.device("meta"):  # the full size, without allocating its weights
        model = qkv.GPT(GPTConfig(**options, vocab_size=config.data.vocab_size,
                                  max_seq_len=config.data.seq_len))  # fmt: skip
    embeddings = model.tok_emb.weight.numel() + model.pos_emb.emb.weight.numel()
    n = sum(p.numel() for p in model.parameters())
    assert n - embeddings == 85_056_000  # GPT-2 small's 12 layers of width 768
    assert config.train.device == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPU")
def test_gpt2_code_without_a_gpu_says_how_to_run_on_the_cpu(tmp_path: Path) -> None:
    overrides = {**COMMON, **TOY["gpt2-code"], "train.device": "cuda", "data.seq_len": 24}
    config = config_from_dict(merge_overrides(load_preset("gpt2-code"), overrides))
    with pytest.raises(ValueError, match=r"no CUDA GPU is visible.*--device cpu"):
        train(config, tmp_path / "run", cache_dir=tmp_path / "cache")
