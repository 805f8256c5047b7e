"""TERScore and ter_score against sacrebleu's TER, the oracle.

sacrebleu's TER is pure Python and takes about 15 s per WMT17 system on one core, too slow to
run on all 16 systems in the suite: the whole-corpus test compares against sacrebleu's corpus
statistics recorded by :func:`sacrebleu_corpus_stats` (sacrebleu 2.6.0), and sacrebleu runs live
on samples of sentences of every system, on the options, on edge cases and on random sentences.
"""

from __future__ import annotations

import json
import random
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein
from sacrebleu.metrics import lib_ter
from sacrebleu.metrics.ter import TER
from torchmetrics import MetricCollection

from llmkit import __version__
from llmkit.metrics.functional._ter_edits import encode_sample, num_edits
from llmkit.metrics.functional._ter_tokenizer import tercom_words
from llmkit.metrics.functional.ter import ter_score
from llmkit.metrics.ter import TERScore
from tests.conftest import WMT17_PATH, load_wmt17, spawn_group

TOL = 1e-6
OPTIONS = (
    {"normalized": True},
    {"no_punct": True},
    {"normalized": True, "no_punct": True, "asian_support": True},
    {"case_sensitive": True},
)


def per_sample(streams: list[list[str]]) -> list[list[str]]:
    """sacrebleu's reference streams -> llmkit's references per sample."""
    return [list(refs) for refs in zip(*streams, strict=True)]


def sacre_rows(hyps: list[str], streams: list[list[str]], **options: bool) -> list[list[float]]:
    return TER(**options)._extract_corpus_statistics(hyps, streams)


def sacre_score(hyps: list[str], streams: list[list[str]], **options: bool) -> float:
    return TER(**options).corpus_score(hyps, streams).score / 100


def sacrebleu_corpus_stats(systems: list[tuple[str, list[str]]], reference: list[str]) -> dict[int, dict[str, Any]]:
    """How ``WMT17_STATS`` below was made: sacrebleu's summed statistics per system (15 s each)."""
    out: dict[int, dict[str, Any]] = {}
    for num_refs, streams in ((1, [reference]), (2, [reference, systems[-1][1]])):
        out[num_refs] = {}
        for name, hyps in systems:
            score = TER().corpus_score(hyps, streams)
            out[num_refs][name] = (score.num_edits, score.ref_length, score.score / 100)
    return out


# sacrebleu 2.6.0's TER().corpus_score(system, streams): (num_edits, ref_length, score / 100), with
# the reference alone and with the last system as a second reference.
WMT17_STATS: dict[int, dict[str, tuple[int, float, float]]] = {
    1: {
        "newstest2017.LIUM-NMT.4900.en-de": (33418, 52833.0, 0.6325213408286487),
        "newstest2017.C-3MA.4959.en-de": (35336, 52833.0, 0.6688244089868075),
        "newstest2017.FBK.4870.en-de": (33614, 52833.0, 0.636231143414154),
        "newstest2017.KIT.4950.en-de": (33865, 52833.0, 0.6409819620313061),
        "newstest2017.LMU-nmt-reranked.4934.en-de": (32662, 52833.0, 0.618212102284557),
        "newstest2017.LMU-nmt-single.4893.en-de": (33093, 52833.0, 0.6263698824598263),
        "newstest2017.online-A.0.en-de": (36438, 52833.0, 0.6896825847481688),
        "newstest2017.online-B.0.en-de": (33387, 52833.0, 0.6319345863380842),
        "newstest2017.online-F.0.en-de": (39933, 52833.0, 0.7558344216682755),
        "newstest2017.online-G.0.en-de": (38753, 52833.0, 0.7334998958983968),
        "newstest2017.PROMT-Rule-based.4735.en-de": (39711, 52833.0, 0.7516325024132644),
        "newstest2017.RWTH-nmt-ensemble.4921.en-de": (33204, 52833.0, 0.6284708420873317),
        "newstest2017.SYSTRAN.4847.en-de": (32277, 52833.0, 0.6109249900630288),
        "newstest2017.TALP-UPC.4834.en-de": (36174, 52833.0, 0.6846857077962638),
        "newstest2017.uedin-nmt.4722.en-de": (32333, 52833.0, 0.6119849336588874),
        "newstest2017.xmu.4910.en-de": (32850, 52833.0, 0.6217704843563682),
    },
    2: {
        "newstest2017.LIUM-NMT.4900.en-de": (18189, 52696.5, 0.34516523867809057),
        "newstest2017.C-3MA.4959.en-de": (22056, 52696.5, 0.41854772138567076),
        "newstest2017.FBK.4870.en-de": (19457, 52696.5, 0.36922755780744454),
        "newstest2017.KIT.4950.en-de": (21114, 52696.5, 0.4006717713700151),
        "newstest2017.LMU-nmt-reranked.4934.en-de": (17553, 52696.5, 0.333096125928667),
        "newstest2017.LMU-nmt-single.4893.en-de": (18710, 52696.5, 0.3550520433045838),
        "newstest2017.online-A.0.en-de": (24740, 52696.5, 0.4694808953156282),
        "newstest2017.online-B.0.en-de": (20293, 52696.5, 0.38509198903152964),
        "newstest2017.online-F.0.en-de": (30819, 52696.5, 0.5848396003529647),
        "newstest2017.online-G.0.en-de": (30277, 52696.5, 0.5745542872866319),
        "newstest2017.PROMT-Rule-based.4735.en-de": (30358, 52696.5, 0.5760913912688699),
        "newstest2017.RWTH-nmt-ensemble.4921.en-de": (15502, 52696.5, 0.2941751349710133),
        "newstest2017.SYSTRAN.4847.en-de": (16446, 52696.5, 0.31208903817141553),
        "newstest2017.TALP-UPC.4834.en-de": (24729, 52696.5, 0.4692721527995218),
        "newstest2017.uedin-nmt.4722.en-de": (15456, 52696.5, 0.2933022117218411),
        "newstest2017.xmu.4910.en-de": (0, 52696.5, 0.0),
    },
}


# ---------------------------------------------------------------------------------------------
# Parity on real data: all 16 WMT17 en-de systems.


@pytest.mark.slow
@pytest.mark.parametrize("num_refs", [1, 2])
def test_wmt17_all_systems_whole_corpus(wmt17, num_refs):
    systems, reference = wmt17
    streams = [reference] if num_refs == 1 else [reference, systems[-1][1]]
    target = per_sample(streams)
    assert len(WMT17_STATS[num_refs]) == len(systems) == 16
    for name, hyps in systems:
        edits, ref_length, score = WMT17_STATS[num_refs][name]
        metric = TERScore()
        metric.update(hyps, target)
        assert metric.num_edits.item() == edits, name
        assert metric.ref_length.item() == pytest.approx(ref_length, rel=1e-12), name
        assert metric.compute().item() == pytest.approx(score, abs=TOL), name
        want_signature = f"nrefs:{num_refs}|case:lc|tok:tercom|norm:no|punct:yes|asian:no|version:llmkit-{__version__}"
        assert metric.signature() == want_signature


@pytest.mark.parametrize("num_refs", [1, 2])
def test_wmt17_every_system_sampled_sentences_live(wmt17, num_refs):
    """sacrebleu itself on 40 random sentences of each system: the sentence rows are equal."""
    systems, reference = wmt17
    rng = random.Random(num_refs)
    for name, hyps in systems:
        index = rng.sample(range(len(hyps)), 40)
        sample_hyps = [hyps[i] for i in index]
        streams = [[reference[i] for i in index]]
        if num_refs == 2:
            streams.append([systems[-1][1][i] for i in index])
        metric = TERScore(keep_sentence_stats=True)
        metric.update(sample_hyps, per_sample(streams))
        assert metric.sentence_stats().tolist() == sacre_rows(sample_hyps, streams), name


@pytest.mark.parametrize(
    ("options", "system"),
    [(options, 3 + 3 * index) for index, options in enumerate(OPTIONS)],
    ids=["+".join(options) for options in OPTIONS],
)
def test_wmt17_options_live(wmt17, options, system):
    """Each option, on 250 sentences of a system (another for each option), with two references."""
    systems, reference = wmt17
    hyps = systems[system][1][:250]
    streams = [reference[:250], systems[-1][1][:250]]
    metric = TERScore(keep_sentence_stats=True, **options)
    metric.update(hyps, per_sample(streams))
    assert metric.sentence_stats().tolist() == sacre_rows(hyps, streams, **options)


# ---------------------------------------------------------------------------------------------
# Sentences: edge cases, the beam, the shift search's limits, random sentences.

EDGE_CASES = [
    # (hypothesis, references, options)
    ("", ["the cat sat"], {}),
    ("the cat sat", [""], {}),
    ("", [""], {}),
    ("   ", ["  "], {}),
    ("the cat sat on the mat", ["the cat sat on the mat"], {}),
    ("The Cat sat", ["the cat sat"], {}),
    ("The Cat sat", ["the cat sat"], {"case_sensitive": True}),
    ("cat", ["dog"], {}),
    ("cat", ["cat"], {}),
    ("cat", ["the cat sat on the mat"], {}),
    ("the cat sat on the mat", ["mat"], {}),
    ("on the mat the cat sat", ["the cat sat on the mat"], {}),
    ("d e f g h i j k l m n o p a b c", ["a b c d e f g h i j k l m n o p"], {}),
    ("a b c d e f g h i j k l m n", ["k l m n a b c d e f g h i j"], {}),
    ("a a a b b b a a a", ["b b b a a a a a a"], {}),
    ("x y the cat", ["the cat x y", "the x y cat"], {}),
    ("the cat", ["a dog", "", "the cat"], {}),
    ("Hello, world! (It's \"fine\"; isn't it?)", ["hello world it's fine isn't it"], {"no_punct": True}),
    ("Hello, world! (It's \"fine\")", ["hello , world ! ( it 's \" fine \" )"], {"normalized": True}),
    ("R&amp;D costs 1,000.50 &quot;euros&quot; -- in 2017-2018.", ["r&d costs 1,000.50 \"euros\""], {"normalized": True}),
    ("a &amp;quot; b", ["a &amp;quot; b"], {"normalized": True}),
    ("line one\n-continued\nline two", ["line one continued line two"], {"normalized": True}),
    ("東京は日本の首都です。", ["東京は日本の首都である。"], {"normalized": True, "asian_support": True}),
    ("東京は日本の首都です。", ["東京は日本の首都である。"], {"normalized": True}),
    ("ソニーの「テレビ」、買った\uff01", ["ソニーのテレビを買った"], {"no_punct": True, "asian_support": True}),
    ("카페에서 커피를 마셨다.", ["커피를 카페에서 마셨다"], {"normalized": True, "no_punct": True, "asian_support": True}),
    ("naïve café Straße ÉTÉ", ["naive cafe strasse été"], {}),
    ("tab\tsep\u00a0nbsp\u2003em", ["tab sep nbsp em"], {}),
]


@pytest.mark.parametrize(("hyp", "refs", "options"), EDGE_CASES)
def test_sentence_edge_cases(hyp, refs, options):
    streams = [[ref] for ref in refs]
    metric = TERScore(keep_sentence_stats=True, **options)
    metric.update([hyp], [refs])
    assert metric.sentence_stats().tolist() == sacre_rows([hyp], streams, **options)
    assert metric.compute().item() == pytest.approx(sacre_score([hyp], streams, **options), abs=TOL)


def sacre_shift_search(words_hyp: list[str], words_ref: list[str]) -> tuple[int, int, int]:
    """sacrebleu's ``translation_edit_rate`` loop, also returning the candidates checked and shifts made."""
    edit_distance = lib_ter.BeamEditDistance(words_ref)
    checked = shifts = 0
    while True:
        delta, shifted, checked = lib_ter._shift(words_hyp, words_ref, edit_distance, checked)
        if checked >= lib_ter._MAX_SHIFT_CANDIDATES or delta <= 0:
            break
        shifts += 1
        words_hyp = shifted
    return shifts + edit_distance(words_hyp)[0], checked, shifts


def our_edits(words_hyp: list[str], words_ref: list[str]) -> int:
    hyp, (ref,) = encode_sample(words_hyp, [words_ref])
    return num_edits(hyp, ref)


def test_beam_distance_above_levenshtein():
    """A block far off the diagonal: sacrebleu's beam misses the optimal path, and so must we."""
    words_ref = [f"x{i}" for i in range(40)] + [f"y{i}" for i in range(40)]
    words_hyp = words_ref[40:]
    beam = lib_ter.BeamEditDistance(words_ref)(words_hyp)[0]
    assert beam > Levenshtein.distance(words_hyp, words_ref)
    want, _, shifts = sacre_shift_search(words_hyp, words_ref)
    assert shifts > 0
    assert our_edits(words_hyp, words_ref) == want == lib_ter.translation_edit_rate(words_hyp, words_ref)[0]


def test_beam_widened_for_very_different_lengths():
    rng = random.Random(0)
    for num_hyp, num_ref in ((1, 120), (2, 150), (120, 1), (3, 3)):
        words_hyp = [rng.choice("abcde") for _ in range(num_hyp)]
        words_ref = [rng.choice("abcdefg") for _ in range(num_ref)]
        want = lib_ter.translation_edit_rate(words_hyp, words_ref)[0]
        assert our_edits(words_hyp, words_ref) == want, (num_hyp, num_ref)


def test_shift_candidate_limit():
    """Two words, 39 each: the search stops at sacrebleu's 1000 candidates, after the first shift."""
    words_hyp = list("aaababaaaaaabaaababaaabbbaabaababbbaaaa")
    words_ref = list("bbaaaaaabbaabbbbbababbaaabaababbaaaaaaa")
    want, checked, _ = sacre_shift_search(words_hyp, words_ref)
    assert checked >= lib_ter._MAX_SHIFT_CANDIDATES
    assert our_edits(words_hyp, words_ref) == want


def test_long_sentences_with_moved_blocks():
    rng = random.Random(1)
    for _ in range(3):
        words_ref = [rng.choice("abcdefghijklmnopqrstuvwxyz0123") for _ in range(rng.randint(36, 48))]
        words_hyp = list(words_ref)
        for _ in range(4):
            start, length = rng.randrange(len(words_hyp)), rng.randint(1, 12)
            block = words_hyp[start : start + length]
            del words_hyp[start : start + length]
            target = rng.randrange(len(words_hyp) + 1)
            words_hyp[target:target] = block
        for _ in range(rng.randint(0, 15)):
            words_hyp[rng.randrange(len(words_hyp))] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        assert our_edits(words_hyp, words_ref) == lib_ter.translation_edit_rate(words_hyp, words_ref)[0]


_WORD = st.sampled_from(["a", "b", "c", "d", "the", "cat"])
_SENTENCE = st.lists(_WORD, max_size=14)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(words_hyp=_SENTENCE, words_ref=_SENTENCE)
def test_random_sentences_edits(words_hyp, words_ref):
    """Few distinct words, so that blocks match in many places and shifts are tried and taken."""
    assert our_edits(words_hyp, words_ref) == lib_ter.translation_edit_rate(words_hyp, words_ref)[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(
        st.tuples(
            st.lists(_WORD, max_size=10).map(" ".join),
            st.lists(st.lists(_WORD, max_size=10).map(" ".join), min_size=2, max_size=2),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_random_corpora_two_references(data):
    hyps = [hyp for hyp, _ in data]
    target = [refs for _, refs in data]
    streams = [list(stream) for stream in zip(*target, strict=True)]
    metric = TERScore(keep_sentence_stats=True)
    metric.update(hyps, target)
    assert metric.sentence_stats().tolist() == sacre_rows(hyps, streams)
    assert metric.compute().item() == pytest.approx(sacre_score(hyps, streams), abs=TOL)


# Pieces that Tercom's rules treat specially: punctuation, digits, entities, possessives, CJK.
_PIECES = [*"aAbBİß .,;:!?\"'()-&/\n\t0123456789", "&amp;", "&quot;", "&lt;", "'s "]
_PIECES += ["東", "京", "は", "ソ", "、", "。", "\uff0e", "\uff01", "\u3008", "\uff61"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=25).map("".join)


@settings(max_examples=150, deadline=None)
@given(line=_TEXT, flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))
def test_random_text_tokenized_as_sacrebleu(line, flags):
    options = dict(zip(("normalized", "no_punct", "asian_support", "case_sensitive"), flags, strict=True))
    oracle = TER(**options)
    (hyp_words,), ((ref_words,),) = tercom_words([line], [[line]], **options)
    assert hyp_words == oracle._preprocess_segment(line).split()
    assert ref_words == oracle._extract_reference_info([oracle._preprocess_segment(line)])["ref_words"][0]


# ---------------------------------------------------------------------------------------------
# The metric: accumulation, sentence statistics, scores from statistics, signature, state.

_HYPS = ["the cat sat on the mat", "on the mat the cat sat", "a dog", "", "completely unrelated words here"]
_STREAMS = [
    ["the cat is on the mat", "the cat sat on the mat", "a dog barks", "nothing", "a b c"],
    ["a cat sat on a mat", "a mat with a cat", "", "", "words unrelated completely here"],
]


def test_class_equals_functional_and_chunks_equal_one_call():
    target = per_sample(_STREAMS)
    want = sacre_score(_HYPS, _STREAMS)
    assert ter_score(_HYPS, target).item() == pytest.approx(want, abs=TOL)
    metric = TERScore(keep_sentence_stats=True)
    for lo, hi in ((0, 2), (2, 3), (3, 3), (3, 5)):
        batch_value = metric(_HYPS[lo:hi], target[lo:hi])
        if hi > lo:
            assert batch_value.item() == pytest.approx(ter_score(_HYPS[lo:hi], target[lo:hi]).item(), abs=TOL)
    assert metric.compute().item() == pytest.approx(want, abs=TOL)
    assert metric.sentence_stats().tolist() == sacre_rows(_HYPS, _STREAMS)
    assert metric.compute().item() == pytest.approx(metric.score_from_stats(metric.sentence_stats().sum(0)).item(), abs=1e-7)


def test_references_per_sample_may_differ():
    target = [["the cat is on the mat"], ["a cat on a mat", "the cat sat on the mat", "mat"], "a dog barks"]
    hyps = _HYPS[:3]
    sacre = [sacre_rows([hyp], [[ref] for ref in ([refs] if isinstance(refs, str) else refs)])[0] for hyp, refs in zip(hyps, target, strict=True)]
    metric = TERScore(keep_sentence_stats=True)
    metric.update(hyps, target)
    assert metric.sentence_stats().tolist() == sacre
    assert metric.signature().startswith("nrefs:3|")


def test_score_from_stats_batched_equals_sacrebleu():
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor(sacre_rows(_HYPS, _STREAMS), dtype=torch.float64)
    counts = torch.multinomial(torch.ones(len(_HYPS)), 1000 * len(_HYPS), replacement=True, generator=generator)
    # Bootstrap resamples as sums of rows, [1000, 2], with some all-zero and zero-length rows.
    stats = rows[counts.reshape(1000, len(_HYPS))].sum(1)
    stats[:3] = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
    oracle = TER()
    want = torch.tensor([oracle._compute_score_from_stats(row.tolist()).score / 100 for row in stats], dtype=torch.float64)
    got = TERScore().score_from_stats(stats)
    assert got.shape == (1000,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert TERScore().score_from_stats(stats.reshape(10, 100, 2)).shape == (10, 100)


@pytest.mark.parametrize("num_refs", [1, 2])
@pytest.mark.parametrize("options", [{}, *OPTIONS], ids=lambda options: "+".join(options) or "default")
def test_signature_equals_sacrebleu(options, num_refs):
    streams = _STREAMS[:num_refs]
    oracle = TER(**options)
    oracle.corpus_score(_HYPS, streams)
    metric = TERScore(**options)
    metric.update(_HYPS, per_sample(streams))
    want = oracle.get_signature().format().replace(f"version:{sacrebleu.__version__}", f"version:llmkit-{__version__}")
    assert metric.signature() == want


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric TERScore was called before")  # a restored state
def test_state_is_float64_sums_and_resets():
    metric = TERScore()
    assert {name: tuple(metric._defaults[name].shape) for name in ("num_edits", "ref_length")} == {
        "num_edits": (),
        "ref_length": (),
    }
    # Lightning's precision="16-true" casts the whole module: the sums stay float64.
    metric = metric.to(torch.bfloat16)
    metric.update(_HYPS, per_sample(_STREAMS))
    assert metric.num_edits.dtype == metric.ref_length.dtype == torch.float64
    state = metric.state_dict()
    assert set(state) == set()  # torchmetrics states are not persistent by default
    metric.persistent(True)
    state = metric.state_dict()
    restored = TERScore()
    restored.persistent(True)
    restored.load_state_dict(state)
    assert restored.compute().item() == pytest.approx(sacre_score(_HYPS, _STREAMS), abs=TOL)
    metric.reset()
    assert metric.num_edits.item() == metric.ref_length.item() == 0.0
    metric.update(_HYPS[:2], per_sample(_STREAMS)[:2])
    assert metric.compute().item() == pytest.approx(sacre_score(_HYPS[:2], [s[:2] for s in _STREAMS]), abs=TOL)


def test_collection_keeps_different_options_apart():
    collection = MetricCollection({"lc": TERScore(), "cased": TERScore(case_sensitive=True)})
    collection.update(["the cat"], [["the cat"]])  # equal statistics on a first batch
    collection.update(["The Cat"], [["the cat"]])
    result = collection.compute()
    assert result["lc"].item() == pytest.approx(sacre_score(["the cat", "The Cat"], [["the cat", "the cat"]]), abs=TOL)
    assert result["cased"].item() == pytest.approx(
        sacre_score(["the cat", "The Cat"], [["the cat", "the cat"]], case_sensitive=True), abs=TOL
    )


def test_empty_corpus_scores_zero():
    assert ter_score([], []).item() == 0.0
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert TERScore().compute().item() == 0.0


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
        (["a"], [None], TypeError, r"`target\[0\]` must be a str or a sequence of str, got NoneType"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), TypeError, r"TER scores text: `preds` .* got a Tensor"),
        (["a"], torch.tensor([[1]]), TypeError, r"TER scores text: `target` .* got a Tensor"),
    ],
)
def test_bad_input(preds, target, error, match):
    with pytest.raises(error, match=match):
        ter_score(preds, target)
    metric = TERScore(keep_sentence_stats=True)
    metric.update(_HYPS, per_sample(_STREAMS))
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    # The failed update left the corpus as it was.
    assert metric.compute().item() == pytest.approx(sacre_score(_HYPS, _STREAMS), abs=TOL)
    assert metric.sentence_stats().shape == (len(_HYPS), 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalized": 1}, r"`normalized` must be a bool, got 1"),
        ({"no_punct": "yes"}, r"`no_punct` must be a bool, got 'yes'"),
        ({"asian_support": None}, r"`asian_support` must be a bool, got None"),
        ({"case_sensitive": 0.0}, r"`case_sensitive` must be a bool, got 0.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(TypeError, match=match):
        TERScore(**kwargs)
    with pytest.raises(TypeError, match=match):
        ter_score(["a"], [["a"]], **kwargs)


def test_sentence_stats_needs_the_flag():
    metric = TERScore()
    metric.update(_HYPS, per_sample(_STREAMS))
    with pytest.raises(RuntimeError, match=r"keep_sentence_stats=True"):
        metric.sentence_stats()


# ---------------------------------------------------------------------------------------------
# A real 2-process gloo group on CPU (the harness of test_distributed.py): each rank updates with
# its share; compute(), sentence_stats() and signature() sync across ranks.

WORLD_SIZE = 2
NUM_DDP_SENTENCES = 120
GROUP_TIMEOUT = 180


def ddp_corpus() -> tuple[list[str], list[list[str]], list[list[str | None]]]:
    """``(hyps, target, streams)``: a second reference for even samples only."""
    if WMT17_PATH.exists():
        systems, reference = load_wmt17()
        hyps, refs, alts = (lines[:NUM_DDP_SENTENCES] for lines in (systems[0][1], reference, systems[-1][1]))
    else:
        rng = random.Random(0)
        words = ["der", "die", "das", "Haus", "Stadt", "ist", "war", "in", "auf", "mit", "und", "nicht", "."]
        refs = [" ".join(rng.choices(words, k=rng.randint(3, 20))) for _ in range(NUM_DDP_SENTENCES)]
        hyps = [" ".join(rng.sample(ref.split(), k=len(ref.split()))) for ref in refs]
        alts = [" ".join(rng.choices(words, k=rng.randint(3, 20))) for _ in range(NUM_DDP_SENTENCES)]
    target = [[ref, alt] if index % 2 == 0 else [ref] for index, (ref, alt) in enumerate(zip(refs, alts, strict=True))]
    streams: list[list[str | None]] = [list(refs), [alt if index % 2 == 0 else None for index, alt in enumerate(alts)]]
    return hyps, target, streams


def _split(num: int, split: str) -> list[list[tuple[int, int]]]:
    def chunks(start: int, stop: int) -> list[tuple[int, int]]:
        return [(lo, min(lo + 16, stop)) for lo in range(start, stop, 16)]

    if split == "even":
        return [chunks(0, num // 2), chunks(num // 2, num)]
    if split == "uneven":
        return [[(0, 1)], chunks(1, num)]
    return [[], chunks(0, num)]  # empty_rank


def _ddp_worker(rank: int, port: int, splits: dict[str, list[list[tuple[int, int]]]], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    try:
        hyps, target, _ = ddp_corpus()
        results = {}
        for name, ranges in splits.items():
            metric = TERScore(keep_sentence_stats=True)
            for lo, hi in ranges[rank]:
                metric.update(hyps[lo:hi], target[lo:hi])
            local = (metric.num_edits.item(), metric.ref_length.item())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # compute before update on an empty rank
                value = metric.compute().item()
            results[name] = {
                "value": value,
                "rows": metric.sentence_stats().tolist(),
                "signature": metric.signature(),
                "local_kept": (metric.num_edits.item(), metric.ref_length.item()) == local,
            }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes(tmp_path, ddp_spawn):
    import os

    port = int(os.environ["MASTER_PORT"])
    splits = {split: _split(NUM_DDP_SENTENCES, split) for split in ("even", "uneven", "empty_rank")}
    results = spawn_group(_ddp_worker, (port, splits, str(tmp_path)), tmp_path, WORLD_SIZE, GROUP_TIMEOUT)

    hyps, _, streams = ddp_corpus()
    oracle = TER()
    want_rows = oracle._extract_corpus_statistics(hyps, streams)
    want = oracle._aggregate_and_compute(want_rows).score / 100
    for split in splits:
        for rank in range(WORLD_SIZE):
            result = results[rank][split]
            assert result["value"] == pytest.approx(want, abs=TOL), (split, rank)
            # Rows in rank order: rank 0's share, then rank 1's, which is the corpus order here
            # (a rank without updates sends none).
            assert result["rows"] == want_rows, (split, rank)
            if splits[split][rank]:
                # The local number of references (a rank without updates has seen none).
                assert result["signature"].startswith("nrefs:2|"), (split, rank)
            assert result["local_kept"], (split, rank)
        assert results[0][split]["value"] == results[1][split]["value"]
