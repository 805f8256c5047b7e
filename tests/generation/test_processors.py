"""Logits processors against Hugging Face transformers' processors, which are the oracle: exact equality."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit.generation.processors import (
    BadWords,
    LogitsProcessor,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    build_processors,
)

hf = pytest.importorskip("transformers.generation.logits_process")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def make_logits(
    seed: int,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    *,
    ties: bool = False,
    neg_inf: float = 0.0,
) -> torch.Tensor:
    """Random logits; ``ties`` puts them on a coarse grid, ``neg_inf`` is the fraction set to -inf."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator) * 3
    if ties:
        logits = (logits * 2).round() / 2
    if neg_inf:
        logits[torch.rand(shape, generator=generator) < neg_inf] = -math.inf
    return logits.to(dtype)


def make_tokens(seed: int, shape: tuple[int, int], high: int) -> torch.Tensor:
    """Histories drawn from ``[0, high)``: a small ``high`` makes repeated n-grams likely."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=generator)


def assert_same(ours: LogitsProcessor, theirs, tokens: torch.Tensor, logits: torch.Tensor) -> None:
    before = logits.clone()
    expected = theirs(tokens, logits.clone())
    got = ours(tokens, logits)
    assert got.dtype == logits.dtype and got.shape == logits.shape
    assert torch.equal(got, expected), (got, expected)
    assert torch.equal(logits, before), "the processor changed its input"
    assert got.data_ptr() != logits.data_ptr()


# --- each processor equals its HF counterpart -----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.3, 1.7, 2])
def test_temperature_matches_hf(dtype, temperature):
    logits = make_logits(0, (4, 50), dtype, neg_inf=0.1)
    assert_same(Temperature(temperature), hf.TemperatureLogitsWarper(float(temperature)), None, logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("top_k", "min_tokens_to_keep"), [(1, 1), (5, 1), (5, 9), (60, 1), (50, 1)])
def test_top_k_matches_hf(dtype, ties, top_k, min_tokens_to_keep):
    logits = make_logits(1, (5, 50), dtype, ties=ties, neg_inf=0.2)
    ours = TopK(top_k, min_tokens_to_keep=min_tokens_to_keep)
    assert_same(ours, hf.TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep), None, logits)


def test_top_k_filter_value_matches_hf():
    logits = make_logits(2, (3, 40))
    assert_same(TopK(7, filter_value=-100.0), hf.TopKLogitsWarper(7, filter_value=-100.0), None, logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("min_tokens_to_keep", [1, 3])
def test_top_p_matches_hf(dtype, ties, top_p, min_tokens_to_keep):
    logits = make_logits(3, (6, 300), dtype, ties=ties, neg_inf=0.1)
    ours = TopP(top_p, min_tokens_to_keep=min_tokens_to_keep)
    assert_same(ours, hf.TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep), None, logits)


def test_top_p_large_vocabulary_matches_hf():
    # The size generation runs at; a real-looking distribution (a few likely tokens, a long tail).
    logits = make_logits(4, (8, 8000)) * 2
    for top_p in (0.5, 0.9, 0.95):
        assert_same(TopP(top_p), hf.TopPLogitsWarper(top_p), None, logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_p_tie_across_the_cut_matches_hf(dtype):
    # Ten equal logits and top_p = 0.5: five of the tied tokens go, and which five is torch.sort's choice.
    logits = torch.zeros(3, 10, dtype=dtype)
    logits[1, :4] = 1.0  # four tied likely tokens, six tied unlikely ones
    for top_p in (0.5, 0.25, 0.75):
        assert_same(TopP(top_p), hf.TopPLogitsWarper(top_p), None, logits)
    # The tie across min_tokens_to_keep's boundary.
    assert_same(TopP(0.1, min_tokens_to_keep=4), hf.TopPLogitsWarper(0.1, min_tokens_to_keep=4), None, logits)


@pytest.mark.parametrize("make", [TopK, TopP, MinP])
@pytest.mark.parametrize("min_tokens_to_keep", [1, 20])
def test_truncation_degenerate_rows_match_hf(make, min_tokens_to_keep):
    # A row all -inf, one with a +inf, one with a nan, one half -inf; 20 is more than the vocabulary.
    logits = make_logits(5, (5, 12))
    logits[0] = -math.inf
    logits[1, 3] = math.inf
    logits[2, 5] = math.nan
    logits[3, :6] = -math.inf
    argument, theirs = {
        TopK: (3, hf.TopKLogitsWarper),
        TopP: (0.8, hf.TopPLogitsWarper),
        MinP: (0.2, hf.MinPLogitsWarper),
    }[make]
    expected = theirs(argument, min_tokens_to_keep=min_tokens_to_keep)(None, logits.clone())
    got = make(argument, min_tokens_to_keep=min_tokens_to_keep)(None, logits)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))


def test_top_p_takes_both_paths():
    # White-box: the numpy-sorted path answers when no tie straddles the cut, and hands over when one does.
    assert TopP(0.5)._filter_by_sorted_values(make_logits(0, (2, 10))) is not None
    assert TopP(0.5)._filter_by_sorted_values(torch.zeros(2, 10)) is None


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 4),
    vocab=st.integers(1, 400),
    top_p=st.floats(0.001, 1.0),
    min_tokens_to_keep=st.integers(1, 5),
    ties=st.booleans(),
    neg_inf=st.sampled_from([0.0, 0.3]),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_top_p_property(seed, rows, vocab, top_p, min_tokens_to_keep, ties, neg_inf, scale):
    logits = make_logits(seed, (rows, vocab), ties=ties, neg_inf=neg_inf) * scale
    ours = TopP(top_p, min_tokens_to_keep=min_tokens_to_keep)
    assert_same(ours, hf.TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep), None, logits)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    vocab=st.integers(1, 300),
    top_k=st.integers(1, 320),
    min_p=st.floats(0.0, 1.0),
    min_tokens_to_keep=st.integers(1, 5),
    ties=st.booleans(),
)
def test_top_k_and_min_p_property(seed, vocab, top_k, min_p, min_tokens_to_keep, ties):
    logits = make_logits(seed, (3, vocab), ties=ties, neg_inf=0.2)
    assert_same(
        TopK(top_k, min_tokens_to_keep=min_tokens_to_keep),
        hf.TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep),
        None,
        logits,
    )
    assert_same(
        MinP(min_p, min_tokens_to_keep=min_tokens_to_keep),
        hf.MinPLogitsWarper(min_p, min_tokens_to_keep=min_tokens_to_keep),
        None,
        logits,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("min_tokens_to_keep", [1, 2, 7])
def test_min_p_matches_hf(dtype, ties, min_p, min_tokens_to_keep):
    logits = make_logits(6, (5, 80), dtype, ties=ties, neg_inf=0.1)
    ours = MinP(min_p, min_tokens_to_keep=min_tokens_to_keep)
    assert_same(ours, hf.MinPLogitsWarper(min_p, min_tokens_to_keep=min_tokens_to_keep), None, logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2])
def test_repetition_penalty_matches_hf(dtype, penalty):
    logits = make_logits(7, (4, 30), dtype, neg_inf=0.1)
    tokens = make_tokens(7, (4, 25), high=20)  # repeats within a row
    tokens[0, 3] = 34  # an id past the logits' vocabulary: ignored by both
    assert_same(RepetitionPenalty(penalty), hf.RepetitionPenaltyLogitsProcessor(float(penalty)), tokens, logits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ngram_size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 3, 4, 40])
def test_no_repeat_ngram_matches_hf(dtype, ngram_size, length):
    logits = make_logits(8, (6, 12), dtype, neg_inf=0.1)
    tokens = make_tokens(8 + length, (6, length), high=4)  # a 4-token alphabet repeats n-grams
    assert_same(NoRepeatNGram(ngram_size), hf.NoRepeatNGramLogitsProcessor(ngram_size), tokens, logits)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), ngram_size=st.integers(1, 5), length=st.integers(1, 30), alphabet=st.integers(1, 6))
def test_no_repeat_ngram_property(seed, ngram_size, length, alphabet):
    logits = make_logits(seed, (4, 8), neg_inf=0.1)
    tokens = make_tokens(seed, (4, length), high=alphabet)
    assert_same(NoRepeatNGram(ngram_size), hf.NoRepeatNGramLogitsProcessor(ngram_size), tokens, logits)


BAD_WORDS = [
    [[3]],
    [[3], [5], [3]],  # a duplicate
    [[1, 2]],
    [[0, 1], [1, 1], [2, 1, 0], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]],  # the last is longer than a history
    [[7], [2, 3], [1, 3], [0, 1, 2, 3], [5, 3, 0]],  # sequences sharing their last token
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad_words_ids", BAD_WORDS)
@pytest.mark.parametrize("length", [1, 2, 12])
def test_bad_words_matches_hf(dtype, bad_words_ids, length):
    vocab = 10
    logits = make_logits(9, (8, vocab), dtype, neg_inf=0.1)
    tokens = make_tokens(9 + length, (8, length), high=4)
    theirs = hf.NoBadWordsLogitsProcessor(bad_words_ids, eos_token_id=vocab - 1)
    assert_same(BadWords(bad_words_ids), theirs, tokens, logits)
    assert_same(BadWords(bad_words_ids, vocab_size=vocab), theirs, tokens, logits)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bad_words_ids=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=4), min_size=1, max_size=6),
    length=st.integers(1, 12),
)
def test_bad_words_property(seed, bad_words_ids, length):
    vocab = 6
    logits = make_logits(seed, (6, vocab), neg_inf=0.1)
    tokens = make_tokens(seed, (6, length), high=5)
    theirs = hf.NoBadWordsLogitsProcessor(bad_words_ids, eos_token_id=vocab - 1)
    assert_same(BadWords(bad_words_ids), theirs, tokens, logits)


def test_bad_words_is_reusable_across_vocabularies_and_dtypes():
    ban = BadWords([[2], [0, 1]])
    tokens = torch.tensor([[0], [1]])
    for vocab, dtype in [(4, torch.float32), (6, torch.float16), (4, torch.float64)]:
        logits = make_logits(10, (2, vocab), dtype)
        assert_same(ban, hf.NoBadWordsLogitsProcessor([[2], [0, 1]], eos_token_id=3), tokens, logits)


@pytest.mark.parametrize("device", DEVICES)
def test_every_processor_matches_hf_on_device(device):
    logits = make_logits(11, (4, 500), neg_inf=0.05).to(device)
    tokens = make_tokens(11, (4, 30), high=8).to(device)
    pairs = [
        (Temperature(0.7), hf.TemperatureLogitsWarper(0.7)),
        (TopK(20), hf.TopKLogitsWarper(20)),
        (TopP(0.8), hf.TopPLogitsWarper(0.8)),
        (MinP(0.1), hf.MinPLogitsWarper(0.1)),
        (RepetitionPenalty(1.3), hf.RepetitionPenaltyLogitsProcessor(1.3)),
        (NoRepeatNGram(2), hf.NoRepeatNGramLogitsProcessor(2)),
        (BadWords([[3], [1, 2]]), hf.NoBadWordsLogitsProcessor([[3], [1, 2]], eos_token_id=499)),
    ]
    for ours, theirs in pairs:
        got = ours(tokens, logits)
        assert got.device == logits.device
        assert torch.equal(got, theirs(tokens, logits.clone())), ours


# --- the list: order, omissions, composition ------------------------------------------------------------


def test_build_processors_order_and_omissions():
    user = [lambda tokens, logits: logits * 1.0]
    everything = build_processors(
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        no_repeat_ngram_size=3,
        bad_words_ids=[[1]],
        logits_processors=user,
    )
    names = [type(p).__name__ for p in everything]
    assert names == [
        "RepetitionPenalty", "NoRepeatNGram", "BadWords", "function", "Temperature", "TopK", "TopP", "MinP"
    ]  # fmt: skip
    assert everything[3] is user[0]
    # Identities are left out; without sampling, so are the warpers.
    assert build_processors(do_sample=True) == []
    assert build_processors(do_sample=True, temperature=1, top_k=0, top_p=1, min_p=0, repetition_penalty=1) == []
    greedy = build_processors(do_sample=False, temperature=0.7, top_k=20, top_p=0.9, min_p=0.1, no_repeat_ngram_size=2)
    assert [type(p).__name__ for p in greedy] == ["NoRepeatNGram"]
    assert build_processors(do_sample=False, temperature=0.0) == []  # temperature 0: greedy, by convention


def test_build_processors_applies_like_hf_list():
    # The whole list against HF's LogitsProcessorList in the documented order: exact equality.
    logits = make_logits(12, (4, 100), neg_inf=0.05)
    tokens = make_tokens(12, (4, 20), high=6)

    def user(tokens, logits):
        return logits + 0.25

    ours = build_processors(
        do_sample=True,
        temperature=0.6,
        top_k=40,
        top_p=0.8,
        min_p=0.02,
        repetition_penalty=1.4,
        no_repeat_ngram_size=2,
        bad_words_ids=[[5], [1, 2]],
        logits_processors=[user],
        vocab_size=100,
    )
    theirs = hf.LogitsProcessorList(
        [
            hf.RepetitionPenaltyLogitsProcessor(1.4),
            hf.NoRepeatNGramLogitsProcessor(2),
            hf.NoBadWordsLogitsProcessor([[5], [1, 2]], eos_token_id=99),
            user,
            hf.TemperatureLogitsWarper(0.6),
            hf.TopKLogitsWarper(40),
            hf.TopPLogitsWarper(0.8),
            hf.MinPLogitsWarper(0.02),
        ]
    )
    assert torch.equal(apply_processors(ours, tokens, logits), theirs(tokens, logits.clone()))


def test_apply_processors_of_nothing_is_identity():
    logits = make_logits(13, (2, 5))
    assert apply_processors([], torch.zeros(2, 1, dtype=torch.long), logits) is logits


def test_processors_satisfy_the_protocol():
    for processor in [Temperature(2.0), TopK(1), TopP(0.5), MinP(0.1), RepetitionPenalty(1.1), NoRepeatNGram(2)]:
        assert isinstance(processor, LogitsProcessor)
    assert isinstance(BadWords([[1]]), LogitsProcessor)
    assert repr(TopP(0.5)) == "TopP(top_p=0.5, min_tokens_to_keep=1, filter_value=-inf)"


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Temperature(0.0), ValueError, r"`temperature` must be a finite number > 0, got 0.0"),
        (lambda: Temperature(-1), ValueError, r"`temperature` must be a finite number > 0, got -1"),
        (lambda: Temperature(math.inf), ValueError, r"`temperature` must be a finite number > 0, got inf"),
        (lambda: Temperature(math.nan), ValueError, r"`temperature` must be a finite number > 0, got nan"),
        (lambda: Temperature("1"), TypeError, r"`temperature` must be a real number, got '1' of type str"),
        (lambda: Temperature(True), TypeError, r"`temperature` must be a real number, got True"),
        (lambda: TopK(0), ValueError, r"`top_k` must be an int >= 1, got 0"),
        (lambda: TopK(2.5), TypeError, r"`top_k` must be an int, got 2.5 of type float"),
        (lambda: TopK(2, min_tokens_to_keep=0), ValueError, r"`min_tokens_to_keep` must be an int >= 1, got 0"),
        (lambda: TopK(2, filter_value=math.nan), ValueError, r"`filter_value` must not be nan, got nan"),
        (lambda: TopP(0.0), ValueError, r"`top_p` must be in \(0, 1\], got 0.0"),
        (lambda: TopP(1.5), ValueError, r"`top_p` must be in \(0, 1\], got 1.5"),
        (lambda: TopP(math.nan), ValueError, r"`top_p` must be in \(0, 1\], got nan"),
        (lambda: TopP(0.5, min_tokens_to_keep=-2), ValueError, r"`min_tokens_to_keep` must be an int >= 1, got -2"),
        (lambda: MinP(-0.1), ValueError, r"`min_p` must be in \[0, 1\], got -0.1"),
        (lambda: MinP(1.01), ValueError, r"`min_p` must be in \[0, 1\], got 1.01"),
        (lambda: MinP(None), TypeError, r"`min_p` must be a real number, got None"),
        (lambda: RepetitionPenalty(0.0), ValueError, r"`penalty` must be a finite number > 0, got 0.0"),
        (lambda: RepetitionPenalty(-1.2), ValueError, r"`penalty` must be a finite number > 0, got -1.2"),
        (lambda: NoRepeatNGram(0), ValueError, r"`ngram_size` must be an int >= 1, got 0"),
        (lambda: NoRepeatNGram(2.0), TypeError, r"`ngram_size` must be an int, got 2.0"),
        (lambda: BadWords([]), ValueError, r"`bad_words_ids` must hold at least one sequence, got an empty list"),
        (
            lambda: BadWords([[1], []]),
            ValueError,
            r"`bad_words_ids` must not hold an empty sequence, got \[\[1\], \[\]\]",
        ),
        (lambda: BadWords([[1, -3]]), ValueError, r"`bad_words_ids` must hold token ids >= 0, got -3 in \[1, -3\]"),
        (lambda: BadWords([[1, 2.0]]), TypeError, r"`bad_words_ids` must hold int token ids, got 2.0 in \[1, 2.0\]"),
        (lambda: BadWords([1, 2]), TypeError, r"`bad_words_ids` must be a list of lists of token ids, got the item 1"),
        (lambda: BadWords("ab"), TypeError, r"`bad_words_ids` must be a list of lists of token ids, got 'ab'"),
        (lambda: BadWords([[4]], vocab_size=4), ValueError, r"ids in \[0, 4\) \(the vocabulary\), got the id 4"),
        (lambda: BadWords([[1]], vocab_size=0), ValueError, r"`vocab_size` must be an int >= 1, got 0"),
    ],
)
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_words_id_outside_vocabulary_at_call_time():
    ban = BadWords([[2], [1, 7]])
    ban(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 8))  # fine at V = 8
    with pytest.raises(ValueError, match=r"`bad_words_ids` must hold ids in \[0, 5\) \(the vocabulary\), got the id 7"):
        ban(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 5))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, r"`temperature` must be a finite number > 0, got 0.0"),
        ({"temperature": -0.5}, ValueError, r"`temperature` must be a finite number > 0, got -0.5"),
        ({"top_k": -1}, ValueError, r"`top_k` must be an int >= 0, got -1"),
        ({"top_k": 1.0}, TypeError, r"`top_k` must be an int, got 1.0"),
        ({"top_p": 0.0}, ValueError, r"`top_p` must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.2}, ValueError, r"`top_p` must be in \(0, 1\], got 1.2"),
        ({"min_p": 2}, ValueError, r"`min_p` must be in \[0, 1\], got 2"),
        ({"repetition_penalty": 0}, ValueError, r"`repetition_penalty` must be a finite number > 0, got 0"),
        ({"no_repeat_ngram_size": -1}, ValueError, r"`no_repeat_ngram_size` must be an int >= 0, got -1"),
        ({"bad_words_ids": []}, ValueError, r"`bad_words_ids` must hold at least one sequence"),
        ({"bad_words_ids": [[9]], "vocab_size": 9}, ValueError, r"ids in \[0, 9\) \(the vocabulary\), got the id 9"),
        ({"vocab_size": -3}, ValueError, r"`vocab_size` must be an int >= 1, got -3"),
        ({"logits_processors": [3]}, TypeError, r"`logits_processors` must hold callables .* got 3"),
        ({"do_sample": 1}, TypeError, r"`do_sample` must be a bool, got 1"),
    ],
)
def test_build_processors_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_processors(**{"do_sample": True, **kwargs})


def test_build_processors_checks_sampling_arguments_without_sampling():
    with pytest.raises(ValueError, match=r"`top_p` must be in \(0, 1\], got 0"):
        build_processors(do_sample=False, top_p=0)
    with pytest.raises(ValueError, match=r"`top_k` must be an int >= 0, got -5"):
        build_processors(do_sample=False, top_k=-5)
