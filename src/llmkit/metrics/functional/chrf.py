"""chrF (Popović, 2015) and chrF++ (Popović, 2017) equal to sacrebleu's, on text or token ids.

chrF is an F-score over character n-grams (orders ``1..char_order``); chrF++ adds word n-grams
(orders ``1..word_order``, usually 2). Per sentence and order the statistics are sacrebleu's:
the hypothesis' n-grams, the reference's, and their clipped overlap ``sum_g min(hyp_g, ref_g)``.
With several references each sentence keeps the statistics of the reference that gives it the
best sentence-level score (the first on ties), and the corpus score is the F-score of the
statistics summed over sentences.

Counting is exact and vectorized: the n-grams of all (hypothesis, reference) pairs of a batch
are packed into integers and sorted, once for all orders when a window of ``char_order``
characters fits 62 bits (a few hundred distinct characters in a batch), else once per order;
instead of one ``Counter`` per sentence and order.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from itertools import chain
from typing import TypeVar

import torch
from torch import Tensor

from llmkit.metrics._state import sum_dtype
from llmkit.metrics.functional._corpus import TextTarget, check_text_corpus, flatten_token_ids, is_token_ids

# sacrebleu's `CHRF._PUNCTS` (string.punctuation): split off the start or end of words for chrF++.
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
# sacrebleu's stand-in for 0/0 precision or recall.
_EPS = 1e-16
# Keys are built in int64 and kept non-negative.
_KEY_BITS = 62

_Item = TypeVar("_Item")


def _check_chrf_args(
    char_order: int,
    word_order: int,
    beta: float,
    lowercase: bool,
    whitespace: bool,
    eps_smoothing: bool,
    ignore_index: int | None,
) -> None:
    for name, value, low in (("char_order", char_order, 1), ("word_order", word_order, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise ValueError(f"`{name}` must be at least {low}, got {value}")
    if isinstance(beta, bool) or not isinstance(beta, int | float):
        raise TypeError(f"`beta` must be a real number, got {type(beta).__name__} {beta!r}")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"`beta` must be a finite non-negative number, got {beta!r}")
    for name, flag in (("lowercase", lowercase), ("whitespace", whitespace), ("eps_smoothing", eps_smoothing)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__} {flag!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"`ignore_index` must be an int or None, got {type(ignore_index).__name__} {ignore_index!r}")


def _split_punctuation(sentence: str) -> list[str]:
    """The words of ``sentence`` for chrF++'s word n-grams, as sacrebleu's ``CHRF._remove_punctuation``.

    Words are split on whitespace; a word of two or more characters that ends with punctuation
    loses that last character to a word of its own, else one that starts with punctuation its
    first (only one split per word: ``"(hi)"`` gives ``"(hi"`` and ``")"``).
    """
    words: list[str] = []
    for word in sentence.split():
        if len(word) > 1:
            if word[-1] in _PUNCTUATION:
                words += (word[:-1], word[-1])
                continue
            if word[0] in _PUNCTUATION:
                words += (word[0], word[1:])
                continue
        words.append(word)
    return words


def _bits(count: int) -> int:
    """How many bits hold the values ``0..count-1``."""
    return max(count - 1, 0).bit_length()


def _dense_ids(tokens: Tensor) -> tuple[Tensor, int]:
    """Map non-negative ``tokens`` to ``0..V-1`` keeping equality; return them and ``V``."""
    if tokens.numel() == 0:
        return tokens, 0
    largest = int(tokens.max())
    if largest < max(2**21, 4 * tokens.numel()):
        # A table over the id range (every Unicode code point fits): no sort needed.
        present = torch.zeros(largest + 1, dtype=torch.bool, device=tokens.device)
        present[tokens] = True
        rank = torch.cumsum(present, 0) - 1
        return rank[tokens], int(rank[-1]) + 1
    values, inverse = torch.unique(tokens, return_inverse=True)
    return inverse, values.numel()


def _run_starts(sorted_keys: Tensor) -> Tensor:
    """A boolean mask, True where a run of equal values starts in ``sorted_keys``."""
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    torch.ne(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    return starts


def _paired_ngram_matches(
    hyp_tokens: Tensor, hyp_lens: Tensor, ref_tokens: Tensor, ref_lens: Tensor, max_order: int
) -> Tensor:
    """Count the n-grams that hypothesis ``p`` shares with reference ``p``, clipped, for every pair ``p``.

    For pair ``p`` and order ``n`` this is ``sum_g min(count_hyp_p(g), count_ref_p(g))`` over the
    n-grams ``g`` of ``n`` consecutive tokens.

    Args:
        hyp_tokens: ``[sum(hyp_lens)]`` non-negative integer ids of all hypotheses, concatenated.
        hyp_lens: ``[P]`` the length of each hypothesis.
        ref_tokens: ``[sum(ref_lens)]`` non-negative integer ids of all references, concatenated.
        ref_lens: ``[P]`` the length of each reference.
        max_order: the largest n-gram order counted.

    Returns:
        ``[max_order, P]`` int64 clipped matches per order and pair.
    """
    num_pairs = hyp_lens.numel()
    matches = torch.zeros(max_order, num_pairs, dtype=torch.long, device=hyp_tokens.device)
    tokens, vocab_size = _dense_ids(torch.cat([hyp_tokens, ref_tokens]).long())
    if tokens.numel() == 0:
        return matches
    lens = torch.cat([hyp_lens, ref_lens]).long()
    # Orders beyond the shortest of the longest sentences on either side match nothing.
    max_order = min(max_order, int(hyp_lens.max()), int(ref_lens.max()))
    if max_order == 0:
        return matches
    if _bits(num_pairs) + max_order * _bits(vocab_size + 1) + 1 <= _KEY_BITS:
        matches[:max_order] = _window_matches(tokens, vocab_size, lens, num_pairs, max_order)
    else:
        matches[:max_order] = _per_order_matches(tokens, vocab_size, lens, num_pairs, max_order)
    return matches


def _window_matches(tokens: Tensor, vocab_size: int, lens: Tensor, num_pairs: int, max_order: int) -> Tensor:
    """:func:`_paired_ngram_matches` with one sort for all orders, when a window of ``max_order`` fits a key.

    Each position becomes one integer ``(pair, window, side)``, the window being the next
    ``max_order`` tokens of the sentence (``1..V``, 0 past its end), the first in the highest
    bits. Sorted, equal n-gram prefixes of one pair are contiguous for every order ``n``: a run
    of equal ``(pair, first n tokens)`` is one n-gram of one pair, and its hypothesis and
    reference counts are how many keys of each side it holds.
    """
    device = tokens.device
    token_bits = _bits(vocab_size + 1)
    total = tokens.numel()
    num_sentences = 2 * num_pairs  # the hypotheses, then the references
    # The tokens (1..V) with `max_order` zeros after each sentence: a window never reads the next one.
    gapped_lens = lens + max_order
    position = torch.arange(total, device=device)
    position += torch.repeat_interleave(torch.arange(num_sentences, device=device) * max_order, lens)
    gapped = tokens.new_zeros(int(gapped_lens.sum()) + max_order)
    gapped[position] = tokens + 1
    size = gapped.numel() - max_order
    pairs = torch.arange(num_pairs, device=device).repeat(2)
    key = torch.repeat_interleave(pairs, gapped_lens)
    for offset in range(max_order):
        key <<= token_bits
        key |= gapped[offset : offset + size]
    key = key.index_select(0, position)
    key <<= 1
    key[int(lens[:num_pairs].sum()) :] |= 1  # the side: 1 for the references
    key = torch.sort(key).values

    # Neighbouring keys' first n tokens (or pairs) differ where this is at least 2 ** shift(n).
    differ = key[1:] ^ key[:-1]
    # How many reference keys come before each position.
    ref_before = torch.cat([key.new_zeros(1), torch.cumsum(key & 1, 0)])
    run_start = torch.ones(total, dtype=torch.bool, device=device)
    token_mask = (1 << token_bits) - 1
    matches = torch.zeros(max_order, num_pairs, dtype=torch.long, device=device)
    for n in range(1, max_order + 1):
        shift = (max_order - n) * token_bits + 1
        torch.ge(differ, 1 << shift, out=run_start[1:])
        starts = torch.nonzero(run_start).squeeze(1)
        run_len = torch.diff(starts, append=starts.new_tensor([total]))
        ref_start = ref_before.index_select(0, starts)
        ref_count = torch.diff(ref_start, append=ref_before[-1:])
        hyp_count = run_len - ref_count
        run_prefix = key.index_select(0, starts) >> shift  # (pair, first n tokens)
        # A window that ends before its n-th token (0) holds no n-gram.
        is_ngram = (run_prefix & token_mask) != 0
        clipped = torch.where(is_ngram, torch.minimum(hyp_count, ref_count), 0)
        matches[n - 1].scatter_add_(0, run_prefix >> (n * token_bits), clipped)
    return matches


def _per_order_matches(tokens: Tensor, vocab_size: int, lens: Tensor, num_pairs: int, max_order: int) -> Tensor:
    """:func:`_paired_ngram_matches` with one sort per order, for any vocabulary.

    Each n-gram occurrence becomes one integer ``(n-gram, pair, side)``: the n-gram's tokens
    packed in bits, re-ranked densely whenever the next token would not fit in 62 bits. Sorted,
    a run of equal keys is how often one side of one pair holds an n-gram, and the hypothesis'
    run comes right before the reference's.
    """
    total = tokens.numel()
    token_bits = _bits(vocab_size)
    group_bits = _bits(2 * num_pairs)
    if _bits(total) + token_bits + group_bits > _KEY_BITS:
        return _split_and_count(tokens, lens, num_pairs, max_order)
    device = tokens.device
    segment = torch.repeat_interleave(torch.arange(2 * num_pairs, device=device), lens)
    # (pair, side) of each token, side 0 for the hypothesis: the low bits of every key.
    group = torch.cat([2 * torch.arange(num_pairs, device=device), 2 * torch.arange(num_pairs, device=device) + 1])
    group = group[segment]
    # Tokens left in the sentence from each position on, itself included: an n-gram that
    # starts there stays inside its sentence when this is at least n.
    remaining = torch.cumsum(lens, 0)[segment] - torch.arange(total, device=device)
    del segment
    # Keys of occurrences that run past the end of their sentence sort last and are cut off.
    sentinel = 1 << _KEY_BITS
    num_valid = (lens.unsqueeze(0) - torch.arange(max_order, device=lens.device).unsqueeze(1)).clamp(min=0).sum(1)
    pair_mask = (1 << (group_bits - 1)) - 1
    matches = torch.zeros(max_order, num_pairs, dtype=torch.long, device=tokens.device)
    ident, ident_bits = tokens, token_bits
    for n in range(1, max_order + 1):
        if n > 1:
            if ident_bits + token_bits + group_bits > _KEY_BITS:
                ident, num_idents = _dense_ids(ident)
                ident_bits = _bits(num_idents)
            # The n-gram starting at i: the (n-1)-gram there, then the token at i + n - 1.
            ident = (ident[:-1] << token_bits) | tokens[n - 1 :]
            ident_bits += token_bits
        span = ident.numel()
        key = torch.where(remaining[:span] >= n, (ident << group_bits) | group[:span], sentinel)
        key = torch.sort(key).values[: int(num_valid[n - 1])]
        starts = torch.nonzero(_run_starts(key)).squeeze(1)
        counts = torch.diff(starts, append=starts.new_tensor([key.numel()]))
        run_pair = key[starts] >> 1  # (n-gram, pair)
        # A hypothesis run followed by a run of the same n-gram and pair: the reference's.
        both = run_pair[1:] == run_pair[:-1]
        clipped = torch.where(both, torch.minimum(counts[1:], counts[:-1]), 0)
        matches[n - 1].scatter_add_(0, run_pair[:-1] & pair_mask, clipped)
    return matches


def _split_and_count(tokens: Tensor, lens: Tensor, num_pairs: int, max_order: int) -> Tensor:
    """Count a batch too large for int64 keys as two halves of pairs."""
    if num_pairs < 2:
        raise ValueError(f"a pair of sentences of {tokens.numel()} tokens is too long to count n-grams of")
    half = num_pairs // 2
    hyp_lens, ref_lens = lens[:num_pairs], lens[num_pairs:]
    hyp_total = int(hyp_lens.sum())
    hyp_split, ref_split = int(hyp_lens[:half].sum()), hyp_total + int(ref_lens[:half].sum())
    first = _paired_ngram_matches(
        tokens[:hyp_split], hyp_lens[:half], tokens[hyp_total:ref_split], ref_lens[:half], max_order
    )
    second = _paired_ngram_matches(
        tokens[hyp_split:hyp_total], hyp_lens[half:], tokens[ref_split:], ref_lens[half:], max_order
    )
    return torch.cat([first, second], dim=1)


def _gather_segments(tokens: Tensor, lens: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The sentences ``index`` of a flat corpus (``tokens`` cut by ``lens``), in that order."""
    starts = torch.cumsum(lens, 0) - lens
    new_lens = lens[index]
    new_starts = torch.cumsum(new_lens, 0) - new_lens
    total = int(new_lens.sum()) if new_lens.numel() else 0
    offsets = torch.arange(total, device=tokens.device) - torch.repeat_interleave(new_starts, new_lens)
    return tokens[torch.repeat_interleave(starts[index], new_lens) + offsets], new_lens


def _ngram_statistics(
    hyp_tokens: Tensor, hyp_lens: Tensor, ref_tokens: Tensor, ref_lens: Tensor, max_order: int
) -> Tensor:
    """Per order, sacrebleu's ``[hyp, ref, match]`` counts of (hypothesis, reference) pairs.

    Returns:
        ``[P, max_order, 3]`` int64.
    """
    matches = _paired_ngram_matches(hyp_tokens, hyp_lens, ref_tokens, ref_lens, max_order)
    orders = torch.arange(1, max_order + 1, device=hyp_lens.device).unsqueeze(1)
    hyp_counts = (hyp_lens.long().unsqueeze(0) - orders + 1).clamp_(min=0)
    ref_counts = (ref_lens.long().unsqueeze(0) - orders + 1).clamp_(min=0)
    # sacrebleu counts no hypothesis n-gram of an order the reference has none of.
    hyp_counts = torch.where(ref_counts > 0, hyp_counts, 0)
    return torch.stack([hyp_counts, ref_counts, matches], dim=-1).transpose(0, 1)


def _char_ids(sentences: list[str]) -> tuple[Tensor, Tensor]:
    """Each character's code point, all sentences concatenated, and each sentence's length."""
    text = "".join(sentences)
    # UTF-32 holds one code point in four bytes: a string becomes ids without a Python loop.
    codes = bytearray(text.encode("utf-32-le", "surrogatepass"))
    ids = torch.frombuffer(codes, dtype=torch.int32).long() if codes else torch.zeros(0, dtype=torch.long)
    return ids, torch.tensor([len(sentence) for sentence in sentences], dtype=torch.long)


def _word_ids(*corpora: list[list[str]]) -> list[tuple[Tensor, Tensor]]:
    """Number the words of several corpora (one vocabulary for all) as :func:`_char_ids` does characters."""
    vocab = {word: index for index, word in enumerate(dict.fromkeys(chain.from_iterable(chain(*corpora))))}
    out = []
    for corpus in corpora:
        ids = array("q", map(vocab.__getitem__, chain.from_iterable(corpus)))
        tokens = torch.frombuffer(ids, dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)
        out.append((tokens, torch.tensor([len(words) for words in corpus], dtype=torch.long)))
    return out


def _text_pair_statistics(
    hyps: list[str],
    refs: list[list[str]],
    char_order: int,
    word_order: int,
    lowercase: bool,
    whitespace: bool,
) -> tuple[Tensor, Tensor]:
    """Statistics rows ``[P, S]`` of every (hypothesis, reference) pair, and the sample of each ``[P]``."""
    if lowercase:
        hyps = [hyp.lower() for hyp in hyps]
        refs = [[ref.lower() for ref in sample_refs] for sample_refs in refs]
    ref_lines = [ref for sample_refs in refs for ref in sample_refs]
    owner = [index for index, sample_refs in enumerate(refs) for _ in sample_refs]
    one_each = len(ref_lines) == len(hyps)

    def pair_up(per_hyp: list[_Item]) -> list[_Item]:
        return per_hyp if one_each else [per_hyp[index] for index in owner]

    if whitespace:
        hyp_chars, ref_chars = hyps, ref_lines
    else:
        hyp_chars = ["".join(hyp.split()) for hyp in hyps]
        ref_chars = ["".join(ref.split()) for ref in ref_lines]
    stats = [_ngram_statistics(*_char_ids(pair_up(hyp_chars)), *_char_ids(ref_chars), char_order)]
    if word_order > 0:
        hyp_words = pair_up([_split_punctuation(hyp) for hyp in hyps])
        (hyp_ids, hyp_lens), (ref_ids, ref_lens) = _word_ids(hyp_words, [_split_punctuation(r) for r in ref_lines])
        stats.append(_ngram_statistics(hyp_ids, hyp_lens, ref_ids, ref_lens, word_order))
    rows = torch.cat(stats, dim=1)  # [P, orders, 3]
    return rows.reshape(rows.shape[0], 3 * rows.shape[1]), torch.tensor(owner, dtype=torch.long)


def _token_pair_statistics(
    preds: Tensor, target: Tensor, char_order: int, word_order: int, ignore_index: int | None
) -> tuple[Tensor, Tensor, int]:
    """As :func:`_text_pair_statistics` for token ids (each id a character and a word); also the sample count."""
    corpus = flatten_token_ids(preds, target, ignore_index)
    owner = corpus.ref_owner
    hyp_tokens, hyp_lens = corpus.hyp_tokens, corpus.hyp_lens
    if owner.numel() != corpus.num_samples:
        hyp_tokens, hyp_lens = _gather_segments(hyp_tokens, hyp_lens, owner)
    stats = _ngram_statistics(hyp_tokens, hyp_lens, corpus.ref_tokens, corpus.ref_lens, max(char_order, word_order))
    rows = torch.cat([stats[:, :char_order], stats[:, :word_order]], dim=1)  # [P, orders, 3]
    return rows.reshape(rows.shape[0], 3 * rows.shape[1]), owner, corpus.num_samples


def _f_score(stats: Tensor, beta: float, eps_smoothing: bool) -> Tensor:
    """The F-score of ``[..., 3 * orders]`` statistics, batched: sacrebleu's ``CHRF._compute_f_score`` (0..100).

    The operations are sacrebleu's, in its order, in float64, so that scores compare (to pick a
    reference) exactly as sacrebleu's do.
    """
    stats = stats.to(sum_dtype(stats.device))
    num_orders = stats.shape[-1] // 3
    factor = beta**2
    score = stats.new_zeros(stats.shape[:-1])
    avg_prec, avg_rec, effective_order = score.clone(), score.clone(), score.clone()
    for order in range(num_orders):
        n_hyp, n_ref, n_match = stats[..., 3 * order], stats[..., 3 * order + 1], stats[..., 3 * order + 2]
        prec = torch.where(n_hyp > 0, n_match / n_hyp, _EPS)
        rec = torch.where(n_ref > 0, n_match / n_ref, _EPS)
        denom = factor * prec + rec
        score = score + torch.where(denom > 0, (1 + factor) * prec * rec / denom, _EPS)
        # Effective order: average precision and recall over the orders both sides have.
        both = (n_hyp > 0) & (n_ref > 0)
        avg_prec = avg_prec + torch.where(both, prec, 0.0)
        avg_rec = avg_rec + torch.where(both, rec, 0.0)
        effective_order = effective_order + both
    if eps_smoothing:
        return 100 * score / num_orders
    avg_prec = torch.where(effective_order > 0, avg_prec / effective_order.clamp(min=1), 0.0)
    avg_rec = torch.where(effective_order > 0, avg_rec / effective_order.clamp(min=1), 0.0)
    nonzero = (avg_prec + avg_rec) != 0
    f_score = (1 + factor) * avg_prec * avg_rec
    f_score = f_score / torch.where(nonzero, factor * avg_prec + avg_rec, 1.0)
    return torch.where(nonzero, 100 * f_score, 0.0)


def _best_reference_rows(rows: Tensor, owner: Tensor, num_samples: int, beta: float, eps_smoothing: bool) -> Tensor:
    """Per sample, the row of the reference with the best sentence score, the first on ties."""
    if rows.shape[0] == num_samples:  # one reference each
        return rows
    score = _f_score(rows, beta, eps_smoothing)
    best = torch.full((num_samples,), -1.0, dtype=score.dtype, device=score.device)
    best.scatter_reduce_(0, owner, score, reduce="amax")
    index = torch.arange(rows.shape[0], device=rows.device)
    candidate = torch.where(score == best[owner], index, rows.shape[0])
    first = torch.full((num_samples,), rows.shape[0], dtype=torch.long, device=rows.device)
    first.scatter_reduce_(0, owner, candidate, reduce="amin")
    return rows[first]


def _chrf_update(
    preds: Sequence[str] | Tensor,
    target: TextTarget | Tensor,
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2,
    lowercase: bool = False,
    whitespace: bool = False,
    eps_smoothing: bool = False,
    ignore_index: int | None = None,
) -> tuple[Tensor, int]:
    """The per-sentence statistics of chrF for one batch.

    Returns:
        ``(rows, num_refs)``: ``[B, 3 * (char_order + word_order)]`` int64 rows, per order (the
        character orders, then the word orders) the hypothesis' n-grams, the reference's and
        their clipped matches, of the best reference of each sample (sacrebleu's
        ``_extract_corpus_statistics``); and the most references a sample had.
    """
    if is_token_ids(preds, target):
        assert isinstance(preds, Tensor) and isinstance(target, Tensor)  # narrowed by is_token_ids
        rows, owner, num_samples = _token_pair_statistics(preds, target, char_order, word_order, ignore_index)
    else:
        assert not isinstance(preds, Tensor) and not isinstance(target, Tensor)
        hyps, refs = check_text_corpus(preds, target)
        rows, owner = _text_pair_statistics(hyps, refs, char_order, word_order, lowercase, whitespace)
        num_samples = len(hyps)
    num_refs = int(torch.bincount(owner).max()) if owner.numel() else 0
    return _best_reference_rows(rows, owner, num_samples, beta, eps_smoothing), num_refs


def _chrf_compute(stats: Tensor, beta: float = 2, eps_smoothing: bool = False) -> Tensor:
    """The chrF in [0, 1] of summed statistics ``[..., S]`` (batched), as ``CHRF._compute_score_from_stats`` / 100."""
    return _f_score(stats, beta, eps_smoothing) / 100


def chrf_score(
    preds: Sequence[str] | Tensor,
    target: TextTarget | Tensor,
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2,
    lowercase: bool = False,
    whitespace: bool = False,
    eps_smoothing: bool = False,
    ignore_index: int | None = None,
) -> Tensor:
    """Corpus chrF (``word_order=0``) or chrF++ (``word_order=2``), equal to sacrebleu's ``CHRF`` score / 100.

    Text is scored as sacrebleu does: character n-grams without whitespace (unless
    ``whitespace=True``); word n-grams on whitespace-split words whose leading or trailing
    punctuation is split off; with several references, per sentence the one with the best
    sentence-level score.

    Token ids have no whitespace and no case: each id is one character, and, for the word
    n-grams, also one word. This is sacrebleu's chrF on strings that write each id as its own
    (non-punctuation) character, separated by spaces. ``lowercase`` and ``whitespace`` do not
    apply to them.

    Args:
        preds: the hypotheses: one string per sample, or ``[B, T]`` integer token ids.
        target: the references: per sample a string or a sequence of strings (the number may
            differ between samples), or ``[B, T']`` / ``[B, R, T']`` integer token ids.
        char_order: the largest character n-gram order (sacrebleu's ``char_order``).
        word_order: the largest word n-gram order; 0 is chrF, 2 chrF++.
        beta: the weight of recall against precision.
        lowercase: lowercase text first.
        whitespace: keep whitespace in the character n-grams of text.
        eps_smoothing: average the F-scores of the orders with epsilon for missing counts (as
            chrF++.py, NLTK and Moses); by default the precisions and recalls of the orders
            present on both sides are averaged first (sacrebleu's default).
        ignore_index: for token ids, the padding id, dropped before counting. A reference row
            that is all padding counts as missing.

    Returns:
        A 0-d tensor in [0, 1].

    Raises:
        TypeError: If an argument has the wrong type, the inputs are neither text nor integer
            tensors, or mix the two.
        ValueError: If an argument is out of its range, the corpus sizes differ, a sample has no
            reference, or token-id shapes do not fit.

    Examples:
        >>> preds = ["the cat is on the mat"]
        >>> target = [["there is a cat on the mat", "a cat is on the mat"]]
        >>> round(chrf_score(preds, target).item(), 4)
        0.8799
        >>> round(chrf_score(preds, target, word_order=2).item(), 4)
        0.8648
        >>> import torch
        >>> preds, target = torch.tensor([[3, 4, 5, 6, 0]]), torch.tensor([[3, 4, 5, 7, 0]])
        >>> round(chrf_score(preds, target, ignore_index=0).item(), 4)
        0.4792
    """
    _check_chrf_args(char_order, word_order, beta, lowercase, whitespace, eps_smoothing, ignore_index)
    rows, _ = _chrf_update(
        preds, target, char_order, word_order, beta, lowercase, whitespace, eps_smoothing, ignore_index
    )
    return _chrf_compute(rows.sum(0), beta, eps_smoothing).to(torch.get_default_dtype())
