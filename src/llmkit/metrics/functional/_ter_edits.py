"""The number of edits of TER (Snover et al., 2006), equal to sacrebleu's ``lib_ter`` edit for edit.

sacrebleu shifts blocks of hypothesis words greedily: each round it takes the shift that lowers a
beam-limited edit distance the most (ties: the longest block, then the earliest, then the earliest
target), until no shift helps or 1000 candidate shifts have been tried. The rounds, the candidates,
their order and count, the beam and its tie-breaking are reproduced here exactly; what changes is
how each edit distance is found.

Each sentence's words become the characters of a string (one code per distinct word of the
sample), so that shifts are string slices and distances run in rapidfuzz's compiled Levenshtein.
sacrebleu's distance only fills a beam of ``w`` cells either side of the pseudo-diagonal
``floor(i * m / n)`` of its matrix, so it can exceed the true Levenshtein distance ``d``. It cannot
when ``d + |m - n| <= 2 w - 4``: a path of ``A`` insertions and ``B`` deletions never strays more
than ``max(A, B) <= (d + |m - n|) / 2`` cells from the exact diagonal ``i * m / n``, and the
float rounding of ``floor`` moves the beam by at most one cell. Then every optimal path lies in the
beam, so the beam's distance is ``d``, and its trace (the first optimal operation at each step,
in the order substitution, deletion, insertion) is the one that the exact prefix distances give,
which rapidfuzz computes. Only past that bound does the beam's own dynamic programme run, in Python.
"""

from __future__ import annotations

import math

from rapidfuzz.distance import Levenshtein

# sacrebleu's (Tercom's) limits.
MAX_SHIFT_SIZE = 10
MAX_SHIFT_DIST = 50
BEAM_WIDTH = 25
MAX_SHIFT_CANDIDATES = 1000
# Out-of-beam cells, as sacrebleu's `_INT_INFINITY`.
_INF = 10**16

_levenshtein = Levenshtein.distance


def encode_sample(hyp_words: list[str], refs_words: list[list[str]]) -> tuple[str, list[str]]:
    """One character per distinct word of a sample: its hypothesis and references as strings."""
    codes: dict[str, str] = {}
    setdefault = codes.setdefault
    hyp = "".join([setdefault(word, chr(len(codes))) for word in hyp_words])
    refs = ["".join([setdefault(word, chr(len(codes))) for word in words]) for words in refs_words]
    return hyp, refs


def beam_width(num_hyp: int, num_ref: int) -> int:
    """The half-width of sacrebleu's beam: 25 cells, more where lengths differ so much that rows would not overlap."""
    ratio = num_ref / num_hyp if num_hyp else 1
    return math.ceil(ratio / 2 + BEAM_WIDTH) if ratio / 2 > BEAM_WIDTH else BEAM_WIDTH


def num_edits(hyp: str, ref: str) -> int:
    """The edits of ``hyp`` against ``ref``: sacrebleu's ``translation_edit_rate(hyp, ref)[0]``.

    Shifts are taken greedily while one lowers the beam's distance; the edits are the shifts
    taken plus the distance left.

    Args:
        hyp: the hypothesis, one character per word (see :func:`encode_sample`).
        ref: the reference, coded with the same characters.
    """
    num_hyp, num_ref = len(hyp), len(ref)
    if num_ref == 0:
        return num_hyp
    if hyp == ref:
        return 0
    width = beam_width(num_hyp, num_ref)
    # At or below this distance the beam's distance is the exact one (see the module's docstring).
    exact_up_to = 2 * width - 4 - abs(num_hyp - num_ref)
    cost = _levenshtein(hyp, ref)
    if cost > exact_up_to:
        cost = _beam_rows(hyp, ref, width)[-1][-1]
    ref_positions: dict[str, list[int]] = {}
    for position, word in enumerate(ref):
        ref_positions.setdefault(word, []).append(position)
    shifts = 0
    checked = 0
    # No shift can bring the distance below the length difference, so none helps once there.
    while cost > abs(num_hyp - num_ref):
        delta, shifted, checked = _best_shift(hyp, ref, cost, checked, width, exact_up_to, ref_positions)
        if checked >= MAX_SHIFT_CANDIDATES or delta <= 0:
            break
        shifts += 1
        hyp = shifted
        cost -= delta
    return shifts + cost


def _best_shift(
    hyp: str,
    ref: str,
    cost: int,
    checked: int,
    width: int,
    exact_up_to: int,
    ref_positions: dict[str, list[int]],
) -> tuple[int, str, int]:
    """The best shift of a round, as sacrebleu's ``_shift``: its gain, the shifted words, the candidates checked.

    Only a shift that gains at least one edit can be taken, and only one that beats the best so
    far can become the best; the others are counted as sacrebleu counts them, but their distance
    is bounded by rapidfuzz's cut-off instead of computed.
    """
    num_hyp, num_ref = len(hyp), len(ref)
    align, hyp_err, ref_err = _alignment(hyp, ref, cost, width, exact_up_to)
    # The first erroneous position at or after each position (its length if none).
    next_hyp_err = _next_error(hyp_err)
    next_ref_err = _next_error(ref_err)

    # The best so far, ranked as sacrebleu ranks: gain, then (length, -start_h, -target).
    best_tie: tuple[int, int, int] | None = None
    best_gain = 0
    best_hyp = hyp
    for start_h in range(num_hyp):
        positions = ref_positions.get(hyp[start_h])
        if positions is None:
            continue
        for start_r in positions:
            if abs(start_r - start_h) > MAX_SHIFT_DIST:
                continue
            # The lengths of the common blocks starting here: 1 .. longest (at most 10).
            longest = 1
            while (
                longest < MAX_SHIFT_SIZE
                and start_h + longest < num_hyp
                and start_r + longest < num_ref
                and hyp[start_h + longest] == ref[start_r + longest]
            ):
                longest += 1
            # A block must hold a hypothesis error and a reference error ...
            shortest = max(next_hyp_err[start_h] - start_h, next_ref_err[start_r] - start_r) + 1
            # ... and must not hold the word that the reference's start is aligned to.
            aligned = align[start_r]
            if aligned >= start_h:
                longest = min(longest, aligned - start_h)
            for length in range(shortest, longest + 1):
                previous = -1
                for offset in range(-1, length):
                    target = 0 if start_r + offset == -1 else align[start_r + offset] + 1
                    if target == previous:
                        continue
                    previous = target
                    checked += 1
                    tie = (length, -start_h, -target)
                    # The least gain that beats the best so far (a first shift must gain), and so the
                    # most edits that the shifted words may need.
                    max_cost = cost - (1 if best_tie is None else best_gain if tie > best_tie else best_gain + 1)
                    if max_cost < 0:
                        continue
                    shifted = _perform_shift(hyp, start_h, length, target)
                    new_cost = _levenshtein(shifted, ref, score_cutoff=max_cost)
                    if new_cost > max_cost:
                        continue  # the beam's distance is at least the exact one
                    if new_cost > exact_up_to:
                        new_cost = _beam_cost(shifted, ref, width, max_cost)
                        if new_cost > max_cost:
                            continue
                    best_gain, best_tie, best_hyp = cost - new_cost, tie, shifted
                if checked >= MAX_SHIFT_CANDIDATES:
                    return best_gain, best_hyp, checked
    return best_gain, best_hyp, checked


def _next_error(errors: list[int]) -> list[int]:
    out = [0] * (len(errors) + 1)
    nxt = len(errors)
    out[nxt] = nxt
    for position in range(len(errors) - 1, -1, -1):
        if errors[position]:
            nxt = position
        out[position] = nxt
    return out


def _perform_shift(words: str, start: int, length: int, target: int) -> str:
    """Move a block as sacrebleu's ``_perform_shift`` (whose third case moves it past ``target - start`` words)."""
    if target < start:
        return words[:target] + words[start : start + length] + words[target:start] + words[start + length :]
    if target > start + length:
        return words[:start] + words[start + length : target] + words[start : start + length] + words[target:]
    return (
        words[:start]
        + words[start + length : length + target]
        + words[start : start + length]
        + words[length + target :]
    )


def _alignment(hyp: str, ref: str, cost: int, width: int, exact_up_to: int) -> tuple[list[int], list[int], list[int]]:
    """The alignment of the beam's trace, as sacrebleu's ``trace_to_alignment(_flip_trace(trace))``.

    Returns:
        ``(align, hyp_err, ref_err)``: per reference word the hypothesis word it is aligned to
        (for a reference word that is inserted, the hypothesis word before it, or -1), and per
        word of each side whether it is an error (1) or matched (0).
    """
    num_hyp, num_ref = len(hyp), len(ref)
    align = [0] * num_ref
    hyp_err = [0] * num_hyp
    ref_err = [0] * num_ref
    i, j = num_hyp, num_ref
    if cost <= exact_up_to:
        # The exact prefix distances, from rapidfuzz, give the beam's trace.
        value = cost
        while i > 0 and j > 0:
            if hyp[i - 1] == ref[j - 1]:  # a match is always an optimal first step back
                i -= 1
                j -= 1
                align[j] = i
                continue
            value -= 1
            # A distance is at least the difference of the lengths: no call when that rules a step out.
            if abs(i - j) <= value and _levenshtein(hyp[: i - 1], ref[: j - 1], score_cutoff=value) == value:
                i -= 1
                j -= 1
                align[j] = i
                hyp_err[i] = ref_err[j] = 1
            elif abs(i - 1 - j) <= value and _levenshtein(hyp[: i - 1], ref[:j], score_cutoff=value) == value:
                i -= 1
                hyp_err[i] = 1
            else:
                j -= 1
                align[j] = i - 1
                ref_err[j] = 1
    else:
        rows = _beam_rows(hyp, ref, width)
        while i > 0 and j > 0:
            value = rows[i][j]
            if rows[i - 1][j - 1] + (hyp[i - 1] != ref[j - 1]) == value:
                i -= 1
                j -= 1
                align[j] = i
                hyp_err[i] = ref_err[j] = int(hyp[i] != ref[j])
            elif rows[i - 1][j] + 1 == value:
                i -= 1
                hyp_err[i] = 1
            else:
                j -= 1
                align[j] = i - 1
                ref_err[j] = 1
    # The words left before the first of the other side: deleted, or inserted before any.
    hyp_err[:i] = [1] * i
    align[:j] = [-1] * j
    ref_err[:j] = [1] * j
    return align, hyp_err, ref_err


def _beam_bounds(row: int, ratio: float, width: int, num_hyp: int, num_ref: int) -> tuple[int, int]:
    """The cells ``[lo, hi)`` that sacrebleu fills in row ``row`` (1-based) of its matrix."""
    diagonal = math.floor(row * ratio)
    high = num_ref + 1 if row == num_hyp else min(num_ref + 1, diagonal + width)
    return max(0, diagonal - width), high


def _beam_rows(hyp: str, ref: str, width: int) -> list[list[int]]:
    """The beam-limited edit-distance matrix of sacrebleu, ``[len(hyp) + 1][len(ref) + 1]``; out-of-beam cells huge."""
    num_hyp, num_ref = len(hyp), len(ref)
    ratio = num_ref / num_hyp if num_hyp else 1
    prev = list(range(num_ref + 1))
    rows = [prev]
    for i in range(1, num_hyp + 1):
        prev = _beam_row(prev, hyp[i - 1], ref, *_beam_bounds(i, ratio, width, num_hyp, num_ref))
        rows.append(prev)
    return rows


def _beam_cost(hyp: str, ref: str, width: int, max_cost: int) -> int:
    """The beam's distance, or a number above ``max_cost`` as soon as it must exceed it."""
    num_hyp, num_ref = len(hyp), len(ref)
    ratio = num_ref / num_hyp if num_hyp else 1
    prev = list(range(num_ref + 1))
    for i in range(1, num_hyp + 1):
        prev = _beam_row(prev, hyp[i - 1], ref, *_beam_bounds(i, ratio, width, num_hyp, num_ref))
        # Every path to the last cell crosses this row.
        if min(prev) > max_cost:
            return max_cost + 1
    return prev[-1]


def _beam_row(prev: list[int], word: str, ref: str, lo: int, hi: int) -> list[int]:
    """One row of the beam's matrix from the row above; cells outside ``[lo, hi)`` stay out of the beam."""
    row = [_INF] * len(prev)
    if lo == 0:
        row[0] = prev[0] + 1
        lo = 1
    left = row[lo - 1]
    for j in range(lo, hi):
        best = prev[j - 1] if word == ref[j - 1] else prev[j - 1] + 1
        up = prev[j] + 1
        if up < best:
            best = up
        if left + 1 < best:
            best = left + 1
        row[j] = left = best
    return row
