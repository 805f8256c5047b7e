"""Pure-torch building blocks, no Lightning.

Attention with a KV cache (dynamic, or static for ``torch.compile``), positional encoding,
encoder and decoder layers and stacks, a fused label-smoothed cross-entropy; the VAE's MLP and
convolutional encoders and decoders.
"""

from llmkit.nn.attention import KVCache, MultiHeadAttention, StaticKVCache, padding_mask_to_allowed
from llmkit.nn.loss import label_smoothed_cross_entropy
from llmkit.nn.positional import SinusoidalPositionalEncoding
from llmkit.nn.transformer import Decoder, DecoderLayer, DecoderState, Encoder, EncoderLayer, FeedForward
from llmkit.nn.vae import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

__all__ = [
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
    "SinusoidalPositionalEncoding",
    "StaticKVCache",
    "label_smoothed_cross_entropy",
    "padding_mask_to_allowed",
]
