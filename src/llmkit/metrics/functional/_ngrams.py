"""Exact n-gram counting with tensor ops, shared by BLEU and ROUGE-N.

Sentences are given flat: the tokens of all sentences one after another, plus each
sentence's length. Every n-gram is identified exactly (no hash collisions) by ranking the
pair (rank of its (n-1)-gram prefix, its last token): one sort per order over all tokens at
once, instead of a Python loop per sentence.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Keys are built in int64; the top bits stay clear so that the sentinel sorts last.
_KEY_BITS = 62
_KEY_SENTINEL = 2**62


def _bits(count: int) -> int:
    """Return how many bits hold the values ``0..count-1``."""
    return max(count - 1, 0).bit_length()


def _run_starts(sorted_keys: Tensor) -> Tensor:
    """Return a boolean mask, True where a run of equal values starts in ``sorted_keys``."""
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    torch.ne(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    return starts


def dense_rank(values: Tensor) -> Tensor:
    """Map ``values`` to ``0..K-1`` (``K`` distinct values), keeping equality, with one sort."""
    sorted_values, order = torch.sort(values, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.cumsum(_run_starts(sorted_values), 0) - 1
    return rank


def ngram_totals(lens: Tensor, max_order: int) -> Tensor:
    """Return ``[max_order, B]``: how many n-grams of each order sentences of ``lens`` hold."""
    orders = torch.arange(1, max_order + 1, device=lens.device).unsqueeze(1)
    return (lens.long().unsqueeze(0) - orders + 1).clamp_(min=0)


def clipped_ngram_matches(
    hyp_tokens: Tensor,
    hyp_lens: Tensor,
    ref_tokens: Tensor,
    ref_lens: Tensor,
    ref_owner: Tensor,
    max_order: int,
) -> Tensor:
    """Count the n-grams of each hypothesis that its references hold too, clipped.

    For hypothesis ``b`` and order ``n`` this is
    ``sum_g min(count_b(g), max_{r of b} count_r(g))`` over the n-grams ``g`` of order ``n``:
    BLEU's clipped matches (several references) and ROUGE-N's overlap (one reference).

    Args:
        hyp_tokens: ``[sum(hyp_lens)]`` non-negative integer ids of all hypotheses, concatenated.
        hyp_lens: ``[B]`` the length of each hypothesis.
        ref_tokens: ``[sum(ref_lens)]`` non-negative integer ids of all references, concatenated.
        ref_lens: ``[L]`` the length of each reference.
        ref_owner: ``[L]`` the hypothesis each reference belongs to, in non-decreasing order.
        max_order: the largest n-gram order counted.

    Returns:
        ``[max_order, B]`` int64 clipped matches per order and hypothesis.
    """
    device = hyp_tokens.device
    num_hyps = hyp_lens.numel()
    matches = torch.zeros(max_order, num_hyps, dtype=torch.long, device=device)
    tokens = torch.cat([hyp_tokens, ref_tokens]).long()
    total = tokens.numel()
    if total == 0 or ref_lens.numel() == 0:
        return matches

    lens = torch.cat([hyp_lens, ref_lens]).long()
    owner = torch.cat([torch.arange(num_hyps, device=device), ref_owner.long()])
    # Within one owner, the hypothesis is slot 0 and its references 1, 2, ...
    first_ref = torch.searchsorted(ref_owner.long(), ref_owner.long(), side="left")
    slot = torch.cat(
        [torch.zeros(num_hyps, dtype=torch.long, device=device),
         torch.arange(1, ref_lens.numel() + 1, device=device) - first_ref]
    )
    segment = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens)
    # Tokens left in the sentence from each position on, itself included: an n-gram that
    # starts there stays inside its sentence when this is at least n.
    remaining = torch.cumsum(lens, 0)[segment] - torch.arange(total, device=device)

    # Keys pack fields into bit ranges (shifts and masks are much cheaper than division).
    slot_bits = _bits(int(slot.max()) + 1)
    group_bits = _bits(num_hyps) + slot_bits
    token_bits = _bits(int(tokens.max()) + 1)
    if token_bits + _bits(total) + group_bits > _KEY_BITS:
        tokens = dense_rank(tokens)
        token_bits = _bits(int(tokens.max()) + 1)
    if token_bits + _bits(total) + group_bits > _KEY_BITS:
        return _split_and_count(hyp_tokens, hyp_lens, ref_tokens, ref_lens, ref_owner, max_order)
    # (owner, slot) of each token, the low bits of every key.
    group = (owner[segment] << slot_bits) | slot[segment]
    del segment
    num_valid = ngram_totals(lens, max_order).sum(1).tolist()
    owner_mask = (1 << (group_bits - slot_bits)) - 1

    prefix_rank = torch.zeros(total, dtype=torch.long, device=device)
    for n in range(1, max_order + 1):
        span = total - n + 1
        if span <= 0 or num_valid[n - 1] == 0:
            break
        # One integer per n-gram occurrence: (prefix rank, last token, owner, slot).
        # Occurrences that run past the end of their sentence sort last and are cut off.
        key = (((prefix_rank[:span] << token_bits) | tokens[n - 1 :]) << group_bits) | group[:span]
        key = torch.where(remaining[:span] >= n, key, _KEY_SENTINEL)
        sorted_key, order = torch.sort(key, stable=True)
        sorted_key = sorted_key[: num_valid[n - 1]]
        if n < max_order:
            # The rank of each n-gram is the prefix of the (n+1)-grams that extend it.
            # Left unset (garbage) where no n-gram fits: no (n+1)-gram starts there either.
            prefix_rank = torch.empty(span, dtype=torch.long, device=device)
            prefix_rank[order[: num_valid[n - 1]]] = torch.cumsum(_run_starts(sorted_key >> group_bits), 0) - 1

        # Runs of equal keys: how often each sentence (hypothesis or reference) holds an n-gram.
        starts = torch.nonzero(_run_starts(sorted_key)).squeeze(1)
        counts = torch.diff(starts, append=starts.new_tensor([sorted_key.numel()]))
        run_key = sorted_key[starts]
        # Runs of one (n-gram, owner) pair are adjacent, the hypothesis' first, then its
        # references'.
        run_pair = run_key >> slot_bits
        if slot_bits == 1:
            # At most one reference per hypothesis: a pair is a hypothesis run followed by
            # a reference run.
            both = run_pair[1:] == run_pair[:-1]
            clipped = torch.where(both, torch.minimum(counts[1:], counts[:-1]), 0)
            matches[n - 1].scatter_add_(0, run_pair[:-1] & owner_mask, clipped)
            continue
        is_hyp = (run_key & ((1 << slot_bits) - 1)) == 0
        pair_start = _run_starts(run_pair)
        pair_index = torch.cumsum(pair_start, 0) - 1
        num_pairs = int(pair_index[-1]) + 1
        hyp_count = torch.zeros(num_pairs, dtype=torch.long, device=device)
        hyp_count.scatter_add_(0, pair_index, torch.where(is_hyp, counts, 0))
        ref_count = torch.zeros(num_pairs, dtype=torch.long, device=device)
        ref_count.scatter_reduce_(0, pair_index, torch.where(is_hyp, 0, counts), reduce="amax")
        pair_owner = run_pair[pair_start] & owner_mask
        matches[n - 1].scatter_add_(0, pair_owner, torch.minimum(hyp_count, ref_count))
    return matches


def _split_and_count(
    hyp_tokens: Tensor,
    hyp_lens: Tensor,
    ref_tokens: Tensor,
    ref_lens: Tensor,
    ref_owner: Tensor,
    max_order: int,
) -> Tensor:
    """Count a batch too large for int64 keys as two halves of hypotheses."""
    num_hyps = hyp_lens.numel()
    if num_hyps < 2:
        raise ValueError(f"a single sentence of {int(hyp_lens.sum())} tokens is too long to count n-grams of")
    half = num_hyps // 2
    hyp_split = int(hyp_lens[:half].sum())
    ref_half = int(torch.searchsorted(ref_owner.long(), torch.tensor(half, device=ref_owner.device)))
    ref_split = int(ref_lens[:ref_half].sum())
    first = clipped_ngram_matches(
        hyp_tokens[:hyp_split], hyp_lens[:half], ref_tokens[:ref_split], ref_lens[:ref_half],
        ref_owner[:ref_half], max_order,
    )
    second = clipped_ngram_matches(
        hyp_tokens[hyp_split:], hyp_lens[half:], ref_tokens[ref_split:], ref_lens[ref_half:],
        ref_owner[ref_half:] - half, max_order,
    )
    return torch.cat([first, second], dim=1)
