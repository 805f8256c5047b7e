"""torchmetrics Metrics for language models: BLEU, ROUGE and perplexity."""

from llmkit.metrics.bleu import BLEUScore
from llmkit.metrics.perplexity import Perplexity
from llmkit.metrics.rouge import ROUGEScore

__all__ = ["BLEUScore", "Perplexity", "ROUGEScore"]
