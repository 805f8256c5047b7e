"""Keeping the model as it was: passes of an attack leave no trace on it, and differ only by ``delta``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics are as before the block, whatever passes ran in it."""
    saved = [
        (m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for key, value in buffers.items():
                    getattr(module, key).copy_(value)


class RNGReplay:
    """Replays the random number generator's state from its creation before each pass.

    So that every pass of one attack draws the same dropout masks: the perturbation is the only
    difference between them. The attack's own draws (a random start) come from :attr:`generator`,
    seeded from the global generator at creation, so that replaying does not repeat them from
    step to step.
    """

    def __init__(self, device: torch.device | None, *, random: bool = False) -> None:
        device = device or torch.device("cpu")
        self.generator: torch.Generator | None = None
        if random:
            self.generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,))))
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None

    def replay(self) -> None:
        """Restore the state captured at creation."""
        torch.set_rng_state(self.cpu)
        if self.device is not None and self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@contextlib.contextmanager
def quiet_logging(model: nn.Module) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing in the block (a training_step called to score an attack)."""
    names = [n for n in ("log", "log_dict") if hasattr(model, n)]
    for name in names:
        setattr(model, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name in names:
            delattr(model, name)
