"""Label-smoothed cross-entropy in one autograd node, as cheap as the plain cross-entropy.

``F.cross_entropy(..., label_smoothing=eps)`` materialises the log-probabilities, sums them for the
smoothing term, and in backward builds a dense gradient of that sum before the softmax's own
backward: several passes over the ``[N, V]`` logits more than the plain loss. With
``lse = logsumexp(x)`` the smoothed loss of one row is

    (1 - eps) * (lse - x[y]) + eps * (lse - mean(x)) = lse - (1 - eps) * x[y] - eps * mean(x),

and its gradient ``softmax(x) - (1 - eps) * onehot(y) - eps / V``: one exponential pass forward,
kept for backward, and backward rewrites it in place. The values equal ``F.cross_entropy``'s up to
float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Mean label-smoothed cross-entropy over the rows whose target is not ``ignore_index``."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, ignore_index: int, smoothing: float) -> Tensor:
        top = logits.amax(dim=-1, keepdim=True)
        exp = torch.exp(logits - top)
        total = exp.sum(dim=-1)
        lse = total.log() + top.squeeze(-1)
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1)
        per_row = lse - (1.0 - smoothing) * picked - smoothing * logits.mean(dim=-1)
        count = valid.sum()
        ctx.save_for_backward(exp, total, safe, valid, count)
        ctx.smoothing = smoothing
        return torch.where(valid, per_row, 0.0).sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        exp, total, safe, valid, count = ctx.saved_tensors
        smoothing = ctx.smoothing
        scale = (grad_output / count) * valid.to(exp.dtype)
        # softmax * scale - scale * eps / V, then -(1 - eps) * scale at the target: written into the
        # saved exponentials (autograd frees them after this backward; a second one raises in autograd).
        grad = exp.mul_((scale / total)[:, None])
        grad.sub_((scale * (smoothing / exp.shape[1]))[:, None])
        grad.scatter_add_(1, safe[:, None], (-(1.0 - smoothing) * scale)[:, None])
        return grad, None, None, None


def label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Tensor:
    """``F.cross_entropy(logits, target, ignore_index=..., label_smoothing=...)``, mean over kept rows, faster.

    With ``label_smoothing > 0`` the loss and its gradient take one fused pass each (see the module
    docstring) instead of ``F.cross_entropy``'s several; with 0 it is ``F.cross_entropy`` itself.
    As there, a batch whose every target is ``ignore_index`` gives NaN. Differentiable once (no
    double backward).

    Args:
        logits: ``[N, V]`` floating-point scores.
        target: ``[N]`` class ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: target value that contributes nothing.
        label_smoothing: ``eps`` in ``[0, 1)``: the target keeps ``1 - eps`` and every class gets ``eps / V``.

    Returns:
        The 0-dim mean loss, in ``logits``' dtype.

    Raises:
        ValueError: If the shapes do not match ``[N, V]`` and ``[N]`` or ``label_smoothing`` is outside [0, 1).
        TypeError: If ``logits`` is not floating point or ``target`` not integer.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> logits, target = torch.randn(6, 10), torch.tensor([1, 2, 0, 9, -100, 4])
        >>> ours = label_smoothed_cross_entropy(logits, target, label_smoothing=0.1)
        >>> torch.allclose(ours, F.cross_entropy(logits, target, label_smoothing=0.1))
        True
    """
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must be floating point, got dtype {logits.dtype}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"`target` must hold integer class ids, got dtype {target.dtype}")
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"`logits` must be [N, V] and `target` [N], got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}")
    if label_smoothing == 0.0:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    loss: Tensor = _SmoothedCrossEntropy.apply(  # type: ignore[no-untyped-call]
        logits, target, ignore_index, float(label_smoothing)
    )
    return loss
