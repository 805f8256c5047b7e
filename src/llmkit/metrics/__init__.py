"""torchmetrics Metrics for language models.

- Corpus scores equal to the reference implementations: ``BLEUScore``, ``CHRFScore`` (chrF and
  chrF++) and ``TERScore`` (sacrebleu), ``ROUGEScore`` (rouge-score), ``QAScore`` (SQuAD v1.1 and
  v2.0 exact match and F1), ``Perplexity``; :mod:`llmkit.metrics.significance` for paired tests and
  confidence intervals of BLEU, chrF and TER (sacrebleu's).
- Model-based measures with a local model (nothing downloads): ``Toxicity``, ``Faithfulness``,
  ``AnswerRelevance``, ``BERTScore`` (the bert-score package's).

Functional twins of the corpus scores are in :mod:`llmkit.metrics.functional`.
"""

from llmkit.metrics.bleu import BLEUScore
from llmkit.metrics.chrf import CHRFScore
from llmkit.metrics.model_based import AnswerRelevance, BERTScore, Faithfulness, Toxicity
from llmkit.metrics.perplexity import Perplexity
from llmkit.metrics.qa import QAScore
from llmkit.metrics.rouge import ROUGEScore
from llmkit.metrics.ter import TERScore

__all__ = [
    "AnswerRelevance",
    "BERTScore",
    "BLEUScore",
    "CHRFScore",
    "Faithfulness",
    "Perplexity",
    "QAScore",
    "ROUGEScore",
    "TERScore",
    "Toxicity",
]
