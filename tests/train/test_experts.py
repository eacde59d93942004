"""Expert utilisation during training: per-step routing columns, run totals, resume, picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib import image

import qkv
from qkv.blocks.moe import MixtureOfExperts
from qkv.cli.main import main
from qkv.train import config_from_dict, train
from qkv.train.experts import ExpertLoad, read_expert_load
from qkv.train.metrics import read_metrics

from .helpers import TINY_GPT, with_overrides, write_config

N_EXPERTS, TOP_K, N_LAYERS = 4, 2, 2


def _mixtral_run(**train_section: Any) -> dict[str, Any]:
    model = {
        "family": "mixtral", "d_model": 32, "n_layers": N_LAYERS, "n_heads": 4, "n_kv_heads": 2,
        "n_experts": N_EXPERTS, "top_k": TOP_K, "capacity_factor": 1.0,
    }  # fmt: skip
    raw = with_overrides(TINY_GPT, train={"seed": 0, **train_section})
    raw["model"] = model
    return raw


def test_step_columns_are_the_counts_of_the_step() -> None:
    """Two micro-batches: the columns describe their sum, then the step's counts join the run."""
    torch.manual_seed(0)
    moe = MixtureOfExperts(8, 16, n_experts=N_EXPERTS, top_k=TOP_K, capacity_factor=0.5)
    load = ExpertLoad([moe])
    seen = []
    for _ in range(2):
        moe(torch.randn(3, 5, 8))
        load.add()
        stats = moe.last_stats
        assert stats is not None
        seen.append((stats.tokens_per_expert.clone(), stats.dropped_per_expert.clone()))
    routed = sum(r for r, _ in seen)
    dropped = sum(d for _, d in seen)
    row = load.end_step()
    assert int(routed.sum()) == 2 * 3 * 5 * TOP_K
    assert row["moe_dropped"] == pytest.approx(float(dropped.sum()) / float(routed.sum()))
    assert row["moe_dropped"] > 0  # capacity 0.5 of an even share drops choices
    assert row["moe_max_share"] == pytest.approx(float(routed.max()) / float(routed.sum()))
    assert torch.equal(load.tokens[0], routed) and torch.equal(load.dropped[0], dropped)
    assert load.end_step() == {}  # nothing routed since


def test_a_run_logs_routing_and_a_resumed_run_goes_on_counting(
    tmp_path: Path, cache_dir: Path
) -> None:
    steps, batch, seq = 4, TINY_GPT["train"]["batch_size"], TINY_GPT["data"]["seq_len"]
    whole = train(config_from_dict(_mixtral_run(max_steps=steps, checkpoint_every=2)),
                  tmp_path / "whole", cache_dir=cache_dir)  # fmt: skip
    rows = read_metrics(whole.run_dir / "metrics.csv")
    assert len(rows) == steps
    for row in rows:
        dropped, share = float(row["moe_dropped"]), float(row["moe_max_share"])
        assert 0.0 <= dropped < 1.0
        assert 1.0 / N_EXPERTS <= share <= 1.0
    counts = read_expert_load(whole.run_dir / "experts.json")
    tokens = torch.tensor(counts["tokens_per_expert"])
    assert counts["step"] == steps and tokens.shape == (N_LAYERS, N_EXPERTS)
    # Every step routes each of its B (T - 1) input tokens (a row of T tokens is T - 1
    # inputs and their next tokens) to k experts, in every layer.
    assert tokens.sum(1).tolist() == [steps * batch * (seq - 1) * TOP_K] * N_LAYERS

    # The same run stopped at step 2 and resumed: the same totals.
    half = tmp_path / "half"
    train(config_from_dict(_mixtral_run(max_steps=2, checkpoint_every=2)), half,
          cache_dir=cache_dir)  # fmt: skip
    (half / "experts.json").unlink()  # the counts must come from the checkpoint
    resumed = config_from_dict(_mixtral_run(max_steps=steps, checkpoint_every=2))
    train(resumed, half, resume=True, cache_dir=cache_dir)
    assert read_expert_load(half / "experts.json") == counts


def test_qkv_train_draws_the_expert_load(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "moe.yaml", _mixtral_run(max_steps=2, checkpoint_every=0))
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--out", str(out), "--quiet",
                 "--cache-dir", str(cache_dir)])  # fmt: skip
    assert code == 0
    picture = image.imread(out / "experts.png")
    assert picture.shape[0] > 100 and picture.std() > 0.05  # a drawn heatmap, not blank


def test_a_dense_run_has_no_routing_columns(tmp_path: Path, cache_dir: Path) -> None:
    raw = with_overrides(TINY_GPT, train={"max_steps": 2, "checkpoint_every": 0})
    result = train(config_from_dict(raw), tmp_path / "dense", cache_dir=cache_dir)
    assert "moe_dropped" not in read_metrics(result.run_dir / "metrics.csv")[0]
    assert not (result.run_dir / "experts.json").exists()


def test_expert_counts_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    load = ExpertLoad([MixtureOfExperts(8, 16, n_experts=N_EXPERTS)])
    with pytest.raises(ValueError, match="layers x experts"):
        load.load_state({"tokens_per_expert": [[1, 2]], "dropped_per_expert": [[0, 0]]})
    (tmp_path / "x.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not an experts\.json"):
        read_expert_load(tmp_path / "x.json")


def test_a_gpt_with_experts_from_the_command_line(tmp_path: Path, cache_dir: Path) -> None:
    """``--model.experts`` gives gpt-char's GPT a mixture of experts in every layer; the run logs
    its routing and the saved model keeps the experts."""
    out = tmp_path / "gpt-moe"
    code = main(["train", "--preset", "gpt-char", "--model.d_model", "32", "--model.n_layers",
                 "2", "--model.n_heads", "2", "--data.seq_len", "32", "--train.batch_size", "4",
                 "--train.max_steps", "2", "--train.max_time", "", "--train.eval_batches", "1",
                 "--train.checkpoint_every", "0", "--eval.sample_tokens", "4",
                 "--model.experts", "{n_experts: 4, top_k: 1, capacity_factor: 1.0}",
                 "--out", str(out), "--quiet", "--cache-dir", str(cache_dir)])  # fmt: skip
    assert code == 0
    assert all(row["moe_dropped"] for row in read_metrics(out / "metrics.csv"))
    tokens = torch.tensor(read_expert_load(out / "experts.json")["tokens_per_expert"])
    assert tokens.shape == (2, N_EXPERTS) and (tokens.sum(1) == 2 * 4 * 31).all()  # top-1
    model = qkv.from_pretrained(out / "final")
    assert model.config.experts is not None and model.config.experts.top_k == 1
    assert sum(isinstance(m, MixtureOfExperts) for m in model.modules()) == 2
