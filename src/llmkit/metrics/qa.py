"""QAScore: SQuAD exact match and F1 as a torchmetrics Metric, equal to the official scripts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from llmkit.metrics._state import Float64Sums, add_update_config_state
from llmkit.metrics.functional.qa import GROUPS, STAT_NAMES, QATarget, _check_qa_args, _qa_compute, _qa_update


class QAScore(Float64Sums):
    """SQuAD exact match and F1 in [0, 1], equal to the official v1.1 or v2.0 evaluation script.

    With ``squad_version="v1.1"`` (the default) the scores equal torchmetrics' ``SQuAD`` / 100;
    with ``"v2.0"`` questions may have no answer and ``compute`` also reports the ``HasAns`` /
    ``NoAns`` split, as the official v2.0 script. Answers are normalised as SQuAD's
    ``normalize_answer`` (lowercase; punctuation, articles and extra whitespace removed); token
    ids are words already. See :func:`llmkit.metrics.functional.qa_score` for the rules.

    The state is a ``[2, 3]`` float64 tensor: for the questions with and without a gold answer,
    the sums of exact match and F1 and the number of questions. It has a constant size and sums
    across processes.

    Args:
        squad_version: ``"v1.1"`` or ``"v2.0"``.
        ignore_index: for token ids, the padding id, dropped before scoring; a gold row that is all
            padding is no gold answer.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, target)`` takes either
        - ``preds: Sequence[str]`` and ``target: Sequence[str | Sequence[str]]`` (the gold answers of
          each question; their number may differ between questions), or
        - ``preds: LongTensor[B, T]`` and ``target: LongTensor[B, T'] | LongTensor[B, R, T']``.

    ``compute()`` returns a dict of float64 0-d tensors: ``"exact_match"`` and ``"f1"``; with
    ``"v2.0"`` also ``"total"`` and ``"{HasAns,NoAns}_{exact_match,f1,total}"``. Log it with
    ``LightningModule.log_dict``.

    Raises:
        ValueError: If ``squad_version`` is unknown (``update`` raises on bad input as
            :func:`llmkit.metrics.functional.qa_score` does).
        TypeError: If ``ignore_index`` is not an int or None.

    Examples:
        >>> metric = QAScore()
        >>> metric.update(["The Eiffel Tower!"], [["Eiffel Tower", "the tower"]])
        >>> metric.update(["in 1889"], [["1889", "March 1889"]])
        >>> {key: round(value.item(), 4) for key, value in metric.compute().items()}
        {'exact_match': 0.5, 'f1': 0.8333}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    float64_states = ("sums",)

    sums: Tensor

    def __init__(self, squad_version: str = "v1.1", ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_qa_args(squad_version, ignore_index)
        self.squad_version = squad_version
        self.ignore_index = ignore_index
        sums = torch.zeros(len(GROUPS), len(STAT_NAMES), dtype=torch.float64)
        self.add_state("sums", default=sums, dist_reduce_fx="sum")
        add_update_config_state(self, squad_version=squad_version, ignore_index=ignore_index)

    def update(self, preds: Sequence[str] | Tensor, target: QATarget | Tensor) -> None:
        """Score a batch of predicted answers against their gold answers and add them to the sums."""
        sums = _qa_update(preds, target, self.squad_version, self.ignore_index)
        self.sums += sums.to(self.sums.device, self.sums.dtype)

    def compute(self) -> dict[str, Tensor]:
        """The mean scores over the questions seen so far (see the class docstring for the keys)."""
        return _qa_compute(self.sums, self.squad_version)

    def plot(
        self, val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None, ax: _AX_TYPE | None = None
    ) -> _PLOT_OUT_TYPE:
        """Plot one result or a sequence of results of the metric (needs matplotlib).

        Args:
            val: a result of ``compute``/``forward``, or several; ``None`` plots ``compute()``.
            ax: a matplotlib axis to draw on.
        """
        return self._plot(val, ax)
