"""The expert-utilisation heatmap: shares per layer, a PNG on disk, clear errors."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import qkv.viz.moe
from qkv.models.mixtral import PRESETS, Mixtral
from qkv.viz.moe import expert_load_share, plot_expert_load
from tests.viz.test_plots import check_png


def test_shares_are_per_layer() -> None:
    share = expert_load_share(torch.tensor([[1, 1, 2], [0, 0, 5]]))
    np.testing.assert_allclose(share, [[0.25, 0.25, 0.5], [0.0, 0.0, 1.0]])


def test_writes_a_png_from_a_models_router_stats(tmp_path: Path) -> None:
    model = Mixtral(PRESETS["tiny"])
    model(torch.randint(0, 128, (2, 16)))
    counts = torch.stack([s.tokens_per_expert for s in model.router_stats()])  # (L, X)
    path = tmp_path / "load.png"
    fig = plot_expert_load(counts, title="tiny Mixtral", path=path)
    assert isinstance(fig, Figure) and fig.axes[0].get_xlabel() == "expert"
    check_png(path, min_width=150, min_height=100)
    assert [p.name for p in tmp_path.iterdir()] == ["load.png"]  # no temporary file left over
    collapsed = plot_expert_load([[14, 2, 2, 2], [5, 5, 5, 5]])  # 0.7 against an even 0.25
    low, high = collapsed.axes[1].get_ylim()  # the colour bar: from share 0, not below
    assert low == 0.0 and high == pytest.approx(0.7)
    plot_expert_load(np.ones((3, 40)), path=tmp_path / "wide.png")  # no cell text when wide
    assert (tmp_path / "wide.png").is_file()


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([1, 2, 3], r"must be \(L, X\)"),
        (np.zeros((0, 4)), r"must be \(L, X\)"),
        ([[1, -1]], "finite and >= 0"),
        ([[1.0, float("nan")]], "finite and >= 0"),
        ([[1, 2], [0, 0]], r"layer\(s\) \[1\] routed no tokens"),
    ],
)
def test_bad_counts_are_clear_errors(counts: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        plot_expert_load(counts, path=tmp_path / "bad.png")  # type: ignore[arg-type]
    assert not (tmp_path / "bad.png").exists()


def test_docstring_examples() -> None:
    results = doctest.testmod(qkv.viz.moe, raise_on_error=False)
    assert results.failed == 0 and results.attempted > 0
