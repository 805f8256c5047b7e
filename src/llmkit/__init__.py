"""llmkit: Lightning components for people who build language models.

- :class:`llmkit.Seq2SeqTransformer`: the encoder-decoder of "Attention Is All You Need".
- :class:`llmkit.CausalLMTransformer`: a decoder-only language model (GPT-2/LLaMA layout) that samples.
- :class:`llmkit.VAE`: a variational autoencoder that generates, denoises and estimates ``log p(x)``.
- :mod:`llmkit.callbacks`: ``KnowledgeDistillation``, ``QuantizationAwareTraining``, for any LightningModule.
- :mod:`llmkit.metrics`: ``BLEUScore``, ``ROUGEScore``, ``Perplexity`` (and ``.functional``).
- :mod:`llmkit.data`: ``NumberWordsDataModule`` (translation) and ``DigitsDataModule`` (8x8 images),
  embedded tasks that need no download.
- :mod:`llmkit.nn`: the pure-torch building blocks.

The modules load on first use, so that ``import llmkit.metrics`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {"CausalLMTransformer": "llmkit.models", "Seq2SeqTransformer": "llmkit.models", "VAE": "llmkit.models"}

if TYPE_CHECKING:
    from llmkit.models import VAE, CausalLMTransformer, Seq2SeqTransformer

__all__ = ["VAE", "CausalLMTransformer", "Seq2SeqTransformer", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
