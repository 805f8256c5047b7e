"""Model-based, context-specific measures: each scores text with a local model.

``Toxicity``, ``Faithfulness``, ``AnswerRelevance`` and ``BERTScore`` take an ``nn.Module``
with a tokenizer callable, or the path of a local Hugging Face checkpoint directory (loaded
with ``local_files_only=True``; ``pip install llmkit[eval]``). Nothing is downloaded;
``transformers`` is imported only when a path is given.
"""

from llmkit.metrics.model_based.bertscore import BERTScore
from llmkit.metrics.model_based.faithfulness import Faithfulness, split_sentences
from llmkit.metrics.model_based.relevance import AnswerRelevance
from llmkit.metrics.model_based.toxicity import Toxicity

__all__ = ["AnswerRelevance", "BERTScore", "Faithfulness", "Toxicity", "split_sentences"]
