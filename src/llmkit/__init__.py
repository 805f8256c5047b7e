"""llmkit: Lightning components for people who build language models.

The metrics live in :mod:`llmkit.metrics` (``BLEUScore``, ``ROUGEScore``, ``Perplexity``) and
their functional forms in :mod:`llmkit.metrics.functional`.
"""

__version__ = "0.1.0"
