"""CHRFScore: corpus chrF and chrF++ as a torchmetrics Metric, equal to sacrebleu's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from llmkit.metrics._sentence_stats import SentenceStatsMetric, signature, yes_no
from llmkit.metrics._state import add_update_config_state
from llmkit.metrics.functional._corpus import TextTarget
from llmkit.metrics.functional.chrf import _check_chrf_args, _chrf_compute, _chrf_update


class CHRFScore(SentenceStatsMetric):
    """Corpus chrF (``word_order=0``) or chrF++ (``word_order=2``), equal to sacrebleu's ``CHRF`` score / 100.

    The state is the statistics summed over sentences: per n-gram order (the character orders,
    then the word orders) the hypotheses' n-grams, the references' and their clipped matches,
    of each sentence's best reference. It has a constant size and sums across processes.

    Token ids are scored with each id as one character and, for the word n-grams, one word
    (see :func:`llmkit.metrics.functional.chrf_score`).

    Args:
        char_order: the largest character n-gram order.
        word_order: the largest word n-gram order; 0 is chrF, 2 chrF++.
        beta: the weight of recall against precision.
        lowercase: lowercase text first.
        whitespace: keep whitespace in the character n-grams of text.
        eps_smoothing: average the orders' F-scores with epsilon smoothing (chrF++.py's way)
            instead of sacrebleu's default effective-order averaging.
        ignore_index: for token ids, the padding id, dropped before counting; a reference row
            that is all padding counts as missing.
        keep_sentence_stats: also keep each sentence's statistics (:meth:`sentence_stats`), for
            significance tests.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, target)`` takes either
        - ``preds: Sequence[str]`` and ``target: Sequence[str | Sequence[str]]`` (the references of
          each sample; their number may differ between samples), or
        - ``preds: LongTensor[B, T]`` and ``target: LongTensor[B, T'] | LongTensor[B, R, T']``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of its range (``update`` raises on bad input as
            :func:`llmkit.metrics.functional.chrf_score` does).

    Examples:
        >>> metric = CHRFScore(word_order=2)
        >>> metric.update(["the cat is on the mat"], [["there is a cat on the mat", "a cat is on the mat"]])
        >>> round(metric.compute().item(), 4)
        0.8648
        >>> metric.signature().rsplit("|", 1)[0]
        'nrefs:2|case:mixed|eff:yes|nc:6|nw:2|space:no'
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    preds_ngrams: Tensor
    target_ngrams: Tensor
    matching_ngrams: Tensor
    sentence_rows: list[Tensor]

    def __init__(
        self,
        char_order: int = 6,
        word_order: int = 0,
        beta: float = 2,
        lowercase: bool = False,
        whitespace: bool = False,
        eps_smoothing: bool = False,
        ignore_index: int | None = None,
        keep_sentence_stats: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_chrf_args(char_order, word_order, beta, lowercase, whitespace, eps_smoothing, ignore_index)
        self.char_order = char_order
        self.word_order = word_order
        self.beta = beta
        self.lowercase = lowercase
        self.whitespace = whitespace
        self.eps_smoothing = eps_smoothing
        self.ignore_index = ignore_index
        num_orders = char_order + word_order
        for name in ("preds_ngrams", "target_ngrams", "matching_ngrams"):
            self.add_state(name, default=torch.zeros(num_orders, dtype=torch.long), dist_reduce_fx="sum")
        self._init_sentence_stats(keep_sentence_stats)
        # With several references the sentence score picks one, so beta and the smoothing
        # change what an update counts.
        add_update_config_state(
            self, char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase,
            whitespace=whitespace, eps_smoothing=eps_smoothing, ignore_index=ignore_index,
        )

    def update(self, preds: Sequence[str] | Tensor, target: TextTarget | Tensor) -> None:
        """Add a batch of hypotheses and their references to the corpus."""
        rows, num_refs = _chrf_update(
            preds, target, self.char_order, self.word_order, self.beta, self.lowercase, self.whitespace,
            self.eps_smoothing, self.ignore_index,
        )
        sums = rows.sum(0).view(-1, 3).to(self.preds_ngrams.device)  # [orders, (hyp, ref, match)]
        self.preds_ngrams += sums[:, 0]
        self.target_ngrams += sums[:, 1]
        self.matching_ngrams += sums[:, 2]
        self._keep_sentence_stats(rows, num_refs)

    def compute(self) -> Tensor:
        """The chrF of the corpus seen so far, a 0-d tensor in [0, 1]."""
        return self.score_from_stats(self._summed_stats()).to(torch.get_default_dtype())

    def _summed_stats(self) -> Tensor:
        """The state as one row of statistics, ``[3 * orders]`` in sacrebleu's order."""
        return torch.stack([self.preds_ngrams, self.target_ngrams, self.matching_ngrams], dim=1).reshape(-1)

    def num_sentence_stats(self) -> int:
        """``3 * (char_order + word_order)``: per order, hypothesis n-grams, reference n-grams and matches."""
        return 3 * (self.char_order + self.word_order)

    def score_from_stats(self, stats: Tensor) -> Tensor:
        """Score summed statistics ``[..., S]`` as ``[...]`` float64 in [0, 1] (sacrebleu's score / 100).

        Raises:
            ValueError: If the last dimension of ``stats`` is not :meth:`num_sentence_stats`.
        """
        if stats.shape[-1] != self.num_sentence_stats():
            raise ValueError(
                f"`stats` must have {self.num_sentence_stats()} statistics in its last dimension, "
                f"got shape {tuple(stats.shape)}"
            )
        return _chrf_compute(stats, self.beta, self.eps_smoothing)

    def signature(self) -> str:
        """The signature of this configuration as sacrebleu writes chrF's, with llmkit's version.

        ``nrefs`` is the most references any sample of this process had (not a collective call,
        so that rank 0 alone may log it).
        """
        return signature(
            {
                "nrefs": int(self.num_refs),
                "case": "lc" if self.lowercase else "mixed",
                "eff": yes_no(not self.eps_smoothing),
                "nc": self.char_order,
                "nw": self.word_order,
                "space": yes_no(self.whitespace),
            }
        )

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot one value or a sequence of values of the metric (needs matplotlib).

        Args:
            val: a result of ``compute``/``forward``, or several; ``None`` plots ``compute()``.
            ax: a matplotlib axis to draw on.
        """
        return self._plot(val, ax)
