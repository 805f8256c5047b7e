"""Significance tests and intervals against sacrebleu's own ``PairedTest`` on the WMT17 systems.

The oracle is sacrebleu 2.x: the same seed and number of resamples must give the same p-values
(exactly: they are counts) and the same means and intervals (in llmkit's units, sacrebleu's / 100).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sacrebleu
import torch
import torch.distributed as dist
from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.significance import PairedTest, _bootstrap_resample, estimate_ci

from llmkit.metrics.bleu import BLEUScore
from llmkit.metrics.significance import (
    SignificanceResult,
    confidence_interval,
    paired_approximate_randomization,
    paired_bootstrap,
)
from tests.conftest import _free_port, spawn_group

logging.getLogger("sacrebleu").setLevel(logging.ERROR)


def _chrf_plus_plus() -> Any:
    from llmkit.metrics.chrf import CHRFScore

    return CHRFScore(word_order=2, keep_sentence_stats=True)


def _ter() -> Any:
    from llmkit.metrics.ter import TERScore

    return TERScore(keep_sentence_stats=True)


# (llmkit factory, sacrebleu factory, sentences used): TER is sacrebleu's slowest, so fewer sentences.
METRICS: dict[str, tuple[Callable[[], Any], Callable[[], Any], int]] = {
    "bleu": (lambda: BLEUScore(keep_sentence_stats=True), BLEU, 3004),
    "chrf++": (_chrf_plus_plus, lambda: CHRF(word_order=2), 3004),
    "ter": (_ter, TER, 400),
}


def _ours(factory: Callable[[], Any], systems: list[tuple[str, list[str]]], refs: list[list[str]]) -> dict[str, Any]:
    """One metric per system, updated in a few batches (so the rows are concatenated)."""
    out = {}
    for name, hyps in systems:
        metric = factory()
        for start in range(0, len(hyps), 1000):
            metric.update(hyps[start : start + 1000], refs[start : start + 1000])
        out[name] = metric
    return out


def _per_sample(streams: list[list[str]]) -> list[list[str]]:
    return [list(refs) for refs in zip(*streams, strict=True)]


def _assert_same(ours: dict[str, SignificanceResult], theirs: list[Any], names: list[str], tol: float = 1e-6) -> None:
    for name, result in zip(names, theirs, strict=True):
        got = ours[name]
        assert got.score == pytest.approx(result.score / 100, abs=tol), name
        assert got.p_value == result.p_value, name
        if result.mean is None:
            assert got.mean is None
        else:
            assert got.mean == pytest.approx(result.mean / 100, abs=tol), name
            assert got.ci == pytest.approx(result.ci / 100, abs=tol), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(METRICS))
def test_paired_bootstrap_equals_sacrebleu(wmt17, kind):
    systems, reference = wmt17
    ours_factory, theirs_factory, size = METRICS[kind]
    systems = [(name, hyps[:size]) for name, hyps in systems[:4]]
    streams = [reference[:size]]
    ours = _ours(ours_factory, systems, _per_sample(streams))
    got = paired_bootstrap(ours, systems[0][0], num_resamples=1000)
    _, scores = PairedTest(systems, {"m": theirs_factory()}, streams, test_type="bs", n_samples=1000)()
    (theirs,) = (value for key, value in scores.items() if key != "System")
    _assert_same(got, theirs, [name for name, _ in systems])
    assert list(got) == [name for name, _ in systems]
    assert 0 < min(result.p_value for result in got.values() if result.p_value is not None) < 0.5


@pytest.mark.parametrize("kind", list(METRICS))
def test_paired_approximate_randomization_equals_sacrebleu(wmt17, kind):
    systems, reference = wmt17
    ours_factory, theirs_factory, size = METRICS[kind]
    size = min(size, 600)
    systems = [(name, hyps[:size]) for name, hyps in systems[5:8]]
    # Two references: another system's output as the second stream.
    streams = [reference[:size], wmt17[0][0][1][:size]]
    ours = _ours(ours_factory, systems, _per_sample(streams))
    got = paired_approximate_randomization(ours, systems[0][0], num_trials=500, num_resamples=200)
    _, scores = PairedTest(
        systems, {"m": theirs_factory()}, streams, test_type="ar", n_samples=500, n_ar_confidence=200
    )()
    (theirs,) = (value for key, value in scores.items() if key != "System")
    _assert_same(got, theirs, [name for name, _ in systems])


def test_approximate_randomization_without_intervals(wmt17):
    systems, reference = wmt17
    systems = [(name, hyps[:300]) for name, hyps in systems[:3]]
    ours = _ours(METRICS["bleu"][0], systems, _per_sample([reference[:300]]))
    got = paired_approximate_randomization(ours, systems[1][0], num_trials=300)
    _, scores = PairedTest(
        [systems[1], systems[0], systems[2]], {"BLEU": BLEU()}, [reference[:300]], test_type="ar", n_samples=300
    )()
    theirs = dict(zip(scores["System"], scores["BLEU"], strict=True))
    for name, result in got.items():
        assert result.mean is None and result.ci is None
        assert result.p_value == theirs[name].p_value
        assert result.score == pytest.approx(theirs[name].score / 100, abs=1e-6)


@pytest.mark.parametrize("kind", list(METRICS))
def test_confidence_interval_equals_sacrebleu(wmt17, kind):
    systems, reference = wmt17
    ours_factory, theirs_factory, size = METRICS[kind]
    size = min(size, 800)
    name, hyps = systems[3]
    refs = [reference[:size]]
    ours = _ours(ours_factory, [(name, hyps[:size])], _per_sample(refs))[name]
    got = confidence_interval(ours, num_resamples=500)
    metric = theirs_factory()
    stats = metric._extract_corpus_statistics(hyps[:size], refs)
    score = metric._aggregate_and_compute(stats).score
    _, resampled = _bootstrap_resample(stats, metric, 500)
    mean, ci = estimate_ci(np.array([x.score for x in resampled]))
    assert got.score == pytest.approx(score / 100, abs=1e-6)
    assert got.mean == pytest.approx(mean / 100, abs=1e-6)
    assert got.ci == pytest.approx(ci / 100, abs=1e-6)
    assert got.lower <= got.mean <= got.upper
    assert got.ci == pytest.approx((got.upper - got.lower) / 2, abs=1e-12)


def test_a_wider_level_gives_a_wider_interval(wmt17):
    systems, reference = wmt17
    metric = _ours(METRICS["bleu"][0], systems[:1], _per_sample([reference]))[systems[0][0]]
    narrow = confidence_interval(metric, num_resamples=400, level=0.5)
    wide = confidence_interval(metric, num_resamples=400, level=0.99)
    assert wide.lower < narrow.lower < narrow.upper < wide.upper


def test_bleu_sentence_stats_equal_sacrebleu(wmt17):
    systems, reference = wmt17
    streams = [reference[:500], systems[2][1][:500]]
    for refs in (streams[:1], streams):
        metric = BLEUScore(keep_sentence_stats=True)
        metric.update(systems[0][1][:250], _per_sample(refs)[:250])
        metric.update(systems[0][1][250:500], _per_sample(refs)[250:])
        theirs = BLEU()._extract_corpus_statistics(systems[0][1][:500], refs)
        assert metric.sentence_stats().tolist() == theirs
        assert metric.signature() == f"nrefs:{len(refs)}|case:mixed|eff:no|tok:13a|smooth:exp|version:llmkit-" + (
            metric.signature().rsplit("llmkit-", 1)[1]
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"smooth_method": "floor"},
        {"smooth_method": "add-k", "smooth_value": 2.0},
        {"smooth_method": "none", "effective_order": True},
        {"tokenize": "intl", "lowercase": True, "n_gram": 3},
        {"tokenize": "char", "smooth_method": "floor", "smooth_value": 0.3},
    ],
)
def test_bleu_score_from_stats_and_signature_equal_sacrebleu(wmt17, kwargs):
    systems, reference = wmt17
    hyps, refs = systems[4][1][:300], [reference[:300]]
    ours = BLEUScore(keep_sentence_stats=True, **kwargs)
    ours.update(hyps, _per_sample(refs))
    theirs_kwargs = {("max_ngram_order" if key == "n_gram" else key): value for key, value in kwargs.items()}
    theirs = BLEU(**theirs_kwargs)
    corpus = theirs.corpus_score(hyps, refs)
    stats = ours.sentence_stats()
    assert ours.compute().item() == pytest.approx(corpus.score / 100, abs=1e-6)
    # Bootstrap-like sums, many at once.
    weights = torch.from_numpy(np.random.default_rng(0).integers(0, 3, size=(50, stats.shape[0]))).double()
    sums = weights @ stats
    got = ours.score_from_stats(sums)
    want = [theirs._compute_score_from_stats(row.numpy()).score / 100 for row in sums]
    assert got.shape == (50,)
    assert got.tolist() == pytest.approx(want, abs=1e-9)
    version = f"version:{sacrebleu.__version__}"
    assert ours.signature().rsplit("|", 1)[0] == theirs.get_signature().format().replace(f"|{version}", "")
    assert ours.signature().endswith(f"version:llmkit-{__import__('llmkit').__version__}")


def test_token_ids_sign_as_untokenized():
    metric = BLEUScore(keep_sentence_stats=True, ignore_index=0)
    metric.update(torch.tensor([[3, 4, 5, 0]]), torch.tensor([[3, 4, 6, 0]]))
    assert "|tok:none|" in metric.signature()
    assert metric.sentence_stats().tolist() == [[3, 3, 2, 1, 0, 0, 3, 2, 1, 0]]


def test_sentence_stats_need_the_flag():
    metric = BLEUScore()
    metric.update(["a b"], [["a b"]])
    with pytest.raises(RuntimeError, match="keep_sentence_stats=True"):
        metric.sentence_stats()
    with pytest.raises(TypeError, match="`keep_sentence_stats` must be a bool"):
        BLEUScore(keep_sentence_stats="yes")  # type: ignore[arg-type]


def test_kept_rows_reset_and_checkpoint():
    metric = BLEUScore(keep_sentence_stats=True)
    metric.update(["a b c", "d e"], [["a b c"], ["d f"]])
    assert metric.sentence_stats().shape == (2, 10)
    metric.reset()
    assert metric.sentence_stats().shape == (0, 10)
    # Like every torchmetrics list state, the rows are kept out of state_dict unless persisted.
    assert "sentence_rows" not in metric.state_dict()


def _pair(**kwargs: Any) -> dict[str, BLEUScore]:
    refs = [["the cat sat on the mat"], ["a dog ran off"]]
    systems = {"a": BLEUScore(keep_sentence_stats=True, **kwargs), "b": BLEUScore(keep_sentence_stats=True)}
    systems["a"].update(["the cat sat", "a dog"], refs)
    systems["b"].update(["the cat sat on the mat", "a dog ran"], refs)
    return systems


def test_bad_input():
    systems = _pair()
    with pytest.raises(ValueError, match="`baseline` 'c' is not one of the systems"):
        paired_bootstrap(systems, "c")
    with pytest.raises(TypeError, match="`systems` must be a non-empty mapping"):
        paired_bootstrap([systems["a"]], "a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`systems` must be a non-empty mapping"):
        paired_bootstrap({}, "a")
    with pytest.raises(TypeError, match="system 'x' must be a corpus metric"):
        paired_bootstrap({"a": systems["a"], "x": object()}, "a")  # type: ignore[dict-item]
    plain = BLEUScore()
    plain.update(["a"], [["a"]])
    with pytest.raises(ValueError, match="system 'p' \\(BLEUScore\\) keeps no per-sentence statistics"):
        paired_bootstrap({"a": systems["a"], "p": plain}, "a")
    with pytest.raises(ValueError, match="compare systems under one metric"):
        paired_bootstrap(_pair(lowercase=True), "a")
    short = BLEUScore(keep_sentence_stats=True)
    short.update(["a"], [["a"]])
    with pytest.raises(ValueError, match="the same sentences, got sentence counts \\{'a': 2, 's': 1\\}"):
        paired_approximate_randomization({"a": systems["a"], "s": short}, "a")
    with pytest.raises(ValueError, match="hold no sentence yet"):
        confidence_interval(BLEUScore(keep_sentence_stats=True))
    for call, name in (
        (lambda: paired_bootstrap(systems, "a", num_resamples=0), "num_resamples"),
        (lambda: paired_approximate_randomization(systems, "a", num_trials=-5), "num_trials"),
        (lambda: paired_approximate_randomization(systems, "a", num_resamples=-1), "num_resamples"),
        (lambda: confidence_interval(systems["a"], num_resamples=True), "num_resamples"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=f"`{name}` must be an integer"):
            call()
    with pytest.raises(ValueError, match=r"`level` must be in \(0, 1\), got 1.5"):
        confidence_interval(systems["a"], level=1.5)


def test_a_system_identical_to_the_baseline_gets_sacrebleus_smallest_p_value():
    # sacrebleu (after MultEval) counts only strictly larger differences: identical systems get
    # 1 / (trials + 1), not 1.
    systems = _pair()
    twin = BLEUScore(keep_sentence_stats=True)
    twin.update(["the cat sat", "a dog"], [["the cat sat on the mat"], ["a dog ran off"]])
    hyps = {"a": ["the cat sat", "a dog"], "twin": ["the cat sat", "a dog"]}
    refs = [["the cat sat on the mat", "a dog ran off"]]
    for test, ours in (("bs", paired_bootstrap), ("ar", paired_approximate_randomization)):
        count = {"num_resamples": 99} if test == "bs" else {"num_trials": 99}
        got = ours({"a": systems["a"], "twin": twin}, "a", **count)  # type: ignore[operator]
        _, scores = PairedTest(list(hyps.items()), {"BLEU": BLEU()}, refs, test_type=test, n_samples=99)()
        assert got["twin"].p_value == scores["BLEU"][1].p_value == 1 / 100
        assert got["twin"].score == got["a"].score


# ---------------------------------------------------------------------------------------------
# Two processes (gloo on CPU): the rows are gathered in rank order, so every rank gets the
# single-process result of the corpus ordered rank 0's sentences first.

_SPLIT = 130


def _ddp_worker(rank: int, port: int, corpus: dict[str, Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        refs = corpus["refs"]
        start, stop = (0, _SPLIT) if rank == 0 else (_SPLIT, len(refs))
        systems = {}
        for name, hyps in corpus["systems"].items():
            metric = BLEUScore(keep_sentence_stats=True)
            # Rank 1 updates in two batches, rank 0 in one.
            cut = start if rank == 0 else (start + stop) // 2
            for lo, hi in ((start, cut), (cut, stop)):
                if hi > lo:
                    metric.update(hyps[lo:hi], refs[lo:hi])
            systems[name] = metric
        results = paired_bootstrap(systems, "base", num_resamples=300)
        rows = systems["base"].sentence_stats()
        # A process without any update gathers with the others.
        lonely = BLEUScore(keep_sentence_stats=True)
        if rank == 0:
            lonely.update(corpus["systems"]["other"][:7], refs[:7])
        saved = {"results": results, "rows": rows, "local": len(systems["base"].sentence_rows)}
        torch.save({**saved, "lonely": lonely.sentence_stats(), "lonely_score": lonely.compute()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gathers_rows_in_rank_order(wmt17, tmp_path: Path):
    systems, reference = wmt17
    size = 300
    refs = [[ref] for ref in reference[:size]]
    corpus = {"refs": refs, "systems": {"base": systems[0][1][:size], "other": systems[6][1][:size]}}
    spawn_group(_ddp_worker, (_free_port(), corpus, str(tmp_path)))
    single = {}
    for name, hyps in corpus["systems"].items():
        metric = BLEUScore(keep_sentence_stats=True)
        metric.update(hyps, refs)
        single[name] = metric
    want = paired_bootstrap(single, "base", num_resamples=300)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        assert torch.equal(got["rows"], single["base"].sentence_stats())
        assert got["local"] == (1 if rank == 0 else 2)  # unsynced again after the test
        lonely = BLEUScore(keep_sentence_stats=True)
        lonely.update(corpus["systems"]["other"][:7], refs[:7])
        assert torch.equal(got["lonely"], lonely.sentence_stats())
        assert got["lonely_score"].item() == pytest.approx(lonely.compute().item(), abs=1e-7)
        for name in want:
            assert got["results"][name].p_value == want[name].p_value
            assert got["results"][name].mean == pytest.approx(want[name].mean, abs=1e-12)
            assert got["results"][name].score == pytest.approx(want[name].score, abs=1e-12)
