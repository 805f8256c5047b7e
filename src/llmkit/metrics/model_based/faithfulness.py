"""Faithfulness: how much of each response an NLI model finds entailed by its context."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from llmkit.metrics._state import add_update_config_state
from llmkit.metrics.model_based._base import (
    ModelMetric,
    load_source,
    prepare_source,
    same_length,
    text_batch,
    unit_interval,
)
from llmkit.metrics.model_based._loading import (
    ModelSource,
    Tokenizer,
    check_classifier_config,
    find_label,
    output_tensor,
)
from llmkit.metrics.model_based.toxicity import label_probability

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_AGGREGATIONS = ("min", "mean")

SentenceSplitter = Callable[[str], Sequence[str]]


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: it is cut after each ``.``, ``!`` or ``?`` that whitespace follows.

    A plain deterministic rule (no model, no data to download): ``"Dr. Smith"`` is cut too. The
    pieces are stripped; a text without any non-space character is one empty sentence.

    Examples:
        >>> split_sentences("Paris is in France. It is big!  Is it old?")
        ['Paris is in France.', 'It is big!', 'Is it old?']
    """
    pieces = [piece for piece in _SENTENCE_END.split(text.strip()) if piece]
    return pieces or [""]


def _splitter(sentence_split: bool | SentenceSplitter) -> SentenceSplitter:
    if sentence_split is True:
        return split_sentences
    if sentence_split is False:
        return lambda text: [text]
    if callable(sentence_split):
        return sentence_split
    raise TypeError(f"`sentence_split` must be a bool or a callable str -> list[str], got {sentence_split!r}")


class Faithfulness(ModelMetric):
    """How far each response is entailed by its context (source), by a local NLI model.

    Each response is split into sentences (:func:`split_sentences`, or ``sentence_split``); each
    sentence is a hypothesis, scored against the whole context as the premise: the softmax
    probability, over all the model's labels, of its entailment label (the tokenizer gets the
    pair ``(context, sentence)``, premise first, truncated longest-first). A response's score
    aggregates its sentences' scores by ``"min"`` (the default: one unsupported sentence makes a
    response unfaithful) or ``"mean"``. ``compute()`` returns, as 0-d tensors (NaN before any
    update):

    - ``"faithfulness"``: the mean response score,
    - ``"hallucination_rate"``: the share of responses scoring below ``threshold``.

    Args:
        model: an NLI ``nn.Module`` returning logits ``[B, num_labels]`` (see :class:`Toxicity`),
            or the path of a local ``*ForSequenceClassification`` checkpoint directory.
        tokenizer: the tokenizer callable (called with ``text_pair=``); loaded from the directory
            when ``model`` is a path and this is ``None``.
        entailment_label: the entailment label's name in ``config.id2label`` (case-insensitive),
            or its output index; ``None`` takes the label named ``entailment``.
        aggregation: ``"min"`` or ``"mean"`` over a response's sentences.
        sentence_split: ``True`` for :func:`split_sentences`, ``False`` to score each response
            whole, or a callable ``str -> list[str]``.
        threshold: the score below which a response counts as a hallucination.
        batch_size: how many (context, sentence) pairs go through the model at once.
        max_length: the tokenizer's truncation length; ``None`` uses the tokenizer's own.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, context)``: ``preds: Sequence[str]`` responses, ``context: Sequence[str]``
    their sources, one per response.

    Raises:
        TypeError: If ``model`` is neither a module nor a path, or a module comes without a tokenizer.
        ValueError: If the path is not a local checkpoint directory or holds no classifier head,
            the model has no entailment label, or an argument is out of its range.
        ImportError: If ``model`` is a path and ``transformers`` is not installed.

    Examples:
        >>> import torch
        >>> def tokenizer(premises, text_pair, **kwargs):  # ids: 1 for a word of the premise, 2 otherwise
        ...     ids = [[1 if word in premise.split() else 2 for word in hypothesis.split()]
        ...            for premise, hypothesis in zip(premises, text_pair)]
        ...     width = max(map(len, ids))
        ...     return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids])}
        >>> class Overlap(torch.nn.Module):  # logits (contradiction, entailment): entailed when all words are known
        ...     def forward(self, input_ids):
        ...         unknown = (input_ids == 2).sum(-1).float()
        ...         return torch.stack([unknown, 1.0 - unknown], dim=-1)
        >>> metric = Faithfulness(Overlap(), tokenizer, entailment_label=1)
        >>> metric.update(["the cat sat. the cat ran.", "the cat sat."], ["the cat sat.", "the cat sat."])
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'faithfulness': 0.5, 'hallucination_rate': 0.5}
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    float64_states = ("score_sum",)

    score_sum: Tensor
    num_unfaithful: Tensor
    total: Tensor

    def __init__(
        self,
        model: ModelSource,
        tokenizer: Tokenizer | None = None,
        *,
        entailment_label: str | int | None = None,
        aggregation: str = "min",
        sentence_split: bool | SentenceSplitter = True,
        threshold: float = 0.5,
        batch_size: int = 32,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        if aggregation not in _AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {_AGGREGATIONS}, got {aggregation!r}")
        splitter = _splitter(sentence_split)
        threshold = unit_interval(threshold, "threshold")
        config, directory = prepare_source(model, tokenizer)
        if directory is not None:
            check_classifier_config(config, directory)
        label = find_label(
            config, entailment_label, role="entailment", argument="entailment_label", defaults=("entailment",)
        )
        local = load_source(model, tokenizer, config, directory, "classifier")
        super().__init__(local, batch_size=batch_size, max_length=max_length, **kwargs)
        self.label = label
        self.aggregation = aggregation
        self.splitter = splitter
        self.threshold = threshold
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_unfaithful", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        add_update_config_state(
            self,
            model=str(local.path or type(local.module).__qualname__),
            label=label,
            aggregation=aggregation,
            splitter=getattr(splitter, "__qualname__", repr(splitter)),
            threshold=threshold,
            max_length=self.max_length,
        )

    def scores(self, preds: Sequence[str], context: Sequence[str]) -> Tensor:
        """Each response's score, ``[B]`` float32 on the metric's device (the states are untouched)."""
        responses = text_batch(preds, "preds")
        contexts = text_batch(context, "context")
        same_length(responses, contexts, "`preds` and `context`")
        premises: list[str] = []
        hypotheses: list[str] = []
        owners: list[int] = []
        for index, (response, premise) in enumerate(zip(responses, contexts, strict=True)):
            sentences = list(self.splitter(response)) or [""]
            hypotheses.extend(sentences)
            premises.extend([premise] * len(sentences))
            owners.extend([index] * len(sentences))
        batches = self._batches([len(premise) + len(hyp) for premise, hyp in zip(premises, hypotheses, strict=True)])
        probs = []
        with self._running() as module:
            for batch in batches:
                encoded = self._tokenize([premises[i] for i in batch], [hypotheses[i] for i in batch])
                probs.append(label_probability(output_tensor(module(**encoded), "logits"), self.label, "softmax"))
        if not probs:
            return torch.zeros(0, device=self.device)
        sentence_scores = self._in_order(probs, batches)
        owner = torch.tensor(owners, device=sentence_scores.device)
        if self.aggregation == "min":
            out = torch.full((len(responses),), float("inf"), device=sentence_scores.device)
            return out.scatter_reduce(0, owner, sentence_scores, reduce="amin")
        sums = torch.zeros(len(responses), device=sentence_scores.device).index_add(0, owner, sentence_scores)
        return sums / torch.bincount(owner, minlength=len(responses))

    def update(self, preds: Sequence[str], context: Sequence[str]) -> None:
        """Score a batch of responses against their contexts."""
        scores = self.scores(preds, context)
        self.score_sum += scores.sum(dtype=torch.float64)
        self.num_unfaithful += (scores < self.threshold).sum()
        self.total += scores.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"faithfulness", "hallucination_rate"}``: the mean score and the share below ``threshold``."""
        if self.total == 0:
            empty = torch.tensor(float("nan"), dtype=self.score_sum.dtype, device=self.score_sum.device)
            return {"faithfulness": empty, "hallucination_rate": empty.clone()}
        total = self.total.to(self.score_sum.dtype)
        return {"faithfulness": self.score_sum / total, "hallucination_rate": self.num_unfaithful / total}
