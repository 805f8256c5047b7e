"""AnswerRelevance against a hand computation: mean-pooled cosines, or a cross-encoder's sigmoid."""

from __future__ import annotations

import pytest
import torch

from llmkit.metrics.model_based import AnswerRelevance
from tests.metrics import tiny_hf
from tests.metrics.tiny_hf import offline  # noqa: F401

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

QUESTIONS = [
    "what is the capital of france ?",
    "where did the cat sit ?",
    "what color is the sky ?",
    "who wrote the book ?",
    "why is fire hot ?",
]
RESPONSES = [
    "paris is the capital of france",
    "the dog ran under the tree",
    "the sky is blue",
    "",
    "fire is hot because it is fire",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_hf.save_checkpoints(tmp_path_factory.mktemp("tiny_hf"))


def hand_bi_encoder(path, questions, responses):
    """Each text alone through ``AutoModel``: the mean of its hidden states, then the cosine."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def embed(text):
        with torch.no_grad():
            return model(**tok([text], return_tensors="pt", truncation=True)).last_hidden_state[0].mean(dim=0)

    out = []
    for question, response in zip(questions, responses, strict=True):
        q, r = embed(question), embed(response)
        out.append((q @ r / (q.norm() * r.norm())).item())
    return torch.tensor(out)


def hand_cross_encoder(path, questions, responses):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for question, response in zip(questions, responses, strict=True):
            out.append(model(**tok([question], text_pair=[response], return_tensors="pt")).logits[0, 0].sigmoid())
    return torch.stack(out)


def test_bi_encoder_equals_hand_computation(checkpoints):
    metric = AnswerRelevance(str(checkpoints.encoder), batch_size=2)
    assert not metric.cross_encoder
    metric.update(RESPONSES[:3], QUESTIONS[:3])
    metric.update(RESPONSES[3:], QUESTIONS[3:])
    want = hand_bi_encoder(checkpoints.encoder, QUESTIONS, RESPONSES)
    torch.testing.assert_close(metric.scores(RESPONSES, QUESTIONS), want, atol=1e-5, rtol=0)
    assert metric.compute()["answer_relevance"].item() == pytest.approx(want.double().mean().item(), abs=1e-6)


def test_cross_encoder_equals_hand_computation(checkpoints):
    metric = AnswerRelevance(checkpoints.cross_encoder, batch_size=2)
    assert metric.cross_encoder  # a one-logit *ForSequenceClassification checkpoint
    metric.update(RESPONSES, QUESTIONS)
    want = hand_cross_encoder(checkpoints.cross_encoder, QUESTIONS, RESPONSES)
    torch.testing.assert_close(metric.scores(RESPONSES, QUESTIONS), want, atol=1e-6, rtol=0)
    assert metric.compute()["answer_relevance"].item() == pytest.approx(want.double().mean().item(), abs=1e-6)


def test_module_forms(checkpoints):
    from transformers import AutoModel, AutoModelForSequenceClassification

    encoder = AutoModel.from_pretrained(checkpoints.encoder, local_files_only=True)
    by_module = AnswerRelevance(encoder, tiny_hf.tokenizer())
    assert not by_module.cross_encoder
    torch.testing.assert_close(
        by_module.scores(RESPONSES, QUESTIONS), hand_bi_encoder(checkpoints.encoder, QUESTIONS, RESPONSES), atol=1e-5, rtol=0
    )
    cross = AutoModelForSequenceClassification.from_pretrained(checkpoints.cross_encoder, local_files_only=True)
    by_module = AnswerRelevance(cross, tiny_hf.tokenizer())
    assert by_module.cross_encoder
    torch.testing.assert_close(
        by_module.scores(RESPONSES, QUESTIONS),
        hand_cross_encoder(checkpoints.cross_encoder, QUESTIONS, RESPONSES),
        atol=1e-6,
        rtol=0,
    )


def test_a_classifier_read_as_a_bi_encoder(checkpoints):
    # cross_encoder=False on a classifier checkpoint: its base model's hidden states.
    metric = AnswerRelevance(checkpoints.cross_encoder, cross_encoder=False)
    assert not metric.cross_encoder
    torch.testing.assert_close(
        metric.scores(RESPONSES, QUESTIONS), hand_bi_encoder(checkpoints.cross_encoder, QUESTIONS, RESPONSES), atol=1e-5, rtol=0
    )


def test_bad_models(checkpoints):
    with pytest.raises(ValueError, match=r"holds no sequence-classification head"):
        AnswerRelevance(checkpoints.encoder, cross_encoder=True)
    with pytest.raises(ValueError, match=r"a cross-encoder must have one output .* got 2 labels"):
        AnswerRelevance(checkpoints.toxic)
    with pytest.raises(TypeError, match=r"`cross_encoder` must be a bool or None, got 'yes'"):
        AnswerRelevance(checkpoints.encoder, cross_encoder="yes")
    three = AnswerRelevance(torch.nn.Linear(2, 3), lambda texts, **kwargs: {"input": torch.ones(len(texts), 2)}, cross_encoder=True)
    with pytest.raises(ValueError, match=r"a cross-encoder must return one logit per pair, \[B, 1\], got shape \(1, 3\)"):
        three.update(["a"], ["b"])


def test_state_is_the_sums_only(checkpoints):
    metric = AnswerRelevance(checkpoints.encoder)
    metric.persistent(True)
    assert set(metric.state_dict()) == {"score_sum", "total", "update_config"}
    assert list(metric.parameters()) == []
