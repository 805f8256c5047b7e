"""Multi-head attention on ``F.scaled_dot_product_attention``, with an incremental KV cache.

Self-attention projects queries, keys and values with one fused linear layer. In
cross-attention the *decoder* supplies the queries and the *encoder output* (memory) the keys
and values; those keys and values depend only on the source, so they are computed once per
source and reused at every decoding step.

Two caches: :class:`KVCache` (the default) hands attention exactly the positions written so far,
so every step has new shapes; :class:`StaticKVCache` keeps every shape fixed (all ``max_len``
keys, a mask hiding the unwritten ones, the write position a tensor), so that a decoding step
compiled with ``torch.compile`` is compiled once, whatever the length.

Masks are boolean and say where attention is *allowed* (True), broadcastable to
``[B, num_heads, T, S]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.nn.positional import RotaryEmbedding


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


class StaticKVCache:
    """A self-attention KV cache of fixed shape, for decoding steps compiled with ``torch.compile``.

    The buffers ``[batch_size, num_heads, max_len, head_dim]`` are allocated (zeroed) at
    construction and never replaced: writes, reorders and the write position :attr:`position`
    (a 0-dim long tensor, never a Python int) all change tensors in place. Attention then runs
    over all ``max_len`` keys with the mask :meth:`allowed` hiding the ones not written yet, so
    no shape and no Python value depends on the length decoded, and a compiled step does not
    recompile per length. The results equal :class:`KVCache`'s up to float rounding.

    Writing past ``max_len`` raises a ``ValueError`` in eager mode (the check reads
    :attr:`position` on the host: a device sync on accelerators). Inside ``torch.compile`` the
    check is skipped, as reading the position would break the graph; the caller bounds the
    number of steps by ``max_len`` there.

    Args:
        max_len: the most positions the cache holds.
        batch_size: rows ``B``; fixed, so :meth:`reorder` keeps ``B`` rows.
        num_heads: heads ``H``.
        head_dim: width of a head ``Dh``.
        dtype: of the keys and values (what the projections produce, under autocast too).
        device: where the buffers live.

    Raises:
        ValueError: If ``max_len``, ``batch_size``, ``num_heads`` or ``head_dim`` is below 1.

    Examples:
        >>> import torch
        >>> cache = StaticKVCache(max_len=4, batch_size=1, num_heads=1, head_dim=2)
        >>> keys, values = cache.append(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
        >>> keys.shape, cache.position
        (torch.Size([1, 1, 4, 2]), tensor(2))
        >>> cache.allowed(1)  # the next query sees the two positions written and itself
        tensor([[ True,  True,  True, False]])
    """

    def __init__(
        self,
        *,
        max_len: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        sizes = {"max_len": max_len, "batch_size": batch_size, "num_heads": num_heads, "head_dim": head_dim}
        for name, size in sizes.items():
            if size < 1:
                raise ValueError(f"`{name}` must be at least 1, got {size}")
        self.max_len = max_len
        # Zeros, not empty: a hidden key still enters q @ k (then masked), and NaN garbage would survive that.
        self.keys = torch.zeros(batch_size, num_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device)

    @property
    def length(self) -> int:
        """How many positions have been written (reads :attr:`position` on the host)."""
        return int(self.position)

    def allowed(self, length: int, *, causal: bool = True) -> Tensor:
        """Which keys the next ``length`` queries may see: ``[length, max_len]`` bool, True where allowed.

        Query ``i`` (absolute position ``position + i``) sees the keys up to ``position + i``
        when ``causal``, else all of the ``length`` new ones; never a slot not yet written.
        Call it before :meth:`append` moves the position.
        """
        ends = self.position + torch.arange(1, length + 1, device=self.position.device)  # (t,)
        if not causal:
            ends = ends[-1:]
        return self._slots < ends[:, None]

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``[B, H, t, Dh]`` keys and values at the position; return the whole buffers ``[B, H, max_len, Dh]``.

        Raises:
            ValueError: If the shapes do not fit the buffers, or (eager mode only) the write
                goes past ``max_len``.
        """
        batch, heads, length, head_dim = keys.shape
        if (batch, heads, head_dim) != (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3]):
            raise ValueError(
                f"keys of shape {tuple(keys.shape)} do not fit a static KV cache of shape {tuple(self.keys.shape)}"
            )
        if not torch.compiler.is_compiling() and (end := int(self.position) + length) > self.max_len:
            raise ValueError(f"the static KV cache holds {self.max_len} positions, {end} were written")
        index = self.position + torch.arange(length, device=self.position.device)
        self.keys.index_copy_(2, index, keys.to(self.keys.dtype))
        self.values.index_copy_(2, index, values.to(self.values.dtype))
        self.position.add_(length)
        return self.keys, self.values

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (``[B]``), e.g. the beams that survive a beam-search step, in place.

        Raises:
            ValueError: If ``index`` is not one-dimensional of length ``B``.
        """
        if index.shape != self.keys.shape[:1]:
            raise ValueError(
                f"`index` must have shape ({self.keys.shape[0]},) (the static cache's batch), got {tuple(index.shape)}"
            )
        self.keys.copy_(self.keys.index_select(0, index))
        self.values.copy_(self.values.index_select(0, index))


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

    Examples:
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
        cache: KVCache | StaticKVCache | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> Tensor:
        """Attend from ``x``.

        Args:
            x: ``[B, T, D]`` queries (and, in self-attention, keys and values).
            memory: ``[B, S, D]`` encoder output, for cross-attention.
            memory_kv: ``memory`` already projected by :meth:`memory_kv` (it wins over ``memory``).
            mask: bool, True where allowed, broadcastable to ``[B, H, T, S]``.
            is_causal: each position attends only to itself and earlier ones (self-attention).
            cache: self-attention's keys and values so far; ``x`` holds the next positions. With a
                :class:`StaticKVCache`, attention runs over all its ``max_len`` slots, ``mask`` (then
                broadcastable to ``[B, H, T, max_len]``) combined with the cache's own.
            rotary: rotate the queries and the new keys by their positions (self-attention only):
                ``x``'s first position is the cache's length, or 0 without a cache. The cache
                holds keys already rotated.

        Returns:
            ``[B, T, D]``.

        Raises:
            ValueError: If cross-attention gets neither ``memory`` nor ``memory_kv``, or gets ``rotary``.
        """
        if self.cross:
            if rotary is not None:
                raise ValueError("rotary embeddings apply to self-attention only, not to cross-attention")
            query = self._heads(self.q_proj(x))
            if memory_kv is None:
                if memory is None:
                    raise ValueError("cross-attention needs `memory` or `memory_kv`")
                memory_kv = self.memory_kv(memory)
            keys, values = memory_kv
            is_causal = False
        else:
            query, keys, values = (self._heads(part) for part in self.qkv_proj(x).chunk(3, dim=-1))
            if rotary is not None:
                # x's first position: the static cache's tensor position (never read on the host), else an int.
                offset = cache.position if isinstance(cache, StaticKVCache) else cache.length if cache else 0
                query, keys = rotary(query, offset=offset), rotary(keys, offset=offset)
            if isinstance(cache, StaticKVCache):
                allowed = cache.allowed(x.shape[1], causal=is_causal)
                keys, values = cache.append(keys, values)
                return self._attend(query, keys, values, allowed if mask is None else mask & allowed, False)
            cached = 0
            if cache is not None:
                cached = cache.length
                keys, values = cache.append(keys, values)
            # One new position may see every earlier one. Otherwise position i of x (absolute
            # position cached + i) sees the keys up to cached + i.
            if x.shape[1] == 1:  # a branch, not a value: with dynamic shapes a guard, never a SymBool
                is_causal = False
            if is_causal and (mask is not None or cached > 0):
                causal = torch.ones(x.shape[1], keys.shape[2], dtype=torch.bool, device=x.device).tril(cached)
                mask = causal if mask is None else mask & causal
                is_causal = False
        return self._attend(query, keys, values, mask, is_causal)

    def _attend(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        out = F.scaled_dot_product_attention(
            query, keys, values,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, H, T, Dh)
        batch, _, length, _ = query.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))
