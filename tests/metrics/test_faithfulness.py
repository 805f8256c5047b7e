"""Faithfulness against a hand computation: each (context, sentence) pair through the NLI model alone."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit.metrics.model_based import Faithfulness, split_sentences
from tests.metrics import tiny_hf
from tests.metrics.tiny_hf import offline  # noqa: F401

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

CONTEXTS = [
    "paris is the capital of france . it is a big city .",
    "the cat sat on the mat .",
    "the dog ran under the tree . the sky was blue .",
    "we love food and water .",
    "she reads a book every night .",
    "hello world",
]
RESPONSES = [
    "paris is the capital of france. it is a small city!",
    "the cat sat on the mat.",
    "the dog ran. the sky was green? the tree was tall.",
    "they hate food",
    "",
    "hello world. hello you.",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_hf.save_checkpoints(tmp_path_factory.mktemp("tiny_hf"))


def hand_entailment(path, premise, hypothesis):
    """The entailment probability of one (premise, hypothesis) pair, the model loaded by hand."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    entailment = {name.lower(): index for index, name in model.config.id2label.items()}["entailment"]
    with torch.no_grad():
        logits = model(**tok([premise], text_pair=[hypothesis], truncation=True, return_tensors="pt")).logits[0]
    return logits.softmax(-1)[entailment].item()


def hand_scores(path, responses, contexts, aggregate=min, split=split_sentences):
    return [
        aggregate([hand_entailment(path, context, sentence) for sentence in split(response)])
        for response, context in zip(responses, contexts, strict=True)
    ]


def test_split_sentences():
    assert split_sentences("Paris is big. It is old!  Is it?\nYes.") == ["Paris is big.", "It is old!", "Is it?", "Yes."]
    assert split_sentences("3.5 is a number... right?") == ["3.5 is a number...", "right?"]
    assert split_sentences("no end") == ["no end"]
    assert split_sentences("   ") == [""]
    assert split_sentences("") == [""]


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab .!?\n"), max_size=30))
def test_split_sentences_only_cuts_whitespace_after_an_end_mark(text):
    pieces = split_sentences(text)
    assert " ".join(pieces).split() == text.split()  # nothing but whitespace is lost
    assert all(piece == piece.strip() for piece in pieces)
    for piece, following in itertools.pairwise(pieces):
        assert piece[-1] in ".!?" and following


@pytest.mark.parametrize("aggregation", ["min", "mean"])
def test_equals_hand_computation(checkpoints, aggregation):
    metric = Faithfulness(str(checkpoints.nli), aggregation=aggregation, batch_size=3)
    assert metric.label == 2  # "ENTAILMENT"
    metric.update(RESPONSES[:2], CONTEXTS[:2])
    metric.update(RESPONSES[2:], CONTEXTS[2:])
    aggregate = min if aggregation == "min" else (lambda scores: sum(scores) / len(scores))
    want = hand_scores(checkpoints.nli, RESPONSES, CONTEXTS, aggregate)
    torch.testing.assert_close(metric.scores(RESPONSES, CONTEXTS), torch.tensor(want), atol=1e-6, rtol=0)
    result = metric.compute()
    assert result["faithfulness"].item() == pytest.approx(sum(want) / len(want), abs=1e-6)
    assert result["hallucination_rate"].item() == pytest.approx(sum(s < 0.5 for s in want) / len(want))
    assert 0.0 < result["hallucination_rate"].item() < 1.0


def test_whole_responses_and_a_custom_splitter(checkpoints):
    whole = Faithfulness(checkpoints.nli, sentence_split=False, threshold=0.4)
    whole.update(RESPONSES, CONTEXTS)
    want = hand_scores(checkpoints.nli, RESPONSES, CONTEXTS, split=lambda text: [text])
    assert whole.compute()["faithfulness"].item() == pytest.approx(sum(want) / len(want), abs=1e-6)
    assert whole.compute()["hallucination_rate"].item() == pytest.approx(sum(s < 0.4 for s in want) / len(want))
    by_comma = Faithfulness(checkpoints.nli, sentence_split=lambda text: text.split(","))
    want = hand_scores(checkpoints.nli, ["a cat, a dog"], ["the cat"], split=lambda text: text.split(","))
    assert by_comma.scores(["a cat, a dog"], ["the cat"]).item() == pytest.approx(want[0], abs=1e-6)


def test_premise_is_the_context(checkpoints):
    metric = Faithfulness(checkpoints.nli, sentence_split=False)
    got = metric.scores(["the cat sat on the mat ."], ["paris is the capital of france ."]).item()
    assert got == pytest.approx(hand_entailment(checkpoints.nli, "paris is the capital of france .", "the cat sat on the mat ."), abs=1e-6)
    assert got != pytest.approx(hand_entailment(checkpoints.nli, "the cat sat on the mat .", "paris is the capital of france ."), abs=1e-4)


def test_entailment_label_given(checkpoints):
    metric = Faithfulness(checkpoints.no_entailment, entailment_label="YES", sentence_split=False)
    assert metric.label == 0
    metric = Faithfulness(checkpoints.nli, entailment_label=1)
    assert metric.label == 1


@settings(max_examples=6, deadline=None)
@given(batch_size=st.integers(1, 4), split=st.integers(0, len(RESPONSES)))
def test_chunks_and_updates_do_not_change_the_result(checkpoints, batch_size, split):
    whole = Faithfulness(checkpoints.nli, batch_size=64)
    whole.update(RESPONSES, CONTEXTS)
    chunked = Faithfulness(checkpoints.nli, batch_size=batch_size)
    chunked.update(RESPONSES[:split], CONTEXTS[:split])
    chunked.update(RESPONSES[split:], CONTEXTS[split:])
    for key, value in whole.compute().items():
        assert chunked.compute()[key].item() == pytest.approx(value.item(), abs=1e-6), key


def test_state_is_the_sums_only(checkpoints):
    metric = Faithfulness(checkpoints.nli)
    metric.persistent(True)
    assert set(metric.state_dict()) == {"score_sum", "num_unfaithful", "total", "update_config"}
    assert list(metric.children()) == []


def test_bad_input(checkpoints):
    metric = Faithfulness(checkpoints.nli)
    with pytest.raises(ValueError, match=r"`preds` and `context` must have the same length, got 2 and 1"):
        metric.update(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"`context` must be a sequence of strings, got str"):
        metric.update(["a"], "c")
    with pytest.raises(ValueError, match=r"`aggregation` must be one of \('min', 'mean'\), got 'max'"):
        Faithfulness(checkpoints.nli, aggregation="max")
    with pytest.raises(TypeError, match=r"`sentence_split` must be a bool or a callable"):
        Faithfulness(checkpoints.nli, sentence_split="regex")
    with pytest.raises(ValueError, match=r"`threshold` must be in \[0, 1\], got 2"):
        Faithfulness(checkpoints.nli, threshold=2)
