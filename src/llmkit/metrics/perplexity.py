"""Perplexity as a torchmetrics Metric, through fused cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from llmkit.metrics._state import Float64Sums, add_update_config_state
from llmkit.metrics.functional._perplexity import _perplexity_compute, _perplexity_update


class Perplexity(Float64Sums):
    """Perplexity ``exp(cross_entropy)`` over all tokens that are not ``ignore_index``.

    Each update sums the negative log-likelihood with fused ``cross_entropy`` (no softmax is
    materialised) into a float64 state and counts the tokens; half-precision logits are
    scored in float32.

    Args:
        ignore_index: a target id to leave out (padding); ``None`` counts every position.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, target)``: ``preds: FloatTensor[B, T, V]`` logits, ``target: LongTensor[B, T]``.

    Examples:
        >>> import torch
        >>> metric = Perplexity(ignore_index=-100)
        >>> metric.update(torch.zeros(1, 3, 4), torch.tensor([[1, 2, -100]]))
        >>> metric.compute()
        tensor(4.)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 1.0
    float64_states = ("nll",)

    nll: Tensor
    count: Tensor

    def __init__(self, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")
        add_update_config_state(self, ignore_index=ignore_index)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of logits ``[B, T, V]`` and targets ``[B, T]``."""
        nll, count = _perplexity_update(preds, target, self.ignore_index)
        self.nll += nll.detach().to(self.nll.dtype)
        self.count += count

    def compute(self) -> Tensor:
        """Perplexity of everything seen so far; NaN when no token was counted."""
        return _perplexity_compute(self.nll, self.count)

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot one value or a sequence of values of the metric (needs matplotlib).

        Args:
            val: a result of ``compute``/``forward``, or several; ``None`` plots ``compute()``.
            ax: a matplotlib axis to draw on.
        """
        return self._plot(val, ax)
