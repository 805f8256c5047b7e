"""Multi-head attention on ``F.scaled_dot_product_attention``, with an incremental KV cache.

Self-attention projects queries, keys and values with one fused linear layer. In
cross-attention the *decoder* supplies the queries and the *encoder output* (memory) the keys
and values; those keys and values depend only on the source, so they are computed once per
source and reused at every decoding step.

Masks are boolean and say where attention is *allowed* (True), broadcastable to
``[B, num_heads, T, S]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padding_mask_to_allowed(padding: Tensor) -> Tensor:
    """Turn a key padding mask into an attention mask that never leaves a row without keys.

    Args:
        padding: ``[B, S]`` bool, True at padding positions.

    Returns:
        ``[B, 1, 1, S]`` bool, True where attention is allowed. A row whose keys are all padding
        may attend to every key instead (its output is then meaningless but finite, where a
        softmax over no key at all would give NaN).
    """
    allowed = ~padding
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None, None, :]


class KVCache:
    """Keys and values of the positions decoded so far, for one self-attention layer.

    The buffers for ``max_len`` positions are allocated at the first :meth:`append`, in the
    dtype and on the device of what is appended (under autocast, the dtype the projections
    produce), and each later append writes in place.

    Args:
        max_len: the most positions the cache will hold.
    """

    def __init__(self, *, max_len: int) -> None:
        self.max_len = max_len
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``[B, H, t, Dh]`` keys and values; return all cached so far, ``[B, H, length, Dh]``."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions, {end} were written")
        if self.keys is None or self.values is None:
            batch, heads, _, head_dim = keys.shape
            self.keys = keys.new_empty(batch, heads, self.max_len, head_dim)
            self.values = values.new_empty(batch, heads, self.max_len, head_dim)
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (``[B]``), e.g. the beams that survive a beam-search step."""
        if self.keys is not None and self.values is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention ("Attention Is All You Need", section 3.2).

    Args:
        embed_dim: model width ``D``; must be divisible by ``num_heads``.
        num_heads: number of heads ``H``.
        dropout: dropout on the attention weights, in training.
        bias: whether the projections have biases.
        cross: cross-attention (queries from ``x``, keys and values from ``memory``) instead of
            self-attention.

    Raises:
        ValueError: If ``embed_dim`` is not divisible by ``num_heads``.

    Example:
        >>> import torch
        >>> attention = MultiHeadAttention(embed_dim=8, num_heads=2)
        >>> attention(torch.randn(3, 5, 8), is_causal=True).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, cross: bool = False):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.cross = dropout, cross
        if cross:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.kv_proj = nn.Linear(embed_dim, 2 * embed_dim, bias=bias)
        else:
            self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Project the encoder output once: keys and values, each ``[B, H, S, Dh]``."""
        keys, values = self.kv_proj(memory).chunk(2, dim=-1)
        return self._heads(keys), self._heads(values)

    def forward(
        self,
        x: Tensor,
        *,
        memory: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from ``x``.

        Args:
            x: ``[B, T, D]`` queries (and, in self-attention, keys and values).
            memory: ``[B, S, D]`` encoder output, for cross-attention.
            memory_kv: ``memory`` already projected by :meth:`memory_kv` (it wins over ``memory``).
            mask: bool, True where allowed, broadcastable to ``[B, H, T, S]``.
            is_causal: each position attends only to itself and earlier ones (self-attention).
            cache: self-attention's keys and values so far; ``x`` holds the next positions.

        Returns:
            ``[B, T, D]``.
        """
        if self.cross:
            query = self._heads(self.q_proj(x))
            if memory_kv is None:
                if memory is None:
                    raise ValueError("cross-attention needs `memory` or `memory_kv`")
                memory_kv = self.memory_kv(memory)
            keys, values = memory_kv
            is_causal = False
        else:
            query, keys, values = (self._heads(part) for part in self.qkv_proj(x).chunk(3, dim=-1))
            cached = 0
            if cache is not None:
                cached = cache.length
                keys, values = cache.append(keys, values)
            # One new position may see every earlier one. Otherwise position i of x (absolute
            # position cached + i) sees the keys up to cached + i.
            is_causal = is_causal and x.shape[1] > 1
            if is_causal and (mask is not None or cached > 0):
                causal = torch.ones(x.shape[1], keys.shape[2], dtype=torch.bool, device=x.device).tril(cached)
                mask = causal if mask is None else mask & causal
                is_causal = False
        out = F.scaled_dot_product_attention(
            query, keys, values,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.embed_dim))
