"""Longest common subsequences for ROUGE-L and ROUGE-Lsum.

ROUGE-L needs only the length of the LCS: rapidfuzz computes it in compiled, bit-parallel
code. ROUGE-Lsum needs *which* reference tokens one LCS uses, and the union over candidate
sentences depends on the choice among equally long LCSs, so it is read out of the dynamic
programme exactly as rouge-score does (``_backtrack_norec``), for a whole batch of sentence
pairs at once with tensor ops: each row of the table is one ``cummax``, and the read-out
walks every pair back one step at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rapidfuzz.distance import LCSseq
from torch import Tensor

# The largest dynamic-programme table built at once, in cells.
_MAX_CELLS = 2**23


def lcs_lengths(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]]) -> list[int]:
    """Return the length of the longest common subsequence of each pair of token sequences."""
    return [int(LCSseq.similarity(a, b)) for a, b in zip(first, second, strict=True)]


def pad_sentences(tokens: Tensor, lens: Tensor, fill: int) -> Tensor:
    """Lay a flat corpus out as ``[num_sentences, max(lens)]``, padded with ``fill``."""
    out = torch.full((lens.numel(), int(lens.max()) if lens.numel() else 0), fill, dtype=tokens.dtype)
    rows = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    starts = torch.cumsum(lens, 0) - lens
    out[rows, torch.arange(tokens.numel()) - starts[rows]] = tokens
    return out


def union_lcs_mask(sentences: Tensor, lens: Tensor, ref_index: Tensor, cand_index: Tensor) -> Tensor:
    """Mark the reference tokens that the LCS with any of their candidate sentences uses.

    Each LCS is the one rouge-score reads out of the dynamic-programme table (``lcs_ind``):
    which of several equally long LCSs is taken changes the union.

    Args:
        sentences: ``[S, W]`` all sentences, non-negative ids, padded.
        lens: ``[S]`` their lengths.
        ref_index: ``[N]`` the reference sentence of each (reference, candidate) pair.
        cand_index: ``[N]`` the candidate sentence of each pair.

    Returns:
        ``[S, W]`` bool: True at a position of sentence ``s`` when the LCS of ``s`` with one of
        the candidates it is paired with uses that position.
    """
    union = torch.zeros(sentences.shape, dtype=torch.int32)
    ref_lens, cand_lens = lens[ref_index], lens[cand_index]
    # Similar sizes together keep the padding small.
    order = torch.argsort(ref_lens * (int(lens.max()) + 1 if lens.numel() else 1) + cand_lens)
    sorted_ref_lens, sorted_cand_lens = ref_lens[order].tolist(), cand_lens[order].tolist()
    start = 0
    while start < len(sorted_ref_lens):
        stop, widest = start + 1, sorted_cand_lens[start]
        while stop < len(sorted_ref_lens):
            widest = max(widest, sorted_cand_lens[stop])
            if (stop - start + 1) * (sorted_ref_lens[stop] + 1) * (widest + 1) > _MAX_CELLS:
                break
            stop += 1
        chunk = order[start:stop]
        rows, cols = sorted_ref_lens[stop - 1], max(sorted_cand_lens[start:stop])
        refs, cands = ref_index[chunk], cand_index[chunk]
        in_lcs = _lcs_chunk(sentences[refs, :rows], lens[refs], sentences[cands, :cols], lens[cands])
        union[:, :rows].index_add_(0, refs, in_lcs.int())
        start = stop
    return union > 0


def _lcs_chunk(ref: Tensor, ref_lens: Tensor, cand: Tensor, cand_lens: Tensor) -> Tensor:
    num, ref_width = ref.shape
    cand_width = cand.shape[1]
    in_lcs = torch.zeros(num, ref_width, dtype=torch.bool)
    if ref_width == 0 or cand_width == 0:
        return in_lcs
    # Padding never matches: -1 in the references, -2 in the candidates.
    positions = torch.arange(max(ref_width, cand_width))
    ref = torch.where(positions[:ref_width] < ref_lens.unsqueeze(1), ref, -1)
    cand = torch.where(positions[:cand_width] < cand_lens.unsqueeze(1), cand, -2)
    # table[k, i, j]: the LCS length of ref[k, :i] and cand[k, :j].
    table = torch.zeros(num, ref_width + 1, cand_width + 1, dtype=torch.int32)
    for row in range(1, ref_width + 1):
        above = table[:, row - 1]
        diagonal = torch.where(ref[:, row - 1 : row] == cand, above[:, :-1] + 1, 0)
        # table[i][j] = max(table[i-1][j], diagonal[j], table[i][j-1]): a running max along j.
        table[:, row, 1:] = torch.cummax(torch.maximum(above[:, 1:], diagonal), dim=1).values

    rows = torch.arange(num)
    i, j = ref_lens.clone(), cand_lens.clone()
    for _ in range(ref_width + cand_width):
        active = (i > 0) & (j > 0)
        up_i, left_j = (i - 1).clamp(min=0), (j - 1).clamp(min=0)
        same = active & (ref[rows, up_i] == cand[rows, left_j])
        in_lcs[rows[same], up_i[same]] = True
        # rouge-score steps left only when that keeps strictly more of the LCS; else up.
        left = active & ~same & (table[rows, i, left_j] > table[rows, up_i, j])
        up = active & ~same & ~left
        i = i - (same | up).long()
        j = j - (same | left).long()
    return in_lcs
