"""label_smoothed_cross_entropy against its oracle, F.cross_entropy: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit.nn import label_smoothed_cross_entropy


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12), classes=st.integers(1, 40), smoothing=st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.9]),
    ignored=st.floats(0.0, 0.7), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 30.0]),
)
def test_value_and_gradient_equal_cross_entropy(rows, classes, smoothing, ignored, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale).requires_grad_(True)
    target = torch.randint(0, classes, (rows,), generator=generator)
    target[torch.rand(rows, generator=generator) < ignored] = -100
    target[0] = 0  # at least one kept row: an all-ignored batch is NaN for both
    weights = torch.rand((), generator=generator, dtype=torch.float64) + 0.5  # a non-unit upstream gradient

    ours = label_smoothed_cross_entropy(logits, target, label_smoothing=smoothing)
    (ours_grad,) = torch.autograd.grad(ours * weights, logits)
    expected = F.cross_entropy(logits, target, label_smoothing=smoothing)
    (expected_grad,) = torch.autograd.grad(expected * weights, logits)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precisions_and_a_custom_ignore_index(dtype):
    torch.manual_seed(0)
    logits = torch.randn(64, 500).to(dtype).requires_grad_(True)
    target = torch.randint(0, 500, (64,))
    target[::5] = 3  # ignored
    ours = label_smoothed_cross_entropy(logits, target, ignore_index=3, label_smoothing=0.1)
    ours.backward()
    grad = logits.grad.clone()
    logits.grad = None
    expected = F.cross_entropy(logits, target, ignore_index=3, label_smoothing=0.1)
    expected.backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, expected, **tolerance)
    torch.testing.assert_close(grad, logits.grad, **tolerance)
    assert (grad[::5] == 0).all()  # ignored rows get no gradient


def test_every_row_ignored_is_nan_as_cross_entropy():
    logits, target = torch.randn(3, 5), torch.full((3,), -100)
    assert torch.isnan(label_smoothed_cross_entropy(logits, target, label_smoothing=0.1))
    assert torch.isnan(F.cross_entropy(logits, target, label_smoothing=0.1))


def test_backward_through_a_compiled_graph_equals_eager():
    torch.manual_seed(0)
    logits = torch.randn(16, 30, requires_grad=True)
    target = torch.randint(0, 30, (16,))
    target[::4] = 0

    def loss(x):
        return label_smoothed_cross_entropy(x * 2.0, target, ignore_index=0, label_smoothing=0.2)

    (eager,) = torch.autograd.grad(loss(logits), logits)
    (compiled,) = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(logits), logits)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "error", "match"),
    [
        (torch.randn(2, 3), torch.tensor([0, 1]), {"label_smoothing": 1.0}, ValueError, r"label_smoothing.*\[0, 1\)"),
        (torch.randn(2, 3), torch.tensor([0, 1]), {"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        (torch.randn(2, 3, 4), torch.tensor([0, 1]), {}, ValueError, r"\[N, V\].*\(2, 3, 4\)"),
        (torch.randn(2, 3), torch.tensor([0, 1, 2]), {}, ValueError, r"\[N\].*\(3,\)"),
        (torch.randint(0, 3, (2, 3)), torch.tensor([0, 1]), {}, TypeError, "floating point"),
        (torch.randn(2, 3), torch.tensor([0.0, 1.0]), {}, TypeError, "integer class ids"),
    ],
)
def test_bad_input(logits, target, kwargs, error, match):
    with pytest.raises(error, match=match):
        label_smoothed_cross_entropy(logits, target, **kwargs)
