"""Decoding over a step function: greedy search, sampling, beam search, and logits processors.

A *step function* maps the tokens decoded so far, ``[N, t]`` (BOS first), to the scores of the
next token, ``[N, V]`` (logits, or log-probabilities for beam search). It may keep its own state
between calls (a KV cache); beam search then calls ``reorder(index)`` after each step so that row
``i`` of that state follows the beam that now sits in row ``i``.

- :func:`greedy_search`, :func:`sample`, :func:`beam_search` (n-best lists, diverse groups): the searches.
- :class:`Temperature`, :class:`TopK`, :class:`TopP`, :class:`MinP`, :class:`RepetitionPenalty`,
  :class:`NoRepeatNGram`, :class:`BadWords`: logits processors ``(tokens [N, t], scores [N, V]) -> [N, V]``,
  each equal to its Hugging Face counterpart; :func:`build_processors` puts them in their fixed order.
- :class:`GenerationConfig`: the keywords of ``generate``, checked before any decoding, picking the search.
- :class:`GenerationScorer`: decode a batch and update text metrics (the core of
  :class:`llmkit.callbacks.GenerationEvaluation` and of the models' own validation decoding).
"""

from llmkit.generation.config import GenerationConfig
from llmkit.generation.processors import (
    BadWords,
    LogitsProcessor,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    build_processors,
)
from llmkit.generation.scoring import GenerationScorer
from llmkit.generation.search import GenerationOutput, Processor, beam_search, greedy_search, sample

__all__ = [
    "BadWords",
    "GenerationConfig",
    "GenerationOutput",
    "GenerationScorer",
    "LogitsProcessor",
    "MinP",
    "NoRepeatNGram",
    "Processor",
    "RepetitionPenalty",
    "Temperature",
    "TopK",
    "TopP",
    "apply_processors",
    "beam_search",
    "build_processors",
    "greedy_search",
    "sample",
]
