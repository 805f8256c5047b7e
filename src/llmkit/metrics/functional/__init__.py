"""Functional forms of llmkit's metrics: one call scores a whole corpus."""

from llmkit.metrics.functional._perplexity import perplexity
from llmkit.metrics.functional.bleu import bleu_score
from llmkit.metrics.functional.chrf import chrf_score
from llmkit.metrics.functional.qa import qa_score
from llmkit.metrics.functional.rouge import rouge_score
from llmkit.metrics.functional.ter import ter_score

__all__ = ["bleu_score", "chrf_score", "perplexity", "qa_score", "rouge_score", "ter_score"]
