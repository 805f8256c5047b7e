"""Sampling, n-best lists, diverse beams, forced prefixes and scores of ``llmkit.generation``.

The step functions are the log-probability tables of ``tests/test_generation.py``; the oracles are
closed forms (a chi-square test against the processed distribution, argmax chains, sums of table
entries) and plain beam search.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from llmkit.generation import (
    GenerationConfig,
    GenerationOutput,
    Temperature,
    TopK,
    TopP,
    beam_search,
    greedy_search,
    sample,
)
from tests.test_generation import BOS, EOS, PAD, CachedStep, as_rows, history_log_probs, random_tables, table_step

COMMON = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}


def test_sampling_first_token_matches_the_processed_distribution():
    # 20,000 rows drawn at once from one distribution: the counts follow the processed softmax.
    vocab = 12
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    logits[[PAD, BOS]] = -math.inf
    processors = [Temperature(0.7), TopK(9), TopP(0.9)]
    draws = 20_000
    out = sample(
        lambda tokens: logits.expand(tokens.shape[0], vocab),
        batch_size=draws,
        max_new_tokens=1,
        logits_processors=processors,
        generator=torch.Generator().manual_seed(0),
        **COMMON,
    )
    processed = logits[None]
    for processor in processors:
        processed = processor(torch.full((1, 1), BOS), processed)
    probs = processed.softmax(dim=-1)[0].double()
    support = probs > 0
    assert 3 <= int(support.sum()) < vocab - 2  # top-k and top-p really cut
    counts = torch.bincount(out[:, 0], minlength=vocab).double()
    assert counts[~support].sum() == 0
    expected = probs[support] / probs[support].sum() * draws
    result = stats.chisquare(counts[support].numpy(), expected.numpy())
    assert result.pvalue > 1e-3


def test_same_seed_same_tokens():
    tables = random_tables(4, 8, 10, seed=1)

    def run(seed: int) -> torch.Tensor:
        return sample(
            table_step(tables, 1),
            batch_size=4,
            max_new_tokens=8,
            logits_processors=[Temperature(1.3)],
            generator=torch.Generator().manual_seed(seed),
            **COMMON,
        )

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@pytest.mark.parametrize(
    ("num_beams", "num_return_sequences", "length_penalty", "seed"),
    [
        (4, 4, 1.0, 10),
        (3, 2, 0.6, 11),
        (5, 3, 1.5, 12),
    ],
)
def test_n_best_sorted_first_equals_beam_search(num_beams, num_return_sequences, length_penalty, seed):
    batch_size, max_new = 3, 7
    tables = random_tables(batch_size, max_new, 9, seed=seed, eos_bias=1.0)
    kwargs = {
        "batch_size": batch_size,
        "num_beams": num_beams,
        "max_new_tokens": max_new,
        "length_penalty": length_penalty,
        **COMMON,
    }
    best = beam_search(table_step(tables, num_beams), reorder=lambda index: None, **kwargs)
    out = beam_search(
        table_step(tables, num_beams),
        reorder=lambda index: None,
        num_return_sequences=num_return_sequences,
        return_scores=True,
        **kwargs,
    )
    assert isinstance(out, GenerationOutput)
    assert out.sequences.shape[0] == batch_size * num_return_sequences
    rows = as_rows(out.sequences)
    for b in range(batch_size):
        mine = slice(b * num_return_sequences, (b + 1) * num_return_sequences)
        scores = out.scores[mine].tolist()
        assert scores == sorted(scores, reverse=True)
        assert rows[mine.start] == as_rows(best)[b]
        assert len({tuple(row) for row in rows[mine]}) == num_return_sequences  # distinct hypotheses
        for i in range(mine.start, mine.stop):
            # The score is the table's log-probabilities summed along the hypothesis, length-normalised.
            tokens, total, last = rows[i], 0.0, BOS
            for position, token in enumerate(tokens):
                total += float(tables[b, position, last, token])
                last = token
            assert out.scores[i].item() == pytest.approx(total / len(tokens) ** length_penalty, abs=1e-4)
            assert out.token_scores[i, : len(tokens)].sum().item() == pytest.approx(total, abs=1e-4)
            assert bool((out.token_scores[i, len(tokens) :] == 0).all())


def test_greedy_scores_are_log_probabilities_of_the_chosen_tokens():
    tables = random_tables(3, 6, 8, seed=4, eos_bias=0.5)
    out = greedy_search(table_step(tables, 1), batch_size=3, max_new_tokens=6, return_scores=True, **COMMON)
    for b, tokens in enumerate(as_rows(out.sequences)):
        want, last = [], BOS
        for position, token in enumerate(tokens):
            want.append(float(tables[b, position, last].log_softmax(dim=-1)[token]))
            last = token
        assert out.token_scores[b, : len(tokens)].tolist() == pytest.approx(want, abs=1e-6)
        assert out.scores[b].item() == pytest.approx(sum(want), abs=1e-5)


def test_diverse_beams_without_penalty_repeat_plain_beam_search():
    batch_size, max_new = 2, 6
    tables = random_tables(batch_size, max_new, 9, seed=7, eos_bias=1.0)
    kwargs = {"batch_size": batch_size, "max_new_tokens": max_new, **COMMON}
    plain = beam_search(
        table_step(tables, 2), reorder=lambda index: None, num_beams=2, num_return_sequences=2, **kwargs
    )
    grouped = beam_search(
        table_step(tables, 6),
        reorder=lambda index: None,
        num_beams=6,
        num_beam_groups=3,
        num_return_sequences=6,
        **kwargs,
    )
    # Three identical groups: each hypothesis of plain 2-beam search three times, in score order.
    assert as_rows(grouped) == [row for row in as_rows(plain) for _ in range(3)]


def test_diversity_penalty_makes_groups_start_differently():
    batch_size, max_new = 2, 6
    tables = random_tables(batch_size, max_new, 9, seed=8, eos_bias=-6.0)  # EOS rare: every beam runs
    kwargs = {
        "batch_size": batch_size,
        "max_new_tokens": max_new,
        "num_beams": 4,
        "num_beam_groups": 4,
        "num_return_sequences": 4,
        **COMMON,
    }
    same = as_rows(beam_search(table_step(tables, 4), reorder=lambda index: None, **kwargs))
    diverse = as_rows(beam_search(table_step(tables, 4), reorder=lambda index: None, diversity_penalty=100.0, **kwargs))
    for b in range(batch_size):
        assert len({row[0] for row in same[4 * b : 4 * b + 4]}) == 1
        # Each group's beam avoids the tokens the earlier groups' running beams took (a hypothesis
        # that finished at EOS is not a running beam, as in HF), so the four are distinct.
        assert len({tuple(row) for row in diverse[4 * b : 4 * b + 4]}) == 4
        assert len({row[0] for row in diverse[4 * b : 4 * b + 4]}) == 4


@pytest.mark.parametrize("num_beams", [1, 6])
def test_cached_step_with_groups_and_prefix_equals_stateless(num_beams):
    batch_size, max_new = 3, 7
    tables = random_tables(batch_size, max_new, 10, seed=9, eos_bias=0.5)
    prefix = torch.tensor([[5, 6, 7], [4, PAD, PAD], [PAD, PAD, PAD]])

    def stateless(tokens: torch.Tensor) -> torch.Tensor:
        source = torch.arange(tokens.shape[0]) // num_beams
        return history_log_probs(tables, source, tokens)

    cached = CachedStep(tables, num_beams)
    kwargs = {"batch_size": batch_size, "max_new_tokens": max_new, "decoder_prefix": prefix, **COMMON}
    if num_beams == 1:
        a = greedy_search(cached, **kwargs)
        b = greedy_search(stateless, **kwargs)
    else:
        kwargs.update(num_beams=num_beams, num_beam_groups=2, diversity_penalty=0.5, num_return_sequences=3)
        a = beam_search(cached, reorder=cached.reorder, **kwargs)
        b = beam_search(stateless, reorder=lambda index: None, **kwargs)
    assert torch.equal(a, b)
    rows = as_rows(a)
    per_source = len(rows) // batch_size
    for i, row in enumerate(rows):
        forced = [t for t in prefix[i // per_source].tolist() if t != PAD]
        assert row[: len(forced)] == forced


def test_greedy_prefix_then_argmax_chain():
    tables = random_tables(2, 6, 9, seed=12)
    prefix = torch.tensor([[4, 5], [6, PAD]])
    out = as_rows(greedy_search(table_step(tables, 1), batch_size=2, max_new_tokens=6, decoder_prefix=prefix, **COMMON))
    for b, row in enumerate(out):
        forced = [t for t in prefix[b].tolist() if t != PAD]
        want, last = list(forced), forced[-1]
        for position in range(len(forced), 6):
            last = int(tables[b, position, last].argmax())
            want.append(last)
            if last == EOS:
                break
        assert row == want


def test_bad_options_fail_before_decoding():
    def never(tokens: torch.Tensor) -> torch.Tensor:
        raise AssertionError("decoding started")

    cases = [
        ({"do_sample": True, "top_p": 0.0}, r"`top_p`"),
        ({"do_sample": True, "top_p": 1.5}, r"`top_p`"),
        ({"do_sample": True, "top_k": -1}, r"`top_k`"),
        ({"do_sample": True, "temperature": 0.0}, r"`temperature`"),
        ({"num_beams": 2, "num_return_sequences": 3}, r"`num_return_sequences` must be in \[1, num_beams=2\]"),
        ({"num_beams": 4, "num_beam_groups": 3}, r"`num_beam_groups` must be at least 1 and divide num_beams=4"),
        ({"num_return_sequences": 2}, r"greedy search gives one sequence per source"),
        ({"num_beams": 2, "do_sample": True}, r"beam sampling"),
        ({"num_beam_groups": 2}, r"`num_beam_groups` \(2\) needs num_beams > 1"),
        ({"num_beams": 2, "diversity_penalty": -1.0}, r"`diversity_penalty` must be >= 0"),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match):
            GenerationConfig(**options).search(
                never, reorder=lambda index: None, batch_size=1, max_new_tokens=3, device="cpu", **COMMON
            )
    config = GenerationConfig()
    with pytest.raises(ValueError, match=r"`decoder_prefix` has 4 tokens, more than max_new_tokens=3"):
        config.check(batch_size=1, max_new_tokens=3, vocab_size=9, decoder_prefix=torch.tensor([[4, 5, 6, 7]]))
    with pytest.raises(ValueError, match=r"`decoder_prefix` holds token ids in \[4, 9\], outside the vocabulary"):
        config.check(batch_size=1, max_new_tokens=3, vocab_size=9, decoder_prefix=torch.tensor([[4, 9]]))
    with pytest.raises(ValueError, match=r"`decoder_prefix` must have shape \[batch=2, P\]"):
        config.check(batch_size=2, max_new_tokens=3, vocab_size=9, decoder_prefix=torch.tensor([[4, 5]]))
    with pytest.raises(TypeError, match=r"`decoder_prefix` must be an integer LongTensor"):
        config.check(batch_size=1, max_new_tokens=3, vocab_size=9, decoder_prefix=torch.tensor([[4.0]]))
    with pytest.raises(ValueError, match=r"`bad_words_ids`"):
        GenerationConfig(bad_words_ids=[[3, 12]]).check(
            batch_size=1, max_new_tokens=3, vocab_size=9, decoder_prefix=None
        )
