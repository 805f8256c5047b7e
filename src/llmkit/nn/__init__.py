"""Pure-torch building blocks, no Lightning.

Attention with a KV cache (dynamic, or static for ``torch.compile``), sinusoidal and rotary
positions, encoder and decoder layers and stacks, the decoder-only stack, a fused label-smoothed
cross-entropy; the VAE's MLP and convolutional encoders and decoders.
"""

from llmkit.nn.attention import KVCache, MultiHeadAttention, StaticKVCache, padding_mask_to_allowed
from llmkit.nn.loss import label_smoothed_cross_entropy
from llmkit.nn.positional import RotaryEmbedding, SinusoidalPositionalEncoding
from llmkit.nn.transformer import (
    CausalDecoder,
    CausalDecoderLayer,
    Decoder,
    DecoderLayer,
    DecoderState,
    Encoder,
    EncoderLayer,
    FeedForward,
    swiglu,
)
from llmkit.nn.vae import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

__all__ = [
    "CausalDecoder",
    "CausalDecoderLayer",
    "ConvDecoder",
    "ConvEncoder",
    "Decoder",
    "DecoderLayer",
    "DecoderState",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "KVCache",
    "MLPDecoder",
    "MLPEncoder",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "StaticKVCache",
    "label_smoothed_cross_entropy",
    "padding_mask_to_allowed",
    "swiglu",
]
