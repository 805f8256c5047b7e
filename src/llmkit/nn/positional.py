"""Positions: sinusoidal encoding ("Attention Is All You Need", section 3.5) and rotary embeddings (RoPE)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class SinusoidalPositionalEncoding(nn.Module):
    """Add ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(...)`` to the input.

    The table is a non-trainable buffer that is not saved in checkpoints (it is a function of
    ``d_model`` and ``max_len``).

    Args:
        d_model: model width.
        max_len: the most positions encoded.

    Examples:
        >>> import torch
        >>> encoding = SinusoidalPositionalEncoding(d_model=4, max_len=10)
        >>> encoding(torch.zeros(1, 2, 4))[0, 1]  # position 1: sin(1), cos(1), sin(0.01), cos(0.01)
        tensor([0.8415, 0.5403, 0.0100, 0.9999])
    """

    pe: Tensor

    def __init__(self, *, d_model: int, max_len: int) -> None:
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * frequency)
        pe[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
        self.register_buffer("pe", pe.float(), persistent=False)

    def forward(self, x: Tensor, *, offset: int | Tensor = 0) -> Tensor:
        """Add the encodings of positions ``offset .. offset + T - 1`` to ``x`` (``[B, T, D]``).

        Args:
            x: ``[B, T, D]``.
            offset: the position of ``x[:, 0]``: an int, or a 0-dim integer tensor (a
                :class:`~llmkit.nn.StaticKVCache`'s ``position``), whose rows are gathered on its
                device without reading it on the host, so a compiled step does not depend on its value.

        Raises:
            ValueError: If a tensor ``offset`` is not a 0-dim integer tensor.

        Examples:
            >>> import torch
            >>> encoding = SinusoidalPositionalEncoding(d_model=4, max_len=10)
            >>> x = torch.zeros(1, 2, 4)
            >>> torch.equal(encoding(x, offset=torch.tensor(3)), encoding(x, offset=3))
            True
        """
        _check_offset(offset)
        return x + _rows(self.pe, offset, x.shape[1]).to(x.dtype)


def _check_offset(offset: int | Tensor) -> None:
    if isinstance(offset, Tensor) and (
        offset.ndim != 0 or offset.is_floating_point() or offset.is_complex() or offset.dtype == torch.bool
    ):
        raise ValueError(
            f"a tensor `offset` must be a 0-dim integer tensor, got shape {tuple(offset.shape)} and {offset.dtype}"
        )


def _rows(table: Tensor, offset: int | Tensor, length: int) -> Tensor:
    """Rows ``offset .. offset + length - 1`` of ``table``; a tensor offset is gathered without a host read."""
    if isinstance(offset, Tensor):
        rows = offset + torch.arange(length, device=offset.device)
        return table.index_select(0, rows.to(table.device))
    return table[offset : offset + length]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair ``(x1[i], x2[i])`` of ``x``'s halves by the angles of ``cos``, ``sin`` (``[T, Dh/2]``)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    first, second = out[..., :half], out[..., half:]
    # Written into the halves of one buffer: two passes over the elements instead of a cat, a negation,
    # two products and a sum.
    torch.mul(x1, cos, out=first).addcmul_(x2, sin, value=-1.0)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=second).addcmul_(x1, sin)  # x2 cos + x1 sin
    return out


class _Rotation(torch.autograd.Function):
    """``_rotate`` with its gradient: a rotation's transpose is the rotation by the opposite angle."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad.contiguous(), cos, -sin), None, None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE; Su et al., 2021), as GPT-NeoX and LLaMA apply it to queries and keys.

    Each head's width is split in two halves ``(x1, x2)``; position ``p`` rotates the pair
    ``(x1[i], x2[i])`` by the angle ``p * base^(-2i / head_dim)``:
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = (-x2, x1)``. The dot product of a
    rotated query and key then depends only on their distance. The cosines and sines of every
    position up to ``max_len`` are computed once (in float64, stored in float32) as buffers that
    are not saved in checkpoints. The rotation is one autograd node (its backward is the rotation
    by the opposite angle), two passes over the elements each way; differentiable once.

    Args:
        head_dim: the width of one head ``Dh``; must be even.
        max_len: the most positions rotated.
        base: the wavelength base (10,000 in the paper and LLaMA).

    Raises:
        ValueError: If ``head_dim`` is odd or below 2, ``max_len`` below 1, or ``base`` not above 1.

    Examples:
        >>> import torch
        >>> rotary = RotaryEmbedding(head_dim=4, max_len=8)
        >>> q = torch.randn(1, 2, 3, 4)  # [B, H, T, Dh]
        >>> rotary(q).shape
        torch.Size([1, 2, 3, 4])
        >>> torch.allclose(rotary(q)[..., 0, :], q[..., 0, :])  # position 0 is not rotated
        True
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, *, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"rotary embeddings need an even `head_dim` >= 2, got {head_dim}")
        if max_len < 1:
            raise ValueError(f"`max_len` must be at least 1, got {max_len}")
        if not base > 1.0:
            raise ValueError(f"`base` must be above 1, got {base}")
        self.head_dim, self.max_len, self.base = head_dim, max_len, base
        inverse_frequency = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inverse_frequency)  # (max_len, Dh/2)
        # One angle per pair (x1[i], x2[i]).
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, *, offset: int | Tensor = 0) -> Tensor:
        """Rotate ``x`` ``[B, H, T, Dh]`` as positions ``offset .. offset + T - 1``.

        Args:
            x: queries or keys, ``[B, H, T, Dh]``.
            offset: the position of ``x[:, :, 0]``: an int, or a 0-dim integer tensor (a
                :class:`~llmkit.nn.StaticKVCache`'s ``position``), read on its device, never on the host.

        Raises:
            ValueError: If a tensor ``offset`` is not a 0-dim integer tensor, or ``x``'s last
                dimension is not ``head_dim``.
        """
        _check_offset(offset)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"rotary embeddings of head_dim={self.head_dim} got inputs of width {x.shape[-1]}")
        length = x.shape[-2]
        cos = _rows(self.cos, offset, length).to(x.dtype)  # (T, Dh/2), broadcast over B and H
        sin = _rows(self.sin, offset, length).to(x.dtype)
        if torch.compiler.is_compiling():
            # Dynamo refuses `out=` views; a compiler fuses the plain formula into one pass anyway.
            half = self.head_dim // 2
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return _rotate(x, cos, sin)  # decoding: no autograd node to build
        rotated: Tensor = _Rotation.apply(x, cos, sin)  # type: ignore[no-untyped-call]
        return rotated

    def extra_repr(self) -> str:  # noqa: D102
        return f"head_dim={self.head_dim}, max_len={self.max_len}, base={self.base}"
