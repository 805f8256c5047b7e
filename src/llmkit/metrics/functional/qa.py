"""Question-answering exact match and F1 with the official SQuAD v1.1 and v2.0 rules.

An answer is normalised as SQuAD's ``normalize_answer`` does (lowercase, ASCII punctuation
removed, the English articles a/an/the removed, whitespace collapsed) and split on whitespace.
Exact match asks whether the normalised prediction equals a gold answer; F1 is the harmonic mean
of precision and recall of the common tokens, counted as multisets; both take the maximum over
a question's gold answers. The normalisation runs over all strings of a batch joined by a
separator, and the scoring is vectorised, in runs of questions of a bounded number of tokens.
"""

from __future__ import annotations

import re
import string
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, repeat

import torch
from torch import Tensor

from llmkit.metrics._state import sum_dtype
from llmkit.metrics.functional._corpus import FlatCorpus, flatten_token_ids, is_token_ids

SQUAD_VERSIONS = ("v1.1", "v2.0")
# The rows of the state: questions with a gold answer, and without one (SQuAD v2.0's split).
GROUPS = ("HasAns", "NoAns")
# The columns of the state: per group, summed exact match and F1, and the number of questions.
STAT_NAMES = ("exact_match", "f1", "total")

QATarget = Sequence[str] | Sequence[Sequence[str]]

# At most about this many tokens are scored at once. Below torch's grain size (32768 elements)
# most operations run on the calling thread: on a busy CPU the thread pool's hand-offs cost far
# more than the work (a sort of 100k ids: 1 ms alone, hundreds of ms while other processes hold
# the cores). For the same reason gathers and scatters use `index_select`/`scatter_`/`index_fill_`:
# indexing with a tensor (`x[index]`, `x[index] = y`) goes to the thread pool at any size.
_CHUNK_TOKENS = 16384
# Text is cut before it is split into words: a word and its space take about this many characters.
_CHARS_PER_TOKEN = 4

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def _check_qa_args(squad_version: str, ignore_index: int | None) -> None:
    if squad_version not in SQUAD_VERSIONS:
        raise ValueError(f"`squad_version` must be one of {SQUAD_VERSIONS}, got {squad_version!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}")


def _separator(texts: Sequence[str]) -> str:
    """A character absent from ``texts`` that normalisation keeps as a word of its own.

    NUL, or else the first private-use character not in the text: neither is a word character,
    whitespace, punctuation, nor changed by ``lower()``.
    """
    joined = "".join(texts)
    code = 0
    while chr(code) in joined:
        code = 0xE000 if code == 0 else code + 1
    return chr(code)


def normalize_answers(texts: Sequence[str]) -> list[list[str]]:
    """SQuAD's ``normalize_answer(text).split()`` for every text, in one pass over them all.

    The texts are joined by ``" <sep> "``: the spaces keep every regex word boundary, every word
    and the Greek final-sigma rule of ``str.lower`` as they are within each text alone.
    """
    if not texts:
        return []
    separator = _separator(texts)
    text = f" {separator} ".join(texts).lower()
    text = _ARTICLES.sub(" ", _PUNCTUATION.sub("", text))
    return [part.split() for part in text.split(separator)]


def _as_ids(sentences: list[list[str]], vocab: dict[str, int]) -> tuple[Tensor, Tensor]:
    """Words as ids of ``vocab`` (which must hold them): ``([sum(lens)] int64, [N] int64 lens)``."""
    ids = array("q", map(vocab.__getitem__, chain.from_iterable(sentences)))
    tokens = torch.frombuffer(ids, dtype=torch.long).clone() if ids else torch.zeros(0, dtype=torch.long)
    return tokens, torch.tensor(list(map(len, sentences)), dtype=torch.long)


def _check_qa_text(preds: Sequence[str], target: QATarget, squad_version: str) -> tuple[list[str], list[list[str]]]:
    """Check a text batch and return it as predictions and per-question gold answers.

    Raises:
        TypeError: If ``preds`` or ``target`` is a bare string, or holds something else than strings.
        ValueError: If they hold different numbers of questions, or (SQuAD v1.1) a question has no
            gold answer or an empty one.
    """
    for name, value in (("preds", preds), ("target", target)):
        if isinstance(value, str):
            raise TypeError(
                f"`{name}` must be a sequence with one entry per question, got a single str {value[:40]!r}; "
                "wrap it in a list"
            )
        if not isinstance(value, Sequence):
            raise TypeError(f"`{name}` must be a sequence with one entry per question, got {type(value).__name__}")
    if len(preds) != len(target):
        raise ValueError(
            f"`preds` and `target` must hold the same number of questions, got {len(preds)} and {len(target)}"
        )
    answers = list(preds)
    if not all(isinstance(answer, str) for answer in answers):
        index, bad = next((i, answer) for i, answer in enumerate(answers) if not isinstance(answer, str))
        raise TypeError(f"`preds[{index}]` must be a str, got {type(bad).__name__}")
    golds: list[list[str]] = []
    for index, sample in enumerate(target):
        if isinstance(sample, str):
            sample = [sample]
        # A list or tuple first: the abstract Sequence check is slow.
        elif not isinstance(sample, (list, tuple)) and not isinstance(sample, Sequence):
            raise TypeError(f"`target[{index}]` must be a str or a sequence of str, got {type(sample).__name__}")
        elif not all(isinstance(gold, str) for gold in sample):
            gold_index, bad = next((i, gold) for i, gold in enumerate(sample) if not isinstance(gold, str))
            raise TypeError(f"`target[{index}][{gold_index}]` must be a str, got {type(bad).__name__}")
        if squad_version == "v1.1" and (len(sample) == 0 or "" in sample):
            raise ValueError(
                f"`target[{index}]` is {list(sample)!r}: SQuAD v1.1 needs at least one non-empty gold answer per "
                "question; for unanswerable questions use squad_version='v2.0'"
            )
        golds.append(list(sample))
    return answers, golds


def _text_chunks(answers: list[str], golds: list[list[str]]) -> Iterator[tuple[int, int]]:
    """Cut checked text into runs of questions of about ``_CHUNK_TOKENS`` tokens: ``(first, end)``."""
    first, size = 0, 0
    for index, (answer, sample) in enumerate(zip(answers, golds, strict=True)):
        size += len(answer) + sum(map(len, sample)) + len(sample) + 1
        if size > _CHARS_PER_TOKEN * _CHUNK_TOKENS:
            yield first, index + 1
            first, size = index + 1, 0
    if first < len(answers) or not answers:
        yield first, len(answers)


def _qa_text_corpus(answers: list[str], golds: list[list[str]]) -> tuple[FlatCorpus, Tensor]:
    """Checked text as a :class:`FlatCorpus` of normalised words, and whether each question has an answer."""
    hyps = normalize_answers(answers)
    refs = normalize_answers([gold for sample in golds for gold in sample])
    vocab = {word: index for index, word in enumerate(dict.fromkeys(chain.from_iterable(chain(hyps, refs))))}
    hyp_tokens, hyp_lens = _as_ids(hyps, vocab)
    ref_tokens, ref_lens = _as_ids(refs, vocab)
    owner = array("q", chain.from_iterable(repeat(index, len(sample)) for index, sample in enumerate(golds)))
    corpus = FlatCorpus(
        hyp_tokens=hyp_tokens,
        hyp_lens=hyp_lens,
        ref_tokens=ref_tokens,
        ref_lens=ref_lens,
        ref_owner=torch.frombuffer(owner, dtype=torch.long).clone() if owner else torch.zeros(0, dtype=torch.long),
    )
    # SQuAD v2.0's `make_qid_to_has_ans`: a question has an answer when its list of answers is
    # not empty; here an empty string stands for "no answer" and is not in that list.
    has_answer = torch.tensor([any(sample) for sample in golds], dtype=torch.bool)
    return corpus, has_answer


def _qa_id_corpus(
    preds: Tensor, target: Tensor, ignore_index: int | None, squad_version: str
) -> tuple[FlatCorpus, Tensor]:
    """Token ids as a :class:`FlatCorpus`, and whether each question has an answer (a non-empty row)."""
    corpus = flatten_token_ids(preds, target, ignore_index)
    answers = torch.zeros(corpus.num_samples, dtype=torch.long, device=corpus.ref_lens.device)
    has_answer = answers.index_add_(0, corpus.ref_owner, (corpus.ref_lens > 0).long()) > 0
    if squad_version == "v1.1" and not bool(has_answer.all()):
        index = int(torch.nonzero(~has_answer)[0])
        raise ValueError(
            f"`target[{index}]` holds no gold answer (every row is empty or `ignore_index`={ignore_index}): "
            "SQuAD v1.1 needs one per question; for unanswerable questions use squad_version='v2.0'"
        )
    return corpus, has_answer


def _starts(lens: Tensor) -> Tensor:
    """The offset of each segment in the concatenation of segments of lengths ``lens``."""
    return torch.cumsum(lens, 0) - lens


def _segment_ids(lens: Tensor) -> Tensor:
    """For each element of the concatenated segments, the index of its segment.

    A cumulative count of the segments begun so far (``repeat_interleave`` would do, but it
    always runs on torch's thread pool, which costs milliseconds on a busy machine).
    """
    total = int(lens.sum())
    begun = torch.zeros(total + 1, dtype=torch.long, device=lens.device)
    begun.index_add_(0, _starts(lens), torch.ones_like(lens))
    # Empty segments begin where the next one does; the last of them owns the elements.
    return torch.cumsum(begun[:total], 0) - 1


def _number(values: Tensor) -> tuple[Tensor, int]:
    """Number the distinct values (in sorted order): ``(their numbers [N], how many)``.

    ``torch.unique(return_inverse=True)``, by a sort (unique's own inverse is very slow on CPU
    when its threads compete with other work).
    """
    if values.numel() == 0:
        return values.new_zeros(0), 0
    ordered, order = torch.sort(values)
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[1:] = ordered[1:] != ordered[:-1]
    numbers = torch.cumsum(is_new, 0) - 1
    out = torch.empty_like(numbers)
    out.scatter_(0, order, numbers)
    return out, int(numbers[-1]) + 1


def _pair_scores(corpus: FlatCorpus) -> tuple[Tensor, Tensor]:
    """SQuAD v2.0's ``compute_exact`` and ``compute_f1`` of every (prediction, gold answer) pair.

    Returns:
        ``(exact [L], f1 [L])``, float64, one per gold answer, against its question's prediction.
    """
    hyp_tokens, ref_tokens, owner = corpus.hyp_tokens, corpus.ref_tokens, corpus.ref_owner
    hyp_lens, ref_lens = corpus.hyp_lens.long(), corpus.ref_lens.long()
    device = ref_tokens.device
    dtype = sum_dtype(device)
    pred_lens = hyp_lens.index_select(0, owner)  # [L]
    ref_of_token = _segment_ids(ref_lens)  # [sum(ref_lens)]
    hyp_of_token = _segment_ids(hyp_lens)  # [sum(hyp_lens)]

    # Exact match: the same length and the same token at every position of the gold answer.
    position = torch.arange(ref_tokens.numel(), device=device) - _starts(ref_lens).index_select(0, ref_of_token)
    question = owner.index_select(0, ref_of_token)
    in_pred = position < hyp_lens.index_select(0, question)
    # One id past the end that no token equals, where the gold answer runs past the prediction.
    padded = torch.cat([hyp_tokens, hyp_tokens.new_full((1,), -1)])
    at = torch.where(in_pred, _starts(hyp_lens).index_select(0, question) + position, hyp_tokens.numel())
    mismatches = torch.zeros_like(ref_lens)
    mismatches.index_add_(0, ref_of_token, (padded.index_select(0, at) != ref_tokens).long())
    exact = (pred_lens == ref_lens) & (mismatches == 0)

    # Common tokens as multisets: per gold answer and word, the smaller of the two counts. A word
    # of a question (its index and the id) is numbered once for the predictions and the golds.
    vocab = int(torch.cat([hyp_tokens, ref_tokens]).max()) + 1 if hyp_tokens.numel() or ref_tokens.numel() else 1
    if vocab * max(hyp_lens.numel(), 1) >= 2**62:  # ids too large to pack with an index
        dense, vocab = _number(torch.cat([hyp_tokens, ref_tokens]))
        hyp_tokens, ref_tokens = dense[: hyp_tokens.numel()], dense[hyp_tokens.numel() :]
    word, num_words = _number(torch.cat([hyp_of_token * vocab + hyp_tokens, question * vocab + ref_tokens]))
    pred_counts = torch.zeros(num_words, dtype=torch.long, device=device)
    pred_counts.index_add_(0, word[: hyp_tokens.numel()], torch.ones_like(hyp_tokens))
    # Per gold answer, its words with their counts.
    ref_word, num_ref_words = _number(ref_of_token * num_words + word[hyp_tokens.numel() :])
    ref_counts = torch.zeros(num_ref_words, dtype=torch.long, device=device)
    ref_counts.index_add_(0, ref_word, torch.ones_like(ref_tokens))
    first = torch.zeros(num_ref_words, dtype=torch.long, device=device)
    first.scatter_(0, ref_word, torch.arange(ref_word.numel(), device=device))  # any token of the word will do
    counts_in_pred = pred_counts.index_select(0, word[hyp_tokens.numel() :].index_select(0, first))
    common = torch.zeros_like(ref_lens)
    common.index_add_(0, ref_of_token.index_select(0, first), torch.minimum(ref_counts, counts_in_pred))

    # compute_f1, with its operations in its order (so equal to the last bit).
    num_same = common.to(dtype)
    precision = num_same / pred_lens.clamp(min=1).to(dtype)
    recall = num_same / ref_lens.clamp(min=1).to(dtype)
    f1 = torch.where(common > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), 0.0)
    # "If either is no-answer, then F1 is 1 if they agree, 0 otherwise."
    either_empty = (pred_lens == 0) | (ref_lens == 0)
    f1 = torch.where(either_empty, (pred_lens == ref_lens).to(dtype), f1)
    return exact.to(dtype), f1


def _chunks(corpus: FlatCorpus) -> Iterator[tuple[int, int, FlatCorpus]]:
    """Cut the questions into runs of about ``_CHUNK_TOKENS`` tokens: ``(first, end, their corpus)``."""
    num = corpus.num_samples
    num_tokens = corpus.hyp_tokens.numel() + corpus.ref_tokens.numel()
    if num_tokens <= _CHUNK_TOKENS:
        yield 0, num, corpus
        return
    step = max(1, num * _CHUNK_TOKENS // num_tokens)
    bounds = [*range(0, num, step), num]
    owner = corpus.ref_owner
    # The gold answers of a question follow each other: its first one is found by a search.
    ref_bounds = torch.searchsorted(owner, torch.tensor(bounds, dtype=owner.dtype, device=owner.device)).tolist()
    hyp_at = torch.cat([corpus.hyp_lens.new_zeros(1), torch.cumsum(corpus.hyp_lens, 0)]).tolist()
    ref_at = torch.cat([corpus.ref_lens.new_zeros(1), torch.cumsum(corpus.ref_lens, 0)]).tolist()
    for index in range(len(bounds) - 1):
        lo, hi, ref_lo, ref_hi = bounds[index], bounds[index + 1], ref_bounds[index], ref_bounds[index + 1]
        yield lo, hi, FlatCorpus(
            hyp_tokens=corpus.hyp_tokens[hyp_at[lo] : hyp_at[hi]],
            hyp_lens=corpus.hyp_lens[lo:hi],
            ref_tokens=corpus.ref_tokens[ref_at[ref_lo] : ref_at[ref_hi]],
            ref_lens=corpus.ref_lens[ref_lo:ref_hi],
            ref_owner=owner[ref_lo:ref_hi] - lo,
        )


def _score_questions(corpus: FlatCorpus, has_answer: Tensor, squad_version: str) -> Tensor:
    """The ``[2, 3]`` sums (see :func:`_qa_update`) of the questions of ``corpus``."""
    exact, f1 = _pair_scores(corpus)
    owner, num = corpus.ref_owner, corpus.num_samples
    device = exact.device
    scores = torch.stack([exact, f1], 1)  # [L, 2]
    if squad_version == "v2.0":
        # get_raw_scores: gold answers that normalise to nothing are dropped (scored below 0 here);
        # a question left without any is scored against the empty answer.
        scores = torch.where((corpus.ref_lens > 0).unsqueeze(1), scores, -1.0)
    # The maximum over a question's gold answers; the empty answer's score where it has none.
    best = torch.full((num, 2), -1.0, dtype=scores.dtype, device=device)
    best.scatter_reduce_(0, owner.unsqueeze(1).expand(-1, 2), scores, reduce="amax")
    pred_empty = (corpus.hyp_lens == 0).to(device=device, dtype=best.dtype).unsqueeze(1)
    best = torch.where(best < 0, pred_empty, best)
    rows = torch.cat([best, torch.ones(num, 1, dtype=best.dtype, device=device)], 1)  # [B, 3]
    group = (~has_answer.to(device)).long()  # 0: HasAns, 1: NoAns
    return torch.zeros(len(GROUPS), len(STAT_NAMES), dtype=best.dtype, device=device).index_add_(0, group, rows)


def _qa_update(
    preds: Sequence[str] | Tensor,
    target: QATarget | Tensor,
    squad_version: str = "v1.1",
    ignore_index: int | None = None,
) -> Tensor:
    """Score one batch.

    Returns:
        ``[2, 3]`` float64 sums: rows ``GROUPS`` (questions with and without a gold answer),
        columns ``STAT_NAMES`` (exact match, F1, number of questions).
    """
    batches: Iterable[tuple[FlatCorpus, Tensor]]
    if is_token_ids(preds, target):
        assert isinstance(preds, Tensor) and isinstance(target, Tensor)  # narrowed by is_token_ids
        batches = [_qa_id_corpus(preds, target, ignore_index, squad_version)]
    else:
        assert not isinstance(preds, Tensor) and not isinstance(target, Tensor)
        answers, golds = _check_qa_text(preds, target, squad_version)
        # Normalised and numbered in runs too, so that no tensor outgrows the grain size.
        batches = (_qa_text_corpus(answers[lo:hi], golds[lo:hi]) for lo, hi in _text_chunks(answers, golds))
    sums = torch.zeros(len(GROUPS), len(STAT_NAMES), dtype=torch.float64)
    for corpus, has_answer in batches:
        sums = sums.to(has_answer.device, sum_dtype(has_answer.device))
        for lo, hi, part in _chunks(corpus):
            sums += _score_questions(part, has_answer[lo:hi], squad_version)
    return sums


def _qa_compute(sums: Tensor, squad_version: str = "v1.1") -> dict[str, Tensor]:
    """Means in [0, 1] from the ``[2, 3]`` sums (0 for a group without questions).

    Returns:
        ``{"exact_match", "f1"}``; with ``"v2.0"`` also ``"total"`` and, for ``HasAns`` and ``NoAns``,
        ``"<group>_exact_match"``, ``"<group>_f1"`` and ``"<group>_total"``. float64 0-d tensors.
    """
    sums = sums.to(sum_dtype(sums.device))
    every = sums.sum(0)
    out = {"exact_match": every[0] / every[2].clamp(min=1), "f1": every[1] / every[2].clamp(min=1)}
    if squad_version == "v2.0":
        out["total"] = every[2]
        for row, group in enumerate(GROUPS):
            count = sums[row, 2]
            out[f"{group}_exact_match"] = sums[row, 0] / count.clamp(min=1)
            out[f"{group}_f1"] = sums[row, 1] / count.clamp(min=1)
            out[f"{group}_total"] = count
    return out


def qa_score(
    preds: Sequence[str] | Tensor,
    target: QATarget | Tensor,
    squad_version: str = "v1.1",
    ignore_index: int | None = None,
) -> dict[str, Tensor]:
    """SQuAD exact match and F1, equal to the official evaluation scripts (as fractions, not percent).

    ``"v1.1"`` equals torchmetrics' ``squad`` (a port of the official v1.1 script) divided by 100:
    every question has at least one gold answer. ``"v2.0"`` follows the official v2.0 script:
    a question may have no answer (an empty string or no gold at all), gold answers that
    normalise to nothing are dropped, a question left without gold is answered correctly only by
    a prediction that normalises to nothing, and the scores are also reported separately for
    questions with an answer (``HasAns``) and without (``NoAns``).

    Token ids are words already (no normalisation): exact match asks for the same id sequence,
    F1 counts the common ids as multisets. This is the text path on the space-joined ids.

    Args:
        preds: the predicted answers: one string per question, or ``[B, T]`` integer token ids.
        target: the gold answers: per question a string or a sequence of strings (their number
            may differ between questions), or ``[B, T']`` / ``[B, R, T']`` integer token ids.
        squad_version: ``"v1.1"`` or ``"v2.0"``, the rules above.
        ignore_index: for token ids, the padding id, dropped before scoring. A gold row that is
            all padding is no gold answer (with ``"v2.0"``, a question with no other row has no answer).

    Returns:
        ``{"exact_match": ..., "f1": ...}`` in [0, 1]; with ``"v2.0"`` also ``"total"``,
        ``"HasAns_exact_match"``, ``"HasAns_f1"``, ``"HasAns_total"``, ``"NoAns_exact_match"``,
        ``"NoAns_f1"`` and ``"NoAns_total"`` (a group without questions scores 0). float64 0-d tensors.

    Raises:
        ValueError: If ``squad_version`` is unknown, the numbers of questions differ, token-id
            shapes do not fit, or (``"v1.1"``) a question has no gold answer or an empty one.
        TypeError: If the inputs are neither text nor integer tensors, or mix the two.

    Examples:
        >>> preds = ["The Eiffel Tower!", "in 1889"]
        >>> target = [["Eiffel Tower", "the tower"], ["1889", "March 1889"]]
        >>> {key: round(value.item(), 4) for key, value in qa_score(preds, target).items()}
        {'exact_match': 0.5, 'f1': 0.8333}
        >>> scores = qa_score(["1889", ""], [["1889"], []], squad_version="v2.0")
        >>> scores["HasAns_exact_match"].item(), scores["NoAns_exact_match"].item()
        (1.0, 1.0)
    """
    _check_qa_args(squad_version, ignore_index)
    return _qa_compute(_qa_update(preds, target, squad_version, ignore_index), squad_version)
