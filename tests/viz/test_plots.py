"""The pictures: each function returns a figure and writes a PNG with something on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg
from matplotlib.figure import Figure

from qkv.viz import plots

TOKENS = ["[CLS]", "the", "cat", "sat", "$5", "[SEP]"]  # "$5" would be read as mathematics


def weights(*shape: int) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(*shape), dim=-1)


def check_png(path: Path, min_width: int = 200, min_height: int = 150) -> np.ndarray:
    """The file is a real picture: big enough, not blank, not all white."""
    pixels = mpimg.imread(path)  # (h, w, 4) floats in [0, 1]
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    grey = pixels[..., :3].mean(-1)
    assert grey.std() > 0.05, "the picture is (nearly) one flat colour"
    assert grey.mean() < 0.97, "the picture is (nearly) all white"
    return pixels


def test_head(tmp_path: Path) -> None:
    path = tmp_path / "head.png"
    fig = plots.plot_head(weights(6, 6), TOKENS, TOKENS, title="layer 0, head 1", path=path)
    assert isinstance(fig, Figure)
    check_png(path)
    with pytest.raises(ValueError, match="one label per row"):
        plots.plot_head(weights(6, 6), TOKENS[:5], TOKENS)


def test_heads_of_a_layer_and_the_model_view(tmp_path: Path) -> None:
    plots.plot_heads(weights(12, 6, 6), TOKENS, TOKENS, title="layer 3", path=tmp_path / "a.png")
    check_png(tmp_path / "a.png", min_width=400)
    plots.plot_model_view(weights(3, 4, 6, 6), path=tmp_path / "b.png")
    check_png(tmp_path / "b.png")


def test_head_stats_and_query(tmp_path: Path) -> None:
    stats = torch.rand(6, 12) * 2.5  # (L, H)
    plots.plot_head_stats(stats, label="entropy (nats)", title="t", path=tmp_path / "s.png")
    check_png(tmp_path / "s.png", min_width=400)
    plots.plot_query(weights(6, 12, 6), TOKENS, query="cat", path=tmp_path / "q.png")
    check_png(tmp_path / "q.png")


def test_image_attention(tmp_path: Path) -> None:
    image = np.random.rand(32, 32, 3)
    path = tmp_path / "vit.png"
    plots.plot_image_attention(image, [torch.rand(16), np.random.rand(16)], (4, 4),
                               titles=["CLS", "rollout"], path=path)  # fmt: skip
    check_png(path, min_width=300)
    plots.plot_image_attention(image[..., 0], torch.rand(16), (4, 4), path=tmp_path / "one.png")
    check_png(tmp_path / "one.png", min_width=150)
    with pytest.raises(ValueError, match="drop the \\[CLS\\] column"):
        plots.plot_image_attention(image, torch.rand(17), (4, 4))


def test_position_encodings(tmp_path: Path) -> None:
    plots.plot_sinusoidal(48, 32, path=tmp_path / "sin.png")
    plots.plot_learned(torch.randn(32, 16), title="random", path=tmp_path / "learned.png")
    plots.plot_rope(path=tmp_path / "rope.png")
    plots.plot_alibi(4, 10, path=tmp_path / "alibi.png")
    for name in ("sin", "learned", "rope", "alibi"):
        check_png(tmp_path / f"{name}.png", min_width=300)


def test_a_blank_picture_fails_the_check(tmp_path: Path) -> None:
    """The PNG check above is not vacuous: an empty figure does not pass it."""
    path = tmp_path / "blank.png"
    plots.save_figure(Figure(figsize=(4, 3)), path)
    with pytest.raises(AssertionError):
        check_png(path)
