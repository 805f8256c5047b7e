"""ROUGEScore: ROUGE-N/L/Lsum as a torchmetrics Metric, equal to Google's rouge-score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from llmkit.metrics._state import Float64Sums, add_update_config_state
from llmkit.metrics.functional._corpus import TextTarget
from llmkit.metrics.functional.rouge import SCORE_NAMES, _check_rouge_args, _rouge_compute, _rouge_update


class ROUGEScore(Float64Sums):
    """ROUGE scores equal to the mean over samples of ``rouge_score.rouge_scorer.RougeScorer``'s.

    Text is tokenized as rouge-score does (lowercase, runs of ``[a-z0-9]``, optional Porter
    stemming); ``rougeLsum`` splits sentences on newlines as rouge-score does, so nothing is
    ever downloaded. The state holds per key the sums of the per-sample scores and the number
    of samples: a constant size, summed across processes.

    Args:
        rouge_keys: among ``"rouge1"`` ... ``"rouge9"``, ``"rougeL"``, ``"rougeLsum"``.
        use_stemmer: stem words longer than three characters (nltk's Porter stemmer).
        accumulate: with several references, ``"best"`` (rouge-score's ``score_multi``: per key
            the reference with the highest F-measure) or ``"avg"`` (their mean).
        ignore_index: for token ids, the padding id, dropped before scoring.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, target)`` takes text (``Sequence[str]``, and per sample a reference string or
    a sequence of them) or token ids (``[B, T]``, and ``[B, T']`` or ``[B, R, T']``).
    ``compute()`` returns ``{f"{key}_{fmeasure|precision|recall}": 0-d tensor}``.

    Raises:
        ValueError: If a key or ``accumulate`` is unknown.

    Examples:
        >>> metric = ROUGEScore(rouge_keys=("rouge1", "rougeL"))
        >>> metric.update(["the cat sat on the mat"], [["the cat lay on the mat", "a dog sat"]])
        >>> round(metric.compute()["rouge1_fmeasure"].item(), 4)
        0.8333
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    float64_states = ("score_sums",)

    score_sums: Tensor
    num_samples: Tensor

    def __init__(
        self,
        rouge_keys: str | Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
        use_stemmer: bool = False,
        accumulate: str = "best",
        ignore_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.rouge_keys = _check_rouge_args(rouge_keys, accumulate)
        self.use_stemmer = use_stemmer
        self.accumulate = accumulate
        self.ignore_index = ignore_index
        sums = torch.zeros(len(self.rouge_keys), len(SCORE_NAMES), dtype=torch.float64)
        self.add_state("score_sums", default=sums, dist_reduce_fx="sum")
        self.add_state("num_samples", default=torch.tensor(0), dist_reduce_fx="sum")
        add_update_config_state(
            self, rouge_keys=self.rouge_keys, use_stemmer=use_stemmer, accumulate=accumulate, ignore_index=ignore_index
        )

    def update(self, preds: Sequence[str] | Tensor, target: TextTarget | Tensor) -> None:
        """Score a batch of predictions against their references and add them to the sums."""
        sums, num_samples = _rouge_update(
            preds, target, self.rouge_keys, self.use_stemmer, self.accumulate, self.ignore_index
        )
        self.score_sums += sums.to(self.score_sums.device, self.score_sums.dtype)
        self.num_samples += num_samples.to(self.num_samples.device)

    def compute(self) -> dict[str, Tensor]:
        """The mean scores: ``{f"{key}_{fmeasure|precision|recall}": 0-d tensor}``."""
        return _rouge_compute(self.score_sums, self.num_samples, self.rouge_keys)

    def plot(
        self, val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None, ax: _AX_TYPE | None = None
    ) -> _PLOT_OUT_TYPE:
        """Plot one result or a sequence of results of the metric (needs matplotlib).

        Args:
            val: a result of ``compute``/``forward``, or several; ``None`` plots ``compute()``.
            ax: a matplotlib axis to draw on.
        """
        return self._plot(val, ax)
