"""Loading the model-based metrics' models: local paths only, clear errors, transformers imported lazily."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

from llmkit.metrics import model_based
from llmkit.metrics.model_based import AnswerRelevance, BERTScore, Faithfulness, Toxicity
from tests.metrics import tiny_hf
from tests.metrics.tiny_hf import offline  # noqa: F401

pytestmark = pytest.mark.usefixtures("offline", "one_thread")

CLASSIFIER_METRICS = [Toxicity, Faithfulness]
ALL_METRICS = [Toxicity, Faithfulness, AnswerRelevance, BERTScore]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_hf.save_checkpoints(tmp_path_factory.mktemp("tiny_hf"))


def _words_tokenizer(texts, text_pair=None, **kwargs):
    return {"input_ids": torch.ones(len(texts), 3, dtype=torch.long)}


class _TwoLogits(torch.nn.Module):
    def forward(self, input_ids):
        return torch.zeros(input_ids.shape[0], 2)


def test_no_module_imports_transformers_at_import_time():
    # transformers is never a runtime dependency: only `import_transformers`, called for a path, imports it.
    # (torchmetrics itself imports transformers when it is installed, so sys.modules cannot tell.)
    package = Path(model_based.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(not alias.name.startswith("transformers") for alias in node.names), source
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("transformers"), source


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_a_path_without_transformers_says_how_to_install_it(checkpoints, metric, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ImportError, match=r"needs `transformers`: pip install llmkit\[eval\]"):
        metric(checkpoints.nli)
    # A module with its tokenizer needs no transformers.
    metric(_TwoLogits(), _words_tokenizer, **({"toxic_label": 1} if metric is Toxicity else {"entailment_label": 1} if metric is Faithfulness else {}))


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_path_errors(checkpoints, metric, tmp_path):
    with pytest.raises(ValueError, match=r"model path '.*nowhere' does not exist \(llmkit loads local checkpoint directories only"):
        metric(str(tmp_path / "nowhere"))
    # A hub name is not looked up: it is a path that does not exist (and the network is blocked here).
    with pytest.raises(ValueError, match=r"model path 'bert-base-uncased' does not exist"):
        metric("bert-base-uncased")
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not a directory"):
        metric(file)
    with pytest.raises(ValueError, match=r"holds no config.json"):
        metric(tmp_path)


@pytest.mark.parametrize("metric", CLASSIFIER_METRICS)
def test_a_checkpoint_without_a_classifier_head(checkpoints, metric, tmp_path):
    with pytest.raises(ValueError, match=r"holds no sequence-classification head \(config.architectures = \['BertModel'\]\)"):
        metric(checkpoints.encoder)
    # A config that claims a head the weights lack: transformers would initialise it randomly.
    fake = tiny_hf.save(tmp_path / "fake", tiny_hf.encoder())
    config = json.loads((fake / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], id2label={"0": "toxic", "1": "entailment"})
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks weights for \['classifier.bias', 'classifier.weight'\]: its classifier head would be randomly initialised"):
        metric(fake)


def test_a_checkpoint_without_a_tokenizer(checkpoints, tmp_path):
    bare = tiny_hf.save(tmp_path / "bare", tiny_hf.classifier(["ok", "toxic"]), with_tokenizer=False)
    with pytest.raises(ValueError, match=r"holds no tokenizer files; pass `tokenizer=`"):
        Toxicity(bare)
    metric = Toxicity(bare, tokenizer=tiny_hf.tokenizer())  # a tokenizer given with the path
    assert metric.scores(["hello world"]).shape == (1,)


def test_an_encoder_checkpoint_missing_layers(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tiny_hf.save(tmp_path / "partial", tiny_hf.encoder())
    weights = load_file(path / "model.safetensors")
    save_file({key: value for key, value in weights.items() if "layer.1." not in key}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights for \['encoder.layer.1.*: they would be random"):
        BERTScore(path)


def test_label_errors(checkpoints):
    with pytest.raises(ValueError, match=r"toxic label 'hateful' is not among the model's labels \{0: 'non-toxic', 1: 'Toxic'\}"):
        Toxicity(checkpoints.toxic, toxic_label="hateful")
    with pytest.raises(ValueError, match=r"cannot tell the toxic label among the model's labels \{0: 'yes', 1: 'no', 2: 'maybe'\}.*pass `toxic_label`"):
        Toxicity(checkpoints.no_entailment)
    with pytest.raises(ValueError, match=r"cannot tell the entailment label among the model's labels \{0: 'yes', 1: 'no', 2: 'maybe'\} .*looked for \['entailment'\].*pass `entailment_label`"):
        Faithfulness(checkpoints.no_entailment)
    with pytest.raises(ValueError, match=r"`entailment_label`=3 is not an output index of the model's labels"):
        Faithfulness(checkpoints.nli, entailment_label=3)
    with pytest.raises(TypeError, match=r"`toxic_label` must be a label name, an output index or None, got 1.0"):
        Toxicity(checkpoints.toxic, toxic_label=1.0)
    with pytest.raises(ValueError, match=r"the model has no config.id2label to find the toxic label in; pass `toxic_label` as an output index"):
        Toxicity(_TwoLogits(), _words_tokenizer)


def test_module_errors(checkpoints):
    with pytest.raises(TypeError, match=r"a model given as an nn.Module needs its tokenizer: pass `tokenizer=`"):
        Toxicity(_TwoLogits(), toxic_label=1)
    with pytest.raises(TypeError, match=r"`tokenizer` must be callable, got str"):
        Toxicity(_TwoLogits(), "bert", toxic_label=1)
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module or the path of a local checkpoint directory, got int"):
        Toxicity(3)


def test_argument_errors(checkpoints):
    with pytest.raises(ValueError, match=r"`batch_size` must be at least 1, got 0"):
        Toxicity(checkpoints.toxic, batch_size=0)
    with pytest.raises(TypeError, match=r"`batch_size` must be an int, got '8'"):
        AnswerRelevance(checkpoints.encoder, batch_size="8")
    with pytest.raises(ValueError, match=r"`max_length` must be at least 1, got -1"):
        BERTScore(checkpoints.encoder, max_length=-1)
    with pytest.raises(ValueError, match=r"`threshold` must be in \[0, 1\], got 1.5"):
        Toxicity(checkpoints.toxic, threshold=1.5)
    with pytest.raises(TypeError, match=r"`threshold` must be a number, got '0.5'"):
        Toxicity(checkpoints.toxic, threshold="0.5")
    with pytest.raises(ValueError, match=r"`function_to_apply` must be one of \('softmax', 'sigmoid'\) or None, got 'relu'"):
        Toxicity(checkpoints.toxic, function_to_apply="relu")


def test_update_errors(checkpoints):
    metric = Toxicity(checkpoints.toxic)
    with pytest.raises(TypeError, match=r"`preds` must be a sequence of strings, got str"):
        metric.update("you are stupid")
    with pytest.raises(TypeError, match=r"`preds` must be a sequence of strings, got an item of type int"):
        metric.update(["a", 3])
    relevance = AnswerRelevance(checkpoints.encoder)
    with pytest.raises(ValueError, match=r"`preds` and `questions` must have the same length, got 1 and 2"):
        relevance.update(["a"], ["b", "c"])


def test_model_output_errors():
    one_logit = Toxicity(torch.nn.Identity(), lambda texts, **kwargs: {"input": torch.zeros(len(texts), 1)}, toxic_label=1)
    with pytest.raises(ValueError, match=r"logits \[B, num_labels\] with num_labels > 1 \(the label's index\), got shape \(2, 1\)"):
        one_logit.update(["a", "b"])

    class Words(torch.nn.Module):
        def forward(self, input_ids):
            return {"words": input_ids}

    odd = Toxicity(Words(), _words_tokenizer, toxic_label=0)
    with pytest.raises(TypeError, match=r"the model must return a tensor, an object with `.logits` or a tuple, got dict"):
        odd.update(["a"])


def test_the_network_is_blocked_in_these_tests():
    import socket

    with pytest.raises(RuntimeError, match="a test opened a network connection"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(RuntimeError, match="a test opened a network connection"):
        socket.socket().connect(("127.0.0.1", 9))
