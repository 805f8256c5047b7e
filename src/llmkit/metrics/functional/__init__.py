"""Functional forms of llmkit's metrics: one call scores a whole corpus."""

from llmkit.metrics.functional.bleu import bleu_score
from llmkit.metrics.functional.perplexity import perplexity
from llmkit.metrics.functional.rouge import rouge_score

__all__ = ["bleu_score", "perplexity", "rouge_score"]
