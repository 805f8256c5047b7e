"""greedy_search and beam_search against closed forms and a plain reference beam search.

The step functions here are hand-made log-probability tables (no model): the next token's
distribution depends on the source row, the position and the last token (or, for the cache
tests, on the whole history).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from llmkit.generation import beam_search, greedy_search

BOS, EOS, PAD = 1, 2, 0


def random_tables(batch_size: int, max_new_tokens: int, vocab: int, seed: int, eos_bias: float = 0.0) -> Tensor:
    """``[B, max_new_tokens, V, V]`` float32 log-probabilities: ``tables[b, position, last]`` is a distribution.

    PAD and BOS get a tiny (finite) probability, so that a PAD in an output can only be padding.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, max_new_tokens, vocab, vocab, generator=generator) * 2.0
    logits[..., EOS] += eos_bias
    logits[..., [PAD, BOS]] = -30.0
    return torch.log_softmax(logits, dim=-1)


def table_step(tables: Tensor, rows_per_source: int):
    """A stateless step function: row ``n`` belongs to source ``n // rows_per_source``."""

    def step(tokens: Tensor) -> Tensor:
        rows, length = tokens.shape
        assert rows == tables.shape[0] * rows_per_source
        assert bool((tokens[:, 0] == BOS).all())
        source = torch.arange(rows) // rows_per_source
        return tables[source, length - 1, tokens[:, -1]]

    return step


def reference_beam_search(
    log_probs, *, batch_size: int, num_beams: int, max_new_tokens: int, min_new_tokens: int = 0,
    length_penalty: float = 1.0, eos_id: int = EOS, pad_id: int = PAD,
) -> list[list[int]]:
    """Beam search, one source and one hypothesis at a time, written for clarity rather than speed.

    ``log_probs(b, generated)`` gives the next-token log-probabilities (float32 values) of source
    ``b`` after the generated tokens ``generated`` (BOS excluded). Sums of log-probabilities are
    accumulated in float32, as the implementation does; scores are
    ``sum_logp / len ** length_penalty`` with ``len`` the generated tokens, EOS included.
    Returns the best hypothesis per source.
    """
    results = []
    for b in range(batch_size):
        running: list[tuple[float, list[int]]] = [(0.0, [])]  # (sum_logp, tokens)
        finished: list[tuple[float, list[int]]] = []  # (score, tokens), in the order found
        stopped = False
        for index in range(max_new_tokens):
            length = index + 1
            candidates = []  # (sum_logp, beam, token), beams in order, tokens in order
            for beam, (sum_logp, tokens) in enumerate(running):
                row = [float(value) for value in log_probs(b, tokens)]
                for token, value in enumerate(row):
                    if index < min_new_tokens and token == eos_id:
                        continue
                    if value == -math.inf:
                        continue
                    candidates.append((float(np.float32(sum_logp) + np.float32(value)), beam, token))
            candidates.sort(key=lambda item: -item[0])  # stable: ties keep beam, then token order
            new_running = []
            for rank, (sum_logp, beam, token) in enumerate(candidates[: 2 * num_beams]):
                if token == eos_id:
                    # An EOS among the top num_beams candidates finishes a hypothesis.
                    if rank < num_beams:
                        finished.append((sum_logp / length**length_penalty, [*running[beam][1], eos_id]))
                    continue
                new_running.append((sum_logp, [*running[beam][1], token]))
                if len(new_running) == num_beams:
                    break
            if not new_running:
                stopped = True
                break
            if len(finished) >= num_beams:
                worst_kept = sorted((score for score, _ in finished), reverse=True)[num_beams - 1]
                best_running = max(sum_logp for sum_logp, _ in new_running)
                if worst_kept >= best_running / length**length_penalty:
                    stopped = True
                    break
            running = new_running
        if not stopped:
            # At max_new_tokens the running beams count as finished.
            finished += [(sum_logp / max_new_tokens**length_penalty, tokens) for sum_logp, tokens in running]
        best_score = max(score for score, _ in finished)
        results.append(next(tokens for score, tokens in finished if score == best_score))
    return results


def as_rows(out: Tensor, pad_id: int = PAD, eos_id: int = EOS) -> list[list[int]]:
    """Strip the padding after each row's EOS (the rows of a ``[B, L]`` output)."""
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


def check_layout(out: Tensor, max_new_tokens: int, pad_id: int = PAD, eos_id: int = EOS) -> None:
    """``[B, L]``, ``L <= max_new_tokens``; after a row's first EOS only padding; a row without EOS is full."""
    assert out.dtype == torch.long and out.ndim == 2 and out.shape[1] <= max_new_tokens
    for row in out.tolist():
        if eos_id in row:
            assert all(token == pad_id for token in row[row.index(eos_id) + 1 :]), row
        else:
            assert pad_id not in row, row


# ---------------------------------------------------------------------------------------------
# (a) greedy: the argmax chain


def argmax_chain(table: Tensor, max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
    """Closed form of greedy decoding over ``table[position, last]``: follow the argmax from BOS."""
    out, last = [], BOS
    for position in range(max_new_tokens):
        row = table[position, last].clone()
        if position < min_new_tokens:
            row[EOS] = -math.inf
        last = int(row.argmax())
        out.append(last)
        if last == EOS:
            break
    return out


@pytest.mark.parametrize(("batch_size", "max_new_tokens", "min_new_tokens", "seed"), [
    (1, 6, 0, 0), (4, 8, 0, 1), (5, 7, 3, 2), (3, 1, 0, 3), (3, 4, 4, 4),
])
def test_greedy_follows_the_argmax_chain(batch_size, max_new_tokens, min_new_tokens, seed):
    tables = random_tables(batch_size, max_new_tokens, vocab=9, seed=seed, eos_bias=1.5)
    out = greedy_search(
        table_step(tables, 1), batch_size=batch_size, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
    )
    chains = [argmax_chain(tables[b], max_new_tokens, min_new_tokens) for b in range(batch_size)]
    width = max(len(chain) for chain in chains)
    want = torch.tensor([chain + [PAD] * (width - len(chain)) for chain in chains])
    assert torch.equal(out, want)
    for chain in chains:
        assert EOS not in chain[:min_new_tokens]


def test_greedy_transition_table_closed_form():
    # Token i -> i + 1 with certainty, EOS = 5: from BOS = 1 the chain is 2, 3, 4, 5.
    table = torch.full((6, 6), -math.inf)
    for token in range(5):
        table[token, token + 1] = 0.0
    table[5, 0] = 0.0
    out = greedy_search(lambda tokens: table[tokens[:, -1]], batch_size=2, bos_id=1, eos_id=5, pad_id=0,
                        max_new_tokens=10)
    assert out.tolist() == [[2, 3, 4, 5], [2, 3, 4, 5]]
    # Cut short: no EOS, full length.
    out = greedy_search(lambda tokens: table[tokens[:, -1]], batch_size=1, bos_id=1, eos_id=5, pad_id=0,
                        max_new_tokens=2)
    assert out.tolist() == [[2, 3]]


def test_greedy_rows_that_finish_early_are_padded():
    tables = random_tables(6, 8, vocab=7, seed=5, eos_bias=2.0)
    out = greedy_search(table_step(tables, 1), batch_size=6, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=8)
    check_layout(out, 8)
    lengths = {len(row) for row in as_rows(out)}
    assert len(lengths) > 1  # the case is not trivial: rows end at different lengths


# ---------------------------------------------------------------------------------------------
# (b) beam search against the reference


BEAM_CASES = [
    # batch_size, num_beams, length_penalty, max_new_tokens, min_new_tokens, vocab, eos_bias, seed
    (b, k, lp, 7, 0, 8, 2.0, seed)
    for seed, (b, k, lp) in enumerate(itertools.product((1, 3, 8), (2, 3, 5), (0.0, 0.6, 1.0, 1.5)))
] + [
    (2, 4, 1.0, 6, 3, 9, 2.5, 100),
    (3, 3, 0.6, 5, 5, 7, 3.0, 101),
    (4, 2, 2.0, 1, 0, 6, 0.0, 102),
    (4, 2, 1.0, 1, 1, 6, 0.0, 103),
    (2, 6, -0.5, 6, 0, 12, 1.0, 104),
    (5, 3, 1.0, 9, 0, 10, 4.0, 105),
    (5, 3, 1.0, 9, 0, 10, -1.0, 106),
]


def run_beam(tables: Tensor, num_beams: int, **kwargs) -> Tensor:
    return beam_search(
        table_step(tables, num_beams), reorder=lambda index: None, batch_size=tables.shape[0], num_beams=num_beams,
        bos_id=BOS, eos_id=EOS, pad_id=PAD, **kwargs,
    )


def reference_for(tables: Tensor, num_beams: int, **kwargs) -> list[list[int]]:
    return reference_beam_search(
        lambda b, generated: tables[b, len(generated), generated[-1] if generated else BOS],
        batch_size=tables.shape[0], num_beams=num_beams, **kwargs,
    )


@pytest.mark.parametrize(("batch_size", "num_beams", "length_penalty", "max_new_tokens", "min_new_tokens", "vocab",
                          "eos_bias", "seed"), BEAM_CASES)
def test_beam_search_matches_reference(batch_size, num_beams, length_penalty, max_new_tokens, min_new_tokens, vocab,
                                       eos_bias, seed):
    tables = random_tables(batch_size, max_new_tokens, vocab, seed, eos_bias)
    kwargs = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "length_penalty": length_penalty}
    out = run_beam(tables, num_beams, **kwargs)
    check_layout(out, max_new_tokens)
    assert as_rows(out) == reference_for(tables, num_beams, **kwargs)
    for row in as_rows(out):
        assert EOS not in row[:min_new_tokens]


def test_beam_cases_are_not_trivial():
    """Over the cases above, beam search often differs from greedy, and hypotheses end both ways."""
    differs, with_eos, without_eos = 0, 0, 0
    for batch_size, num_beams, length_penalty, max_new_tokens, min_new_tokens, vocab, eos_bias, seed in BEAM_CASES:
        tables = random_tables(batch_size, max_new_tokens, vocab, seed, eos_bias)
        kwargs = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}
        beam = reference_for(tables, num_beams, length_penalty=length_penalty, **kwargs)
        greedy = [argmax_chain(tables[b], max_new_tokens, min_new_tokens) for b in range(batch_size)]
        differs += sum(x != y for x, y in zip(beam, greedy, strict=True))
        with_eos += sum(EOS in row for row in beam)
        without_eos += sum(EOS not in row for row in beam)
    assert differs >= 10 and with_eos >= 10 and without_eos >= 5


def test_length_penalty_changes_the_winner():
    """A short hypothesis with a better mean and a long one with a better sum: the exponent decides."""
    vocab = 5
    table = torch.full((4, vocab, vocab), -20.0)
    # From BOS: EOS (p=0.3) or token 3 (p=0.7); after 3: 3 again or EOS, each p=0.5. A small exponent
    # picks a short hypothesis, a large one a long one.
    table[0, BOS, EOS], table[0, BOS, 3] = math.log(0.3), math.log(0.7)
    table[1:, 3, 3], table[1:, 3, EOS] = math.log(0.5), math.log(0.5)
    table[1:, 4, 4] = 0.0
    table = torch.log_softmax(table, dim=-1)[None]
    short = reference_for(table, 2, max_new_tokens=4, length_penalty=0.0)
    long = reference_for(table, 2, max_new_tokens=4, length_penalty=3.0)
    assert short != long
    assert as_rows(run_beam(table, 2, max_new_tokens=4, length_penalty=0.0)) == short
    assert as_rows(run_beam(table, 2, max_new_tokens=4, length_penalty=3.0)) == long


def test_eos_ranked_below_num_beams_does_not_finish():
    """An EOS ranked after the ``num_beams`` best continuations of a step finishes nothing.

    From BOS: tokens 3 (p=0.4), 4 (p=0.35), EOS (p=0.25); with two beams EOS ranks third. Every
    continuation is unlikely, so the lone ``[EOS]`` (score log 0.25) would win if it were kept.
    """
    vocab, max_new_tokens = 10, 4
    generator = torch.Generator().manual_seed(7)
    later = torch.log_softmax(torch.randn(vocab, generator=generator) * 0.3, dim=-1)
    later[[PAD, BOS]] = -30.0
    later = torch.log_softmax(later, dim=-1)
    table = later.expand(1, max_new_tokens, vocab, vocab).clone()
    first = torch.full((vocab,), -30.0)
    first[3], first[4], first[EOS] = math.log(0.4), math.log(0.35), math.log(0.25)
    table[0, 0, BOS] = torch.log_softmax(first, dim=-1)
    out = as_rows(run_beam(table, 2, max_new_tokens=max_new_tokens))
    assert out == reference_for(table, 2, max_new_tokens=max_new_tokens)
    assert out != [[EOS]]
    # The rule mattered: [EOS] scores better than what beam search returns.
    tokens = [BOS, *out[0]]
    score = sum(float(table[0, i, tokens[i], tokens[i + 1]]) for i in range(len(out[0]))) / len(out[0])
    assert math.log(0.25) > score


@pytest.mark.parametrize("case", ["small_vocab", "forbidden_tokens"])
def test_beam_search_with_fewer_candidates_than_beams(case):
    if case == "small_vocab":
        # Three tokens (PAD, a word, EOS), three beams: the first step has only two non-EOS candidates.
        row = torch.log(torch.tensor([0.1, 0.6, 0.3]))
        table = row.expand(1, 3, 3, 3).clone()
        bos, word = 0, 1
    else:
        # Only EOS and token 3 are allowed (log-prob -inf elsewhere).
        row = torch.log_softmax(torch.tensor([-math.inf, -math.inf, 1.0, 0.5, -math.inf, -math.inf]), dim=-1)
        table = row.expand(1, 3, 6, 6).clone()
        bos, word = BOS, 3
    out = beam_search(
        lambda tokens: table[0, tokens.shape[1] - 1, tokens[:, -1]], reorder=lambda index: None, batch_size=1,
        num_beams=3, bos_id=bos, eos_id=EOS, pad_id=PAD, max_new_tokens=3,
    )
    want = reference_beam_search(
        lambda b, generated: table[b, len(generated), generated[-1] if generated else bos],
        batch_size=1, num_beams=3, max_new_tokens=3,
    )
    assert as_rows(out) == want
    assert set(out[0].tolist()) <= {word, EOS, PAD} and out[0, 0] != PAD


# ---------------------------------------------------------------------------------------------
# (c) one beam is greedy


@pytest.mark.parametrize(("batch_size", "max_new_tokens", "min_new_tokens", "seed"), [
    (1, 6, 0, 10), (4, 8, 0, 11), (5, 7, 2, 12), (6, 9, 0, 13),
])
@pytest.mark.parametrize("length_penalty", [0.6, 1.0, 2.0])
def test_one_beam_equals_greedy(batch_size, max_new_tokens, min_new_tokens, seed, length_penalty):
    tables = random_tables(batch_size, max_new_tokens, vocab=8, seed=seed, eos_bias=1.0)
    kwargs = {"batch_size": batch_size, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD,
              "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}
    greedy = greedy_search(table_step(tables, 1), **kwargs)
    beam = beam_search(table_step(tables, 1), reorder=lambda index: None, num_beams=1,
                       length_penalty=length_penalty, **kwargs)
    assert as_rows(beam) == as_rows(greedy)


# ---------------------------------------------------------------------------------------------
# (d) a step function with a cache that beam search reorders


def history_log_probs(tables: Tensor, source: Tensor, history: Tensor) -> Tensor:
    """Log-probabilities that depend on the whole history ``[N, t]`` (BOS first), not just its last token."""
    position = history.shape[1] - 1
    mixed = (history[:, 1:].sum(dim=1) * 3 + history[:, -1]) % tables.shape[-1]
    return tables[source, position, mixed]


class CachedStep:
    """Keeps the history itself and reads only the newest token of its input, like a KV cache."""

    def __init__(self, tables: Tensor, num_beams: int) -> None:
        self.tables, self.num_beams = tables, num_beams
        self.history: Tensor | None = None
        self.reorders: list[Tensor] = []

    def __call__(self, tokens: Tensor) -> Tensor:
        new = tokens[:, -1:]
        self.history = new if self.history is None else torch.cat([self.history, new], dim=1)
        assert self.history.shape == tokens.shape
        source = torch.arange(tokens.shape[0]) // self.num_beams
        return history_log_probs(self.tables, source, self.history)

    def reorder(self, index: Tensor) -> None:
        self.reorders.append(index)
        assert self.history is not None
        self.history = self.history[index]


@pytest.mark.parametrize(("batch_size", "num_beams", "length_penalty", "seed"), [
    (1, 3, 1.0, 20), (3, 2, 0.6, 21), (4, 4, 1.5, 22), (2, 5, 1.0, 23),
])
def test_cached_step_with_reorder_equals_stateless(batch_size, num_beams, length_penalty, seed):
    max_new_tokens = 8
    tables = random_tables(batch_size, max_new_tokens, vocab=11, seed=seed, eos_bias=0.5)
    kwargs = {"batch_size": batch_size, "num_beams": num_beams, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD,
              "max_new_tokens": max_new_tokens, "length_penalty": length_penalty}

    def stateless(tokens: Tensor) -> Tensor:
        return history_log_probs(tables, torch.arange(tokens.shape[0]) // num_beams, tokens)

    want = beam_search(stateless, reorder=lambda index: None, **kwargs)
    cached = CachedStep(tables, num_beams)
    got = beam_search(cached, reorder=cached.reorder, **kwargs)
    assert torch.equal(got, want)
    # And the oracle: the reference over the same history-dependent distribution.
    reference = reference_beam_search(
        lambda b, generated: history_log_probs(tables, torch.tensor([b]), torch.tensor([[BOS, *generated]]))[0],
        batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
    )
    assert as_rows(got) == reference
    # Each row index stays within its source's beams, as DecoderState.reorder relies on.
    rows = torch.arange(batch_size * num_beams)
    assert cached.reorders
    for index in cached.reorders:
        assert index.shape == rows.shape and torch.equal(index // num_beams, rows // num_beams)


def test_cached_step_needs_the_reorder():
    """Without the reorder the cache holds the wrong histories: the comparison above can fail."""
    differs = 0
    for seed in range(30, 36):
        tables = random_tables(2, 8, vocab=11, seed=seed, eos_bias=0.5)
        kwargs = {"batch_size": 2, "num_beams": 3, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_new_tokens": 8}
        good, bad = CachedStep(tables, 3), CachedStep(tables, 3)
        differs += not torch.equal(beam_search(good, reorder=good.reorder, **kwargs),
                                   beam_search(bad, reorder=lambda index: None, **kwargs))
    assert differs > 0


# ---------------------------------------------------------------------------------------------
# (e) bad arguments


def _greedy(**kwargs):
    args = {"batch_size": 1, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_new_tokens": 3, **kwargs}
    return greedy_search(lambda tokens: torch.zeros(tokens.shape[0], 4), **args)


def _beam(**kwargs):
    args = {"batch_size": 1, "num_beams": 2, "bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_new_tokens": 3,
            **kwargs}
    return beam_search(lambda tokens: torch.zeros(tokens.shape[0], 4), reorder=lambda index: None, **args)


@pytest.mark.parametrize("search", [_greedy, _beam])
def test_bad_lengths(search):
    with pytest.raises(ValueError, match="`max_new_tokens` must be at least 1, got 0"):
        search(max_new_tokens=0)
    with pytest.raises(ValueError, match="`max_new_tokens` must be at least 1, got -2"):
        search(max_new_tokens=-2)
    with pytest.raises(ValueError, match=r"`min_new_tokens` must be in \[0, max_new_tokens=3\], got 4"):
        search(min_new_tokens=4)
    with pytest.raises(ValueError, match=r"`min_new_tokens` must be in \[0, max_new_tokens=3\], got -1"):
        search(min_new_tokens=-1)


def test_bad_num_beams():
    with pytest.raises(ValueError, match="`num_beams` must be at least 1, got 0"):
        _beam(num_beams=0)
    with pytest.raises(ValueError, match="`num_beams` must be at least 1, got -3"):
        _beam(num_beams=-3)
