"""BLEUScore and bleu_score against sacrebleu, the oracle."""

from __future__ import annotations

import pytest
import sacrebleu
import torch
from sacrebleu.metrics.bleu import BLEU

from llmkit.metrics import BLEUScore
from llmkit.metrics.functional import bleu_score
from llmkit.metrics.functional.bleu import _bleu_compute

SMOOTH_METHODS = ("none", "floor", "add-k", "exp")
TOKENIZERS = ("13a", "intl", "char", "none")


def per_sample(streams: list[list[str | None]]) -> list[list[str]]:
    """sacrebleu's reference streams -> llmkit's references per sample (``None`` = missing)."""
    return [[stream[i] for stream in streams if stream[i] is not None] for i in range(len(streams[0]))]  # type: ignore[misc]


def sacrebleu_score(hyps, streams, **kwargs) -> float:
    return sacrebleu.corpus_bleu(hyps, streams, **kwargs).score / 100


# ---------------------------------------------------------------------------------------------
# Parity on real data: all 16 WMT17 en-de systems.


@pytest.mark.slow
@pytest.mark.parametrize("num_refs", [1, 2])
@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("tokenize", TOKENIZERS)
def test_wmt17_parity(wmt17, tokenize, lowercase, num_refs):
    """Every system, tokenizer, casing, smoothing method, with one and two references."""
    systems, reference = wmt17
    # A second reference stream: another system's output (sacrebleu's own tests do the same).
    streams = [reference] if num_refs == 1 else [reference, systems[-1][1]]
    oracle = BLEU(tokenize=tokenize, lowercase=lowercase, references=streams)
    target = per_sample(streams)
    for name, hyps in systems:
        expected = oracle.corpus_score(hyps, None)
        metric = BLEUScore(tokenize=tokenize, lowercase=lowercase)
        metric.update(hyps, target)
        # The sufficient statistics themselves are equal, not only the score.
        assert metric.matches.tolist() == expected.counts, name
        assert metric.totals.tolist() == expected.totals, name
        assert (metric.preds_len.item(), metric.target_len.item()) == (expected.sys_len, expected.ref_len), name
        assert metric.compute().item() == pytest.approx(expected.score / 100, abs=1e-6), name
        for smooth in SMOOTH_METHODS:
            want = BLEU.compute_bleu(
                list(expected.counts), list(expected.totals), expected.sys_len, expected.ref_len, smooth_method=smooth
            )
            got = _bleu_compute(metric.matches, metric.totals, metric.preds_len, metric.target_len, smooth)
            assert got.item() == pytest.approx(want.score / 100, abs=1e-6), (name, smooth)


@pytest.mark.slow
def test_wmt17_public_api_every_smoothing(wmt17):
    """The functional form, with each smoothing method, on two systems."""
    systems, reference = wmt17
    for _, hyps in systems[:2]:
        for smooth in SMOOTH_METHODS:
            want = sacrebleu_score(hyps, [reference], smooth_method=smooth)
            assert bleu_score(hyps, [[r] for r in reference], smooth_method=smooth).item() == pytest.approx(
                want, abs=1e-6
            )


def test_wmt17_different_number_of_references_per_sample(wmt17):
    systems, reference = wmt17
    n = 600
    second: list[str | None] = [line if i % 3 else None for i, line in enumerate(systems[3][1][:n])]
    third: list[str | None] = [line if i % 5 == 0 else None for i, line in enumerate(systems[4][1][:n])]
    streams = [reference[:n], second, third]
    hyps = systems[0][1][:n]
    for tokenize in TOKENIZERS:
        want = sacrebleu_score(hyps, streams, tokenize=tokenize)
        assert bleu_score(hyps, per_sample(streams), tokenize=tokenize).item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("n_gram", [1, 2, 3, 5, 6])
def test_wmt17_n_gram_orders(wmt17, n_gram):
    systems, reference = wmt17
    hyps, refs = systems[5][1][:800], reference[:800]
    for smooth in SMOOTH_METHODS:
        want = BLEU(max_ngram_order=n_gram, smooth_method=smooth).corpus_score(hyps, [refs]).score / 100
        got = bleu_score(hyps, [[r] for r in refs], n_gram=n_gram, smooth_method=smooth)
        assert got.item() == pytest.approx(want, abs=1e-6)


def _ids_corpus(lines: list[str], vocab: dict[str, int]) -> list[list[int]]:
    return [[vocab.setdefault(word, len(vocab) + 1) for word in line] for line in lines]


def _pad(rows: list[list[int]], pad: int, width: int | None = None) -> torch.Tensor:
    width = width or max(len(row) for row in rows)
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows])


@pytest.mark.slow
def test_wmt17_token_ids_parity(wmt17):
    """Token ids score as sacrebleu's tokenize="none" on the space-joined ids."""
    from llmkit.metrics.tokenizers import tokenize_bleu

    systems, reference = wmt17
    vocab: dict[str, int] = {}
    ref_ids = _ids_corpus(tokenize_bleu(reference, "13a"), vocab)
    second_ids = _ids_corpus(tokenize_bleu(systems[-1][1], "13a"), vocab)
    width = max(max(map(len, ref_ids)), max(map(len, second_ids)))
    target_2d = _pad(ref_ids, 0, width)
    target_3d = torch.stack([target_2d, _pad(second_ids, 0, width)], dim=1)  # [B, 2, T]
    ref_text = [" ".join(map(str, row)) for row in ref_ids]
    second_text = [" ".join(map(str, row)) for row in second_ids]
    metric = BLEUScore(ignore_index=0)
    for _, hyps in systems:
        hyp_ids = _ids_corpus(tokenize_bleu(hyps, "13a"), vocab)
        hyp_text = [" ".join(map(str, row)) for row in hyp_ids]
        preds = _pad(hyp_ids, 0)
        want = sacrebleu_score(hyp_text, [ref_text], tokenize="none")
        assert bleu_score(preds, target_2d, ignore_index=0).item() == pytest.approx(want, abs=1e-6)
        want = sacrebleu_score(hyp_text, [ref_text, second_text], tokenize="none")
        assert bleu_score(preds, target_3d, ignore_index=0).item() == pytest.approx(want, abs=1e-6)
        metric.update(preds[:1000], target_3d[:1000])
        metric.update(preds[1000:], target_3d[1000:])
        assert metric.compute().item() == pytest.approx(want, abs=1e-6)
        metric.reset()


def test_token_ids_missing_reference_rows_and_no_padding():
    preds = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 9, 0, 0]])
    target = torch.tensor(
        [
            [[5, 6, 7, 9, 0], [0, 0, 0, 0, 0]],  # second reference missing
            [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],  # no reference at all: one empty reference
        ]
    )
    want = sacrebleu_score(["5 6 7 8", "5 9 9"], [["5 6 7 9", ""], [None, None]], tokenize="none")
    assert bleu_score(preds, target, ignore_index=0).item() == pytest.approx(want, abs=1e-6)
    # Without ignore_index every position is a word, the zeros too.
    want = sacrebleu_score(["5 6 7 8 0", "5 9 9 0 0"], [["5 6 7 9 0", "0 0 0 0 0"]], tokenize="none")
    assert bleu_score(preds, target[:, 0]).item() == pytest.approx(want, abs=1e-6)


def test_token_ids_padding_inside_is_dropped():
    preds = torch.tensor([[3, -100, 4, 5, -100]])
    target = torch.tensor([[3, 4, -100, 5, 6]])
    want = sacrebleu_score(["3 4 5"], [["3 4 5 6"]], tokenize="none", smooth_method="floor")
    got = bleu_score(preds, target, ignore_index=-100, smooth_method="floor")
    assert got.item() == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# sacrebleu's own published test cases (sacrebleu/test/test_bleu.py, Apache-2.0).

_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]


@pytest.mark.parametrize(
    ("hyps", "streams", "kwargs", "expected"),
    [
        (_HYPS, _REFS, {}, 48.530827),
        (["", "", ""], _REFS, {}, 0.0),
        (_HYPS, _REFS, {"tokenize": "none"}, 49.1919566),
        (_HYPS, _REFS, {"tokenize": "13a"}, 48.530827),
        (_HYPS, _REFS, {"tokenize": "intl"}, 43.91623493),
        (_HYPS, _REFS, {"smooth_method": "none"}, 48.530827),
    ],
)
def test_sacrebleu_corpus_cases(hyps, streams, kwargs, expected):
    assert sacrebleu_score(hyps, streams, **kwargs) == pytest.approx(expected / 100, abs=1e-8)
    assert bleu_score(hyps, per_sample(streams), **kwargs).item() == pytest.approx(expected / 100, abs=1e-6)


# raw_corpus_bleu = floor smoothing 0.01, tokenize "none", effective order.
@pytest.mark.parametrize(
    ("hyps", "refs", "expected"),
    [
        # No match at any order scores 0 (sacrebleu #141).
        (["this is a test", "another test"], ["ref1", "ref2"], 0.0),
        (["this is a test"], ["this is a test"], 1.0),
        (["this is a fest"], ["this is a test"], 0.223606797749979),
        (["test"], ["a test"], 0.3678794411714425),
        (["a test"], ["a test"], 1.0),
        (["a little test"], ["a test"], 0.03218297948685433),
    ],
)
def test_sacrebleu_raw_and_effective_order_cases(hyps, refs, expected):
    assert sacrebleu.raw_corpus_bleu(hyps, [refs], 0.01).score / 100 == pytest.approx(expected, abs=1e-8)
    got = bleu_score(
        hyps, [[r] for r in refs], smooth_method="floor", smooth_value=0.01, tokenize="none", effective_order=True
    )
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("order", "expected"), [(1, "77.65"), (2, "60.50"), (3, "53.93"), (4, "48.53"), (5, "46.14"), (6, "43.28")]
)
def test_sacrebleu_max_ngram_order_cases(order, expected):
    assert f"{BLEU(max_ngram_order=order).corpus_score(_HYPS, _REFS).score:.2f}" == expected
    assert f"{100 * bleu_score(_HYPS, per_sample(_REFS), n_gram=order).item():.2f}" == expected


def test_sacrebleu_statistics_and_offset_cases():
    metric = BLEUScore(tokenize="none", smooth_method="floor", smooth_value=0.0, effective_order=True)
    metric.update(["am I am a character sequence"], [["I am a symbol string sequence a a"]])
    assert metric.matches.tolist() == [4, 2, 1, 0]
    assert metric.totals.tolist() == [6, 5, 4, 3]
    assert metric.compute().item() == 0.0
    # smooth_value=None takes sacrebleu's default floor, 0.1.
    hyp, ref = ["am I am a character sequence"], [["I am a symbol string sequence a a"]]
    got = bleu_score(hyp, ref, tokenize="none", smooth_method="floor", effective_order=True)
    assert got.item() == pytest.approx(0.1555722182, abs=1e-6)


@pytest.mark.parametrize(
    ("correct", "total", "sys_len", "ref_len", "kwargs", "expected"),
    [
        ([9, 7, 5, 3], [10, 8, 6, 4], 11, 11, {}, 0.8375922397),
        ([0, 0, 0, 0], [4, 4, 2, 1], 0, 1, {"smooth_method": "floor", "smooth_value": 0.0}, 0.0),
        ([0, 0, 0, 0], [10, 11, 12, 0], 14, 10, {"smooth_method": "floor", "smooth_value": 0.0}, 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 0, 0, {"smooth_method": "floor", "smooth_value": 0.0}, 0.0),
        ([6, 5, 4, 0], [6, 5, 4, 3], 6, 6, {"smooth_method": "floor", "smooth_value": 0.0}, 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 0, 0, {"smooth_method": "floor", "smooth_value": 0.1}, 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 1, 5, {"smooth_method": "floor", "smooth_value": 0.01}, 0.0),
    ],
)
def test_sacrebleu_scoring_cases(correct, total, sys_len, ref_len, kwargs, expected):
    sacre = BLEU.compute_bleu(list(correct), list(total), sys_len, ref_len, **kwargs).score / 100
    assert sacre == pytest.approx(expected, abs=1e-8)
    smooth = kwargs.get("smooth_method", "none")
    got = _bleu_compute(
        torch.tensor(correct), torch.tensor(total), torch.tensor(sys_len), torch.tensor(ref_len),
        smooth, kwargs.get("smooth_value"),
    )
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_empty_corpus_scores_like_zero_statistics():
    want = BLEU.compute_bleu([0] * 4, [0] * 4, 0, 0).score / 100
    assert bleu_score([], []).item() == want == 0.0
    assert bleu_score(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long)).item() == 0.0


def test_batches_accumulate_like_one_corpus():
    metric = BLEUScore()
    metric.update(_HYPS[:1], per_sample(_REFS)[:1])
    metric.update(_HYPS[1:], per_sample(_REFS)[1:])
    assert metric.compute().item() == pytest.approx(sacrebleu_score(_HYPS, _REFS), abs=1e-6)


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
        (["a"], torch.tensor([[1]]), TypeError, r"both be text or both be token-id tensors, got list and Tensor"),
        (torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 2]]), TypeError, r"`preds` token ids must be an integer tensor"),
        (torch.tensor([[1, 2]]), torch.tensor([[1.0, 2.0]]), TypeError, r"`target` token ids must be an integer"),
        (torch.tensor([1, 2]), torch.tensor([[1, 2]]), ValueError, r"`preds` token ids must have shape \[batch, length\]"),
        (torch.tensor([[1, 2]]), torch.ones(1, 1, 1, 2, dtype=torch.long), ValueError, r"`target` token ids must"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2], [3, 4]]), ValueError, r"same number of samples, got 1 and 2"),
        (torch.tensor([[1, -100]]), torch.tensor([[1, 2]]), ValueError, r"negative token id -100.*`ignore_index`"),
    ],
)
def test_bad_input(preds, target, error, match):
    with pytest.raises(error, match=match):
        bleu_score(preds, target)
    metric = BLEUScore()
    metric.update(_HYPS, per_sample(_REFS))
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    # The failed update left the corpus as it was.
    assert metric.compute().item() == pytest.approx(sacrebleu_score(_HYPS, _REFS), abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokenize": "zh"}, r"`tokenize` must be one of \('13a', 'intl', 'char', 'none'\), got 'zh'"),
        ({"smooth_method": "add-one"}, r"`smooth_method` must be one of .*got 'add-one'"),
        ({"n_gram": 0}, r"`n_gram` must be a positive integer, got 0"),
        ({"n_gram": 2.5}, r"`n_gram` must be a positive integer, got 2.5"),
        ({"smooth_value": -1.0}, r"`smooth_value` must be non-negative, got -1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BLEUScore(**kwargs)
    with pytest.raises(ValueError, match=match):
        bleu_score(["a"], [["a"]], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_token_ids_on_cuda_stay_on_device():
    preds = torch.tensor([[5, 6, 7, 8, 0]], device="cuda")
    target = torch.tensor([[5, 6, 7, 9, 0]], device="cuda")
    metric = BLEUScore(ignore_index=0).to("cuda")
    metric.update(preds, target)
    result = metric.compute()
    assert result.device.type == "cuda"
    assert result.item() == pytest.approx(sacrebleu_score(["5 6 7 8"], [["5 6 7 9"]], tokenize="none"), abs=1e-6)
