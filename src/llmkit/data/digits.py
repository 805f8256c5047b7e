"""Digits: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download)."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


class DigitsDataModule(LightningDataModule):
    """The UCI optical-recognition handwritten digits that ship inside scikit-learn.

    1,797 grey-level images of 8x8 pixels (values 0..16, scaled here to [0, 1]) with their labels
    0..9, split deterministically by ``seed`` into train, validation and test sets. Batches are
    ``(x, label)``: ``x`` ``[B, 64]`` (``flatten=True``) or ``[B, 1, 8, 8]``, float32; ``label``
    ``[B]`` int64. Needs the ``data`` extra (scikit-learn); nothing is downloaded.

    Args:
        batch_size: examples per batch.
        flatten: ``x`` as ``[B, 64]`` vectors instead of ``[B, 1, 8, 8]`` images.
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
        seed: the split's seed (the training order is shuffled by Lightning's seed).
        num_workers: DataLoader workers.

    Raises:
        ValueError: If the fractions leave no training, validation or test image.

    Examples:
        >>> data = DigitsDataModule(batch_size=32)
        >>> data.setup("fit")
        >>> x, label = next(iter(data.train_dataloader()))
        >>> x.shape, label.shape, data.input_shape, len(data.split("test"))
        (torch.Size([32, 64]), torch.Size([32]), (64,), 359)
    """

    def __init__(
        self,
        batch_size: int = 128,
        flatten: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < fraction < 1.0:
                raise ValueError(f"`{name}` must be in (0, 1), got {fraction}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must leave images to train on, got {val_fraction} + {test_fraction}"
            )
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.batch_size, self.flatten, self.seed, self.num_workers = batch_size, flatten, seed, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._splits: dict[str, TensorDataset] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one image: ``(64,)`` or ``(1, 8, 8)``."""
        return (64,) if self.flatten else (1, 8, 8)

    def prepare_data(self) -> None:
        """Nothing to download: the images ship inside scikit-learn."""

    def setup(self, stage: str | None = None) -> None:
        """Load the images and split them (the same split on every process)."""
        if self._splits is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("DigitsDataModule needs scikit-learn: pip install 'llmkit[data]'") from error
        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32) / 16.0
        y = torch.as_tensor(labels, dtype=torch.int64)
        x = x if self.flatten else x.view(-1, 1, 8, 8)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val, n_test = round(self.val_fraction * len(x)), round(self.test_fraction * len(x))
        parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        self._splits = {name: TensorDataset(x[index], y[index]) for name, index in parts.items()}

    def split(self, name: Split) -> TensorDataset:
        """The ``"train"``, ``"val"`` or ``"test"`` images and labels (after :meth:`setup`)."""
        if name not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {name!r}")
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return self._splits[name]

    def _loader(self, name: Split, shuffle: bool = False) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(
            self.split(name), batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Shuffled training batches ``(x, label)``."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Validation batches ``(x, label)``, in order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """Test batches ``(x, label)``, in order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The test batches, for ``Trainer.predict``."""
        return self._loader("test")
