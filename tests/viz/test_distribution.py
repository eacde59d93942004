"""The sampling-filter picture marks exactly the tokens the sampling code keeps."""

from __future__ import annotations

import matplotlib.image as mpimg
import pytest
import torch

from qkv.generate.sampling import top_p_filter
from qkv.viz.distribution import filter_masks, plot_filters


def test_masks_match_the_sampler_on_random_distributions() -> None:
    probs = torch.rand(12).softmax(-1)  # (V,)
    kept = filter_masks(probs.tolist(), top_k=4, top_p=0.7, min_p=0.2)
    assert sum(kept["top-k 4"]) == 4
    order = probs.argsort(descending=True)
    assert all(kept["top-k 4"][i] for i in order[:4].tolist())
    expected_p = top_p_filter(probs.double().log()[None], 0.7).isfinite()[0].tolist()
    assert kept["top-p 0.7"] == expected_p
    # Kept by top-p: the smallest prefix of the sorted tokens reaching 0.7.
    n = sum(expected_p)
    sorted_probs = probs[order]
    assert sorted_probs[:n].sum() >= 0.7 - 1e-6
    assert sorted_probs[: n - 1].sum() < 0.7
    assert kept["min-p 0.2"] == (probs >= 0.2 * probs.max()).tolist()


def test_plot_writes_a_non_blank_png(tmp_path) -> None:
    path = tmp_path / "filters.png"
    plot_filters(["a", "b", "c"], [0.6, 0.3, 0.1], top_k=1, top_p=0.8, min_p=0.3, path=path)
    image = mpimg.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize(
    ("words", "probs", "message"),
    [
        ([], [], "empty"),
        (["a", "b"], [0.5, 0.2], "sum to 1"),
        (["a"], [0.5, 0.5], "one per word"),
    ],
)
def test_bad_input(words, probs, message) -> None:
    with pytest.raises(ValueError, match=message):
        plot_filters(words, probs, top_k=1, top_p=0.5, min_p=0.1)
