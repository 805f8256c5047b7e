"""Fixtures of the attack tests: the tiny Hugging Face models of ``tests/callbacks/hf.py``."""

from __future__ import annotations

import pytest
import torch

from tests.callbacks.hf import HFModule, batch, build

ATTACKED = ("bart", "bert", "t5")  # the kinds the attack tests run on


@pytest.fixture(params=ATTACKED)
def hf(request) -> tuple[str, HFModule, dict[str, torch.Tensor]]:
    """``(kind, module, batch)`` for each tiny HF model, seeded, in eval mode; the batch is right-padded."""
    torch.manual_seed(0)
    return request.param, HFModule(build(request.param)).eval(), batch(request.param)
