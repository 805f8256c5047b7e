"""ROUGEScore and rouge_score against Google's rouge-score, the oracle."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from llmkit.metrics import ROUGEScore
from llmkit.metrics.functional import rouge_score

KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def oracle_means(preds, targets, keys, use_stemmer=False, accumulate="best") -> dict[str, float]:
    """The mean over samples of rouge-score's scores; ``targets`` holds references per sample."""
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    per_sample = []
    for pred, refs in zip(preds, targets, strict=True):
        refs = [refs] if isinstance(refs, str) else refs
        if accumulate == "best":
            per_sample.append({key: tuple(score) for key, score in scorer.score_multi(refs, pred).items()})
        else:
            scores = [scorer.score(ref, pred) for ref in refs]
            per_sample.append({key: tuple(np.mean([s[key] for s in scores], axis=0)) for key in keys})
    out = {}
    for key in keys:
        for column, name in enumerate(("precision", "recall", "fmeasure")):
            out[f"{key}_{name}"] = float(np.mean([s[key][column] for s in per_sample])) if per_sample else 0.0
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, abs=tol), key


@pytest.mark.slow
@pytest.mark.parametrize("system", range(16))
def test_wmt17_parity_every_system(wmt17, system):
    """German text: rouge-score's tokenizer splits at every non-ASCII letter; so must ours."""
    systems, reference = wmt17
    hyps = systems[system][1]
    assert_close(rouge_score(hyps, reference, rouge_keys=KEYS), oracle_means(hyps, reference, KEYS))


@pytest.mark.slow
def test_wmt17_parity_with_stemmer(wmt17):
    systems, reference = wmt17
    for _, hyps in systems[:2]:
        got = rouge_score(hyps, reference, rouge_keys=KEYS, use_stemmer=True)
        assert_close(got, oracle_means(hyps, reference, KEYS, use_stemmer=True))


def test_wmt17_higher_orders(wmt17):
    systems, reference = wmt17
    keys = tuple(f"rouge{n}" for n in range(1, 10))
    hyps, refs = systems[7][1][:400], reference[:400]
    assert_close(rouge_score(hyps, refs, rouge_keys=keys), oracle_means(hyps, refs, keys))


@pytest.mark.parametrize("accumulate", ["best", "avg"])
@pytest.mark.parametrize("use_stemmer", [False, True])
def test_wmt17_multi_sentence_multi_reference(wmt17, accumulate, use_stemmer):
    """Documents of 1-4 sentences joined by newlines, two or three references each."""
    systems, reference = wmt17
    preds, targets = [], []
    start, size = 0, 1
    while start < 480:
        preds.append("\n".join(systems[2][1][start : start + size]))
        refs = ["\n".join(reference[start : start + size]), "\n".join(systems[9][1][start : start + size])]
        if size % 2:
            refs.append("\n".join(systems[11][1][start : start + size]))
        targets.append(refs)
        start, size = start + size, size % 4 + 1
    got = rouge_score(preds, targets, rouge_keys=KEYS, use_stemmer=use_stemmer, accumulate=accumulate)
    assert_close(got, oracle_means(preds, targets, KEYS, use_stemmer, accumulate))


def test_wmt17_each_sample(wmt17):
    """Sample by sample, not only on average (the best-reference choice included)."""
    systems, reference = wmt17
    scorer = rouge_scorer.RougeScorer(list(KEYS))
    for i in range(0, 3004, 60):
        pred, refs = systems[0][1][i], [reference[i], systems[1][1][i]]
        want = scorer.score_multi(refs, pred)
        got = rouge_score([pred], [refs], rouge_keys=KEYS)
        for key in KEYS:
            assert got[f"{key}_fmeasure"].item() == pytest.approx(want[key].fmeasure, abs=1e-6)
            assert got[f"{key}_precision"].item() == pytest.approx(want[key].precision, abs=1e-6)
            assert got[f"{key}_recall"].item() == pytest.approx(want[key].recall, abs=1e-6)


@pytest.mark.parametrize(
    ("preds", "targets"),
    [
        (["", "a b"], ["a", ""]),  # empty sides score 0
        (["!!! ...", "x"], ["...", "y"]),  # no tokens at all
        (["a b a b a", "b a"], [["a b", "b a b a"], ["a"]]),  # ties between references
        (["first line\n\nsecond line\n", "one\ntwo\nthree"], [["line first\nsecond", "\n\n"], ["three two one"]]),
        (["Über 28-jährige Köche", "İstanbul KELVIN"], ["über köche", "i̇stanbul kelvin"]),
    ],
)
def test_edge_cases(preds, targets):
    for accumulate in ("best", "avg"):
        got = rouge_score(preds, targets, rouge_keys=KEYS, accumulate=accumulate)
        assert_close(got, oracle_means(preds, targets, KEYS, accumulate=accumulate))


def test_token_ids_equal_text_of_the_ids():
    """Token ids score as rouge-score does on the ids written as words; rougeLsum = rougeL on them."""
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(1, 12, (40, 15), generator=generator)
    target = torch.randint(1, 12, (40, 3, 18), generator=generator)
    preds[::3, 10:] = 0
    target[::2, :, 12:] = 0
    target[1::4, 2] = 0  # a missing third reference
    target[5, :] = 0  # no reference at all: one empty one

    def words(row: torch.Tensor) -> str:
        return " ".join(f"t{token}" for token in row.tolist() if token != 0)

    text_preds = [words(row) for row in preds]
    text_targets = [[words(ref) for ref in refs if words(ref)] or [""] for refs in target]
    for accumulate in ("best", "avg"):
        got = rouge_score(preds, target, rouge_keys=KEYS, accumulate=accumulate, ignore_index=0)
        want = oracle_means(text_preds, text_targets, ("rouge1", "rouge2", "rougeL"), accumulate=accumulate)
        want.update({key.replace("rougeL_", "rougeLsum_"): value for key, value in want.items() if "rougeL_" in key})
        assert_close(got, want)
        metric = ROUGEScore(rouge_keys=KEYS, accumulate=accumulate, ignore_index=0)
        metric.update(preds[:25], target[:25])
        metric.update(preds[25:], target[25:])
        assert_close(metric.compute(), want)


def test_batches_accumulate_like_one_corpus(wmt17):
    systems, reference = wmt17
    hyps, refs = systems[4][1][:300], reference[:300]
    metric = ROUGEScore()
    for start in range(0, 300, 70):
        metric.update(hyps[start : start + 70], refs[start : start + 70])
    assert_close(metric.compute(), oracle_means(hyps, refs, KEYS))


def test_empty_corpus_scores_zero():
    got = rouge_score([], [])
    assert set(got) == {f"{key}_{name}" for key in KEYS for name in ("fmeasure", "precision", "recall")}
    assert all(value.item() == 0.0 for value in got.values())


def test_nothing_is_downloaded(monkeypatch):
    """rougeLsum and the stemmer work with every network connection refused."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    preds, targets = ["The cats were running.\nThey stopped."], ["A cat runs.\nIt stops."]
    got = rouge_score(preds, targets, rouge_keys=KEYS, use_stemmer=True)
    assert_close(got, oracle_means(preds, targets, KEYS, use_stemmer=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rouge_keys": ("rouge1", "rougeX")}, r"`rouge_keys` must be among .*got 'rougeX'"),
        ({"rouge_keys": "rouge0"}, r"got 'rouge0'"),
        ({"rouge_keys": ("rouge10",)}, r"got 'rouge10'"),
        ({"rouge_keys": ()}, r"`rouge_keys` must name at least one"),
        ({"rouge_keys": ("rouge1", "rouge1")}, r"holds a key twice"),
        ({"accumulate": "max"}, r"`accumulate` must be one of \('best', 'avg'\), got 'max'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ROUGEScore(**kwargs)
    with pytest.raises(ValueError, match=match):
        rouge_score(["a"], ["a"], **kwargs)


@pytest.mark.parametrize(
    ("preds", "target", "error", "match"),
    [
        (["a b", "c"], ["a b"], ValueError, r"same number of samples, got 2 and 1"),
        ("a b c", ["a b c"], TypeError, r"`preds` must be a sequence .* got a single str"),
        (["a"], [[]], ValueError, r"`target\[0\]` holds no reference"),
        (["a"], torch.tensor([[1]]), TypeError, r"both be text or both be token-id tensors"),
        (torch.tensor([[1.0]]), torch.tensor([[1]]), TypeError, r"`preds` token ids must be an integer tensor"),
    ],
)
def test_bad_input_loses_nothing(preds, target, error, match):
    metric = ROUGEScore()
    metric.update(["the cat sat"], ["the cat sat down"])
    before = {key: value.clone() for key, value in metric.compute().items()}
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    metric._computed = None  # recompute from the state, not a cached result
    assert_close(metric.compute(), {key: value.item() for key, value in before.items()})
