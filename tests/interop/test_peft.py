"""LoRA adapters in PEFT's layout: qkv's adapters loaded by the peft library on the exported
transformers model, and adapters peft saved loaded by qkv, compared on logits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qkv.blocks.lora import LoRALinear, apply_lora
from qkv.interop import from_pretrained
from qkv.interop.files import CheckpointError
from qkv.interop.peft import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    load_peft_adapter,
    save_peft_adapter,
)
from qkv.models.gpt import GPT
from qkv.models.gpt import PRESETS as GPT_PRESETS
from qkv.models.llama import PRESETS, Llama
from qkv.models.transformer import PRESETS as TRANSFORMER_PRESETS
from qkv.models.transformer import Transformer

pytestmark = [pytest.mark.hf, pytest.mark.requires("peft", "transformers")]

TOL = 1e-4  # float32, two implementations with differently ordered sums (as test_llama.py)


def _scramble(model: nn.Module, std: float = 0.15) -> nn.Module:
    """Weights large enough that attention is far from uniform; norm gains away from 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model


def _perturb_adapters(model: nn.Module, std: float = 0.2) -> None:
    """Non-zero A and B in every adapter, qkv's (lora_A) or peft's (lora_A.default.weight)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, std)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.2e}"


def _base(tmp_path: Path) -> tuple[Llama, Any]:
    """A scrambled qkv Llama (GQA: v_proj is narrower than q_proj) and the transformers model
    that qkv's export of it loads as."""
    import transformers

    ours = _scramble(Llama(PRESETS["tiny"])).eval()
    assert isinstance(ours, Llama)
    ours.save_pretrained(tmp_path / "base")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", attn_implementation="eager"
    ).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    return ours, theirs


def test_peft_loads_qkv_adapter(tmp_path: Path) -> None:
    import peft

    ours, theirs = _base(tmp_path)
    apply_lora(ours, "q_proj,v_proj", rank=4, alpha=8)
    apply_lora(ours, "layers.1.self_attn.out_proj", rank=2, alpha=3)  # another rank and alpha
    _perturb_adapters(ours)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["target_modules"] == ["layers.1.self_attn.o_proj", "q_proj", "v_proj"]
    assert config["rank_pattern"] == {"model.layers.1.self_attn.o_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.1.self_attn.o_proj": 3}

    adapted = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    lora_layers = [n for n, _ in adapted.named_modules() if n.endswith("lora_A.default")]
    assert len(lora_layers) == 5  # q and v in two layers, o_proj in one: no more, no fewer
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        mine, theirs_logits = ours(ids).logits, adapted(ids).logits
        base = adapted.get_base_model()
        with adapted.disable_adapter():
            plain = base(ids).logits
    _close(mine, theirs_logits, "logits with the adapter")
    assert (mine - plain).abs().max() > 100 * TOL  # the adapter matters


def test_qkv_loads_peft_adapter(tmp_path: Path) -> None:
    import peft

    ours, theirs = _base(tmp_path)
    lora = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 5}, task_type="CAUSAL_LM",
    )  # fmt: skip
    adapted = peft.get_peft_model(theirs, lora)
    _perturb_adapters(adapted)
    adapted.save_pretrained(str(tmp_path / "adapter"))

    report = load_peft_adapter(ours, tmp_path / "adapter")
    assert len(report.adapted) == 8 and report.trainable == sum(
        p.numel() for n, p in adapted.named_parameters() if "lora_" in n
    )
    down = ours.get_submodule("layers.0.mlp.down_proj")
    out = ours.get_submodule("layers.0.self_attn.out_proj")
    assert isinstance(down, LoRALinear) and isinstance(out, LoRALinear)
    assert (down.rank, down.scaling, out.rank, out.scaling) == (2, 6.0, 4, 1.25)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        _close(ours.eval()(ids).logits, adapted.eval()(ids).logits, "logits with the adapter")


def test_round_trip_through_qkv(tmp_path: Path) -> None:
    ours, _ = _base(tmp_path)
    apply_lora(ours, "gate_proj,up_proj", rank=3, alpha=6, dropout=0.05)
    _perturb_adapters(ours)
    save_peft_adapter(ours, tmp_path / "adapter")
    again = from_pretrained(tmp_path / "base")
    report = load_peft_adapter(again, tmp_path / "adapter")
    assert report.adapted == tuple(
        f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")
    )
    layer = again.get_submodule("layers.1.mlp.up_proj")
    assert isinstance(layer, LoRALinear) and layer.dropout.p == 0.05
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)


def _write_adapter(directory: Path, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps({**base, **config}))
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME))
    return directory


def test_adapter_for_another_architecture_or_size(tmp_path: Path) -> None:
    import peft
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4))
    peft.get_peft_model(
        gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    ).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn.*another arch"):
        load_peft_adapter(Llama(PRESETS["tiny"]), tmp_path / "gpt2")

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    wide = {key + "A.weight": torch.zeros(2, 64), key + "B.weight": torch.zeros(32, 2)}
    _write_adapter(tmp_path / "wide", {}, wide)
    with pytest.raises(CheckpointError, match=r"A \(2, 64\).*maps 32 -> 32.*another size"):
        load_peft_adapter(Llama(PRESETS["tiny"]), tmp_path / "wide")

    deep = {k.replace("layers.0", "layers.5"): v for k, v in wide.items()}
    _write_adapter(tmp_path / "deep", {}, deep)
    with pytest.raises(CheckpointError, match=r"layers\.5\.self_attn\.q_proj"):
        load_peft_adapter(Llama(PRESETS["tiny"]), tmp_path / "deep")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "IA3"}, "'IA3' adapter; qkv reads LoRA"),
        ({"use_dora": True}, "use_dora=True"),
        ({"use_rslora": True}, "use_rslora=True"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_unsupported_adapter_configs(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    tensors = {key + "A.weight": torch.zeros(2, 32), key + "B.weight": torch.zeros(32, 2)}
    _write_adapter(tmp_path, config, tensors)
    with pytest.raises(CheckpointError, match=message):
        load_peft_adapter(Llama(PRESETS["tiny"]), tmp_path)


def test_bad_weights_file(tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    _write_adapter(tmp_path / "half", {}, {key + "A.weight": torch.zeros(2, 32)})
    with pytest.raises(CheckpointError, match="lora_A only"):
        load_peft_adapter(Llama(PRESETS["tiny"]), tmp_path / "half")
    embedding = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 128)}
    _write_adapter(tmp_path / "emb", {}, embedding)
    with pytest.raises(CheckpointError, match="not a LoRA weight of a linear layer"):
        load_peft_adapter(Llama(PRESETS["tiny"]), tmp_path / "emb")
    with pytest.raises(CheckpointError, match=r"no adapter_config\.json"):
        load_peft_adapter(Llama(PRESETS["tiny"]), tmp_path)


def test_gpt2_is_refused_with_the_reason(tmp_path: Path) -> None:
    gpt = GPT(GPT_PRESETS["tiny"])
    apply_lora(gpt, "q_proj,v_proj", rank=2)
    with pytest.raises(CheckpointError, match="fuses q, k and v into one Conv1D c_attn"):
        save_peft_adapter(gpt, tmp_path)
    with pytest.raises(CheckpointError, match="c_attn"):
        load_peft_adapter(GPT(GPT_PRESETS["tiny"]), tmp_path)


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        save_peft_adapter(Llama(PRESETS["tiny"]), tmp_path)
    merged = Llama(PRESETS["tiny"])
    apply_lora(merged, "q_proj", rank=2)
    layer = merged.get_submodule("layers.0.self_attn.q_proj")
    assert isinstance(layer, LoRALinear)
    layer.merge()
    with pytest.raises(CheckpointError, match="merged into their base weights"):
        save_peft_adapter(merged, tmp_path)
    seq2seq = Transformer(TRANSFORMER_PRESETS["tiny"])
    apply_lora(seq2seq, "q_proj", rank=2)
    with pytest.raises(CheckpointError, match="no Hugging Face counterpart"):
        save_peft_adapter(seq2seq, tmp_path)
