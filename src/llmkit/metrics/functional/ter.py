"""Translation edit rate (Snover et al., 2006) equal to sacrebleu's TER, on text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from llmkit.metrics._state import sum_dtype
from llmkit.metrics.functional._corpus import TextTarget, check_text_corpus
from llmkit.metrics.functional._ter_edits import encode_sample, num_edits
from llmkit.metrics.functional._ter_tokenizer import tercom_words

TER_OPTIONS = ("normalized", "no_punct", "asian_support", "case_sensitive")


def _check_ter_args(**options: Any) -> None:
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {value!r}")


def _check_ter_input(preds: Any, target: Any) -> tuple[list[str], list[list[str]]]:
    for name, value in (("preds", preds), ("target", target)):
        if isinstance(value, Tensor):
            raise TypeError(
                f"TER scores text: `{name}` must be a sequence of strings, got a Tensor; decode token ids first"
            )
    return check_text_corpus(preds, target)


def _ter_update(
    preds: Sequence[str],
    target: TextTarget,
    normalized: bool = False,
    no_punct: bool = False,
    asian_support: bool = False,
    case_sensitive: bool = False,
) -> tuple[Tensor, int]:
    """Count the edits of each sentence of one batch, as sacrebleu's ``TER._extract_corpus_statistics``.

    Returns:
        ``(rows, num_refs)``: ``[B, 2]`` float64 rows ``[num_edits, ref_length]`` (the fewest
        edits over the sample's references, and their mean length), and the most references
        a sample of the batch had.
    """
    hyps, refs = _check_ter_input(preds, target)
    hyp_words, refs_words = tercom_words(hyps, refs, normalized, no_punct, asian_support, case_sensitive)
    rows = []
    for words, sample_refs in zip(hyp_words, refs_words, strict=True):
        hyp, coded_refs = encode_sample(words, sample_refs)
        edits = min(num_edits(hyp, ref) for ref in coded_refs)
        rows.append((edits, sum(map(len, sample_refs)) / len(sample_refs)))
    stats = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 2)
    return stats, max(map(len, refs), default=0)


def _ter_compute(stats: Tensor) -> Tensor:
    """TER from summed statistics ``[..., 2]`` (edits, reference length) to ``[...]``, as sacrebleu's / 100.

    With no reference word, a corpus with an edit scores 1 and one without scores 0.
    """
    edits, ref_length = stats[..., 0], stats[..., 1]
    score = edits / ref_length.clamp(min=torch.finfo(stats.dtype).tiny)
    return torch.where(ref_length > 0, score, (edits > 0).to(stats.dtype))


def ter_score(
    preds: Sequence[str],
    target: TextTarget,
    normalized: bool = False,
    no_punct: bool = False,
    asian_support: bool = False,
    case_sensitive: bool = False,
) -> Tensor:
    """Corpus TER equal to ``sacrebleu.metrics.TER(...).corpus_score(preds, refs).score / 100``.

    The edits are Tercom's (as sacrebleu reimplements it): word insertions, deletions,
    substitutions and shifts of word blocks, counted against the closest reference of each
    sample, divided by the mean reference length, summed over the corpus. Lower is better; it
    exceeds 1 when a hypothesis needs more edits than its reference has words.

    Args:
        preds: the hypotheses, one string per sample.
        target: per sample a reference string or a sequence of reference strings (the number
            may differ between samples).
        normalized: Tercom's normalisation (XML entities, punctuation split off words; with
            ``asian_support`` CJK characters split too).
        no_punct: remove punctuation (with ``asian_support``, CJK and full-width punctuation too).
        asian_support: the CJK rules of ``normalized`` and ``no_punct``.
        case_sensitive: keep the case (by default text is lowercased).

    Returns:
        A 0-d float tensor, e.g. 0.453 where sacrebleu prints 45.3.

    Raises:
        TypeError: If an option is not a bool, the inputs are tensors (TER scores text only), or
            they are not text.
        ValueError: If ``preds`` and ``target`` hold different numbers of samples, or a sample
            has no reference.

    Examples:
        >>> round(ter_score(["the cat sat on the mat"], [["the cat is on the mat", "a cat sat on a mat"]]).item(), 4)
        0.1667
        >>> round(ter_score(["on the mat the cat sat"], ["the cat sat on the mat"]).item(), 4)
        0.1667
    """
    _check_ter_args(
        normalized=normalized, no_punct=no_punct, asian_support=asian_support, case_sensitive=case_sensitive
    )
    rows, _ = _ter_update(preds, target, normalized, no_punct, asian_support, case_sensitive)
    return _ter_compute(rows.to(sum_dtype(rows.device)).sum(0)).to(torch.get_default_dtype())
