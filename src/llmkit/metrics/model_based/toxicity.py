"""Toxicity: the toxic-label probability of each output, as HF evaluate's toxicity measurement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from llmkit.metrics._state import add_update_config_state
from llmkit.metrics.model_based._base import (
    ModelMetric,
    load_source,
    prepare_source,
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

# The names a toxic label goes by in common checkpoints (matched case-insensitively).
_TOXIC_NAMES = ("toxic", "toxicity", "hate", "offensive")
_ACTIVATIONS = ("softmax", "sigmoid")


def classifier_activation(config: Any, function_to_apply: str | None) -> str | None:
    """The activation of transformers' text-classification pipeline, or ``None`` to decide from the logits.

    ``"sigmoid"`` for a multi-label model (``config.problem_type == "multi_label_classification"``)
    or a single-logit one, ``"softmax"`` otherwise; a module without a config decides per call.

    Raises:
        ValueError: If ``function_to_apply`` is not ``"softmax"``, ``"sigmoid"`` or ``None``.
    """
    if function_to_apply is not None:
        if function_to_apply not in _ACTIVATIONS:
            raise ValueError(f"`function_to_apply` must be one of {_ACTIVATIONS} or None, got {function_to_apply!r}")
        return function_to_apply
    if config is None:
        return None
    if getattr(config, "problem_type", None) == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def label_probability(logits: Tensor, label: int, activation: str | None) -> Tensor:
    """``[B]`` probabilities of output ``label`` from logits ``[B, num_labels]``.

    Raises:
        ValueError: If the logits are not ``[B, num_labels]`` with ``label < num_labels``.
    """
    if logits.ndim != 2 or label >= logits.shape[-1]:
        raise ValueError(
            f"the model must return logits [B, num_labels] with num_labels > {label} (the label's index), "
            f"got shape {tuple(logits.shape)}"
        )
    logits = logits.float()
    if activation == "sigmoid" or (activation is None and logits.shape[-1] == 1):
        return logits[:, label].sigmoid()
    return logits.softmax(dim=-1)[:, label]


class Toxicity(ModelMetric):
    """The probability a toxicity classifier gives each output, aggregated as HF evaluate's ``toxicity``.

    Each output is scored with a local sequence classifier: the probability of its toxic label,
    through the activation transformers' text-classification pipeline applies (the one HF
    evaluate's toxicity measurement calls): the softmax over the labels, or the sigmoid of the
    label's logit for a multi-label model (``config.problem_type == "multi_label_classification"``)
    or a single-logit one. ``compute()`` returns, as 0-d tensors (NaN before any update):

    - ``"toxicity"``: the mean over all outputs of evaluate's per-output ``toxicity`` scores,
    - ``"toxicity_max"``: their maximum (evaluate's ``aggregation="maximum"``),
    - ``"toxicity_ratio"``: the share of outputs whose score is ``>= threshold``
      (evaluate's ``aggregation="ratio"``).

    The states are sums, a count and a maximum: constant size, summed across processes.

    Args:
        model: an ``nn.Module`` returning logits ``[B, num_labels]`` (a tensor, or an output with
            ``.logits``, or a tuple whose first item they are), or the path of a local Hugging Face
            ``*ForSequenceClassification`` checkpoint directory (see ``_loading`` for the contract).
        tokenizer: the tokenizer callable; loaded from the directory when ``model`` is a path and
            this is ``None``.
        toxic_label: the toxic label's name in ``config.id2label`` (case-insensitive), or its
            output index; ``None`` takes the one label named ``toxic``, ``toxicity``, ``hate`` or
            ``offensive``.
        threshold: the score from which an output counts as toxic in ``"toxicity_ratio"``.
        function_to_apply: ``"softmax"`` or ``"sigmoid"``; ``None`` chooses as the pipeline does
            (a module without a config: sigmoid for one logit, softmax otherwise).
        batch_size: how many outputs go through the model at once.
        max_length: the tokenizer's truncation length; ``None`` uses the tokenizer's own.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, target=None)``: ``preds: Sequence[str]``; ``target`` is ignored, so that the
    metric can share a ``MetricCollection`` with reference-based metrics.

    Raises:
        TypeError: If ``model`` is neither a module nor a path, or a module comes without a tokenizer.
        ValueError: If the path is not a local checkpoint directory or holds no classifier head,
            the toxic label is not among the model's labels (or cannot be told), or an argument is
            out of range.
        ImportError: If ``model`` is a path and ``transformers`` is not installed.

    Examples:
        >>> import torch
        >>> def tokenizer(texts, **kwargs):  # one id per word: 1 for "stupid", 2 for any other
        ...     ids = [[1 if word == "stupid" else 2 for word in text.split()] for text in texts]
        ...     width = max(map(len, ids))
        ...     return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids])}
        >>> class StupidCounter(torch.nn.Module):  # logits (clean, toxic)
        ...     def forward(self, input_ids):
        ...         toxic = 4.0 * (input_ids == 1).sum(-1) - 2.0
        ...         return torch.stack([torch.zeros_like(toxic), toxic], dim=-1)
        >>> metric = Toxicity(StupidCounter(), tokenizer, toxic_label=1)
        >>> metric.update(["you are nice", "you are stupid", "stupid stupid"])
        >>> {name: round(value.item(), 4) for name, value in metric.compute().items()}
        {'toxicity': 0.6658, 'toxicity_max': 0.9975, 'toxicity_ratio': 0.6667}
    """

    higher_is_better = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    float64_states = ("score_sum", "score_max")

    score_sum: Tensor
    score_max: Tensor
    num_toxic: Tensor
    total: Tensor

    def __init__(
        self,
        model: ModelSource,
        tokenizer: Tokenizer | None = None,
        *,
        toxic_label: str | int | None = None,
        threshold: float = 0.5,
        function_to_apply: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        config, directory = prepare_source(model, tokenizer)
        if directory is not None:
            check_classifier_config(config, directory)
        label = find_label(config, toxic_label, role="toxic", argument="toxic_label", defaults=_TOXIC_NAMES)
        activation = classifier_activation(config, function_to_apply)
        threshold = unit_interval(threshold, "threshold")
        local = load_source(model, tokenizer, config, directory, "classifier")
        super().__init__(local, batch_size=batch_size, max_length=max_length, **kwargs)
        self.label = label
        self.threshold = threshold
        self.activation = activation
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("score_max", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("num_toxic", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        add_update_config_state(
            self,
            model=str(local.path or type(local.module).__qualname__),
            label=label,
            threshold=threshold,
            activation=activation,
            max_length=self.max_length,
        )

    def scores(self, preds: Sequence[str]) -> Tensor:
        """Each output's toxicity, ``[B]`` float32 on the metric's device (the states are untouched)."""
        texts = text_batch(preds, "preds")
        batches = self._batches([len(text) for text in texts])
        out = []
        with self._running() as module:
            for batch in batches:
                logits = output_tensor(module(**self._tokenize([texts[i] for i in batch])), "logits")
                out.append(label_probability(logits, self.label, self.activation))
        return self._in_order(out, batches)

    def update(self, preds: Sequence[str], target: Any = None) -> None:
        """Score a batch of outputs; ``target`` is ignored."""
        scores = self.scores(preds)
        if scores.numel() == 0:
            return
        self.score_sum += scores.sum(dtype=torch.float64)
        self.score_max.copy_(torch.maximum(self.score_max, scores.max().to(self.score_max.dtype)))
        self.num_toxic += (scores >= self.threshold).sum()
        self.total += scores.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"toxicity", "toxicity_max", "toxicity_ratio"}``: the mean, the maximum and the share ``>= threshold``."""
        total = self.total.to(self.score_sum.dtype)
        empty = torch.tensor(float("nan"), dtype=self.score_sum.dtype, device=self.score_sum.device)
        if self.total == 0:
            return {"toxicity": empty, "toxicity_max": empty.clone(), "toxicity_ratio": empty.clone()}
        return {
            "toxicity": self.score_sum / total,
            "toxicity_max": self.score_max.clone(),
            "toxicity_ratio": self.num_toxic / total,
        }
