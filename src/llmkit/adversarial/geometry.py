"""The epsilon ball, as pure functions on lists of per-site tensors.

A perturbation is a list of ``delta`` tensors, one per site (an embedding's output, a batch
tensor), each with the batch on axis 0: ``[B, ...]``. Budgets are per sample, over all of a
sample's tensors together: ``"l2"`` bounds ``sqrt(sum_sites ||delta_b||^2) <= epsilon``,
``"linf"`` bounds ``|delta_i| <= epsilon``. A mask (``[B, ..., 1]`` of 0/1, or ``None``) marks
the entries that may move: padding has mask 0 and never moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llmkit.adversarial.settings import NORMS

TINY = 1e-12
"""Floor of a norm that is divided by (a zero gradient moves nothing, and makes no NaN)."""


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


def sample_norms(tensors: Sequence[Tensor]) -> Tensor:
    """The l2 norm of each sample over all ``tensors`` together.

    Args:
        tensors: ``[B, ...]`` each (shapes may differ after the batch axis).

    Returns:
        ``[B]``, in float32 (or wider).

    Raises:
        ValueError: If ``tensors`` is empty or the tensors disagree on their batch axis.

    Examples:
        >>> sample_norms([torch.tensor([[3.0], [0.0]]), torch.tensor([[[4.0]], [[1.0]]])])
        tensor([5., 1.])
    """
    sizes = {t.shape[0] if t.ndim else None for t in tensors}
    if len(sizes) != 1 or None in sizes:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"per-sample norms need tensors sharing a first (batch) axis, got shapes {shapes}")
    return torch.stack([t.float().pow(2).flatten(1).sum(1) for t in tensors]).sum(0).sqrt()


def _expand(per_sample: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]``, broadcastable against ``like`` and of its dtype."""
    return per_sample.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def apply_masks(tensors: Sequence[Tensor], masks: Sequence[Tensor | None]) -> list[Tensor]:
    """Each tensor times its mask (``None``: unmasked).

    Examples:
        >>> apply_masks([torch.ones(1, 2, 1)], [torch.tensor([[[1.0], [0.0]]])])[0].flatten().tolist()
        [1.0, 0.0]
    """
    return [t if m is None else t * m for t, m in zip(tensors, masks, strict=True)]


def project(deltas: Sequence[Tensor], *, epsilon: float, norm: str) -> list[Tensor]:
    """The nearest point of the epsilon ball: l2 rescales a sample's tensors, linf clips each entry.

    Args:
        deltas: ``[B, ...]`` each.
        epsilon: the ball's radius.
        norm: ``"l2"`` or ``"linf"``.

    Returns:
        The projected ``deltas``, shapes unchanged.

    Examples:
        >>> project([torch.tensor([[3.0, 4.0], [0.3, 0.4]])], epsilon=1.0, norm="l2")[0]
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
        >>> project([torch.tensor([[3.0, -0.5]])], epsilon=1.0, norm="linf")[0]
        tensor([[ 1.0000, -0.5000]])
    """
    _check_norm(norm)
    if norm == "linf":
        return [d.clamp(-epsilon, epsilon) for d in deltas]
    factor = (epsilon / sample_norms(deltas).clamp_min(TINY)).clamp(max=1.0)
    return [d * _expand(factor, d) for d in deltas]


def ascent_step(
    deltas: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    *,
    size: float,
    epsilon: float,
    norm: str,
    masks: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """``project(delta + size * direction(g))``: one step of steepest ascent in the norm's geometry.

    The direction is ``g / ||g||`` per sample over all sites (l2) or ``sign(g)`` (linf), taken
    of the masked gradients; a site with no gradient (``None``) counts as zero.

    Args:
        deltas: ``[B, ...]`` each, the current point.
        grads: one gradient per delta (same shapes) or ``None``.
        size: the step's length.
        epsilon: the ball's radius.
        norm: ``"l2"`` or ``"linf"``.
        masks: one mask per delta (``None``: nothing masked).

    Returns:
        The new ``deltas``, detached from the gradients' graph.

    Examples:
        >>> ascent_step([torch.zeros(1, 2)], [torch.tensor([[3.0, 4.0]])], size=0.5, epsilon=1.0, norm="l2")[0]
        tensor([[0.3000, 0.4000]])
        >>> ascent_step([torch.zeros(1, 2)], [torch.tensor([[3.0, -4.0]])], size=2.0, epsilon=1.0, norm="linf")[0]
        tensor([[ 1., -1.]])
    """
    _check_norm(norm)
    with torch.no_grad():
        g = [torch.zeros_like(d) if gr is None else gr.to(d.dtype) for d, gr in zip(deltas, grads, strict=True)]
        g = apply_masks(g, masks if masks is not None else [None] * len(g))
        if norm == "l2":
            norms = sample_norms(g).clamp_min(TINY)
            moved = [d + size * gr / _expand(norms, gr) for d, gr in zip(deltas, g, strict=True)]
        else:
            moved = [d + size * gr.sign() for d, gr in zip(deltas, g, strict=True)]
        return project(moved, epsilon=epsilon, norm=norm)


def random_start(
    like: Sequence[Tensor],
    *,
    epsilon: float,
    norm: str,
    masks: Sequence[Tensor | None] | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """A random point of the epsilon ball, shaped as ``like`` (zero where masked).

    linf: uniform in the cube ``[-epsilon, epsilon]``; l2: a uniformly random direction (of the
    masked cube draw) at a radius uniform in ``[0, epsilon]`` per sample.

    Args:
        like: ``[B, ...]`` each: the shapes, dtypes and devices to draw.
        epsilon: the ball's radius.
        norm: ``"l2"`` or ``"linf"``.
        masks: one mask per tensor (``None``: nothing masked).
        generator: the random generator (``None``: torch's global one).

    Returns:
        One tensor per ``like``.

    Examples:
        >>> generator = torch.Generator().manual_seed(0)
        >>> start = random_start([torch.zeros(4, 3)], epsilon=0.5, norm="l2", generator=generator)
        >>> bool(sample_norms(start).max() <= 0.5)
        True
    """
    _check_norm(norm)
    with torch.no_grad():
        draws = [
            (2 * torch.rand(d.shape, generator=generator, device=d.device, dtype=d.dtype) - 1) * epsilon for d in like
        ]
        draws = apply_masks(draws, masks if masks is not None else [None] * len(draws))
        if norm == "l2":
            norms = sample_norms(draws)
            radius = epsilon * torch.rand(norms.shape, generator=generator, device=norms.device)
            draws = [d * _expand(radius / norms.clamp_min(TINY), d) for d in draws]
        return draws


def clamp_to_range(bases: Sequence[Tensor], deltas: Sequence[Tensor], low: float, high: float) -> list[Tensor]:
    """The ``deltas`` for which ``base + delta`` stays in ``[low, high]`` (inputs' valid range).

    Examples:
        >>> clamp_to_range([torch.tensor([0.9, 0.1])], [torch.tensor([0.5, -0.5])], 0.0, 1.0)[0]
        tensor([ 0.1000, -0.1000])
    """
    return [(b + d).clamp(low, high) - b for b, d in zip(bases, deltas, strict=True)]
