"""LoRA through qkv train: what trains, the merged final model, the PEFT adapter, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qkv
from qkv.cli.main import main as qkv_main
from qkv.interop.peft import ADAPTER_CONFIG_NAME, load_peft_adapter
from qkv.train import ConfigError, config_from_dict, train
from qkv.train.finetune import ADAPTER_DIR
from qkv.train.loop import evaluate_run

from .helpers import TINY_GPT, with_overrides
from .test_finetune import classify_config, gpt_run, tiny_bert

__all__ = ["gpt_run", "tiny_bert"]  # the fixtures, shared with test_finetune


def test_only_adapters_and_the_new_head_train(tiny_bert: Path, tmp_path: Path) -> None:
    config = classify_config(tiny_bert, **{"lora.rank": 4, "optim.lr": 1e-2})
    result = train(config, tmp_path / "run", cache_dir=tmp_path / "cache")
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    # q_proj and v_proj of 2 layers: r (d_in + d_out) = 4 * 64 each; the classifier: 32 * 5 + 5
    assert run_info["finetune"]["trainable_parameters"] == 4 * 4 * 64 + 32 * 5 + 5
    assert any(note.startswith("LoRA on 4 layers") for note in run_info["notes"])
    before = qkv.from_pretrained(tiny_bert).state_dict()
    after = qkv.from_pretrained(result.final_dir).state_dict()  # merged: plain names
    assert set(after) == set(before) - {n for n in before if n.startswith("head.")} | {
        "head.classifier.weight", "head.classifier.bias"}  # fmt: skip
    assert torch.equal(after["layers.0.self_attn.k_proj.weight"],
                       before["layers.0.self_attn.k_proj.weight"])  # fmt: skip
    assert not torch.equal(after["layers.0.self_attn.q_proj.weight"],
                           before["layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert torch.equal(after["tok_emb.weight"], before["tok_emb.weight"])


def test_the_merged_final_model_scores_as_the_last_checkpoint(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """final/ holds the adapters merged; the checkpoint holds them apart (and resumes)."""
    config = classify_config(tiny_bert, **{"lora.rank": 4, "optim.lr": 1e-2})
    run_dir = tmp_path / "run"
    train(config, run_dir, cache_dir=tmp_path / "cache")
    final = evaluate_run(run_dir, cache_dir=tmp_path / "cache")
    latest = evaluate_run(run_dir, checkpoint="latest", cache_dir=tmp_path / "cache")
    assert final["val_loss"] == pytest.approx(latest["val_loss"], rel=1e-3)
    more = classify_config(tiny_bert, **{"lora.rank": 4, "optim.lr": 1e-2,
                                         "train.max_steps": 3})  # fmt: skip
    assert train(more, run_dir, resume=True, cache_dir=tmp_path / "cache").steps == 3


def test_the_adapter_is_saved_in_peft_layout_and_loads_back(
    tiny_bert: Path, tmp_path: Path
) -> None:
    config = classify_config(tiny_bert, **{"lora.rank": 4, "optim.lr": 1e-2})
    result = train(config, tmp_path / "run", cache_dir=tmp_path / "cache")
    adapter = result.final_dir / ADAPTER_DIR
    saved = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == str(tiny_bert)
    assert saved["task_type"] == "SEQ_CLS"
    # base body + adapter == the merged final model, on the body's weights
    base = qkv.from_pretrained(tiny_bert)
    load_peft_adapter(base, adapter)
    from qkv.blocks.lora import merge_lora

    merge_lora(base)
    merged = qkv.from_pretrained(result.final_dir).state_dict()
    weight = "layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(base.state_dict()[weight], merged[weight])


def test_a_gpt_run_with_lora_exports_the_merged_model_and_generates(
    gpt_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPT-2's fused c_attn has no one-to-one PEFT layout: the merged final/ model only."""
    config = config_from_dict(with_overrides(
        TINY_GPT, model={"init_from": str(gpt_run)}, data={"tokenizer": "checkpoint"},
        train={"max_steps": 2, "eval_every": 0, "checkpoint_every": 0},
        lora={"rank": 2, "targets": ["q_proj", "v_proj"]},
    ))  # fmt: skip
    result = train(config, tmp_path / "run", cache_dir=tmp_path / "cache")
    assert not (result.final_dir / ADAPTER_DIR).exists()
    code = qkv_main(["generate", "--model", str(result.final_dir), "--prompt", "The ",
                     "--max-new-tokens", "5"])  # fmt: skip
    assert code == 0 and capsys.readouterr().out.startswith("The ")


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"lora.rank": 4, "lora.targets": "query"}, r"lora.targets: target 'query' matches no"),
        ({"lora.rank": 64}, r"lora.rank=64: rank=64 must be between 1 and min"),
    ],
)
def test_bad_lora_settings_are_named_before_the_run_starts(
    tiny_bert: Path, tmp_path: Path, lora: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        train(classify_config(tiny_bert, **lora), tmp_path / "run", cache_dir=tmp_path / "c")
    assert not (tmp_path / "run").exists()
