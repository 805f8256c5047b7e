"""Toxicity against a hand computation and transformers' text-classification pipeline (HF evaluate's toxicity)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics import MetricCollection

from llmkit.metrics import BLEUScore
from llmkit.metrics.model_based import Toxicity
from tests.metrics import tiny_hf
from tests.metrics.tiny_hf import TEXTS, offline  # noqa: F401

pytestmark = pytest.mark.usefixtures("offline", "one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_hf.save_checkpoints(tmp_path_factory.mktemp("tiny_hf"))


def hand_toxicity(path, texts, label, activation="softmax"):
    """Each text alone through the model loaded by hand; the label's probability."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            logits = model(**tok([text], return_tensors="pt", truncation=True)).logits[0]
            out.append(logits.softmax(-1)[label] if activation == "softmax" else logits[label].sigmoid())
    return torch.stack(out)


def pipeline_toxicity(path, texts, label_name):
    """What HF evaluate's toxicity measurement computes: the pipeline's score of the toxic label."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(path), top_k=None, truncation=True, device="cpu")
    return torch.tensor([next(item["score"] for item in result if item["label"] == label_name) for result in classify(texts)])


def test_equals_hand_and_pipeline(checkpoints):
    metric = Toxicity(str(checkpoints.toxic), batch_size=5)
    assert metric.label == 1  # "Toxic", found case-insensitively
    metric.update(TEXTS[:7])
    metric.update(TEXTS[7:])
    hand = hand_toxicity(checkpoints.toxic, TEXTS, 1)
    pipe = pipeline_toxicity(checkpoints.toxic, TEXTS, "Toxic")
    torch.testing.assert_close(hand, pipe, atol=1e-6, rtol=0)
    torch.testing.assert_close(metric.scores(TEXTS), hand, atol=1e-6, rtol=0)
    result = metric.compute()
    assert set(result) == {"toxicity", "toxicity_max", "toxicity_ratio"}
    # evaluate.load("toxicity"): per-text scores, aggregation="maximum", aggregation="ratio" (>= 0.5).
    assert result["toxicity"].item() == pytest.approx(pipe.double().mean().item(), abs=1e-6)
    assert result["toxicity_max"].item() == pytest.approx(pipe.max().item(), abs=1e-6)
    assert result["toxicity_ratio"].item() == pytest.approx((pipe >= 0.5).double().mean().item(), abs=1e-12)
    assert 0.0 < result["toxicity_ratio"].item() < 1.0  # the threshold splits these texts


def test_threshold_and_label_by_name_or_index(checkpoints):
    scores = hand_toxicity(checkpoints.toxic, TEXTS, 0)
    for label in ("NON-TOXIC", 0):
        metric = Toxicity(checkpoints.toxic, toxic_label=label, threshold=0.3)
        metric.update(TEXTS)
        result = metric.compute()
        assert result["toxicity"].item() == pytest.approx(scores.double().mean().item(), abs=1e-6)
        assert result["toxicity_ratio"].item() == pytest.approx((scores >= 0.3).double().mean().item())


def test_multi_label_model_uses_sigmoid_as_the_pipeline(checkpoints):
    metric = Toxicity(checkpoints.multi_label, batch_size=4)
    assert metric.activation == "sigmoid"
    metric.update(TEXTS)
    pipe = pipeline_toxicity(checkpoints.multi_label, TEXTS, "toxic")
    torch.testing.assert_close(metric.scores(TEXTS), pipe, atol=1e-6, rtol=0)
    assert metric.compute()["toxicity"].item() == pytest.approx(pipe.double().mean().item(), abs=1e-6)
    forced = Toxicity(checkpoints.multi_label, function_to_apply="softmax")
    torch.testing.assert_close(forced.scores(TEXTS), hand_toxicity(checkpoints.multi_label, TEXTS, 0), atol=1e-6, rtol=0)


def test_single_logit_model_uses_sigmoid(checkpoints):
    metric = Toxicity(checkpoints.cross_encoder, toxic_label=0)
    assert metric.activation == "sigmoid"
    torch.testing.assert_close(
        metric.scores(TEXTS), hand_toxicity(checkpoints.cross_encoder, TEXTS, 0, "sigmoid"), atol=1e-6, rtol=0
    )


def test_module_and_tokenizer_equal_the_path(checkpoints):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(checkpoints.toxic, local_files_only=True)
    by_module = Toxicity(model, tiny_hf.tokenizer())
    by_path = Toxicity(checkpoints.toxic)
    torch.testing.assert_close(by_module.scores(TEXTS), by_path.scores(TEXTS), atol=1e-6, rtol=0)


@settings(max_examples=8, deadline=None)
@given(
    texts=st.lists(
        st.lists(st.sampled_from(tiny_hf.WORDS), min_size=0, max_size=12).map(" ".join), min_size=1, max_size=9
    ),
    batch_size=st.integers(1, 5),
    split=st.integers(0, 9),
)
def test_chunks_and_updates_do_not_change_the_result(checkpoints, texts, batch_size, split):
    whole = Toxicity(checkpoints.toxic, batch_size=64)
    whole.update(texts)
    chunked = Toxicity(checkpoints.toxic, batch_size=batch_size)
    chunked.update(texts[:split])
    chunked.update(texts[split:])
    for key, value in whole.compute().items():
        assert chunked.compute()[key].item() == pytest.approx(value.item(), abs=1e-6), key


def test_forward_gives_the_batch_and_accumulates(checkpoints):
    metric = Toxicity(checkpoints.toxic)
    batch = metric(TEXTS[:4])
    alone = Toxicity(checkpoints.toxic)
    alone.update(TEXTS[:4])
    assert batch["toxicity"].item() == pytest.approx(alone.compute()["toxicity"].item(), abs=1e-6)
    metric(TEXTS[4:])
    every = Toxicity(checkpoints.toxic)
    every.update(TEXTS)
    for key, value in every.compute().items():  # other batches: other padding, float32 rounding
        assert metric.compute()[key].item() == pytest.approx(value.item(), abs=1e-6), key


def test_state_is_the_sums_only_and_the_model_is_not_a_submodule(checkpoints):
    metric = Toxicity(checkpoints.toxic)
    assert list(metric.children()) == []
    assert list(metric.parameters()) == []
    assert metric.state_dict() == {}  # torchmetrics' states are not persistent by default
    metric.persistent(True)
    assert set(metric.state_dict()) == {"score_sum", "score_max", "num_toxic", "total", "update_config"}
    metric.update(TEXTS)
    state = metric.state_dict()
    fresh = Toxicity(checkpoints.toxic)
    fresh.persistent(True)
    fresh.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"called before the ``update`` method"):  # torchmetrics counts updates
        assert fresh.compute()["toxicity"].item() == metric.compute()["toxicity"].item()


def test_a_model_in_training_mode_is_scored_in_eval_mode_and_restored(checkpoints):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoints.toxic, local_files_only=True, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5
    )
    model.train()
    metric = Toxicity(model, tiny_hf.tokenizer())
    first, second = metric.scores(TEXTS), metric.scores(TEXTS)
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # no dropout
    assert model.training
    torch.testing.assert_close(first, hand_toxicity(checkpoints.toxic, TEXTS, 1), atol=1e-6, rtol=0)


def test_no_outputs_give_nan(checkpoints):
    metric = Toxicity(checkpoints.toxic)
    with pytest.warns(UserWarning, match=r"called before the ``update`` method"):
        assert all(torch.isnan(value) for value in metric.compute().values())
    metric.update([])
    assert all(torch.isnan(value) for value in metric.compute().values())


def test_sits_in_a_metric_collection_with_a_reference_metric(checkpoints):
    collection = MetricCollection({"bleu": BLEUScore(), "toxicity": Toxicity(checkpoints.toxic)})
    collection.update(TEXTS[:3], [[text] for text in TEXTS[:3]])
    result = collection.compute()
    assert {"bleu", "toxicity", "toxicity_max", "toxicity_ratio"} <= set(result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_model_follows_the_metric_to_the_gpu(checkpoints):
    cpu = Toxicity(checkpoints.toxic)
    cpu.update(TEXTS)
    gpu = Toxicity(checkpoints.toxic).cuda()
    gpu.update(TEXTS)
    assert next(gpu.model.parameters()).device.type == "cuda"
    assert gpu.score_sum.device.type == "cuda"
    for key, value in cpu.compute().items():
        assert gpu.compute()[key].item() == pytest.approx(value.item(), abs=1e-5), key
    gpu.cpu()
    gpu.update(TEXTS)  # and back
    assert next(gpu.model.parameters()).device.type == "cpu"
