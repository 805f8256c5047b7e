"""BERTScore against the bert-score package (0.3.13) given the same local checkpoint."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics import MetricCollection

from llmkit.metrics.model_based import BERTScore
from tests.metrics import tiny_hf
from tests.metrics.tiny_hf import offline  # noqa: F401

bert_score = pytest.importorskip("bert_score")

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

CANDS = [
    "the cat sat on the mat .",
    "hello world",
    "you are stupid !",
    "dog",
    "paris is the capital of france",
    "the sky is blue today",
    "  she reads a book every night  ",
    "the river was cold and the mountain was tall",
    "zebra quokka",
]
REFS = [
    "a cat sat on a mat",
    "hello you",
    "you are nice",
    "the dog",
    "the capital of france is paris",
    "blue sky",
    "she read a book last night",
    "the mountain was tall",
    "a zebra",
]
# Two references for most samples, one for the others: bert-score takes the best of each of P, R, F.
MULTI = [[ref, CANDS[(index + 2) % len(CANDS)]] if index % 3 else [ref] for index, ref in enumerate(REFS)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_hf.save_checkpoints(tmp_path_factory.mktemp("tiny_hf"))


def oracle(path, cands, refs, **kwargs):
    """``bert_score.score`` with the local checkpoint: ``[N, 3]`` per-sample (P, R, F)."""
    kwargs.setdefault("num_layers", 2)
    precision, recall, f1 = bert_score.score(cands, refs, model_type=str(path), nthreads=0, device="cpu", batch_size=4, **kwargs)
    return torch.stack([precision, recall, f1], dim=-1).double()


def means(metric):
    return torch.stack(list(metric.compute().values()))


@pytest.mark.parametrize("num_layers", [None, 1, 0])
@pytest.mark.parametrize("idf", [False, True])
@pytest.mark.parametrize("multi", [False, True], ids=["one_ref", "multi_ref"])
def test_equals_bert_score(checkpoints, num_layers, idf, multi):
    target = MULTI if multi else REFS
    metric = BERTScore(str(checkpoints.encoder), num_layers=num_layers, idf=idf, batch_size=3)
    metric.update(CANDS[:4], target[:4])
    metric.update(CANDS[4:], target[4:])
    want = oracle(checkpoints.encoder, CANDS, target, num_layers=2 if num_layers is None else num_layers, idf=idf)
    torch.testing.assert_close(means(metric), want.mean(dim=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(metric.scores(CANDS, target), want, atol=1e-5, rtol=0)


def test_result_keys_and_the_layer_matters(checkpoints):
    metric = BERTScore(checkpoints.encoder, num_layers=1)
    metric.update(CANDS, REFS)
    assert list(metric.compute()) == ["bertscore_precision", "bertscore_recall", "bertscore_f1"]
    other = BERTScore(checkpoints.encoder, num_layers=2)
    other.update(CANDS, REFS)
    assert (means(metric) - means(other)).abs().min() > 1e-3


def test_idf_from_given_sentences_or_mapping(checkpoints):
    tok = tiny_hf.tokenizer()
    want = oracle(checkpoints.encoder, CANDS, REFS, idf=True)  # idf from REFS
    known = BERTScore(checkpoints.encoder, idf=True, idf_sentences=REFS)
    known.update(CANDS[:5], REFS[:5])
    known.update(CANDS[5:], REFS[5:])
    torch.testing.assert_close(means(known), want.mean(dim=0), atol=1e-5, rtol=0)
    # bert-score's own idf dict (a defaultdict), given to both.
    idf_dict = bert_score.utils.get_idf_dict(CANDS, tok, nthreads=0)
    mapped = BERTScore(checkpoints.encoder, idf=idf_dict)
    mapped.update(CANDS, REFS)
    torch.testing.assert_close(means(mapped), oracle(checkpoints.encoder, CANDS, REFS, idf=idf_dict).mean(dim=0), atol=1e-5, rtol=0)
    # A plain dict must weigh every token it meets.
    plain = BERTScore(checkpoints.encoder, idf={index: 1.0 for index in range(5)})
    with pytest.raises(ValueError, match=r"token id .* has no weight in the `idf` mapping"):
        plain.update(CANDS, REFS)


def test_idf_from_the_whole_corpus_across_updates(checkpoints):
    # The weights depend on every reference, so the metric keeps the per-token matches.
    metric = BERTScore(checkpoints.encoder, idf=True, batch_size=2)
    for start in range(0, len(CANDS), 2):
        metric.update(CANDS[start : start + 2], MULTI[start : start + 2])
    torch.testing.assert_close(means(metric), oracle(checkpoints.encoder, CANDS, MULTI, idf=True).mean(dim=0), atol=1e-5, rtol=0)
    metric.persistent(True)
    assert set(metric.state_dict()) == {
        "precision_sum", "recall_sum", "f1_sum", "total", "update_config",
        "hyp_ids", "hyp_sims", "hyp_lens", "ref_ids", "ref_sims", "ref_lens", "pair_empty", "refs_per_sample",
    }  # fmt: skip


def test_forward_with_corpus_idf(checkpoints):
    metric = BERTScore(checkpoints.encoder, idf=True)
    batch = metric(CANDS[:4], REFS[:4])
    torch.testing.assert_close(torch.stack(list(batch.values())), oracle(checkpoints.encoder, CANDS[:4], REFS[:4], idf=True).mean(dim=0), atol=1e-5, rtol=0)
    metric(CANDS[4:], REFS[4:])
    torch.testing.assert_close(means(metric), oracle(checkpoints.encoder, CANDS, REFS, idf=True).mean(dim=0), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # bert-score's own
def test_baseline_rescaling_from_a_local_file(checkpoints, tmp_path):
    baseline = tmp_path / "baseline.tsv"  # bert-score's format: comma-separated despite the name
    baseline.write_text("LAYER,P,R,F\n0,0.5,0.55,0.52\n1,0.8,0.81,0.805\n2,0.85,0.86,0.855\n")
    metric = BERTScore(checkpoints.encoder, num_layers=1, baseline_path=baseline)
    metric.update(CANDS, REFS)
    want = oracle(checkpoints.encoder, CANDS, REFS, num_layers=1, lang="en", rescale_with_baseline=True, baseline_path=str(baseline))
    torch.testing.assert_close(means(metric), want.mean(dim=0), atol=1e-5, rtol=0)
    last = BERTScore(checkpoints.encoder, baseline_path=baseline)  # the last layer: row 2
    last.update(CANDS, REFS)
    want = oracle(checkpoints.encoder, CANDS, REFS, num_layers=2, lang="en", rescale_with_baseline=True, baseline_path=str(baseline))
    torch.testing.assert_close(means(last), want.mean(dim=0), atol=1e-5, rtol=0)


def test_baseline_file_errors(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"baseline file .*missing.tsv' does not exist"):
        BERTScore(checkpoints.encoder, baseline_path=tmp_path / "missing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("LAYER,X\n0,1\n")
    with pytest.raises(ValueError, match=r"must have the columns LAYER,P,R,F, got \['LAYER', 'X'\]"):
        BERTScore(checkpoints.encoder, baseline_path=bad)
    short = tmp_path / "short.tsv"
    short.write_text("LAYER,P,R,F\n0,0.5,0.5,0.5\n")
    with pytest.raises(ValueError, match=r"has rows for layers 0..0, not for layer 2"):
        BERTScore(checkpoints.encoder, baseline_path=short)
    with pytest.raises(ValueError, match=r"pass `num_layers` to pick the baseline row"):
        BERTScore(torch.nn.Identity(), lambda texts, **kwargs: {}, baseline_path=short)


def test_roberta_tokenizer_as_bert_score_calls_it(tmp_path):
    path = tiny_hf.roberta_encoder(tmp_path / "roberta")
    metric = BERTScore(path, num_layers=1, idf=True)
    assert metric.prefix_space  # bert-score passes add_prefix_space=True to GPT-2/RoBERTa tokenizers
    metric.update(CANDS, MULTI)
    torch.testing.assert_close(means(metric), oracle(path, CANDS, MULTI, num_layers=1, idf=True).mean(dim=0), atol=1e-5, rtol=0)


def test_module_and_tokenizer_equal_the_path(checkpoints):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoints.encoder, local_files_only=True)
    by_module = BERTScore(model, tiny_hf.tokenizer(), num_layers=1)
    by_path = BERTScore(checkpoints.encoder, num_layers=1)
    torch.testing.assert_close(by_module.scores(CANDS, MULTI), by_path.scores(CANDS, MULTI), atol=1e-6, rtol=0)


def test_empty_sentences_score_zero(checkpoints):
    # bert-score 0.3.13 fails on an empty sentence with transformers 5; it means P = R = F = 0.
    metric = BERTScore(checkpoints.encoder)
    scores = metric.scores(["", "the cat", "  "], ["the cat", "", "the dog"])
    assert scores.tolist() == [[0.0, 0.0, 0.0]] * 3
    multi = metric.scores(["the cat"], [["", "the cat"]])
    assert multi[0, 2].item() == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=6, deadline=None)
@given(batch_size=st.integers(1, 5), split=st.integers(0, len(CANDS)), idf=st.booleans())
def test_chunks_and_updates_do_not_change_the_result(checkpoints, batch_size, split, idf):
    whole = BERTScore(checkpoints.encoder, idf=idf, batch_size=64)
    whole.update(CANDS, MULTI)
    chunked = BERTScore(checkpoints.encoder, idf=idf, batch_size=batch_size)
    chunked.update(CANDS[:split], MULTI[:split])
    chunked.update(CANDS[split:], MULTI[split:])
    torch.testing.assert_close(means(chunked), means(whole), atol=1e-6, rtol=0)


def test_many_references_for_one_sample_span_reference_chunks(checkpoints):
    refs = [[f"the {word} sat" for word in ("cat", "dog", "bird", "sun", "moon")] + ["hello world"]]
    metric = BERTScore(checkpoints.encoder, batch_size=2)
    metric.update(["hello world"], refs)
    torch.testing.assert_close(means(metric), oracle(checkpoints.encoder, ["hello world"], refs).mean(dim=0), atol=1e-5, rtol=0)


def test_state_of_the_fixed_weights_is_the_sums_only(checkpoints):
    metric = BERTScore(checkpoints.encoder)
    metric.persistent(True)
    assert set(metric.state_dict()) == {"precision_sum", "recall_sum", "f1_sum", "total", "update_config"}
    assert list(metric.children()) == []


def test_bad_arguments_and_input(checkpoints):
    with pytest.raises(ValueError, match=r"`num_layers` must be in \[0, 2\] \(the model's layers\), got 3"):
        BERTScore(checkpoints.encoder, num_layers=3)
    with pytest.raises(TypeError, match=r"`num_layers` must be an int or None, got 1.0"):
        BERTScore(checkpoints.encoder, num_layers=1.0)
    with pytest.raises(TypeError, match=r"`idf` must be a bool or a mapping of token ids to weights, got str"):
        BERTScore(checkpoints.encoder, idf="yes")
    with pytest.raises(ValueError, match=r"`idf_sentences` needs `idf=True`, got idf=False"):
        BERTScore(checkpoints.encoder, idf_sentences=REFS)
    metric = BERTScore(checkpoints.encoder)
    with pytest.raises(ValueError, match=r"`preds` and `target` must have the same length, got 2 and 1"):
        metric.update(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"sample 0 has no reference"):
        metric.update(["a"], [[]])
    with pytest.raises(TypeError, match=r"`target` must be a sequence of references per sample, got str"):
        metric.update(["a"], "a")
    with pytest.raises(TypeError, match=r"`target\[0\]` must be a sequence of strings, got an item of type int"):
        metric.update(["a"], [[1]])


def test_in_a_metric_collection(checkpoints):
    collection = MetricCollection({"idf": BERTScore(checkpoints.encoder, idf=True), "plain": BERTScore(checkpoints.encoder)})
    collection.update(CANDS, REFS)
    result = collection.compute()
    assert set(result) == {f"{name}_bertscore_{key}" for name in ("idf", "plain") for key in ("precision", "recall", "f1")}
    torch.testing.assert_close(result["idf_bertscore_f1"].item(), oracle(checkpoints.encoder, CANDS, REFS, idf=True)[:, 2].mean().item(), atol=1e-5, rtol=0)


def test_states_keep_their_dtypes_under_module_to(checkpoints):
    # Lightning's precision="bf16-true" calls Module.to(torch.bfloat16) on everything it holds.
    reference = BERTScore(checkpoints.encoder, idf=True)
    reference.update(CANDS, REFS)
    metric = BERTScore(checkpoints.encoder, idf=True)
    metric.update(CANDS, REFS)
    metric.to(torch.bfloat16)  # (a result computed before would be cast: torchmetrics casts its cache)
    assert metric.precision_sum.dtype == torch.float64
    assert metric.hyp_sims[0].dtype == torch.float32 and metric.hyp_ids[0].dtype == torch.long
    assert next(metric.model.parameters()).dtype == torch.float32  # the model is the user's: left as it is
    torch.testing.assert_close(means(metric), means(reference), atol=0, rtol=0)
