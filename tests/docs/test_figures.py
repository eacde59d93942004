"""The scripts in docs/figures redraw the docs' pictures: each runs and writes non-blank PNGs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from tests.optional import require_what_text_needs

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"


@pytest.mark.parametrize("script", sorted(FIGURES.glob("*.py")), ids=lambda p: p.stem)
def test_figure_script(script: Path, tmp_path: Path) -> None:
    require_what_text_needs(script.read_text(encoding="utf-8"))
    spec = importlib.util.spec_from_file_location(f"figures_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.main(["--out", str(tmp_path)])
    assert written, f"{script.name} wrote no figure"
    for path in written:
        image = mpimg.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100, path
        assert image[..., :3].std() > 0.05, f"{path} is blank"
        committed = FIGURES.parent / "learn" / "img" / Path(path).name
        assert committed.exists(), f"run the script to write {committed} for the docs"
