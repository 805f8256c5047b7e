"""Perplexity against its closed form, exp(mean cross-entropy), and torchmetrics' Perplexity."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchmetrics

from llmkit.metrics import Perplexity
from llmkit.metrics.functional import perplexity


def closed_form(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> float:
    """exp of the mean negative log-softmax of the targets, in float64, by hand."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    picked = log_probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    return torch.exp(-picked[keep].mean()).item()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 9, 13, generator=generator)
    target = torch.randint(13, (4, 9), generator=generator)
    target[0, 5:] = -100
    target[2, 7:] = -100
    return logits, target


def test_closed_form(batch):
    logits, target = batch
    want = closed_form(logits, target, ignore_index=-100)
    assert perplexity(logits, target, ignore_index=-100).item() == pytest.approx(want, rel=1e-6)
    full = target.clamp(min=0)
    assert perplexity(logits, full).item() == pytest.approx(closed_form(logits, full), rel=1e-6)


def test_matches_torchmetrics(batch):
    logits, target = batch
    reference = torchmetrics.text.Perplexity(ignore_index=-100)
    reference.update(logits, target)
    assert perplexity(logits, target, ignore_index=-100).item() == pytest.approx(reference.compute().item(), rel=1e-5)


def test_batches_accumulate(batch):
    logits, target = batch
    metric = Perplexity(ignore_index=-100)
    for i in range(logits.shape[0]):
        metric.update(logits[i : i + 1], target[i : i + 1])
    assert metric.compute().item() == pytest.approx(closed_form(logits, target, -100), rel=1e-6)
    assert metric.nll.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_scored_in_float32(batch, dtype):
    logits, target = batch
    half = logits.to(dtype)
    # The oracle is the closed form on the very same (rounded) half-precision values.
    want = closed_form(half.double(), target, ignore_index=-100)
    assert perplexity(half, target, ignore_index=-100).item() == pytest.approx(want, rel=1e-5)


def test_half_precision_in_chunks(monkeypatch, batch):
    module = importlib.import_module("llmkit.metrics.functional._perplexity")
    monkeypatch.setattr(module, "_UPCAST_CHUNK", 13 * 5)  # five rows a chunk
    logits, target = batch
    half = logits.bfloat16()
    want = closed_form(half.double(), target, ignore_index=-100)
    assert perplexity(half, target, ignore_index=-100).item() == pytest.approx(want, rel=1e-5)


def test_functional_is_differentiable(batch):
    logits, target = batch
    logits = logits.clone().requires_grad_(True)
    perplexity(logits, target, ignore_index=-100).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_everything_ignored_is_nan():
    target = torch.full((1, 3), -100)
    assert torch.isnan(perplexity(torch.randn(1, 3, 5), target, ignore_index=-100))


def test_unignored_negative_target_is_reported():
    """Without ignore_index, a -100 is not silently skipped (cross_entropy's default would)."""
    with pytest.raises(IndexError, match="-100"):
        perplexity(torch.randn(1, 3, 5), torch.tensor([[1, 2, -100]]))


@pytest.mark.parametrize(
    ("preds", "target", "error", "match"),
    [
        (torch.randn(2, 5), torch.zeros(2, dtype=torch.long), ValueError, r"`preds` must have 3 dimensions \[batch, seq, vocab\], got 2"),
        (torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), ValueError, r"`target` must have shape \[batch, seq\] = \(2, 3\)"),
        (torch.randint(5, (2, 3, 5)), torch.zeros(2, 3, dtype=torch.long), TypeError, r"`preds` must be floating-point logits, got dtype torch.int64"),
        (torch.randn(2, 3, 5), torch.zeros(2, 3), TypeError, r"`target` must hold integer class ids, got dtype torch.float32"),
        ([[0.0]], torch.zeros(1, 1, dtype=torch.long), TypeError, r"must be tensors, got list and Tensor"),
    ],
)
def test_bad_input_loses_nothing(batch, preds, target, error, match):
    logits, good_target = batch
    metric = Perplexity(ignore_index=-100)
    metric.update(logits, good_target)
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    assert metric.compute().item() == pytest.approx(closed_form(logits, good_target, -100), rel=1e-6)


def test_bad_ignore_index():
    with pytest.raises(TypeError, match=r"`ignore_index` must be an int or None, got 'pad'"):
        Perplexity(ignore_index="pad")  # type: ignore[arg-type]
