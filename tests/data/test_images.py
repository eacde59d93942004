"""Digits for a ViT: shapes, standardisation, the stratified split, augmentation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qkv.data import DataConfig, DataSource, DigitsImages, build_data


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsImages:
    source, tok = build_data(
        DataConfig(kind="images", corpus="digits"), tmp_path_factory.mktemp("c")
    )
    assert tok is None and isinstance(source, DigitsImages)
    return source


def test_shapes_and_attributes(digits: DigitsImages) -> None:
    assert isinstance(digits, DataSource)
    assert (digits.kind, digits.num_labels, digits.image_size, digits.num_channels) == (
        "images",
        10,
        8,
        1,
    )
    batch = digits.train_batch(step=0, batch_size=16, seed=0)
    assert batch["pixel_values"].shape == (16, 1, 8, 8)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (16,) and batch["labels"].dtype == torch.int64
    assert int(batch["labels"].min()) >= 0 and int(batch["labels"].max()) <= 9


def test_train_split_is_standardised(digits: DigitsImages) -> None:
    x = digits.train_images.double()
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
    assert digits.background == pytest.approx(-digits.mean / digits.std)


def test_split_is_stratified_and_disjoint(digits: DigitsImages) -> None:
    n_train, n_test = len(digits.train_labels), len(digits.test_labels)
    assert n_train + n_test == 1797
    assert abs(n_test - 180) <= 10  # val_fraction=0.1 of each digit
    counts = torch.bincount(digits.test_labels, minlength=10)
    assert (counts >= 16).all() and (counts <= 20).all()
    train_rows = {tuple(r.flatten().tolist()) for r in digits.train_images}
    # The digits set has a few duplicate images; almost all test images are unseen.
    unseen = sum(tuple(r.flatten().tolist()) not in train_rows for r in digits.test_images)
    assert unseen >= n_test - 5


def test_batches_are_deterministic_and_val_in_order(digits: DigitsImages) -> None:
    a = digits.train_batch(step=2, batch_size=8, seed=0)
    b = digits.train_batch(step=2, batch_size=8, seed=0)
    c = digits.train_batch(step=3, batch_size=8, seed=0)
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    batches = list(digits.val_batches(batch_size=64))
    assert torch.equal(torch.cat([x["labels"] for x in batches]), digits.test_labels)
    assert len(list(digits.val_batches(batch_size=64, max_batches=1))) == 1


def test_augmentation_shifts_by_at_most_one_pixel() -> None:
    plain = DigitsImages(seed=0)
    shifted = DigitsImages(seed=0, augment=True)
    batch = shifted.train_batch(step=0, batch_size=64, seed=0)
    idx = torch.randint(0, len(plain.train_labels), (64,), generator=_train_generator())
    originals = plain.train_images[idx]
    assert torch.equal(batch["labels"], plain.train_labels[idx])
    moved = 0
    for img, orig in zip(batch["pixel_values"], originals, strict=True):
        padded = torch.nn.functional.pad(orig, (1, 1, 1, 1), value=plain.background)
        views = [padded[:, r : r + 8, c : c + 8] for r in range(3) for c in range(3)]
        assert any(torch.equal(img, v) for v in views)
        moved += not torch.equal(img, orig)
    assert moved > 32  # most images moved (8 of 9 offsets do)


def _train_generator() -> torch.Generator:
    from qkv.data import step_generator

    return step_generator(0, 0)


def test_missing_scikit_learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'qkv\[data\]'"):
        DigitsImages()


def test_images_need_digits_and_digits_need_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="corpus='digits'"):
        build_data(DataConfig(kind="images", corpus="python-docs"), tmp_path)
    with pytest.raises(ValueError, match="kind='images'"):
        build_data(DataConfig(kind="lm", corpus="digits"), tmp_path)
