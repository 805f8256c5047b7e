"""Per-sentence sufficient statistics, kept on request for significance tests and signatures.

A corpus metric (BLEU, chrF, TER) scores the *sum* of per-sentence statistics. Its state keeps
only that sum, of constant size. With ``keep_sentence_stats=True`` it also keeps each sentence's
row, ``[N, S]``, gathered across processes in rank order (``dist_reduce_fx="cat"``), so that
:mod:`llmkit.metrics.significance` can resample sentences without scoring them again.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from llmkit import __version__
from llmkit.metrics._state import sum_dtype


class SentenceStatsMetric(Metric):
    """A corpus metric whose score is a function of summed per-sentence statistics.

    Subclasses call :meth:`_init_sentence_stats` in ``__init__``, :meth:`_keep_sentence_stats`
    with each batch's ``[B, S]`` rows in ``update``, and define :meth:`score_from_stats` and
    :meth:`signature`.
    """

    keep_sentence_stats: bool
    num_refs: Tensor
    sentence_rows: list[Tensor]

    def _init_sentence_stats(self, keep_sentence_stats: bool) -> None:
        if not isinstance(keep_sentence_stats, bool):
            raise TypeError(f"`keep_sentence_stats` must be a bool, got {keep_sentence_stats!r}")
        self.keep_sentence_stats = keep_sentence_stats
        if keep_sentence_stats:
            self.add_state("sentence_rows", default=[], dist_reduce_fx="cat")
        # The most references any sample had, for the signature (sacrebleu's `nrefs`).
        self.add_state("num_refs", default=torch.tensor(0), dist_reduce_fx="max")

    def _keep_sentence_stats(self, rows: Tensor, num_refs: int) -> None:
        """Record one batch: ``rows`` ``[B, S]`` per-sentence statistics, at most ``num_refs`` references."""
        self.num_refs = torch.clamp(self.num_refs, min=num_refs)
        if self.keep_sentence_stats:
            self.sentence_rows.append(rows.to(device=self.device, dtype=sum_dtype(self.device)))

    def _sync_dist(
        self, dist_sync_fn: Callable[..., Any] = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        # A process without updates would send torchmetrics' stand-in, a float32 `tensor([])`, which
        # the others' float64 [N, S] rows cannot be gathered with: send an empty [0, S] of their kind.
        if self.keep_sentence_stats and isinstance(self.sentence_rows, list) and not self.sentence_rows:
            self.sentence_rows = [self._no_rows()]
        super()._sync_dist(dist_sync_fn, process_group)

    def _no_rows(self) -> Tensor:
        return torch.zeros(0, self.num_sentence_stats(), dtype=sum_dtype(self.device), device=self.device)

    def sentence_stats(self) -> Tensor:
        """The per-sentence statistics seen so far, ``[N, S]``, gathered across processes in rank order.

        Raises:
            RuntimeError: If the metric was built without ``keep_sentence_stats=True``.
        """
        if not self.keep_sentence_stats:
            raise RuntimeError(
                f"{type(self).__name__} keeps no per-sentence statistics; build it with `keep_sentence_stats=True`"
            )
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            rows = self.sentence_rows
            return self._no_rows() if isinstance(rows, list) and not rows else dim_zero_cat(rows)

    @abstractmethod
    def num_sentence_stats(self) -> int:
        """``S``, the width of a row of per-sentence statistics."""

    @abstractmethod
    def score_from_stats(self, stats: Tensor) -> Tensor:
        """Score summed statistics: ``[..., S]`` to ``[...]``, in the units of :meth:`compute`.

        ``score_from_stats(sentence_stats().sum(0))`` equals ``compute()``; a resample's sum gives
        that resample's corpus score, many at once.
        """

    @abstractmethod
    def signature(self) -> str:
        """The signature of this configuration as sacrebleu writes it, with llmkit's version."""


def signature(fields: dict[str, Any]) -> str:
    """Join ``fields`` as sacrebleu does (``key:value|...``), ending with llmkit's version."""
    return "|".join(f"{key}:{value}" for key, value in {**fields, "version": f"llmkit-{__version__}"}.items())


def yes_no(flag: bool) -> str:
    """A flag spelled as in sacrebleu's signatures."""
    return "yes" if flag else "no"
