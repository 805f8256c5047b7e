"""CHRFScore and chrf_score against sacrebleu's CHRF, the oracle."""

from __future__ import annotations

import json
import random
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics.chrf import CHRF
from sacrebleu.utils import sum_of_lists
from torchmetrics import MetricCollection

import llmkit.metrics.functional.chrf as chrf_module
from llmkit import __version__
from llmkit.metrics.chrf import CHRFScore
from llmkit.metrics.functional.chrf import _chrf_update, _split_punctuation, chrf_score
from tests.conftest import _free_port, spawn_group

# Batches of a few hundred sentences gain nothing from intra-op threads, which on a busy
# machine make each tensor op wait for a second core.
pytestmark = pytest.mark.usefixtures("one_thread")


def per_sample(streams: list[list[str | None]]) -> list[list[str]]:
    """sacrebleu's reference streams -> llmkit's references per sample (``None`` = missing)."""
    return [[stream[i] for stream in streams if stream[i] is not None] for i in range(len(streams[0]))]  # type: ignore[misc]


def as_streams(target: list[list[str]]) -> list[list[str | None]]:
    """llmkit's references per sample -> sacrebleu's reference streams, ``None`` where missing."""
    width = max(len(refs) for refs in target)
    return [[refs[k] if k < len(refs) else None for refs in target] for k in range(width)]


def sacre_score(hyps: list[str], streams: list, **kwargs: Any) -> float:
    return CHRF(**kwargs).corpus_score(hyps, streams).score / 100


def sacre_rows(hyps: list[str], streams: list, **kwargs: Any) -> list[list[int]]:
    return CHRF(**kwargs)._extract_corpus_statistics(hyps, streams)


def check_against_sacrebleu(hyps: list[str], target: list[list[str]], **kwargs: Any) -> None:
    """Per-sentence rows and the corpus score equal sacrebleu's, functional and class alike."""
    streams = as_streams(target)
    oracle = CHRF(**kwargs)
    # What corpus_score does, in two steps: the rows, then the score of their sum.
    want_rows = oracle._extract_corpus_statistics(hyps, streams)
    want = oracle._aggregate_and_compute(want_rows).score / 100
    rows, num_refs = _chrf_update(hyps, target, **kwargs)
    assert rows.tolist() == want_rows
    assert num_refs == len(streams)
    assert chrf_score(hyps, target, **kwargs).item() == pytest.approx(want, abs=1e-6)
    metric = CHRFScore(**kwargs)
    metric.update(hyps, target)
    assert metric.compute().item() == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Parity on real data: the 16 WMT17 en-de systems.


def wmt17_streams(wmt17: Any, num_refs: int) -> list[list[str]]:
    systems, reference = wmt17
    # A second reference stream: another system's output (sacrebleu's own tests do the same).
    return [reference] if num_refs == 1 else [reference, systems[-1][1]]


@pytest.mark.slow
@pytest.mark.parametrize("num_refs", [1, 2])
def test_wmt17_parity_every_system(wmt17, num_refs):
    """chrF and chrF++ of every system, one and two references: the rows themselves are sacrebleu's."""
    systems, _ = wmt17
    streams = wmt17_streams(wmt17, num_refs)
    target = per_sample(streams)
    chrf_pp = CHRF(word_order=2, references=streams)  # reference n-grams cached once
    chrf = CHRF(word_order=0, references=streams)
    metrics = {0: CHRFScore(keep_sentence_stats=True), 2: CHRFScore(word_order=2, keep_sentence_stats=True)}
    for name, hyps in systems:
        want_rows = {2: chrf_pp._extract_corpus_statistics(hyps, None)}
        if num_refs == 1:
            # One reference: chrF's rows are chrF++'s without the word orders (saves an oracle pass).
            want_rows[0] = [row[: 3 * chrf.order] for row in want_rows[2]]
        else:
            # Several: the word orders take part in picking the reference, so chrF has its own pass.
            want_rows[0] = chrf._extract_corpus_statistics(hyps, None)
        for word_order, oracle in ((0, chrf), (2, chrf_pp)):
            want = oracle._compute_score_from_stats(sum_of_lists(want_rows[word_order])).score / 100
            metric = metrics[word_order]
            metric.update(hyps, target)
            assert metric.sentence_stats().long().tolist() == want_rows[word_order], (name, word_order)
            assert metric.compute().item() == pytest.approx(want, abs=1e-6), (name, word_order)
            metric.reset()


def test_wmt17_parity_two_systems_quick(wmt17):
    """A fast subset of the slow parity test: two systems, 400 sentences, chrF and chrF++, 1 and 2 references."""
    systems, _ = wmt17
    for num_refs in (1, 2):
        streams = [stream[:400] for stream in wmt17_streams(wmt17, num_refs)]
        for _, hyps in systems[:2]:
            for word_order in (0, 2):
                check_against_sacrebleu(hyps[:400], per_sample(streams), word_order=word_order)


OPTIONS = [
    {"char_order": 1},
    {"char_order": 3},
    {"char_order": 4, "word_order": 1},
    {"char_order": 2, "word_order": 3},
    {"word_order": 2, "beta": 1},
    {"beta": 3},
    {"beta": 0.5, "word_order": 2},
    {"beta": 0},
    {"lowercase": True},
    {"lowercase": True, "word_order": 2},
    {"whitespace": True},
    {"whitespace": True, "word_order": 2},
    {"eps_smoothing": True},
    {"eps_smoothing": True, "word_order": 2, "beta": 1},
]


@pytest.mark.parametrize("kwargs", OPTIONS, ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items()))
def test_wmt17_options(wmt17, kwargs):
    """Each option on two systems and 250 sentences, with two references (the option picks the reference)."""
    systems, _ = wmt17
    streams = [stream[:250] for stream in wmt17_streams(wmt17, 2)]
    for _, hyps in systems[2:4]:
        check_against_sacrebleu(hyps[:250], per_sample(streams), **kwargs)


def test_wmt17_different_number_of_references_per_sample(wmt17):
    systems, reference = wmt17
    n = 300
    second: list[str | None] = [line if i % 3 else None for i, line in enumerate(systems[3][1][:n])]
    third: list[str | None] = [line if i % 5 == 0 else None for i, line in enumerate(systems[4][1][:n])]
    target = per_sample([reference[:n], second, third])
    for word_order in (0, 2):
        check_against_sacrebleu(systems[0][1][:n], target, word_order=word_order)


# ---------------------------------------------------------------------------------------------
# Sentence-level edge cases and random strings.

EDGE_CASES: list[tuple[str, list[str]]] = [
    ("", ["a reference"]),  # empty hypothesis
    ("a hypothesis", [""]),  # empty reference
    ("", [""]),
    ("   ", ["\t \n"]),  # whitespace only
    ("abc", ["abcdefgh"]),  # hypothesis shorter than char_order
    ("abcdefgh", ["abc"]),  # reference shorter than char_order
    ("a", ["a"]),
    ("...", ["!?"]),  # punctuation only
    (". , ( )", ["( ) . ,"]),
    ("(hi) there.", ["(hi) there !"]),  # "(hi)" -> "(hi", ")"
    ("'quoted' word,", ["quoted word"]),
    ("aaaa aaaa", ["aaa aa"]),  # repeated n-grams: clipped counts
    ("The Cat", ["the cat", "THE CAT"]),
    ("same", ["same", "same"]),  # a tie: the first reference
    ("x y z", ["", "x y", "x y z w"]),
    ("straße İstanbul", ["STRASSE istanbul"]),  # lowercasing changes lengths
    ("tab\tsep\u00a0nbsp\u2003em", ["tab sep nbsp em"]),  # Unicode whitespace
    ("emoji 😀 here", ["emoji 😀 there"]),
]


@pytest.mark.parametrize("kwargs", [{}, {"word_order": 2}, {"eps_smoothing": True, "word_order": 2}, {"lowercase": True},
                                    {"whitespace": True}, {"char_order": 2, "beta": 1}])
def test_edge_cases_sentence_by_sentence(kwargs):
    for hyp, refs in EDGE_CASES:
        check_against_sacrebleu([hyp], [refs], **kwargs)
    check_against_sacrebleu([hyp for hyp, _ in EDGE_CASES], [refs for _, refs in EDGE_CASES], **kwargs)


def test_empty_corpus():
    assert chrf_score([], []).item() == 0.0
    assert chrf_score(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 2, 4, dtype=torch.long)).item() == 0.0
    metric = CHRFScore(word_order=2, keep_sentence_stats=True)
    metric.update([], [])
    assert metric.compute().item() == 0.0
    assert metric.sentence_stats().shape == (0, 24)


def test_empty_hypothesis_and_reference_scores():
    # Nothing in common scores 0; identical strings score 1.
    assert chrf_score([""], [["abc"]]).item() == 0.0
    assert chrf_score(["abc def"], [["abc def"]]).item() == pytest.approx(1.0, abs=1e-7)
    assert chrf_score(["abc def"], [["abc def"]], word_order=2).item() == pytest.approx(1.0, abs=1e-7)


def test_split_punctuation_is_sacrebleus():
    oracle = CHRF()
    for sentence in ["(hi)", "a.", ".", "..", ".a", "a", "x.y", "'quote'", "end.\u00a0next", "a\x1cb.", ",a,", ""]:
        assert _split_punctuation(sentence) == oracle._remove_punctuation(sentence), sentence


_ALPHABET = [*"abcAB .,!?'()-\t\n", "\u00a0", "\u2003", "\x1c", "İ", "ß", "é", "😀", "—"]
_TEXT = st.text(alphabet=_ALPHABET, max_size=18)


@settings(max_examples=60, deadline=None)
@given(
    corpus=st.lists(st.tuples(_TEXT, st.lists(_TEXT, min_size=1, max_size=3)), min_size=1, max_size=5),
    char_order=st.integers(1, 6),
    word_order=st.integers(0, 3),
    beta=st.sampled_from([0, 0.5, 1, 2, 3]),
    lowercase=st.booleans(),
    whitespace=st.booleans(),
    eps_smoothing=st.booleans(),
)
def test_random_strings_match_sacrebleu(corpus, char_order, word_order, beta, lowercase, whitespace, eps_smoothing):
    hyps = [hyp for hyp, _ in corpus]
    target = [refs for _, refs in corpus]
    check_against_sacrebleu(
        hyps, target, char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase,
        whitespace=whitespace, eps_smoothing=eps_smoothing,
    )


# ---------------------------------------------------------------------------------------------
# Token ids: each id a character and a word, i.e. sacrebleu on strings that write each id as
# its own non-punctuation character, separated by spaces.


_ID_CHARS: dict[int, str] = {}


def ids_to_text(row: list[int], pad: int | None = None) -> str:
    """Each id as its own character (a CJK code point, neither whitespace nor punctuation), space-separated."""
    return " ".join(_ID_CHARS.setdefault(token, chr(0x20000 + len(_ID_CHARS))) for token in row if token != pad)


def pad_rows(rows: list[list[int]], pad: int, width: int | None = None) -> torch.Tensor:
    width = width or max(max(map(len, rows)), 1)
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)


def random_id_corpus(rng: random.Random, num: int, vocab: int, max_len: int) -> tuple[list, list, list]:
    """``(hyps, refs, alts)`` rows of ids in ``1..vocab``; the hypotheses and alternatives perturb the references."""
    refs = [[rng.randint(1, vocab) for _ in range(rng.randint(0, max_len))] for _ in range(num)]

    def perturb(row: list[int]) -> list[int]:
        return [rng.randint(1, vocab) if rng.random() < 0.3 else token for token in row if rng.random() > 0.1]

    return [perturb(row) for row in refs], refs, [perturb(row) for row in refs]


@pytest.mark.parametrize("word_order", [0, 2])
# The large vocabularies count with one sort per order; the largest ids are ranked by sorting.
@pytest.mark.parametrize("vocab", [5, 50, 100_000, 10**12])
def test_token_ids_match_sacrebleu_on_id_characters(vocab, word_order):
    rng = random.Random(vocab + word_order)
    hyps, refs, alts = random_id_corpus(rng, 60, vocab, 14)
    alts = [row if i % 2 == 0 else [] for i, row in enumerate(alts)]  # odd samples: second row all padding
    width = max(map(len, refs + alts + hyps)) + 2
    preds = pad_rows(hyps, 0, width)
    target = torch.stack([pad_rows(refs, 0, width), pad_rows(alts, 0, width)], dim=1)  # [B, 2, T]
    text_target = [[ids_to_text(r)] + ([ids_to_text(a)] if i % 2 == 0 else []) for i, (r, a) in enumerate(zip(refs, alts, strict=True))]
    text_hyps = [ids_to_text(row) for row in hyps]
    streams = as_streams(text_target)
    for char_order in (1, 3, 6):
        kwargs = {"char_order": char_order, "word_order": word_order}
        rows, num_refs = _chrf_update(preds, target, ignore_index=0, **kwargs)
        assert rows.tolist() == sacre_rows(text_hyps, streams, **kwargs)
        assert num_refs == 2
        want = sacre_score(text_hyps, streams, **kwargs)
        assert chrf_score(preds, target, ignore_index=0, **kwargs).item() == pytest.approx(want, abs=1e-6)
        # One reference, [B, T'].
        want = sacre_score(text_hyps, [[ids_to_text(r) for r in refs]], **kwargs)
        assert chrf_score(preds, target[:, 0], ignore_index=0, **kwargs).item() == pytest.approx(want, abs=1e-6)


def test_token_ids_without_ignore_index_count_every_position():
    preds = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 9, 0, 0]])
    target = torch.tensor([[5, 6, 7, 9, 0], [9, 9, 5, 0, 0]])
    want = sacre_score([ids_to_text(row) for row in preds.tolist()], [[ids_to_text(row) for row in target.tolist()]])
    assert chrf_score(preds, target).item() == pytest.approx(want, abs=1e-6)
    # A sample whose reference rows are all padding keeps one empty reference.
    target_3d = torch.tensor([[[5, 6, 7, 9, 0], [0, 0, 0, 0, 0]], [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]])
    hyps = [ids_to_text(row, 0) for row in preds.tolist()]
    want = sacre_score(hyps, [[ids_to_text([5, 6, 7, 9]), ""], [None, None]], word_order=2)
    assert chrf_score(preds, target_3d, ignore_index=0, word_order=2).item() == pytest.approx(want, abs=1e-6)


def test_wmt17_words_as_token_ids(wmt17):
    """Real data with a large vocabulary: WMT17 words numbered, two references."""
    systems, reference = wmt17
    n = 300
    vocab: dict[str, int] = {}

    def numbered(lines: list[str]) -> list[list[int]]:
        return [[vocab.setdefault(word, len(vocab) + 1) for word in line.split()] for line in lines[:n]]

    refs, alts, hyps = numbered(reference), numbered(systems[-1][1]), numbered(systems[1][1])
    width = max(map(len, refs + alts + hyps))
    preds = pad_rows(hyps, 0, width)
    target = torch.stack([pad_rows(refs, 0, width), pad_rows(alts, 0, width)], dim=1)
    streams = [[ids_to_text(row) for row in refs], [ids_to_text(row) for row in alts]]
    for word_order in (0, 2):
        want = sacre_score([ids_to_text(row) for row in hyps], streams, word_order=word_order)
        got = chrf_score(preds, target, ignore_index=0, word_order=word_order)
        assert got.item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("key_bits", [24, 30, 40])
def test_narrow_keys_take_the_general_paths(monkeypatch, key_bits):
    """With fewer key bits the counting re-ranks n-grams and splits batches; the rows stay sacrebleu's."""
    monkeypatch.setattr(chrf_module, "_KEY_BITS", key_bits)
    rng = random.Random(key_bits)
    hyps, refs, alts = random_id_corpus(rng, 40, 300, 12)
    text_hyps = [ids_to_text(row) for row in hyps]
    target = [[ids_to_text(r), ids_to_text(a)] for r, a in zip(refs, alts, strict=True)]
    for word_order in (0, 2):
        rows, _ = _chrf_update(text_hyps, target, word_order=word_order)
        assert rows.tolist() == sacre_rows(text_hyps, as_streams(target), word_order=word_order)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_token_ids_on_cuda_stay_on_device():
    preds = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 9, 0, 0]], device="cuda")
    target = torch.tensor([[[5, 6, 7, 9, 0], [5, 9, 0, 0, 0]], [[9, 9, 5, 0, 0], [0, 0, 0, 0, 0]]], device="cuda")
    metric = CHRFScore(word_order=2, ignore_index=0, keep_sentence_stats=True).to("cuda")
    metric.update(preds, target)
    result = metric.compute()
    assert result.device.type == "cuda"
    want = chrf_score(preds.cpu(), target.cpu(), word_order=2, ignore_index=0)
    assert result.item() == pytest.approx(want.item(), abs=1e-6)
    assert metric.sentence_stats().device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# The Metric: batching, sentence statistics, signature, state.

_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def test_sacrebleu_published_cases():
    """Scores from sacrebleu's own tests (test/test_chrf.py) reproduce."""
    assert chrf_score(["abcdefg"], [["hijklmnop"]]).item() == 0.0
    assert chrf_score(["a"], [["a"]], char_order=1).item() == pytest.approx(1.0, abs=1e-7)
    assert chrf_score(["source"], [["target"]]).item() == pytest.approx(sacre_score(["source"], [["target"]]), abs=1e-6)
    for kwargs in ({}, {"word_order": 2}, {"eps_smoothing": True}):
        check_against_sacrebleu(_HYPS, per_sample(_REFS), **kwargs)


@pytest.mark.parametrize("word_order", [0, 2])
def test_class_equals_functional_and_batches_accumulate(wmt17, word_order):
    systems, _ = wmt17
    streams = [stream[:200] for stream in wmt17_streams(wmt17, 2)]
    hyps, target = systems[6][1][:200], per_sample(streams)
    want = chrf_score(hyps, target, word_order=word_order)
    assert want.item() == pytest.approx(sacre_score(hyps, streams, word_order=word_order), abs=1e-6)
    metric = CHRFScore(word_order=word_order, keep_sentence_stats=True)
    metric.update(hyps, target)
    assert metric.compute().item() == want.item()
    whole_rows = metric.sentence_stats()
    # Chunks of any size and in any order: the same sums, the rows in update order.
    chunks = [(0, 1), (1, 64), (64, 65), (65, 200)]
    metric.reset()
    for lo, hi in reversed(chunks):
        metric.update(hyps[lo:hi], target[lo:hi])
    assert metric.compute().item() == want.item()
    expected_rows = torch.cat([whole_rows[lo:hi] for lo, hi in reversed(chunks)])
    assert torch.equal(metric.sentence_stats(), expected_rows)
    # forward() scores its batch and accumulates.
    metric.reset()
    batch_value = metric(hyps[:50], target[:50])
    assert batch_value.item() == chrf_score(hyps[:50], target[:50], word_order=word_order).item()
    metric(hyps[50:], target[50:])
    assert metric.compute().item() == want.item()


def test_sentence_stats_and_score_from_stats_are_sacrebleus(wmt17):
    """The rows are ``_extract_corpus_statistics``; bootstrap sums score as ``_compute_score_from_stats``."""
    systems, _ = wmt17
    streams = [stream[:300] for stream in wmt17_streams(wmt17, 2)]
    hyps, target = systems[7][1][:300], per_sample(streams)
    generator = torch.Generator().manual_seed(0)
    for kwargs in ({}, {"word_order": 2}, {"eps_smoothing": True, "word_order": 2, "beta": 1}):
        oracle = CHRF(**kwargs)
        metric = CHRFScore(keep_sentence_stats=True, **kwargs)
        metric.update(hyps[:100], target[:100])
        metric.update(hyps[100:], target[100:])
        rows = metric.sentence_stats()
        assert rows.shape == (300, metric.num_sentence_stats())
        assert rows.dtype == torch.float64
        assert rows.long().tolist() == oracle._extract_corpus_statistics(hyps, streams)
        # compute() is the float64 score in the default dtype.
        assert metric.compute().item() == metric.score_from_stats(rows.sum(0)).float().item()
        # 200 bootstrap resamples at once, [200, S] -> [200].
        index = torch.randint(0, 300, (200, 300), generator=generator)
        sums = rows[index].sum(1)
        got = metric.score_from_stats(sums)
        assert got.shape == (200,)
        want = [oracle._compute_score_from_stats([int(v) for v in row]).score / 100 for row in sums.tolist()]
        assert got.tolist() == pytest.approx(want, abs=1e-6)
        # Batched over more dimensions too.
        assert metric.score_from_stats(sums.view(10, 20, -1)).view(-1).tolist() == got.tolist()


def test_score_from_stats_edge_rows():
    """Zero counts, orders without n-grams on one side: sacrebleu's scoring row by row."""
    metric_eff = CHRFScore(char_order=2, word_order=1)
    metric_eps = CHRFScore(char_order=2, word_order=1, eps_smoothing=True)
    rows = [
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [5, 3, 0, 4, 2, 0, 1, 1, 0],
        [5, 5, 5, 4, 4, 4, 1, 1, 1],
        [0, 5, 0, 0, 4, 0, 0, 1, 0],
        [5, 0, 0, 4, 0, 0, 1, 0, 0],
        [7, 9, 3, 6, 8, 1, 2, 0, 0],
    ]
    for metric, eps in ((metric_eff, False), (metric_eps, True)):
        oracle = CHRF(char_order=2, word_order=1, eps_smoothing=eps)
        got = metric.score_from_stats(torch.tensor(rows, dtype=torch.float64))
        want = [oracle._compute_score_from_stats(row).score / 100 for row in rows]
        assert got.tolist() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"word_order": 2}, {"lowercase": True, "whitespace": True}, {"eps_smoothing": True, "char_order": 4}],
)
@pytest.mark.parametrize("num_refs", [1, 2])
def test_signature_is_sacrebleus_with_llmkits_version(kwargs, num_refs):
    streams = _REFS[:num_refs]
    oracle = CHRF(**kwargs)
    oracle.corpus_score(_HYPS, streams)
    metric = CHRFScore(**kwargs)
    metric.update(_HYPS, per_sample(streams))
    want = oracle.get_signature().format().replace(f"version:{oracle.get_signature().info['version']}", "")
    assert metric.signature() == f"{want}version:llmkit-{__version__}"


def test_state_dict_merge_and_reset():
    target = per_sample(_REFS)
    whole = CHRFScore(word_order=2, keep_sentence_stats=True)
    whole.update(_HYPS, target)
    want = whole.compute().item()

    first, second = CHRFScore(word_order=2, keep_sentence_stats=True), CHRFScore(word_order=2, keep_sentence_stats=True)
    first.update(_HYPS[:1], target[:1])
    second.update(_HYPS[1:], target[1:])
    first.merge_state(second)
    assert first.compute().item() == want
    # torchmetrics puts the incoming rows first.
    whole_rows = whole.sentence_stats()
    assert torch.equal(first.sentence_stats(), torch.cat([whole_rows[1:], whole_rows[:1]]))

    whole.persistent(True)
    restored = CHRFScore(word_order=2, keep_sentence_stats=True)
    restored.persistent(True)
    restored.load_state_dict(whole.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # compute without an update of its own
        assert restored.compute().item() == want
    assert restored.signature() == whole.signature()
    assert torch.equal(restored.sentence_stats(), whole_rows)

    whole.reset()
    assert whole.preds_ngrams.sum().item() == whole.target_ngrams.sum().item() == 0
    assert whole.sentence_stats().shape == (0, whole.num_sentence_stats())
    assert whole.signature().startswith("nrefs:0|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # compute before update
        assert whole.compute().item() == 0.0


def test_metric_collection_keeps_configurations_that_pick_references_differently_apart():
    # With two references, beta picks which one counts: the two must not share one update.
    collection = MetricCollection({"beta1": CHRFScore(beta=1), "beta3": CHRFScore(beta=3)}, compute_groups=True)
    streams = [["abc abd", "xyz"], ["abd", "abc xyzw"]]
    hyps = ["abc xyz", "abd"]
    for _ in range(2):
        collection.update(hyps, per_sample(streams))
    result = collection.compute()
    assert result["beta1"].item() == pytest.approx(sacre_score(hyps * 2, [s * 2 for s in streams], beta=1), abs=1e-6)
    assert result["beta3"].item() == pytest.approx(sacre_score(hyps * 2, [s * 2 for s in streams], beta=3), abs=1e-6)


def test_half_precision_module_keeps_exact_counts():
    metric = CHRFScore().to(torch.float16)
    metric.update(_HYPS, per_sample(_REFS))
    assert metric.preds_ngrams.dtype == torch.long
    assert metric.compute().item() == pytest.approx(sacre_score(_HYPS, _REFS), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error that names what was wrong, and nothing lost.


@pytest.mark.parametrize(
    ("preds", "target", "error", "match"),
    [
        (["a b", "c"], [["a b"]], ValueError, r"same number of samples, got 2 and 1"),
        ("a b c", [["a b c"]], TypeError, r"`preds` must be a sequence .* got a single str"),
        (["a b c"], "a b c", TypeError, r"`target` must be a sequence .* got a single str"),
        (["a b c"], [[]], ValueError, r"`target\[0\]` holds no reference"),
        ([3], [["a"]], TypeError, r"`preds\[0\]` must be a str, got int"),
        (["a"], [["a", 4]], TypeError, r"`target\[0\]\[1\]` must be a str, got int"),
        (["a"], torch.tensor([[1]]), TypeError, r"both be text or both be token-id tensors, got list and Tensor"),
        (torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 2]]), TypeError, r"`preds` token ids must be an integer tensor"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2], [3, 4]]), ValueError, r"same number of samples, got 1 and 2"),
        (torch.tensor([[1, -100]]), torch.tensor([[1, 2]]), ValueError, r"negative token id -100.*`ignore_index`"),
    ],
)
def test_bad_input(preds, target, error, match):
    with pytest.raises(error, match=match):
        chrf_score(preds, target)
    metric = CHRFScore(keep_sentence_stats=True)
    metric.update(_HYPS, per_sample(_REFS))
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    # The failed update left the corpus as it was.
    assert metric.compute().item() == pytest.approx(sacre_score(_HYPS, _REFS), abs=1e-6)
    assert metric.sentence_stats().shape[0] == len(_HYPS)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"char_order": 0}, ValueError, r"`char_order` must be at least 1, got 0"),
        ({"char_order": 2.0}, TypeError, r"`char_order` must be an int, got float 2.0"),
        ({"char_order": True}, TypeError, r"`char_order` must be an int, got bool True"),
        ({"word_order": -1}, ValueError, r"`word_order` must be at least 0, got -1"),
        ({"word_order": "2"}, TypeError, r"`word_order` must be an int, got str '2'"),
        ({"beta": -1}, ValueError, r"`beta` must be a finite non-negative number, got -1"),
        ({"beta": float("nan")}, ValueError, r"`beta` must be a finite non-negative number, got nan"),
        ({"beta": "2"}, TypeError, r"`beta` must be a real number, got str '2'"),
        ({"beta": False}, TypeError, r"`beta` must be a real number, got bool False"),
        ({"lowercase": "yes"}, TypeError, r"`lowercase` must be a bool, got str 'yes'"),
        ({"whitespace": 1}, TypeError, r"`whitespace` must be a bool, got int 1"),
        ({"eps_smoothing": None}, TypeError, r"`eps_smoothing` must be a bool, got NoneType None"),
        ({"ignore_index": "0"}, TypeError, r"`ignore_index` must be an int or None, got str '0'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CHRFScore(**kwargs)
    with pytest.raises(error, match=match):
        chrf_score(["a"], [["a"]], **kwargs)


def test_bad_keep_sentence_stats_and_stats_shape():
    with pytest.raises(TypeError, match=r"`keep_sentence_stats` must be a bool, got 'yes'"):
        CHRFScore(keep_sentence_stats="yes")
    metric = CHRFScore(word_order=2)
    with pytest.raises(ValueError, match=r"`stats` must have 24 statistics in its last dimension, got shape \(5, 18\)"):
        metric.score_from_stats(torch.zeros(5, 18))
    with pytest.raises(RuntimeError, match=r"keeps no per-sentence statistics"):
        metric.sentence_stats()


# ---------------------------------------------------------------------------------------------
# Two processes (gloo on CPU): the sums reduce, the sentence rows gather in rank order.

WORLD_SIZE = 2
DDP_SENTENCES = 120
GROUP_TIMEOUT = 180


def ddp_corpus() -> tuple[list[str], list[list[str]]]:
    """``(hyps, target)``: WMT17 sentences (or synthetic ones), a second reference for even samples only."""
    from tests.metrics.test_distributed import text_corpus

    hyps, refs, alts = text_corpus()
    target = [[ref, alt] if i % 2 == 0 else [ref] for i, (ref, alt) in enumerate(zip(refs, alts, strict=True))]
    return hyps[:DDP_SENTENCES], target[:DDP_SENTENCES]


def ddp_scenarios() -> dict[str, dict[str, Any]]:
    hyps, target = ddp_corpus()
    half = DDP_SENTENCES // 2
    splits = {"even": [(0, half), (half, DDP_SENTENCES)], "uneven": [(0, 1), (1, DDP_SENTENCES)]}
    splits["empty_rank"] = [(0, 0), (0, DDP_SENTENCES)]
    scenarios = {}
    for split, ranges in splits.items():
        batches = [[(hyps[lo:mid], target[lo:mid]) for lo, mid in _chunks(lo, hi)] for lo, hi in ranges]
        scenarios[f"chrf++_{split}"] = {"kwargs": {"word_order": 2}, "batches": batches}
    # Token ids: the characters' code points, padded with 0, [B, 2, T] with missing second rows.
    preds = pad_rows([[ord(c) for c in hyp] for hyp in hyps], 0)
    refs = [[[ord(c) for c in ref] for ref in refs] + [[]] * (2 - len(refs)) for refs in target]
    width = max(len(row) for sample in refs for row in sample)
    ids_target = torch.stack([pad_rows([sample[k] for sample in refs], 0, width) for k in range(2)], dim=1)
    batches = [[(preds[lo:mid], ids_target[lo:mid]) for lo, mid in _chunks(lo, hi)] for lo, hi in splits["even"]]
    scenarios["ids_even"] = {"kwargs": {"ignore_index": 0}, "batches": batches}
    return scenarios


def _chunks(lo: int, hi: int, size: int = 32) -> list[tuple[int, int]]:
    return [(start, min(start + size, hi)) for start in range(lo, hi, size)]


def _ddp_worker(rank: int, port: int, scenarios: dict[str, dict[str, Any]], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for name, scenario in scenarios.items():
            metric = CHRFScore(keep_sentence_stats=True, **scenario["kwargs"])
            for preds, target in scenario["batches"][rank]:
                metric.update(preds, target)
            before = [getattr(metric, key).tolist() for key in ("preds_ngrams", "target_ngrams", "num_refs")]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a rank without updates
                value = metric.compute().item()
                rows = metric.sentence_stats().tolist()
                signature = metric.signature()
            # compute() syncs and then restores this rank's own states, so accumulation can go on.
            after = [getattr(metric, key).tolist() for key in ("preds_ngrams", "target_ngrams", "num_refs")]
            results[name] = {"value": value, "rows": rows, "signature": signature, "local_kept": before == after}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def chrf_group(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict[str, dict[str, Any]]]:
    scenarios = ddp_scenarios()
    out_dir = tmp_path_factory.mktemp("chrf_ddp")
    return spawn_group(_ddp_worker, (_free_port(), scenarios, str(out_dir)), out_dir, WORLD_SIZE, GROUP_TIMEOUT), scenarios


@pytest.mark.slow  # starting the two processes takes most of its 15-35 s
@pytest.mark.parametrize("name", ["chrf++_even", "chrf++_uneven", "chrf++_empty_rank", "ids_even"])
def test_ddp_sums_and_sentence_rows(chrf_group, name):
    results, scenarios = chrf_group
    kwargs = scenarios[name]["kwargs"]
    whole = [batch for rank_batches in scenarios[name]["batches"] for batch in rank_batches]  # in rank order
    if isinstance(whole[0][0], torch.Tensor):
        preds, target = torch.cat([b[0] for b in whole]), torch.cat([b[1] for b in whole])
        hyps = [ids_to_text(row, 0) for row in preds.tolist()]
        refs = [[ids_to_text(row, 0) for row in sample if any(row)] for sample in target.tolist()]
        oracle_kwargs = {key: value for key, value in kwargs.items() if key != "ignore_index"}
    else:
        hyps = preds = [hyp for b in whole for hyp in b[0]]
        refs = target = [sample for b in whole for sample in b[1]]
        oracle_kwargs = kwargs
    want = sacre_score(hyps, as_streams(refs), **oracle_kwargs)
    assert chrf_score(preds, target, **kwargs).item() == pytest.approx(want, abs=1e-6)
    want_rows = sacre_rows(hyps, as_streams(refs), **oracle_kwargs)
    for rank in range(WORLD_SIZE):
        result = results[rank][name]
        assert result["value"] == pytest.approx(want, abs=1e-6), (name, rank)
        assert [[int(v) for v in row] for row in result["rows"]] == want_rows, (name, rank)
        if scenarios[name]["batches"][rank]:
            # The most references this rank saw (signature() is local, so rank 0 alone may log it).
            assert result["signature"].startswith("nrefs:2|"), (name, rank)
        assert result["local_kept"], (name, rank)
    assert 0.05 < want < 1.0
