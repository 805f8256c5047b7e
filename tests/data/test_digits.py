"""DigitsDataModule: scikit-learn's bundled digits, split deterministically, as Lightning batches."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from llmkit.data import DigitsDataModule


def test_splits_cover_every_image_once_scaled_to_unit_range():
    data = DigitsDataModule()
    data.setup("fit")
    images, labels = load_digits(return_X_y=True)
    parts = [data.split(name).tensors for name in ("train", "val", "test")]
    assert [len(x) for x, _ in parts] == [1258, 180, 359]
    x = torch.cat([x for x, _ in parts])
    y = torch.cat([y for _, y in parts])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    # The same images and labels as scikit-learn's, each exactly once.
    expected = sorted(zip((images / 16).tolist(), labels.tolist(), strict=True))
    assert sorted(zip(x.double().tolist(), y.tolist(), strict=True)) == expected


def test_splits_are_deterministic_by_seed():
    a, b, c = DigitsDataModule(seed=1), DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    for name in ("train", "val", "test"):
        assert torch.equal(a.split(name).tensors[0], b.split(name).tensors[0])
    assert not torch.equal(a.split("test").tensors[0], c.split("test").tensors[0])


@pytest.mark.parametrize(("flatten", "shape"), [(True, (64,)), (False, (1, 8, 8))])
def test_batches_and_shapes(flatten, shape):
    data = DigitsDataModule(batch_size=50, flatten=flatten)
    data.setup("fit")
    assert data.input_shape == shape
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (50, *shape) and y.shape == (50,)
    assert sum(len(x) for x, _ in data.val_dataloader()) == 180
    assert sum(len(x) for x, _ in data.test_dataloader()) == sum(len(x) for x, _ in data.predict_dataloader()) == 359


def test_training_order_follows_the_global_seed():
    data = DigitsDataModule(batch_size=1258)
    torch.manual_seed(0)
    first = next(iter(data.train_dataloader()))[1]
    torch.manual_seed(0)
    assert torch.equal(first, next(iter(data.train_dataloader()))[1])
    assert not torch.equal(first, data.split("train").tensors[1])  # shuffled


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size` must be at least 1, got 0"),
        ({"val_fraction": 0.0}, "`val_fraction` must be in \\(0, 1\\), got 0.0"),
        ({"test_fraction": 1.5}, "`test_fraction` must be in \\(0, 1\\), got 1.5"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must leave images to train on, got 0.5 \\+ 0.5"),
        ({"num_workers": -1}, "`num_workers` must be >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_unknown_split():
    with pytest.raises(ValueError, match="`split` must be one of \\('train', 'val', 'test'\\), got 'dev'"):
        DigitsDataModule().split("dev")
