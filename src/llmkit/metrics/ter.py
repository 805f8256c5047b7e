"""TERScore: corpus translation edit rate as a torchmetrics Metric, equal to sacrebleu's TER."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from llmkit.metrics._sentence_stats import SentenceStatsMetric, signature, yes_no
from llmkit.metrics._state import Float64Sums, add_update_config_state, sum_dtype
from llmkit.metrics.functional._corpus import TextTarget
from llmkit.metrics.functional.ter import _check_ter_args, _ter_compute, _ter_update


class TERScore(Float64Sums, SentenceStatsMetric):
    """Corpus TER equal to ``sacrebleu.metrics.TER(...).corpus_score(preds, refs).score / 100``.

    Tercom's edits (insertions, deletions, substitutions and shifts of word blocks, against the
    closest reference of each sample) over the mean reference length, summed over the corpus;
    sacrebleu's algorithm is reproduced exactly, beam and tie-breaking included. The state is the
    two sums, float64 and of constant size, summed across processes. Lower is better.

    Args:
        normalized: Tercom's normalisation (XML entities, punctuation split off words; with
            ``asian_support`` CJK characters split too).
        no_punct: remove punctuation (with ``asian_support``, CJK and full-width punctuation too).
        asian_support: the CJK rules of ``normalized`` and ``no_punct``.
        case_sensitive: keep the case (by default text is lowercased).
        keep_sentence_stats: also keep each sentence's ``[num_edits, ref_length]`` row, for
            :meth:`sentence_stats` and significance tests.
        kwargs: the keyword arguments of :class:`torchmetrics.Metric`.

    ``update(preds, target)`` takes ``preds: Sequence[str]`` and ``target: Sequence[str |
    Sequence[str]]`` (the references of each sample; their number may differ between samples).

    Raises:
        TypeError: If an option is not a bool (``update`` raises on bad input as
            :func:`llmkit.metrics.functional.ter_score` does).

    Examples:
        >>> metric = TERScore()
        >>> metric.update(["the cat sat on the mat"], [["the cat is on the mat", "a cat sat on a mat"]])
        >>> metric.update(["on the mat the cat sat"], ["the cat sat on the mat"])
        >>> round(metric.compute().item(), 4)
        0.1667
        >>> metric.signature().rsplit("|", 1)[0]  # then llmkit's version
        'nrefs:2|case:lc|tok:tercom|norm:no|punct:yes|asian:no'
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    float64_states = ("num_edits", "ref_length")

    num_edits: Tensor
    ref_length: Tensor

    def __init__(
        self,
        normalized: bool = False,
        no_punct: bool = False,
        asian_support: bool = False,
        case_sensitive: bool = False,
        keep_sentence_stats: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_ter_args(
            normalized=normalized, no_punct=no_punct, asian_support=asian_support, case_sensitive=case_sensitive
        )
        self.normalized = normalized
        self.no_punct = no_punct
        self.asian_support = asian_support
        self.case_sensitive = case_sensitive
        dtype = sum_dtype(self.device)
        self.add_state("num_edits", default=torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("ref_length", default=torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")
        self._init_sentence_stats(keep_sentence_stats)
        add_update_config_state(
            self, normalized=normalized, no_punct=no_punct, asian_support=asian_support, case_sensitive=case_sensitive
        )

    def update(self, preds: Sequence[str], target: TextTarget) -> None:
        """Add a batch of hypotheses and their references to the corpus."""
        rows, num_refs = _ter_update(
            preds, target, self.normalized, self.no_punct, self.asian_support, self.case_sensitive
        )
        sums = rows.sum(0).to(device=self.num_edits.device, dtype=self.num_edits.dtype)
        self.num_edits += sums[0]
        self.ref_length += sums[1]
        self._keep_sentence_stats(rows, num_refs)

    def compute(self) -> Tensor:
        """TER of the corpus seen so far, a 0-d tensor (0 for a perfect match; above 1 is possible)."""
        return self.score_from_stats(torch.stack([self.num_edits, self.ref_length])).to(torch.get_default_dtype())

    def num_sentence_stats(self) -> int:
        """Two: ``[num_edits, ref_length]``."""
        return 2

    def score_from_stats(self, stats: Tensor) -> Tensor:
        """TER of summed statistics ``[..., 2]`` (edits, reference length), ``[...]`` in the dtype of ``stats``."""
        return _ter_compute(stats)

    def signature(self) -> str:
        """The signature of this configuration as sacrebleu's TER writes it, with llmkit's version.

        ``nrefs`` is the most references of a sample that this process has seen.
        """
        return signature(
            {
                "nrefs": int(self.num_refs),
                "case": "mixed" if self.case_sensitive else "lc",
                "tok": "tercom",
                "norm": yes_no(self.normalized),
                "punct": yes_no(not self.no_punct),
                "asian": yes_no(self.asian_support),
            }
        )

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot one value or a sequence of values of the metric (needs matplotlib).

        Args:
            val: a result of ``compute``/``forward``, or several; ``None`` plots ``compute()``.
            ax: a matplotlib axis to draw on.
        """
        return self._plot(val, ax)
