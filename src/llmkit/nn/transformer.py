"""Encoder and decoder of "Attention Is All You Need" (Vaswani et al., 2017), and the decoder-only stack.

Post-LN (the paper, ``norm_first=False``): ``x = norm(x + dropout(sublayer(x)))``.
Pre-LN (``norm_first=True``): ``x = x + dropout(sublayer(norm(x)))``, with a final norm after
the stack. Parameter names follow ``torch.nn.Transformer``'s where they mean the same.

The decoder-only stack (:class:`CausalDecoder`, GPT-2 and nanoGPT's) is pre-LN blocks of masked
self-attention and feed-forward, without cross-attention, optionally with rotary positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.nn.attention import KVCache, MultiHeadAttention, StaticKVCache
from llmkit.nn.positional import RotaryEmbedding


def swiglu(x: Tensor) -> Tensor:
    """SwiGLU (Shazeer, 2020): ``silu(gate) * up`` of the two halves ``(gate, up)`` of ``x``'s last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "swiglu": swiglu}
#: Gated activations take twice the inner width from ``linear1`` (the gate and the value).
GATED = frozenset({"swiglu"})


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class FeedForward(nn.Module):
    """Position-wise feed-forward network: ``linear2(dropout(activation(linear1(x))))``.

    Args:
        d_model: model width.
        dim_feedforward: inner width.
        dropout: dropout after the activation.
        activation: ``"relu"`` (the paper), ``"gelu"``, or ``"swiglu"`` (LLaMA's gated unit: ``linear1``
            then gives ``2 * dim_feedforward`` features, the gate and the value).
    """

    def __init__(self, *, d_model: int, dim_feedforward: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward * (2 if activation in GATED else 1))
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, T, D]``."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each with a residual connection and layer norm.

    Args:
        d_model: model width.
        num_heads: attention heads.
        dim_feedforward: inner width of the feed-forward network.
        dropout: dropout on attention weights and on each sublayer's output.
        activation: ``"relu"`` or ``"gelu"``.
        norm_first: pre-LN instead of the paper's post-LN.
        layer_norm_eps: layer norms' epsilon.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(embed_dim=d_model, num_heads=num_heads, dropout=dropout)
        self.feed_forward = FeedForward(
            d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation
        )
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """``x``: ``[B, S, D]``; ``mask``: bool ``[B, 1, 1, S]``, True where allowed."""
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), mask=mask))
            return x + self.dropout2(self.feed_forward(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self.self_attn(x, mask=mask)))
        return self.norm2(x + self.dropout2(self.feed_forward(x)))


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output, then feed-forward.

    In cross-attention the decoder supplies the queries and the encoder output the keys and
    values. Arguments as :class:`EncoderLayer`.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(embed_dim=d_model, num_heads=num_heads, dropout=dropout)
        self.cross_attn = MultiHeadAttention(embed_dim=d_model, num_heads=num_heads, dropout=dropout, cross=True)
        self.feed_forward = FeedForward(
            d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation
        )
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self,
        x: Tensor,
        *,
        memory_kv: tuple[Tensor, Tensor],
        memory_mask: Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
    ) -> Tensor:
        """Decode.

        Args:
            x: ``[B, T, D]`` target positions (the next ones after ``cache``, if given).
            memory_kv: this layer's projected encoder output (``cross_attn.memory_kv(memory)``).
            memory_mask: bool ``[B, 1, 1, S]``, True where a source position may be attended.
            cache: the self-attention keys and values of earlier positions.
        """
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), is_causal=True, cache=cache))
            x = x + self.dropout2(self.cross_attn(self.norm2(x), memory_kv=memory_kv, mask=memory_mask))
            return x + self.dropout3(self.feed_forward(self.norm3(x)))
        x = self.norm1(x + self.dropout1(self.self_attn(x, is_causal=True, cache=cache)))
        x = self.norm2(x + self.dropout2(self.cross_attn(x, memory_kv=memory_kv, mask=memory_mask)))
        return self.norm3(x + self.dropout3(self.feed_forward(x)))


def _final_norm(d_model: int, *, norm_first: bool, eps: float) -> nn.LayerNorm | None:
    # Pre-LN stacks end with a norm (their last residual sum is never normalised); post-LN ones do not.
    return nn.LayerNorm(d_model, eps=eps) if norm_first else None


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` (with a final layer norm when pre-LN).

    Args:
        num_layers: how many layers; the other arguments are each layer's (:class:`EncoderLayer`).

    Examples:
        >>> import torch
        >>> encoder = Encoder(num_layers=2, d_model=8, num_heads=2, dim_feedforward=16, dropout=0.0)
        >>> encoder(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(
        self,
        *,
        num_layers: int,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        layer_args: dict[str, Any] = {
            "d_model": d_model, "num_heads": num_heads, "dim_feedforward": dim_feedforward, "dropout": dropout,
            "activation": activation, "norm_first": norm_first, "layer_norm_eps": layer_norm_eps,
        }
        self.layers = nn.ModuleList(EncoderLayer(**layer_args) for _ in range(num_layers))
        self.norm = _final_norm(d_model, norm_first=norm_first, eps=layer_norm_eps)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """``[B, S, D] -> [B, S, D]``; ``mask`` bool ``[B, 1, 1, S]``, True where allowed."""
        for layer in self.layers:
            x = layer(x, mask=mask)
        return self.norm(x) if self.norm is not None else x


class DecoderState:
    """What incremental decoding keeps between steps.

    Per layer the self-attention KV cache and the projected encoder output, and the source mask.

    Args:
        caches: one :class:`KVCache` per decoder layer, or one :class:`StaticKVCache` per layer
            (for a decoding step compiled with ``torch.compile``: see :meth:`Decoder.init_state`).
        memory_kv: per layer, the encoder output's keys and values.
        memory_mask: bool ``[B, 1, 1, S]``.
    """

    def __init__(
        self,
        caches: Sequence[KVCache] | Sequence[StaticKVCache],
        memory_kv: list[tuple[Tensor, Tensor]],
        memory_mask: Tensor | None,
    ):
        self.caches, self.memory_kv, self.memory_mask = caches, memory_kv, memory_mask

    @property
    def static(self) -> bool:
        """Whether the caches are :class:`StaticKVCache` (fixed shapes, tensor position)."""
        return bool(self.caches) and isinstance(self.caches[0], StaticKVCache)

    @property
    def position(self) -> int | Tensor:
        """Where the next position goes: an int with :class:`KVCache`, the 0-dim tensor with :class:`StaticKVCache`.

        Pass the tensor on (e.g. as the positional encoding's ``offset``) without reading it, so
        that a compiled step does not depend on its value.
        """
        if not self.caches:
            return 0
        cache = self.caches[0]
        return cache.position if isinstance(cache, StaticKVCache) else cache.length

    @property
    def length(self) -> int:
        """How many positions have been decoded (with static caches, a host read of :attr:`position`)."""
        return self.caches[0].length if self.caches else 0

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` of every cache (beam search); static caches copy in place and keep ``B`` rows.

        The encoder side is the same for every beam of one source, so it needs no reordering
        as long as ``index`` keeps each row within its source's beams.
        """
        for cache in self.caches:
            cache.reorder(index)


class Decoder(nn.Module):
    """A stack of :class:`DecoderLayer` (with a final layer norm when pre-LN).

    Args:
        num_layers: how many layers; the other arguments are each layer's (:class:`DecoderLayer`).

    Examples:
        >>> import torch
        >>> decoder = Decoder(num_layers=2, d_model=8, num_heads=2, dim_feedforward=16, dropout=0.0)
        >>> decoder(torch.randn(3, 4, 8), memory=torch.randn(3, 6, 8)).shape
        torch.Size([3, 4, 8])
    """

    def __init__(
        self,
        *,
        num_layers: int,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        layer_args: dict[str, Any] = {
            "d_model": d_model, "num_heads": num_heads, "dim_feedforward": dim_feedforward, "dropout": dropout,
            "activation": activation, "norm_first": norm_first, "layer_norm_eps": layer_norm_eps,
        }
        self.layers = nn.ModuleList(DecoderLayer(**layer_args) for _ in range(num_layers))
        self.norm = _final_norm(d_model, norm_first=norm_first, eps=layer_norm_eps)

    def _layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each layer's keys and values of the encoder output, computed once per source."""
        return [layer.cross_attn.memory_kv(memory) for layer in self._layers()]

    def init_state(
        self, memory: Tensor, memory_mask: Tensor | None, *, max_len: int, static: bool = False
    ) -> DecoderState:
        """Start incremental decoding of up to ``max_len`` positions over ``memory`` ``[B, S, D]``.

        Args:
            memory: the encoder output ``[B, S, D]``.
            memory_mask: bool ``[B, 1, 1, S]``, True where a source position may be attended.
            max_len: the most positions decoded.
            static: preallocate :class:`StaticKVCache` buffers of ``B x max_len`` positions on
                ``memory``'s device (in the autocast dtype under autocast, else the layers'), with
                a tensor position: every decoding step then has the same shapes, and a step compiled
                with ``torch.compile`` is compiled once. Same results as the default
                :class:`KVCache` (up to float rounding); its ``B`` is fixed for the whole decoding.

        Raises:
            ValueError: If ``max_len`` is below 1 with ``static=True``.

        Examples:
            >>> import torch
            >>> decoder = Decoder(num_layers=1, d_model=8, num_heads=2, dim_feedforward=16, dropout=0.0)
            >>> state = decoder.init_state(torch.randn(3, 6, 8), None, max_len=5, static=True)
            >>> decoder(torch.randn(3, 2, 8), state=state).shape, state.position
            (torch.Size([3, 2, 8]), tensor(2))
        """
        if not static:
            return DecoderState([KVCache(max_len=max_len) for _ in self.layers], self.memory_kv(memory), memory_mask)
        device = memory.device
        autocast = torch.is_autocast_enabled(device.type)
        caches = [
            StaticKVCache(
                max_len=max_len, batch_size=memory.shape[0], num_heads=layer.self_attn.num_heads,
                head_dim=layer.self_attn.head_dim, device=device,
                # What the self-attention projections will produce, hence what the cache holds.
                dtype=torch.get_autocast_dtype(device.type) if autocast else layer.self_attn.qkv_proj.weight.dtype,
            )
            for layer in self._layers()
        ]
        return DecoderState(caches, self.memory_kv(memory), memory_mask)

    def forward(
        self,
        x: Tensor,
        *,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        state: DecoderState | None = None,
    ) -> Tensor:
        """Decode ``x`` (``[B, T, D]``) over ``memory`` (``[B, S, D]``), or incrementally with ``state``."""
        caches: list[KVCache | StaticKVCache | None]
        if state is not None:
            memory_kv, memory_mask, caches = state.memory_kv, state.memory_mask, list(state.caches)
        else:
            if memory is None:
                raise ValueError("the decoder needs `memory` or a `state`")
            memory_kv, caches = self.memory_kv(memory), [None] * len(self.layers)
        for layer, kv, cache in zip(self._layers(), memory_kv, caches, strict=True):
            x = layer(x, memory_kv=kv, memory_mask=memory_mask, cache=cache)
        return self.norm(x) if self.norm is not None else x


class CausalDecoderLayer(nn.Module):
    """A decoder-only block, pre-LN as GPT-2 and nanoGPT: ``x + attn(norm1(x))``, then ``x + ffn(norm2(x))``.

    Masked self-attention (no cross-attention) then feed-forward. Dropout acts on the attention
    weights and on each sublayer's output (GPT-2's residual dropout), not inside the feed-forward.

    Args:
        d_model: model width.
        num_heads: attention heads.
        dim_feedforward: inner width of the feed-forward network.
        dropout: dropout on the attention weights and on each sublayer's output.
        activation: ``"gelu"`` (GPT-2), ``"relu"`` or ``"swiglu"``.
        layer_norm_eps: layer norms' epsilon.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.self_attn = MultiHeadAttention(embed_dim=d_model, num_heads=num_heads, dropout=dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.feed_forward = FeedForward(
            d_model=d_model, dim_feedforward=dim_feedforward, dropout=0.0, activation=activation
        )
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        cache: KVCache | StaticKVCache | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> Tensor:
        """``[B, T, D] -> [B, T, D]``; with ``cache``, ``x`` holds the positions after the cached ones."""
        x = x + self.dropout1(self.self_attn(self.norm1(x), is_causal=True, cache=cache, rotary=rotary))
        return x + self.dropout2(self.feed_forward(self.norm2(x)))


class CausalDecoder(nn.Module):
    """A stack of :class:`CausalDecoderLayer` with a final layer norm: a decoder-only transformer's body.

    Args:
        num_layers: how many layers; the other arguments are each layer's (:class:`CausalDecoderLayer`).
        rotary: rotary position embeddings applied to every layer's queries and keys (``None``:
            positions are the caller's, e.g. added to the token embeddings).

    Examples:
        >>> import torch
        >>> rotary = RotaryEmbedding(head_dim=4, max_len=16)
        >>> decoder = CausalDecoder(num_layers=2, d_model=8, num_heads=2, dim_feedforward=16, dropout=0.0,
        ...                         rotary=rotary)
        >>> x = torch.randn(3, 5, 8)
        >>> state = decoder.init_state(batch_size=3, max_len=6)
        >>> torch.allclose(decoder(x), torch.cat([decoder(x[:, :4], state=state), decoder(x[:, 4:], state=state)], 1),
        ...                atol=1e-6)  # incremental decoding equals the full pass
        True
    """

    def __init__(
        self,
        *,
        num_layers: int,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-5,
        rotary: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CausalDecoderLayer(
                d_model=d_model, num_heads=num_heads, dim_feedforward=dim_feedforward, dropout=dropout,
                activation=activation, layer_norm_eps=layer_norm_eps,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.rotary = rotary

    def _layers(self) -> list[CausalDecoderLayer]:
        return [cast(CausalDecoderLayer, layer) for layer in self.layers]

    def init_state(
        self,
        *,
        batch_size: int,
        max_len: int,
        static: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DecoderState:
        """Start incremental decoding of up to ``max_len`` positions (the prompt's included).

        Args:
            batch_size: rows ``B`` (fixed for a static cache).
            max_len: the most positions decoded.
            static: preallocate :class:`StaticKVCache` buffers (fixed shapes, a tensor position), so
                that a step compiled with ``torch.compile`` is compiled once whatever the length.
            device: where static buffers live (default: the layers').
            dtype: the static buffers' dtype (default: the autocast dtype under autocast, else the layers').

        Raises:
            ValueError: If ``max_len`` or, with ``static=True``, ``batch_size`` is below 1.
        """
        if max_len < 1:
            raise ValueError(f"`max_len` must be at least 1, got {max_len}")
        if not static:
            return DecoderState([KVCache(max_len=max_len) for _ in self.layers], [], None)
        weight = self._layers()[0].self_attn.qkv_proj.weight if self.layers else self.norm.weight
        device = torch.device(device) if device is not None else weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        caches = [
            StaticKVCache(
                max_len=max_len, batch_size=batch_size, num_heads=layer.self_attn.num_heads,
                head_dim=layer.self_attn.head_dim, dtype=dtype, device=device,
            )
            for layer in self._layers()
        ]
        return DecoderState(caches, [], None)

    def forward(self, x: Tensor, *, state: DecoderState | None = None) -> Tensor:
        """Decode ``x`` ``[B, T, D]`` (with ``state``: the positions after the cached ones) into ``[B, T, D]``."""
        caches: Sequence[KVCache | StaticKVCache | None] = (
            state.caches if state is not None else [None] * len(self.layers)
        )
        for layer, cache in zip(self._layers(), caches, strict=True):
            x = layer(x, cache=cache, rotary=self.rotary)
        return self.norm(x)
