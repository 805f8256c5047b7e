"""QAScore and qa_score against torchmetrics' SQuAD (v1.1) and the official SQuAD v2.0 script.

The v1.1 oracle is torchmetrics' functional ``squad`` (a port of the official v1.1 script) run
with float64 as the default dtype, so that its per-question F1 is not rounded to float32. The
v2.0 oracle is the official evaluation script's functions, transcribed below. Token ids are
checked against a ``collections.Counter`` computation and against the text path on the
space-joined ids.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
import string
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics import MetricCollection
from torchmetrics.functional.text.squad import squad as tm_squad

from llmkit.metrics.functional import qa as qa_functional
from llmkit.metrics.functional.qa import normalize_answers, qa_score
from llmkit.metrics.qa import QAScore
from tests.conftest import _free_port, spawn_group

TOL = 1e-9
# Seconds the 2-process group may take before its test fails instead of hanging CI.
GROUP_TIMEOUT = 180
V2_KEYS = (
    "exact_match", "f1", "total",
    "HasAns_exact_match", "HasAns_f1", "HasAns_total",
    "NoAns_exact_match", "NoAns_f1", "NoAns_total",
)

# ---------------------------------------------------------------------------------------------
# The oracles.


@contextmanager
def float64_default() -> Iterator[None]:
    """torchmetrics' ``squad`` computes in the default dtype: float64 here, restored after."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def torchmetrics_v1(preds: list[str], golds: list[list[str]]) -> dict[str, float]:
    """torchmetrics' SQuAD (v1.1) on plain strings, as fractions."""
    tm_preds = [{"prediction_text": pred, "id": str(index)} for index, pred in enumerate(preds)]
    tm_target = [
        {"answers": {"answer_start": [0] * len(sample), "text": sample}, "id": str(index)}
        for index, sample in enumerate(golds)
    ]
    with float64_default():
        scores = tm_squad(tm_preds, tm_target)
    return {key: value.item() / 100 for key, value in scores.items()}


# The official SQuAD 2.0 evaluation script ("Official evaluation script for SQuAD version 2.0",
# evaluate-v2.0.py, https://rajpurkar.github.io/SQuAD-explorer/; also Hugging Face evaluate's
# metrics/squad_v2/compute_score.py): its functions verbatim, but for the `print` of a missing
# prediction (every question has one here). `apply_no_ans_threshold` is left out: without a
# no-answer probability file it returns the scores unchanged.
# fmt: off
def make_qid_to_has_ans(dataset):
  qid_to_has_ans = {}
  for article in dataset:
    for p in article['paragraphs']:
      for qa in p['qas']:
        qid_to_has_ans[qa['id']] = bool(qa['answers'])
  return qid_to_has_ans

def normalize_answer(s):
  """Lower text and remove punctuation, articles and extra whitespace."""
  def remove_articles(text):
    regex = re.compile(r'\b(a|an|the)\b', re.UNICODE)
    return re.sub(regex, ' ', text)
  def white_space_fix(text):
    return ' '.join(text.split())
  def remove_punc(text):
    exclude = set(string.punctuation)
    return ''.join(ch for ch in text if ch not in exclude)
  def lower(text):
    return text.lower()
  return white_space_fix(remove_articles(remove_punc(lower(s))))

def get_tokens(s):
  if not s: return []  # noqa: E701
  return normalize_answer(s).split()

def compute_exact(a_gold, a_pred):
  return int(normalize_answer(a_gold) == normalize_answer(a_pred))

def compute_f1(a_gold, a_pred):
  gold_toks = get_tokens(a_gold)
  pred_toks = get_tokens(a_pred)
  common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
  num_same = sum(common.values())
  if len(gold_toks) == 0 or len(pred_toks) == 0:
    # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
    return int(gold_toks == pred_toks)
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(pred_toks)
  recall = 1.0 * num_same / len(gold_toks)
  f1 = (2 * precision * recall) / (precision + recall)
  return f1

def get_raw_scores(dataset, preds):
  exact_scores = {}
  f1_scores = {}
  for article in dataset:
    for p in article['paragraphs']:
      for qa in p['qas']:
        qid = qa['id']
        gold_answers = [a['text'] for a in qa['answers']
                        if normalize_answer(a['text'])]
        if not gold_answers:
          # For unanswerable questions, only correct answer is empty string
          gold_answers = ['']
        a_pred = preds[qid]
        # Take max over all gold answers
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
  return exact_scores, f1_scores

def make_eval_dict(exact_scores, f1_scores, qid_list=None):
  if not qid_list:
    total = len(exact_scores)
    return collections.OrderedDict([
        ('exact', 100.0 * sum(exact_scores.values()) / total),
        ('f1', 100.0 * sum(f1_scores.values()) / total),
        ('total', total),
    ])
  else:
    total = len(qid_list)
    return collections.OrderedDict([
        ('exact', 100.0 * sum(exact_scores[k] for k in qid_list) / total),
        ('f1', 100.0 * sum(f1_scores[k] for k in qid_list) / total),
        ('total', total),
    ])

def merge_eval(main_eval, new_eval, prefix):
  for k in new_eval:
    main_eval['%s_%s' % (prefix, k)] = new_eval[k]  # noqa: UP031
# fmt: on


def official_v2(preds: list[str], golds: list[list[str]]) -> dict[str, float]:
    """The official v2.0 script's output (its ``main`` without the no-answer probabilities) as llmkit's keys.

    An empty string in ``golds`` stands for "no answer": it is not in the question's ``answers``.
    Percentages become fractions; a group without questions scores 0 (the script leaves its keys out).
    """
    qas = [
        {"id": str(index), "answers": [{"text": text} for text in sample if text]}
        for index, sample in enumerate(golds)
    ]
    dataset = [{"paragraphs": [{"qas": qas}]}]
    pred_dict = {str(index): pred for index, pred in enumerate(preds)}
    qid_to_has_ans = make_qid_to_has_ans(dataset)
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = get_raw_scores(dataset, pred_dict)
    out_eval = make_eval_dict(exact_raw, f1_raw)
    if has_ans_qids:
        merge_eval(out_eval, make_eval_dict(exact_raw, f1_raw, qid_list=has_ans_qids), "HasAns")
    if no_ans_qids:
        merge_eval(out_eval, make_eval_dict(exact_raw, f1_raw, qid_list=no_ans_qids), "NoAns")
    out = {}
    for key in V2_KEYS:
        official = key.replace("exact_match", "exact")
        value = out_eval.get(official, 0.0)
        out[key] = value if key.endswith("total") else value / 100
    return out


def counter_oracle(preds: torch.Tensor, target: torch.Tensor, ignore_index: int | None) -> dict[str, float]:
    """Token-id EM (equal sequences) and F1 (multiset overlap) by hand, SQuAD v1.1."""
    rows = target if target.ndim == 3 else target.unsqueeze(1)
    exact_sum = f1_sum = 0.0
    for pred_row, gold_rows in zip(preds.tolist(), rows.tolist(), strict=True):
        pred = [t for t in pred_row if t != ignore_index]
        best_exact = best_f1 = 0.0
        for gold_row in gold_rows:
            gold = [t for t in gold_row if t != ignore_index]
            if not gold:  # an all-padding row is no gold answer
                continue
            best_exact = max(best_exact, float(pred == gold))
            common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
            if common:
                precision, recall = common / len(pred), common / len(gold)
                best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
        exact_sum += best_exact
        f1_sum += best_f1
    return {"exact_match": exact_sum / len(preds), "f1": f1_sum / len(preds)}


def as_floats(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in scores.items()}


def assert_close(got: dict[str, torch.Tensor], want: dict[str, float], tol: float = TOL) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == torch.float64, key
        assert math.isclose(got[key].item(), value, abs_tol=tol), (key, got[key].item(), value)


def joined_ids(ids: torch.Tensor, ignore_index: int | None) -> list[str]:
    return [" ".join(str(t) for t in row if t != ignore_index) for row in ids.tolist()]


# ---------------------------------------------------------------------------------------------
# Hand cases.

HAND_PREDS = [
    "The Eiffel Tower!",  # exact after normalisation
    "in 1889",  # partial overlap, best of two golds
    "Denver Broncos",
    "the the",  # normalises to nothing
    "Paris, France.",
    "ΑΣ",  # Greek final sigma: "ας"
    "an apple a day",
    "",  # empty prediction
]
HAND_GOLDS = [
    ["Eiffel Tower", "the tower"],
    ["1889", "March 1889"],
    ["Denver Broncos", "The Denver Broncos", "Broncos"],
    ["a", "an answer"],  # a gold that normalises to nothing: F1 1 against an empty prediction
    ["Paris"],
    ["ας"],
    ["apple day", "an apple"],
    ["something"],
]


def test_hand_cases_v1_equal_torchmetrics():
    got = qa_score(HAND_PREDS, HAND_GOLDS)
    assert_close(got, torchmetrics_v1(HAND_PREDS, HAND_GOLDS))
    # By hand: EM on 0, 2, 3, 5, 6 (five of eight); F1 1, 2/3, 1, 1, 2/3, 1, 1, 0.
    assert got["exact_match"].item() == pytest.approx(5 / 8, abs=TOL)
    assert got["f1"].item() == pytest.approx((5 + 4 / 3) / 8, abs=TOL)


def test_hand_cases_v2_equal_official_script():
    preds = [*HAND_PREDS, "", "no idea", "the"]
    golds = [*HAND_GOLDS, [], [""], ["The!", ""]]
    got = qa_score(preds, golds, squad_version="v2.0")
    want = official_v2(preds, golds)
    assert_close(got, want)
    # The gold "the" counts as an answer (HasAns), yet it is scored against the empty answer.
    assert want["HasAns_total"] == 9 and want["NoAns_total"] == 2
    assert want["NoAns_exact_match"] == 0.5
    # By hand: v2.0 drops the gold "a" of question 3, so "the the" no longer matches "an answer";
    # "the" matches "The!" (dropped: the empty answer), and "" matches no gold at all.
    assert got["exact_match"].item() == pytest.approx(6 / 11, abs=TOL)


def test_v1_and_v2_agree_when_every_gold_has_words():
    preds, golds = HAND_PREDS[:3] + HAND_PREDS[4:], HAND_GOLDS[:3] + HAND_GOLDS[4:]
    v1, v2 = qa_score(preds, golds), qa_score(preds, golds, squad_version="v2.0")
    for key in ("exact_match", "f1"):
        assert v1[key].item() == v2[key].item() == v2[f"HasAns_{key}"].item()
    assert v2["NoAns_total"].item() == 0 and v2["NoAns_f1"].item() == 0.0


def test_v1_keys_and_range():
    scores = qa_score(["a b"], ["b c"])
    assert list(scores) == ["exact_match", "f1"]
    # "a" is an article: "b" against "b c", precision 1 and recall 1/2.
    assert scores["f1"].item() == pytest.approx(2 / 3, abs=TOL)
    assert list(qa_score(["a"], [["a"]], squad_version="v2.0")) == list(V2_KEYS)


# ---------------------------------------------------------------------------------------------
# Property-based parity.

_WORDS = [
    "cat", "Cat", "CAT", "the", "The", "THE", "a", "A", "an", "An", "theatre", "anna", "and", "dog's",
    "e.g.", "U.S.", "1,000", "3.14", "x-y", "naïve", "Über", "straße", "\u2019s", "—", "«", "»", "ΑΣ", "ς",
    "İstanbul", "_", "(", ")", "!", "?", "...", "a\u2019", "the\u2019", "l'a", "日本", "٣", "½",
]
_SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u2003", "", ",", ". ", "-", "\x00", "\ue000"]


@st.composite
def answer_text(draw: st.DrawFn, min_words: int = 0) -> str:
    if draw(st.integers(0, 9)) == 0:  # now and then any text at all
        return draw(st.text(st.characters(codec="utf-8"), max_size=12))
    words = draw(st.lists(st.sampled_from(_WORDS), min_size=min_words, max_size=6))
    out = draw(st.sampled_from(["", " ", "The "]))
    for word in words:
        out += word + draw(st.sampled_from(_SEPARATORS))
    return out


@st.composite
def v1_batch(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    num = draw(st.integers(1, 6))
    preds, golds = [], []
    for _ in range(num):
        sample = draw(st.lists(answer_text(min_words=1).filter(bool), min_size=1, max_size=3))
        roll = draw(st.integers(0, 3))
        # Often a prediction derived from a gold answer, so that matches are common.
        pred = draw(answer_text()) if roll == 0 else draw(st.sampled_from(sample))
        if roll == 2:
            pred = pred.upper() + "."
        elif roll == 3:
            pred = "the " + pred + draw(answer_text())
        preds.append(pred)
        golds.append(sample)
    return preds, golds


@st.composite
def v2_batch(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    preds, golds = draw(v1_batch())
    for index in range(len(golds)):
        roll = draw(st.integers(0, 4))
        if roll == 0:
            golds[index] = []
        elif roll == 1:
            golds[index] = [""]
        elif roll == 2:
            golds[index] = [*golds[index], ""]
        if draw(st.booleans()) and roll < 2:
            preds[index] = draw(st.sampled_from(["", " ", "the", preds[index]]))
    return preds, golds


@settings(max_examples=150, deadline=None)
@given(batch=v1_batch())
def test_v1_equals_torchmetrics_property(batch):
    preds, golds = batch
    assert_close(qa_score(preds, golds), torchmetrics_v1(preds, golds))


@settings(max_examples=150, deadline=None)
@given(batch=v2_batch())
def test_v2_equals_official_script_property(batch):
    preds, golds = batch
    assert_close(qa_score(preds, golds, squad_version="v2.0"), official_v2(preds, golds))


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(answer_text(), max_size=8))
def test_normalisation_in_one_pass_equals_per_string(texts):
    assert normalize_answers(texts) == [normalize_answer(text).split() for text in texts]


def test_wmt17_spans_equal_torchmetrics(wmt17):
    """Realistic answers: German reference spans as gold, system output spans as predictions."""
    preds, golds = qa_pairs(wmt17, 400)
    assert_close(qa_score(preds, golds), torchmetrics_v1(preds, golds))
    scores = qa_score(preds, golds)
    assert 0.1 < scores["exact_match"].item() < scores["f1"].item() < 0.9


def qa_pairs(wmt17: Any, num: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Questions whose golds are 1-3 spans of a WMT17 reference; the prediction a gold or a system's span."""
    systems, reference = wmt17
    return spans_as_questions([hyps for _, hyps in systems], reference, num, seed)


def synthetic_pairs(num: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """As :func:`qa_pairs` on sentences of random words (so that nothing needs ../shared/data)."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choices(_WORDS, k=rng.randint(3, 15))) for _ in range(2 * num)]
    return spans_as_questions([sentences[num:]], sentences[:num], num, seed)


def spans_as_questions(
    systems: list[list[str]], reference: list[str], num: int, seed: int
) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    preds, golds = [], []
    for index in range(num):
        words = reference[index].split()
        hyp_words = systems[index % len(systems)][index].split() or ["leer"]
        start, length = rng.randrange(len(words)), rng.randint(1, 6)
        sample = [" ".join(words[start : start + length])]
        for _ in range(rng.randint(0, 2)):
            lo = min(max(0, start + rng.randint(-1, 1)), len(words) - 1)
            sample.append(" ".join(words[lo : max(start + length + rng.randint(-1, 1), lo + 1)]))
        if rng.random() < 0.3:
            pred = rng.choice(sample)
            pred = "The " + pred.upper() + "." if rng.random() < 0.5 else pred
        else:
            at = int(start / len(words) * len(hyp_words))
            pred = " ".join(hyp_words[at : at + rng.randint(1, 8)])
        preds.append(pred)
        golds.append(sample)
    return preds, golds


# ---------------------------------------------------------------------------------------------
# Token ids.


@st.composite
def id_batch(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` predictions and ``[B, R, T']`` golds over a small vocabulary, padding 0."""
    batch, refs = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    width, gold_width = draw(st.integers(0, 6)), draw(st.integers(1, 6))
    ids = st.integers(0, 5)
    preds = torch.tensor(
        draw(st.lists(st.lists(ids, min_size=width, max_size=width), min_size=batch, max_size=batch)), dtype=torch.long
    )
    target = torch.tensor(
        draw(
            st.lists(
                st.lists(st.lists(ids, min_size=gold_width, max_size=gold_width), min_size=refs, max_size=refs),
                min_size=batch,
                max_size=batch,
            )
        )
    )
    return preds.reshape(batch, width), target


@settings(max_examples=150, deadline=None)
@given(batch=id_batch())
def test_token_ids_v2_equal_official_script_on_joined_ids(batch):
    preds, target = batch
    golds = [[" ".join(str(t) for t in row if t != 0) for row in sample] for sample in target.tolist()]
    got = qa_score(preds, target, squad_version="v2.0", ignore_index=0)
    assert_close(got, official_v2(joined_ids(preds, 0), golds))


@settings(max_examples=150, deadline=None)
@given(batch=id_batch())
def test_token_ids_v1_equal_counter_and_torchmetrics(batch):
    preds, target = batch
    target[:, 0, 0] = 1  # every question has a gold answer
    want = counter_oracle(preds, target, 0)
    assert_close(qa_score(preds, target, ignore_index=0), want)
    # An all-padding row is no gold answer: the text path sees only the others.
    golds = [[" ".join(str(t) for t in row if t) for row in sample if any(row)] for sample in target.tolist()]
    assert_close(qa_score(preds, target, ignore_index=0), torchmetrics_v1(joined_ids(preds, 0), golds))


def test_token_ids_exact_match_is_the_sequence_and_f1_the_multiset():
    preds = torch.tensor([[3, 4, 5, 0], [5, 4, 3, 0], [3, 3, 4, 0]])
    target = torch.tensor([[3, 4, 5], [3, 4, 5], [3, 4, 4]])
    scores = qa_score(preds, target, ignore_index=0)
    assert scores["exact_match"].item() == pytest.approx(1 / 3, abs=TOL)
    assert scores["f1"].item() == pytest.approx((1 + 1 + 2 / 3) / 3, abs=TOL)


def test_token_ids_without_ignore_index_and_2d_target_and_int32():
    preds = torch.tensor([[7, 8], [9, 9]], dtype=torch.int32)
    target = torch.tensor([[7, 8], [9, 1]], dtype=torch.int32)
    assert_close(qa_score(preds, target), counter_oracle(preds, target, None))


def test_token_ids_large_ids():
    big = 2**61  # ids this large are numbered densely before they are packed with a question index
    preds = torch.tensor([[big, big + 1, 5], [big + 2, 1, 1]])
    target = torch.tensor([[[big + 1, big, 5], [5, 0, 0]], [[1, big + 2, 3], [0, 0, 0]]])
    assert_close(qa_score(preds, target, ignore_index=0), counter_oracle(preds, target, 0))


def test_scoring_in_runs_equals_one_run(monkeypatch):
    """Long batches are normalised and scored in runs of questions; tiny runs give the same sums."""
    preds, golds = synthetic_pairs(60, seed=3)
    golds = [sample if index % 4 else [] for index, sample in enumerate(golds)]
    ids_preds = torch.randint(0, 6, (30, 5), generator=torch.Generator().manual_seed(0))
    ids_target = torch.randint(0, 6, (30, 2, 4), generator=torch.Generator().manual_seed(1))
    ids_preds[3] = 0
    whole_text = qa_score(preds, golds, squad_version="v2.0")
    whole_ids = qa_score(ids_preds, ids_target, squad_version="v2.0", ignore_index=0)
    monkeypatch.setattr(qa_functional, "_CHUNK_TOKENS", 7)
    assert len(list(qa_functional._text_chunks(preds, golds))) > 5
    assert_close(qa_score(preds, golds, squad_version="v2.0"), as_floats(whole_text), tol=1e-12)
    assert_close(qa_score(ids_preds, ids_target, squad_version="v2.0", ignore_index=0), as_floats(whole_ids), tol=1e-12)
    assert_close(qa_score(preds, golds, squad_version="v2.0"), official_v2(preds, golds))


# ---------------------------------------------------------------------------------------------
# The Metric class.


def test_class_equals_functional_and_chunked_updates():
    preds, golds = synthetic_pairs(300, seed=1)
    golds = [sample if index % 7 else [] for index, sample in enumerate(golds)]  # some without answer
    for version in ("v1.1", "v2.0"):
        sample_golds = [sample or ["x"] for sample in golds] if version == "v1.1" else golds
        metric = QAScore(squad_version=version)
        for lo in range(0, len(preds), 37):
            metric.update(preds[lo : lo + 37], sample_golds[lo : lo + 37])
        want = qa_score(preds, sample_golds, squad_version=version)
        assert as_floats(metric.compute()) == pytest.approx(as_floats(want), abs=1e-12)


def test_forward_returns_the_batch_score_and_accumulates():
    metric = QAScore()
    batch_scores = metric(["a cat"], ["the cat"])
    assert batch_scores["exact_match"].item() == 1.0
    metric(["dog"], ["cat"])
    assert metric.compute()["exact_match"].item() == 0.5


def test_state_is_constant_size_float64_and_resets():
    metric = QAScore(squad_version="v2.0")
    metric.update(["cat"] * 50, [["the cat", "a dog"]] * 50)
    assert metric.sums.shape == (2, 3) and metric.sums.dtype == torch.float64
    metric.to(torch.bfloat16)  # Lightning's "bf16-true" precision
    assert metric.sums.dtype == torch.float64
    metric.reset()
    assert metric.sums.abs().sum().item() == 0


def test_state_dict_round_trip():
    metric = QAScore(squad_version="v2.0")
    metric.persistent(True)
    metric.update(["cat", ""], [["the cat"], []])
    restored = QAScore(squad_version="v2.0")
    restored.persistent(True)
    restored.load_state_dict(metric.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # restored states, but no update on this object
        assert as_floats(restored.compute()) == as_floats(metric.compute())


def test_metric_collection_keeps_versions_apart():
    """v1.1 and v2.0 count the same on a first batch with answers, but must never share updates."""
    collection = MetricCollection({"v1": QAScore(), "v2": QAScore(squad_version="v2.0")})
    collection.update(["cat", "dog"], [["the cat"], ["dog"]])
    collection.update(["", "dog"], [["a"], ["dog"]])
    scores = collection.compute()
    assert scores["v1_exact_match"].item() == pytest.approx(1.0)
    want = official_v2(["cat", "dog", "", "dog"], [["the cat"], ["dog"], ["a"], ["dog"]])
    assert scores["v2_HasAns_f1"].item() == pytest.approx(want["HasAns_f1"], abs=TOL)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"squad_version": "v3"}, ValueError, r"`squad_version` must be one of \('v1.1', 'v2.0'\), got 'v3'"),
        ({"squad_version": "2.0"}, ValueError, "squad_version"),
        ({"ignore_index": "0"}, TypeError, "`ignore_index` must be an int or None, got '0'"),
        ({"ignore_index": True}, TypeError, "ignore_index"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        QAScore(**kwargs)
    with pytest.raises(error, match=match):
        qa_score(["a"], ["a"], **kwargs)


@pytest.mark.parametrize(
    ("preds", "target", "kwargs", "error", "match"),
    [
        (["a", "b"], ["a"], {}, ValueError, "same number of questions, got 2 and 1"),
        ("a cat", ["a cat"], {}, TypeError, "single str 'a cat'; wrap it in a list"),
        (["a"], "a", {}, TypeError, "`target` must be a sequence with one entry per question"),
        ({"a"}, ["a"], {}, TypeError, "got set"),
        (["a", 3], ["a", "b"], {}, TypeError, r"`preds\[1\]` must be a str, got int"),
        (["a"], [["a", None]], {}, TypeError, r"`target\[0\]\[1\]` must be a str, got NoneType"),
        (["a"], [5], {}, TypeError, r"`target\[0\]` must be a str or a sequence of str, got int"),
        (["a", "b"], ["a", ""], {}, ValueError, r"`target\[1\]` is \[''\]: SQuAD v1.1 needs at least one non-empty"),
        (["a"], [[]], {}, ValueError, r"`target\[0\]` is \[\]: .*use squad_version='v2.0'"),
        (["a"], torch.tensor([[1]]), {}, TypeError, "must both be text or both be token-id tensors"),
        (torch.tensor([[1.0]]), torch.tensor([[1]]), {}, TypeError, "must be an integer tensor, got dtype torch.float32"),
        (torch.tensor([1]), torch.tensor([[1]]), {}, ValueError, r"`preds` token ids must have shape \[batch, length\]"),
        (torch.tensor([[1], [2]]), torch.tensor([[1]]), {}, ValueError, "same number of samples, got 2 and 1"),
        (torch.tensor([[-100]]), torch.tensor([[1]]), {}, ValueError, "negative token id -100"),
        (
            torch.tensor([[1], [2]]),
            torch.tensor([[[1], [0]], [[0], [0]]]),
            {"ignore_index": 0},
            ValueError,
            r"`target\[1\]` holds no gold answer \(every row is empty or `ignore_index`=0\)",
        ),
    ],
)
def test_bad_input(preds, target, kwargs, error, match):
    with pytest.raises(error, match=match):
        qa_score(preds, target, **kwargs)
    with pytest.raises(error, match=match):
        QAScore(**kwargs).update(preds, target)


def test_v2_accepts_what_v1_refuses():
    scores = qa_score(["cat", ""], ["", []], squad_version="v2.0")
    assert scores["NoAns_total"].item() == 2 and scores["NoAns_exact_match"].item() == 0.5
    ids = qa_score(torch.tensor([[1], [0]]), torch.tensor([[0], [0]]), squad_version="v2.0", ignore_index=0)
    assert ids["NoAns_exact_match"].item() == 0.5


def test_empty_batch_and_no_update():
    assert as_floats(qa_score([], [])) == {"exact_match": 0.0, "f1": 0.0}
    metric = QAScore(squad_version="v2.0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # compute before update
        assert all(value == 0.0 for value in as_floats(metric.compute()).values())


# ---------------------------------------------------------------------------------------------
# Two processes (gloo on CPU): every rank updates with its share, compute() syncs the sums.


def _ddp_worker(rank: int, world_size: int, port: int, scenarios: dict[str, Any], out_dir: str) -> None:
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        for name, scenario in scenarios.items():
            metric = QAScore(**scenario["kwargs"])
            for preds, target in scenario["batches"][rank]:
                metric.update(preds, target)
            before = metric.sums.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # a rank without updates
                value = metric.compute()
            results[name] = {"value": as_floats(value), "local_kept": bool(torch.equal(metric.sums, before))}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_group(scenarios: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    """``_ddp_worker`` on two spawned ranks (as tests/metrics/test_distributed.py's harness)."""
    return spawn_group(_ddp_worker, (2, _free_port(), scenarios, str(out_dir)), out_dir, 2, GROUP_TIMEOUT)


@pytest.mark.slow  # two spawned processes import torch and llmkit: 10-30 s on two busy cores
def test_ddp_two_processes(tmp_path):
    preds, golds = synthetic_pairs(120, seed=2)
    golds = [sample if index % 5 else [""] for index, sample in enumerate(golds)]
    ids_preds = torch.randint(0, 6, (40, 5), generator=torch.Generator().manual_seed(0))
    ids_target = torch.randint(0, 6, (40, 2, 4), generator=torch.Generator().manual_seed(1))
    scenarios = {
        "text_v2_uneven": {
            "kwargs": {"squad_version": "v2.0"},
            "batches": [[(preds[:1], golds[:1])], [(preds[lo : lo + 32], golds[lo : lo + 32]) for lo in range(1, 120, 32)]],
        },
        "text_v2_empty_rank": {"kwargs": {"squad_version": "v2.0"}, "batches": [[], [(preds, golds)]]},
        "ids_v2_even": {
            "kwargs": {"squad_version": "v2.0", "ignore_index": 0},
            "batches": [[(ids_preds[:20], ids_target[:20])], [(ids_preds[20:], ids_target[20:])]],
        },
    }
    expected = {
        "text_v2_uneven": official_v2(preds, golds),
        "text_v2_empty_rank": official_v2(preds, golds),
        "ids_v2_even": as_floats(qa_score(ids_preds, ids_target, squad_version="v2.0", ignore_index=0)),
    }
    results = run_group(scenarios, tmp_path)
    for name, want in expected.items():
        assert results[0][name]["value"] == results[1][name]["value"], name
        for rank in range(2):
            got = results[rank][name]["value"]
            assert all(math.isclose(got[key], want[key], abs_tol=TOL) for key in want), (name, rank, got, want)
            assert results[rank][name]["local_kept"], (name, rank)
