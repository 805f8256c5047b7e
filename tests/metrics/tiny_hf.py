"""Tiny Hugging Face models and a tokenizer, built from configs and saved to local directories.

Random weights, a word-level vocabulary written here: nothing is downloaded. The model-based
metrics' tests (and benchmarks/_model_based_bench.py) load them back by path.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# fmt: off
WORDS = [
    "the", "a", "an", "cat", "dog", "bird", "sat", "ran", "flew", "on", "in", "under", "mat", "house", "tree",
    "is", "was", "are", "were", "not", "very", "good", "bad", "nice", "kind", "stupid", "idiot", "hate", "love",
    "you", "i", "we", "they", "he", "she", "it", "hello", "world", "paris", "france", "capital", "of", "city",
    "what", "where", "who", "why", "how", "big", "small", "red", "blue", "green", "water", "fire", "eat", "eats",
    "food", "today", "yesterday", "and", "or", "but", "because", "has", "have", "had", "many", "few", "people",
    "river", "mountain", "sun", "moon", "cold", "hot", "day", "night", "book", "read", "reads", "wrote", "color",
    "sky", "grass", "tall", "short", "fast", "slow", ".", ",", "!", "?", "'", "s",
]
# fmt: on
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + WORDS
MAX_LENGTH = 48


def tokenizer(max_length: int = MAX_LENGTH) -> Any:
    """A lowercasing word-level BERT tokenizer over ``VOCAB`` (unknown words are ``[UNK]``)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={word: index for index, word in enumerate(VOCAB)}, model_max_length=max_length)


def bert_config(**overrides: Any) -> Any:
    """A 2-layer BERT with 32-dimensional states over ``VOCAB``."""
    from transformers import BertConfig

    settings: dict[str, Any] = {
        "vocab_size": len(VOCAB),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    settings.update(overrides)
    return BertConfig(**settings)


def classifier(labels: list[str] | None, seed: int = 0, **overrides: Any) -> Any:
    """A random ``BertForSequenceClassification`` with ``labels`` (``None``: one unnamed logit).

    Initialised ten times wider than BERT's default, so that its probabilities vary between texts.
    """
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    overrides.setdefault("initializer_range", 0.2)
    if labels is None:
        config = bert_config(num_labels=1, **overrides)
    else:
        config = bert_config(
            id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}, **overrides
        )
    return BertForSequenceClassification(config).eval()


def encoder(seed: int = 0, **overrides: Any) -> Any:
    """A random ``BertModel`` whose every layer's output has pairwise non-negative cosines.

    Each layer's output LayerNorm gets weight 1 and bias 1: its outputs are ``x + 1`` with
    ``x`` of zero mean and norm ``sqrt(d)``, so ``cos(x + 1, y + 1) = (x.y + d) / (2 d) >= 0``.
    bert-score pads similarity matrices with zeros, so it equals a true maximum only when the
    similarities are non-negative (as in real BERT models).
    """
    from transformers import BertModel

    torch.manual_seed(seed)
    overrides.setdefault("initializer_range", 0.1)  # layers that differ more than BERT's default 0.02 gives
    model = BertModel(bert_config(**overrides))
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.output.LayerNorm.weight.fill_(1.0)
            layer.output.LayerNorm.bias.fill_(1.0)
        model.embeddings.LayerNorm.weight.fill_(1.0)
        model.embeddings.LayerNorm.bias.fill_(1.0)
    return model.eval()


def save(directory: Path, model: Any, with_tokenizer: bool = True) -> Path:
    """Save ``model`` (and the tokenizer) with ``save_pretrained`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if with_tokenizer:
        tokenizer().save_pretrained(directory)
    return directory


def roberta_tokenizer(directory: Path, max_length: int = MAX_LENGTH) -> Any:
    """A byte-level BPE ``RobertaTokenizer`` trained here on sentences of ``WORDS``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    sentences = [" ".join(WORDS[start : start + 7]) for start in range(0, len(WORDS), 3)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sentences, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    return RobertaTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=max_length
    )


def roberta_encoder(directory: Path, seed: int = 0) -> Path:
    """A tiny ``RobertaModel`` with its BPE tokenizer saved in ``directory`` (non-negative cosines, as ``encoder``)."""
    from transformers import RobertaConfig, RobertaModel

    tok = roberta_tokenizer(directory / "bpe")
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH + 4,
        pad_token_id=tok.pad_token_id,
    )
    model = RobertaModel(config).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.output.LayerNorm.weight.fill_(1.0)
            layer.output.LayerNorm.bias.fill_(1.0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class Checkpoints:
    """Directories of tiny saved checkpoints, each with the tokenizer."""

    toxic: Path  # BertForSequenceClassification, labels ("non-toxic", "Toxic")
    multi_label: Path  # labels ("toxic", "insult", "threat"), problem_type multi_label_classification
    nli: Path  # labels ("CONTRADICTION", "NEUTRAL", "ENTAILMENT")
    no_entailment: Path  # labels ("yes", "no", "maybe")
    cross_encoder: Path  # one unnamed logit
    encoder: Path  # BertModel: no classification head


def save_checkpoints(root: Path) -> Checkpoints:
    """Build and save every tiny checkpoint under ``root``."""
    return Checkpoints(
        toxic=save(root / "toxic", classifier(["non-toxic", "Toxic"], seed=3)),
        multi_label=save(
            root / "multi_label",
            classifier(["toxic", "insult", "threat"], seed=2, problem_type="multi_label_classification"),
        ),
        nli=save(root / "nli", classifier(["CONTRADICTION", "NEUTRAL", "ENTAILMENT"], seed=3)),
        no_entailment=save(root / "no_entailment", classifier(["yes", "no", "maybe"], seed=4)),
        cross_encoder=save(root / "cross_encoder", classifier(None, seed=5)),
        encoder=save(root / "encoder", encoder(seed=6)),
    )


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hugging Face offline mode, and any network connection an error: proves nothing downloads."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"a test opened a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def encode_texts(tok: Any, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``tok`` on a batch, padded, as the metrics call it."""
    if pairs is None:
        return dict(tok(texts, padding=True, truncation=True, return_tensors="pt"))
    return dict(tok(texts, text_pair=pairs, padding=True, truncation=True, return_tensors="pt"))


# Sentences of the vocabulary (and a few unknown words), for the metrics' tests.
TEXTS = [
    "you are stupid",
    "the cat sat on the mat .",
    "i hate you , idiot !",
    "hello world",
    "what a nice day today",
    "paris is the capital of france",
    "the sky is blue and the grass is green",
    "we love food",
    "the dog ran under the tree . it was fast !",
    "she reads a book every night",
    "zebra quokka",
    "",
]
