"""Sinusoidal positional encoding ("Attention Is All You Need", section 3.5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalPositionalEncoding(nn.Module):
    """Add ``PE(pos, 2i) = sin(pos / 10000^(2i/d))``, ``PE(pos, 2i+1) = cos(...)`` to the input.

    The table is a non-trainable buffer that is not saved in checkpoints (it is a function of
    ``d_model`` and ``max_len``).

    Args:
        d_model: model width.
        max_len: the most positions encoded.

    Example:
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

        Example:
            >>> import torch
            >>> encoding = SinusoidalPositionalEncoding(d_model=4, max_len=10)
            >>> x = torch.zeros(1, 2, 4)
            >>> torch.equal(encoding(x, offset=torch.tensor(3)), encoding(x, offset=3))
            True
        """
        if isinstance(offset, Tensor):
            if offset.ndim != 0 or offset.is_floating_point() or offset.is_complex() or offset.dtype == torch.bool:
                raise ValueError(
                    "a tensor `offset` must be a 0-dim integer tensor, "
                    f"got shape {tuple(offset.shape)} and {offset.dtype}"
                )
            rows = offset + torch.arange(x.shape[1], device=offset.device)
            return x + self.pe.index_select(0, rows.to(self.pe.device)).to(x.dtype)
        return x + self.pe[offset : offset + x.shape[1]].to(x.dtype)
