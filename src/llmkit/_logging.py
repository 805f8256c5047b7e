"""Logging a few training scalars without paying Lightning's per-call cost on every step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import Tensor


class WindowedMeans:
    """Sum scalars on their device every step; log their means once per logging window.

    Each ``LightningModule.log`` call costs Lightning about a millisecond on CPU, as much as a
    whole training step of a small model. Lightning hands step values to the logger only every
    ``Trainer(log_every_n_steps=...)`` steps, so logging the mean over that window, on exactly
    those steps (and on the first step, for the progress bar), gives loggers smoother numbers at a
    fraction of the cost. Used from ``training_step`` (or code it calls).

    Args:
        names: the logged names, in the order of :meth:`update`'s values.
        prog_bar: the names also shown on the progress bar.
    """

    def __init__(self, names: Sequence[str], prog_bar: Sequence[str] = ()) -> None:
        self.names = tuple(names)
        self.prog_bar = frozenset(prog_bar)
        self.sums: Tensor | None = None
        self.count = 0

    def update(self, module: LightningModule, values: Mapping[str, Tensor], batch_size: int | None = None) -> None:
        """Add this step's ``values`` (0-d tensors, by name) and log the window's means when due."""
        stacked = torch.stack([values[name].detach().float() for name in self.names])
        if self.sums is None or self.sums.device != stacked.device:
            self.sums, self.count = torch.zeros_like(stacked), 0
        self.sums += stacked
        self.count += 1
        every = int(getattr(module._trainer, "log_every_n_steps", 1))
        logger_step = every <= 1 or (module.global_step + 1) % every == 0
        if logger_step or module.global_step == 0:
            for name, mean in zip(self.names, (self.sums / self.count).unbind(), strict=True):
                module.log(name, mean, prog_bar=name in self.prog_bar, batch_size=batch_size)
        if logger_step:
            self.sums.zero_()
            self.count = 0
