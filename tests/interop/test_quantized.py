"""Quantised models through save_pretrained / from_pretrained: safetensors, the config's
``quantization`` entry, a tied head stored once, and damaged checkpoints named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from qkv.blocks.quant import Int4Linear, Int8Linear, QuantConfig, quantization_of, quantize_model
from qkv.models import GPT, GPTConfig


def _quantised(config: QuantConfig) -> GPT:
    model = GPT(GPTConfig(vocab_size=40, d_model=64, n_layers=2, n_heads=4, max_seq_len=32))
    quantize_model(model.eval(), config)
    return model


@pytest.mark.parametrize("config", [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32)])
def test_round_trip_restores_the_same_layers_and_logits(
    tmp_path: Path, config: QuantConfig
) -> None:
    model = _quantised(config)
    qkv.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["qkv_family"] == "gpt" and saved["quantization"] == config.to_dict()
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied to tok_emb.weight: stored once
    kind = Int8Linear if config.bits == 8 else Int4Linear
    assert tensors["layers.0.mlp.up_proj.qweight"].dtype == (
        torch.int8 if config.bits == 8 else torch.uint8
    )
    loaded = qkv.from_pretrained(tmp_path)
    assert isinstance(loaded.layers[1].self_attn.q_proj, kind)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert quantization_of(loaded) == config
    ids = torch.randint(0, 40, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_bad_quantization_entry_or_mismatched_files_are_named(tmp_path: Path) -> None:
    qkv.save_pretrained(_quantised(QuantConfig(bits=8)), tmp_path)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "quantization": {"bits": 5}}))
    with pytest.raises(qkv.CheckpointError, match="'quantization' entry is invalid"):
        qkv.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**saved, "quantization": {"bits": 4, "group_size": 32}}))
    with pytest.raises(qkv.CheckpointError, match="does not fit GPT"):
        qkv.from_pretrained(tmp_path)  # int8 tensors under an int4 config: shapes differ
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if not k.endswith("qweight")}, str(weights))
    config_path.write_text(json.dumps(saved))
    with pytest.raises(qkv.CheckpointError, match="hold no"):
        qkv.from_pretrained(tmp_path)
