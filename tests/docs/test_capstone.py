"""The capstone script (examples/build_gpt.py, docs/learn/15-build-a-gpt.md) runs end to end in
its quick mode, and its last stage is qkv.GPT: the same logits from the same weights."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "build_gpt.py"
STAGES = [
    "bigram",
    "average the past",
    "one head",
    "multi-head",
    "+ feed-forward",
    "+ residuals",
    "+ LayerNorm",
    "blocks = qkv.GPT",
]


@pytest.fixture(scope="module")
def build_gpt() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_gpt", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def quick_sizes(build_gpt: ModuleType) -> object:
    return build_gpt.Sizes(vocab_size=50, **build_gpt.QUICK_SIZES)


def scrambled(build_gpt: ModuleType) -> torch.nn.Module:
    """The last stage with every parameter random, so that no bias is left at 0 and no
    LayerNorm gain at 1, where a wrongly copied one would go unnoticed."""
    model = build_gpt.build(build_gpt.BlockGPT, quick_sizes(build_gpt), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def test_script_quick_run_prints_every_stage_and_the_check(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        # One thread: on a shared machine, oversubscribed OpenMP threads slow it down tenfold.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == STAGES
    for row in rows:
        loss = float(row.split("|")[4])
        assert math.isfinite(loss) and 0 < loss < 10, row
    assert "qkv.GPT gives the same logits" in result.stdout

    recorded = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [s["stage"] for s in recorded["stages"]] == STAGES
    assert all(s["steps"] >= 1 and math.isfinite(s["val_loss"]) for s in recorded["stages"])
    assert recorded["equal_to_qkv_gpt"]["passed"] is True
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "results.md").read_text(encoding="utf-8").startswith("| stage |")


def test_last_stage_has_the_logits_of_qkv_gpt(build_gpt: ModuleType) -> None:
    model = scrambled(build_gpt)
    ids = torch.randint(0, 50, (3, build_gpt.QUICK_SIZES["block_size"]))  # (B, T)
    diff, largest = build_gpt.same_logits(model, quick_sizes(build_gpt), ids)
    assert diff <= 1e-5 * largest and largest > 1.0


def test_the_check_fails_when_the_heads_are_copied_in_another_order(
    build_gpt: ModuleType,
) -> None:
    """A planted error: heads 0 and 1 of the first block swap their query projections, which
    the stacking in ``to_qkv_gpt`` would then put in the wrong rows; the check must see it."""
    model = scrambled(build_gpt)
    heads = model.blocks[0].self_attn.heads
    heads[0].q_proj, heads[1].q_proj = heads[1].q_proj, heads[0].q_proj
    reference = build_gpt.to_qkv_gpt(model, quick_sizes(build_gpt))
    heads[0].q_proj, heads[1].q_proj = heads[1].q_proj, heads[0].q_proj  # ours back in order
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        diff = (model.eval()(ids) - reference(ids).logits).abs().max().item()
    assert diff > 1e-3
