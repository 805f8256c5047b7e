"""Pure-torch building blocks, no Lightning.

Attention with a KV cache, positional encoding, encoder and decoder layers and stacks.
"""

from llmkit.nn.attention import KVCache, MultiHeadAttention, padding_mask_to_allowed
from llmkit.nn.positional import SinusoidalPositionalEncoding
from llmkit.nn.transformer import Decoder, DecoderLayer, DecoderState, Encoder, EncoderLayer, FeedForward

__all__ = [
    "Decoder",
    "DecoderLayer",
    "DecoderState",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "KVCache",
    "MultiHeadAttention",
    "SinusoidalPositionalEncoding",
    "padding_mask_to_allowed",
]
