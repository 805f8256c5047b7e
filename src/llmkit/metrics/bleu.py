"""BLEUScore: corpus BLEU as a torchmetrics Metric, equal to sacrebleu's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from llmkit.metrics._sentence_stats import SentenceStatsMetric, signature, yes_no
from llmkit.metrics._state import add_update_config_state
from llmkit.metrics.functional._corpus import TextTarget
from llmkit.metrics.functional.bleu import (
    SMOOTH_DEFAULTS,
    _bleu_compute,
    _bleu_sentence_stats,
    _check_bleu_args,
    _split_bleu_stats,
)


class BLEUScore(SentenceStatsMetric):
    """Corpus BLEU equal to ``sacrebleu.corpus_bleu(preds, refs, ...).score / 100``.

    Scores text with sacrebleu's tokenizers, reproduced exactly, or token ids as words. The
    state is the sufficient statistics (clipped matches and totals per n-gram order, and the
    two corpus lengths), so it has a constant size and sums across processes.

    Args:
        n_gram: the largest n-gram order.
        smooth_method: ``"none"``, ``"floor"``, ``"add-k"`` or ``"exp"`` (sacrebleu's default).
        smooth_value: the value of ``"floor"`` (default 0.1) and ``"add-k"`` (default 1).
        tokenize: ``"13a"`` (default), ``"intl"``, ``"char"`` or ``"none"``, for text.
        lowercase: lowercase text before tokenizing.
        ignore_index: for token ids, the padding id, dropped before counting; a reference row
            that is all padding counts as missing.
        effective_order: average only over the n-gram orders the hypotheses have.
        keep_sentence_stats: also keep each sentence's statistics ``[N, 2 + 2 * n_gram]`` (sacrebleu's
            columns: hypothesis words, closest reference words, matches and totals per order),
            for :mod:`llmkit.metrics.significance`; gathered across processes in rank order.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, target)`` takes either
        - ``preds: Sequence[str]`` and ``target: Sequence[str | Sequence[str]]`` (the references of
          each sample; their number may differ between samples), or
        - ``preds: LongTensor[B, T]`` and ``target: LongTensor[B, T'] | LongTensor[B, R, T']``.

    Raises:
        ValueError: If an argument is out of its range (``update`` raises on bad input as
            :func:`llmkit.metrics.functional.bleu_score` does).

    Examples:
        >>> metric = BLEUScore()
        >>> metric.update(["the cat is on the mat"], [["there is a cat on the mat", "a cat is on the mat"]])
        >>> round(metric.compute().item(), 4)
        0.7598
        >>> metric.signature().rsplit("|", 1)[0]
        'nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp'
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    matches: Tensor
    totals: Tensor
    preds_len: Tensor
    target_len: Tensor

    def __init__(
        self,
        n_gram: int = 4,
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        tokenize: str = "13a",
        lowercase: bool = False,
        ignore_index: int | None = None,
        effective_order: bool = False,
        keep_sentence_stats: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_bleu_args(n_gram, smooth_method, smooth_value, tokenize)
        self.n_gram = n_gram
        self.smooth_method = smooth_method
        self.smooth_value = smooth_value
        self.tokenize = tokenize
        self.lowercase = lowercase
        self.ignore_index = ignore_index
        self.effective_order = effective_order
        self.add_state("matches", default=torch.zeros(n_gram, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("totals", default=torch.zeros(n_gram, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("preds_len", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("target_len", default=torch.tensor(0), dist_reduce_fx="sum")
        add_update_config_state(self, tokenize=tokenize, lowercase=lowercase, ignore_index=ignore_index)
        self._init_sentence_stats(keep_sentence_stats)
        # Token ids are words already: sacrebleu's `tok:none`.
        self._token_ids = False

    def update(self, preds: Sequence[str] | Tensor, target: TextTarget | Tensor) -> None:
        """Add a batch of hypotheses and their references to the corpus."""
        rows, num_refs = _bleu_sentence_stats(
            preds, target, self.n_gram, self.tokenize, self.lowercase, self.ignore_index
        )
        self._token_ids = isinstance(preds, Tensor)
        matches, totals, preds_len, target_len = _split_bleu_stats(rows.sum(0))
        self.matches += matches.to(self.matches.device)
        self.totals += totals.to(self.totals.device)
        self.preds_len += preds_len.to(self.preds_len.device)
        self.target_len += target_len.to(self.target_len.device)
        self._keep_sentence_stats(rows, num_refs)

    def compute(self) -> Tensor:
        """BLEU of the corpus seen so far, a 0-d tensor in [0, 1]."""
        score = _bleu_compute(
            self.matches, self.totals, self.preds_len, self.target_len,
            self.smooth_method, self.smooth_value, self.effective_order,
        )
        return score.to(torch.get_default_dtype())

    def num_sentence_stats(self) -> int:
        """``2 + 2 * n_gram`` columns per sentence."""
        return 2 + 2 * self.n_gram

    def score_from_stats(self, stats: Tensor) -> Tensor:
        """BLEU of summed sentence statistics ``[..., 2 + 2 * n_gram]``, as ``[...]`` float64."""
        return _bleu_compute(*_split_bleu_stats(stats), self.smooth_method, self.smooth_value, self.effective_order)

    def signature(self) -> str:
        """The signature as sacrebleu writes it: ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:llmkit-...``."""
        smooth = self.smooth_method
        default = SMOOTH_DEFAULTS[smooth]
        if default is not None:
            smooth += f"[{self.smooth_value if self.smooth_value is not None else default:.2f}]"
        return signature({
            "nrefs": int(self.num_refs),
            "case": "lc" if self.lowercase else "mixed",
            "eff": yes_no(self.effective_order),
            "tok": "none" if self._token_ids else self.tokenize,
            "smooth": smooth,
        })

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot one value or a sequence of values of the metric (needs matplotlib).

        Args:
            val: a result of ``compute``/``forward``, or several; ``None`` plots ``compute()``.
            ax: a matplotlib axis to draw on.
        """
        return self._plot(val, ax)
