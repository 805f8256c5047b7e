"""Fixtures of the attack tests: the tiny Hugging Face models of ``hf_models.py``."""

from __future__ import annotations

import pytest
import torch

from tests.adversarial.hf_models import BUILDERS, HFModule, hf_batch


@pytest.fixture(params=sorted(BUILDERS))
def hf(request) -> tuple[str, HFModule, dict[str, torch.Tensor]]:
    """``(kind, module, batch)`` for each tiny HF model, seeded, in eval mode."""
    torch.manual_seed(0)
    return request.param, HFModule(BUILDERS[request.param]()).eval(), hf_batch(request.param)
