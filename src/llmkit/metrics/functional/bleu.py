"""Corpus BLEU (Papineni et al., 2002) equal to sacrebleu's, on text or token ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llmkit.metrics._state import sum_dtype
from llmkit.metrics.functional._corpus import (
    FlatCorpus,
    TextTarget,
    check_text_corpus,
    flatten_text,
    flatten_token_ids,
    is_token_ids,
)
from llmkit.metrics.functional._ngrams import clipped_ngram_matches, ngram_totals
from llmkit.metrics.tokenizers import BLEU_TOKENIZERS, bleu_token_stream

# sacrebleu's smoothing methods and their default `smooth_value` (Chen and Cherry, 2014).
SMOOTH_DEFAULTS: dict[str, float | None] = {"none": None, "floor": 0.1, "add-k": 1.0, "exp": None}
# sacrebleu's floor for log(0).
_LOG_ZERO = -9999999999.0


def _check_bleu_args(n_gram: int, smooth_method: str, smooth_value: float | None, tokenize: str) -> None:
    if isinstance(n_gram, bool) or not isinstance(n_gram, int) or n_gram < 1:
        raise ValueError(f"`n_gram` must be a positive integer, got {n_gram!r}")
    if smooth_method not in SMOOTH_DEFAULTS:
        raise ValueError(f"`smooth_method` must be one of {tuple(SMOOTH_DEFAULTS)}, got {smooth_method!r}")
    if smooth_value is not None and smooth_value < 0:
        raise ValueError(f"`smooth_value` must be non-negative, got {smooth_value!r}")
    if tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"`tokenize` must be one of {BLEU_TOKENIZERS}, got {tokenize!r}")


def _flatten_bleu_input(
    preds: Sequence[str] | Tensor,
    target: TextTarget | Tensor,
    tokenize: str,
    lowercase: bool,
    ignore_index: int | None,
) -> FlatCorpus:
    if is_token_ids(preds, target):
        assert isinstance(preds, Tensor) and isinstance(target, Tensor)  # narrowed by is_token_ids
        return flatten_token_ids(preds, target, ignore_index)
    assert not isinstance(preds, Tensor) and not isinstance(target, Tensor)
    hyps, refs = check_text_corpus(preds, target)
    ref_lines = [ref for sample_refs in refs for ref in sample_refs]
    ref_owner = [index for index, sample_refs in enumerate(refs) for _ in sample_refs]
    return flatten_text(
        (*bleu_token_stream(hyps, tokenize, lowercase), len(hyps)),
        (*bleu_token_stream(ref_lines, tokenize, lowercase), len(ref_lines)),
        ref_owner,
    )


def _closest_ref_lens(hyp_lens: Tensor, ref_lens: Tensor, ref_owner: Tensor) -> Tensor:
    """Per hypothesis, the reference length closest to its own; the shorter one on a tie."""
    longest = int(ref_lens.max()) + 1 if ref_lens.numel() else 1
    distance = (ref_lens - hyp_lens[ref_owner]).abs()
    # One integer orders by distance, then by length.
    key = distance * longest + ref_lens
    best = torch.full_like(hyp_lens, torch.iinfo(torch.long).max)
    best.scatter_reduce_(0, ref_owner, key, reduce="amin")
    return best % longest


def _bleu_sentence_stats(
    preds: Sequence[str] | Tensor,
    target: TextTarget | Tensor,
    n_gram: int = 4,
    tokenize: str = "13a",
    lowercase: bool = False,
    ignore_index: int | None = None,
) -> tuple[Tensor, int]:
    """Count the sufficient statistics of BLEU for each sentence of one batch.

    Returns:
        ``(rows, num_refs)``: ``rows`` ``[B, 2 + 2 * n_gram]`` int64 in sacrebleu's column order
        (hypothesis words, closest reference words, clipped matches per order, hypothesis
        n-grams per order), and the most references a sample had.
    """
    corpus = _flatten_bleu_input(preds, target, tokenize, lowercase, ignore_index)
    matches = clipped_ngram_matches(
        corpus.hyp_tokens, corpus.hyp_lens, corpus.ref_tokens, corpus.ref_lens, corpus.ref_owner, n_gram
    )
    totals = ngram_totals(corpus.hyp_lens, n_gram)
    hyp_lens = corpus.hyp_lens.long()
    target_len = _closest_ref_lens(hyp_lens, corpus.ref_lens.long(), corpus.ref_owner)
    rows = torch.cat([hyp_lens.unsqueeze(1), target_len.unsqueeze(1), matches.T, totals.T], dim=1)
    num_refs = int(torch.bincount(corpus.ref_owner).max()) if corpus.ref_owner.numel() else 0
    return rows, num_refs


def _bleu_update(
    preds: Sequence[str] | Tensor,
    target: TextTarget | Tensor,
    n_gram: int = 4,
    tokenize: str = "13a",
    lowercase: bool = False,
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Count the sufficient statistics of BLEU for one batch.

    Returns:
        ``(matches [n_gram], totals [n_gram], preds_len [], target_len [])``, int64: clipped
        n-gram matches and hypothesis n-grams per order, hypothesis words, and closest
        reference words, summed over the batch.
    """
    rows, _ = _bleu_sentence_stats(preds, target, n_gram, tokenize, lowercase, ignore_index)
    return _split_bleu_stats(rows.sum(0))


def _split_bleu_stats(stats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``[..., 2 + 2n]`` summed rows to ``(matches [..., n], totals [..., n], preds_len [...], target_len [...])``."""
    n_gram = (stats.shape[-1] - 2) // 2
    return stats[..., 2 : 2 + n_gram], stats[..., 2 + n_gram :], stats[..., 0], stats[..., 1]


def _bleu_compute(
    matches: Tensor,
    totals: Tensor,
    preds_len: Tensor,
    target_len: Tensor,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    effective_order: bool = False,
) -> Tensor:
    """BLEU in [0, 1] from its sufficient statistics, as ``sacrebleu.BLEU.compute_bleu`` / 100.

    Batched: ``matches``/``totals`` ``[..., n_gram]`` and the lengths ``[...]`` give ``[...]``,
    in float64 (float32 on MPS), so that significance tests compare scores as sacrebleu does.
    """
    if smooth_value is None:
        smooth_value = SMOOTH_DEFAULTS[smooth_method]
    max_order = matches.shape[-1]
    dtype = sum_dtype(matches.device)
    correct, total = matches.to(dtype), totals.to(dtype).clone()
    if smooth_method == "add-k":
        assert smooth_value is not None
        correct = correct.clone()
        correct[..., 1:] += smooth_value
        total[..., 1:] += smooth_value
    # sacrebleu walks the orders up and stops at the first that has no n-gram at all.
    reached = torch.cumprod((total > 0).long(), -1).bool()
    missed = correct == 0
    precision = correct / total
    if smooth_method == "exp":
        # Each order without a match halves the smoothed precision again.
        halvings = torch.cumsum((missed & reached).long(), -1)
        precision = torch.where(missed, 1.0 / (2.0**halvings * total), precision)
    elif smooth_method == "floor":
        assert smooth_value is not None
        precision = torch.where(missed, smooth_value / total, precision)
    else:
        precision = torch.where(missed, 0.0, precision)
    precision = torch.where(reached, precision, 0.0)
    log_precision = torch.where(precision > 0, torch.log(precision.clamp(min=1e-300)), _LOG_ZERO)
    num_orders = torch.full(matches.shape[:-1], float(max_order), dtype=dtype, device=matches.device)
    if effective_order:
        # Only the orders reached count; none reached leaves all of them (sacrebleu's rule).
        num_reached = reached.sum(-1).to(dtype)
        num_orders = torch.where(num_reached > 0, num_reached, num_orders)
    in_mean = torch.arange(max_order, device=matches.device) < num_orders.unsqueeze(-1)
    score = torch.exp(torch.where(in_mean, log_precision, 0.0).sum(-1) / num_orders)

    sys_len, ref_len = preds_len.to(dtype), target_len.to(dtype)
    brevity = torch.where(
        sys_len >= ref_len,
        torch.ones_like(sys_len),
        torch.where(sys_len > 0, torch.exp(1.0 - ref_len / sys_len.clamp(min=1.0)), 0.0),
    )
    # No match at any order scores 0 before any smoothing applies.
    return torch.where(matches.sum(-1) > 0, brevity * score, 0.0)


def bleu_score(
    preds: Sequence[str] | Tensor,
    target: TextTarget | Tensor,
    n_gram: int = 4,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    tokenize: str = "13a",
    lowercase: bool = False,
    ignore_index: int | None = None,
    effective_order: bool = False,
) -> Tensor:
    """Corpus BLEU equal to ``sacrebleu.corpus_bleu(...).score / 100``.

    Args:
        preds: the hypotheses: one string per sample, or ``[B, T]`` integer token ids.
        target: the references: per sample a string or a sequence of strings (the number may
            differ between samples), or ``[B, T']`` / ``[B, R, T']`` integer token ids.
        n_gram: the largest n-gram order (sacrebleu's ``max_ngram_order``).
        smooth_method: ``"none"``, ``"floor"``, ``"add-k"`` or ``"exp"``, as in sacrebleu.
        smooth_value: the value of ``"floor"`` (default 0.1) and ``"add-k"`` (default 1).
        tokenize: sacrebleu's tokenizer for text: ``"13a"``, ``"intl"``, ``"char"`` or ``"none"``.
            Token ids are words already (as ``"none"`` on the space-joined ids).
        lowercase: lowercase text before tokenizing.
        ignore_index: for token ids, the padding id, dropped before counting. A reference row
            that is all padding counts as missing.
        effective_order: average only over the n-gram orders that the hypotheses have
            (sacrebleu's option for sentence-level BLEU).

    Returns:
        A 0-d tensor in [0, 1].

    Raises:
        ValueError: If an argument is out of its range, the corpus sizes differ, a sample has no
            reference, or token-id shapes do not fit.
        TypeError: If the inputs are neither text nor integer tensors, or mix the two.

    Examples:
        >>> preds = ["the cat is on the mat"]
        >>> target = [["there is a cat on the mat", "a cat is on the mat"]]
        >>> round(bleu_score(preds, target).item(), 4)
        0.7598
        >>> import torch
        >>> preds, target = torch.tensor([[3, 4, 5, 6, 0]]), torch.tensor([[3, 4, 5, 7, 0]])
        >>> round(bleu_score(preds, target, ignore_index=0).item(), 4)
        0.5946
    """
    _check_bleu_args(n_gram, smooth_method, smooth_value, tokenize)
    stats = _bleu_update(preds, target, n_gram, tokenize, lowercase, ignore_index)
    return _bleu_compute(*stats, smooth_method, smooth_value, effective_order).to(torch.get_default_dtype())
