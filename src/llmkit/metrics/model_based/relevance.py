"""AnswerRelevance: how pertinent each response is to its question, by a local encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from llmkit.metrics._state import add_update_config_state
from llmkit.metrics.model_based._base import ModelMetric, load_source, prepare_source, same_length, text_batch
from llmkit.metrics.model_based._loading import (
    ModelSource,
    Tokenizer,
    check_classifier_config,
    is_classifier_config,
    output_tensor,
)


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The mean of ``hidden [B, T, H]`` over the positions where ``attention_mask [B, T]`` is 1: ``[B, H]``.

    As sentence-transformers' mean pooling (the count is clamped at 1e-9).
    """
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class _Scorer(Protocol):
    """Scores a chunk of (question, response) pairs with a model already on the metric's device."""

    def __call__(
        self, metric: AnswerRelevance, module: nn.Module, questions: list[str], responses: list[str]
    ) -> Tensor:
        ...


class _BiEncoder:
    """Cosine similarity of the mean-pooled last hidden states of question and response."""

    name = "bi-encoder"

    def __call__(
        self, metric: AnswerRelevance, module: nn.Module, questions: list[str], responses: list[str]
    ) -> Tensor:
        vectors = []
        for texts in (questions, responses):
            encoded = metric._tokenize(texts)
            hidden = output_tensor(module(**encoded), "last_hidden_state")
            vectors.append(mean_pool(hidden.float(), encoded.get("attention_mask")))
        return torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=-1)


class _CrossEncoder:
    """The sigmoid of a one-logit sequence classifier's logit on the pair (question, response)."""

    name = "cross-encoder"

    def __call__(
        self, metric: AnswerRelevance, module: nn.Module, questions: list[str], responses: list[str]
    ) -> Tensor:
        logits = output_tensor(module(**metric._tokenize(questions, responses)), "logits")
        if logits.ndim != 2 or logits.shape[-1] != 1:
            raise ValueError(f"a cross-encoder must return one logit per pair, [B, 1], got shape {tuple(logits.shape)}")
        return logits[:, 0].float().sigmoid()


class AnswerRelevance(ModelMetric):
    """How pertinent each response is to its question, by a local bi-encoder or cross-encoder.

    - A bi-encoder (a base model, such as a sentence-transformers checkpoint's transformer) embeds
      question and response separately; the score is the cosine similarity of their mean-pooled
      last hidden states (masked by the attention mask), in [-1, 1].
    - A cross-encoder (a sequence classifier with one output, such as sentence-transformers'
      ``CrossEncoder`` models) reads the pair ``(question, response)``; the score is the sigmoid of
      its logit, in [0, 1], as ``CrossEncoder.predict`` gives it.

    ``compute()`` returns ``{"answer_relevance": the mean score}`` (a 0-d tensor; NaN before any update).

    Args:
        model: an ``nn.Module`` (a bi-encoder returns hidden states ``[B, T, H]``: a tensor, an
            output with ``.last_hidden_state``, or a tuple whose first item they are; a cross-encoder
            returns logits ``[B, 1]``), or the path of a local checkpoint directory.
        tokenizer: the tokenizer callable; loaded from the directory when ``model`` is a path and
            this is ``None``.
        cross_encoder: which kind the model is; ``None`` decides from the model: a cross-encoder when
            its class (or, for a path, ``config.architectures``) is a ``*ForSequenceClassification``.
        batch_size: how many pairs go through the model at once.
        max_length: the tokenizer's truncation length; ``None`` uses the tokenizer's own.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, questions)``: ``preds: Sequence[str]`` responses, ``questions: Sequence[str]``.

    Raises:
        TypeError: If ``model`` is neither a module nor a path, or a module comes without a tokenizer.
        ValueError: If the path is not a local checkpoint directory, or a cross-encoder checkpoint
            has no classifier head or more than one label.
        ImportError: If ``model`` is a path and ``transformers`` is not installed.

    Examples:
        >>> import torch
        >>> def tokenizer(texts, **kwargs):  # one id per word
        ...     vocab = {"where": 1, "is": 2, "paris": 3, "in": 4, "france": 5, "cats": 6, "purr": 7}
        ...     ids = [[vocab[word] for word in text.split()] for text in texts]
        ...     width = max(map(len, ids))
        ...     return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
        ...             "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])}
        >>> class BagOfWords(torch.nn.Module):  # each word its one-hot vector
        ...     def forward(self, input_ids, attention_mask):
        ...         return torch.nn.functional.one_hot(input_ids, 8).float()
        >>> metric = AnswerRelevance(BagOfWords(), tokenizer)
        >>> metric.update(["paris is in france", "cats purr"], ["where is paris", "where is paris"])
        >>> round(metric.compute()["answer_relevance"].item(), 4)
        0.2887
    """

    higher_is_better = True
    plot_upper_bound = 1.0
    float64_states = ("score_sum",)

    score_sum: Tensor
    total: Tensor

    def __init__(
        self,
        model: ModelSource,
        tokenizer: Tokenizer | None = None,
        *,
        cross_encoder: bool | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        if cross_encoder is not None and not isinstance(cross_encoder, bool):
            raise TypeError(f"`cross_encoder` must be a bool or None, got {cross_encoder!r}")
        config, directory = prepare_source(model, tokenizer)
        if cross_encoder is None:
            if directory is None:
                cross_encoder = type(model).__name__.endswith("ForSequenceClassification")
            else:
                cross_encoder = is_classifier_config(config)
        if cross_encoder:
            if directory is not None:
                check_classifier_config(config, directory)
            num_labels = getattr(config, "num_labels", 1)
            if num_labels != 1:
                raise ValueError(
                    f"a cross-encoder must have one output (a relevance logit), got {num_labels} labels "
                    f"{getattr(config, 'id2label', None)}"
                )
        local = load_source(model, tokenizer, config, directory, "classifier" if cross_encoder else "encoder")
        super().__init__(local, batch_size=batch_size, max_length=max_length, **kwargs)
        self.scorer: _Scorer = _CrossEncoder() if cross_encoder else _BiEncoder()
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        add_update_config_state(
            self,
            model=str(local.path or type(local.module).__qualname__),
            cross_encoder=cross_encoder,
            max_length=self.max_length,
        )

    @property
    def cross_encoder(self) -> bool:
        """Whether the model is read as a cross-encoder."""
        return isinstance(self.scorer, _CrossEncoder)

    def scores(self, preds: Sequence[str], questions: Sequence[str]) -> Tensor:
        """Each response's relevance, ``[B]`` float32 on the metric's device (the states are untouched)."""
        responses = text_batch(preds, "preds")
        asked = text_batch(questions, "questions")
        same_length(responses, asked, "`preds` and `questions`")
        batches = self._batches([len(ask) + len(response) for ask, response in zip(asked, responses, strict=True)])
        out = []
        with self._running() as module:
            for batch in batches:
                out.append(self.scorer(self, module, [asked[i] for i in batch], [responses[i] for i in batch]))
        return self._in_order(out, batches)

    def update(self, preds: Sequence[str], questions: Sequence[str]) -> None:
        """Score a batch of responses against their questions."""
        scores = self.scores(preds, questions)
        self.score_sum += scores.sum(dtype=torch.float64)
        self.total += scores.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"answer_relevance": the mean score}``."""
        return {"answer_relevance": self.score_sum / self.total.to(self.score_sum.dtype)}
