"""Perplexity of logits over targets, through fused cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkit.metrics._state import sum_dtype

# Handed to cross_entropy when nothing is ignored: no real target equals it, and a negative
# target (such as a forgotten -100) is then reported instead of silently skipped.
_IGNORE_NOTHING = -(2**62)
# Half-precision logits are scored in float32, this many elements at a time.
_UPCAST_CHUNK = 2**25


def _check_perplexity_input(preds: Tensor, target: Tensor) -> None:
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"`preds` and `target` must be tensors, got {type(preds).__name__} and {type(target).__name__}"
        )
    if not preds.is_floating_point():
        raise TypeError(f"`preds` must be floating-point logits, got dtype {preds.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"`target` must hold integer class ids, got dtype {target.dtype}")
    if preds.ndim != 3:
        raise ValueError(f"`preds` must have 3 dimensions [batch, seq, vocab], got {preds.ndim}: {tuple(preds.shape)}")
    if target.shape != preds.shape[:2]:
        raise ValueError(
            f"`target` must have shape [batch, seq] = {tuple(preds.shape[:2])} to match `preds`, "
            f"got {tuple(target.shape)}"
        )


def _perplexity_update(preds: Tensor, target: Tensor, ignore_index: int | None = None) -> tuple[Tensor, Tensor]:
    """Sum the negative log-likelihood of the targets and count them.

    Returns:
        ``(nll [] float64, count [] int64)`` over the tokens that are not ``ignore_index``.
    """
    _check_perplexity_input(preds, target)
    logits = preds.reshape(-1, preds.shape[-1])
    labels = target.reshape(-1).long()
    ignore = _IGNORE_NOTHING if ignore_index is None else ignore_index
    # Per-token losses, summed in float64: cross_entropy's own "sum" adds in the logits' dtype.
    if logits.dtype in (torch.float16, torch.bfloat16):
        # Half precision would round each loss; score in float32, in chunks so that no full
        # float32 copy of the logits is made.
        rows = max(1, _UPCAST_CHUNK // max(logits.shape[1], 1))
        losses = torch.cat(
            [
                F.cross_entropy(logits[start : start + rows].float(), labels[start : start + rows],
                                ignore_index=ignore, reduction="none")
                for start in range(0, logits.shape[0], rows)
            ]
        )
    else:
        losses = F.cross_entropy(logits, labels, ignore_index=ignore, reduction="none")
    nll = losses.sum(dtype=sum_dtype(losses.device))
    count = torch.tensor(labels.numel(), device=preds.device) if ignore_index is None else (labels != ignore).sum()
    return nll, count


def _perplexity_compute(nll: Tensor, count: Tensor) -> Tensor:
    """``exp(nll / count)``; NaN when no token was counted."""
    return torch.exp(nll / count).to(torch.get_default_dtype())


def perplexity(preds: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor:
    """Perplexity ``exp(cross_entropy)`` over all tokens that are not ``ignore_index``.

    Uses fused ``cross_entropy`` (no softmax is materialised) and sums in float64;
    half-precision logits are scored in float32. Differentiable with respect to ``preds``.

    Args:
        preds: ``[B, T, V]`` logits (unnormalised).
        target: ``[B, T]`` integer class ids.
        ignore_index: a target id to leave out (padding); ``None`` counts every position.

    Returns:
        A 0-d tensor; NaN when every target is ignored.

    Raises:
        TypeError: If ``preds`` is not floating point or ``target`` not integer.
        ValueError: If the shapes do not fit.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
        >>> perplexity(logits, torch.tensor([[0, 1]]))
        tensor(2.)
    """
    return _perplexity_compute(*_perplexity_update(preds, target, ignore_index))
