"""Vocab: specials, sorted ids, encode/decode round trips, unknown words, saving."""

from __future__ import annotations

import io

import pytest
import torch

from llmkit.data import Vocab

SENTENCES = [["the", "cat", "sat"], ["the", "dog", "sat", "down"], ["a", "cat"]]


@pytest.fixture
def vocab() -> Vocab:
    return Vocab.build(SENTENCES)


def test_specials_come_first_with_fixed_ids(vocab: Vocab) -> None:
    assert (Vocab.PAD_ID, Vocab.BOS_ID, Vocab.EOS_ID, Vocab.UNK_ID) == (0, 1, 2, 3)
    assert (Vocab.PAD, Vocab.BOS, Vocab.EOS, Vocab.UNK) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert vocab.itos[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert [vocab.stoi[token] for token in Vocab.SPECIALS] == [0, 1, 2, 3]
    assert len(Vocab()) == 4


def test_words_are_sorted_and_unique(vocab: Vocab) -> None:
    assert vocab.itos[4:] == ("a", "cat", "dog", "down", "sat", "the")
    assert len(vocab) == 10
    # The order of the sentences does not matter.
    assert Vocab.build(reversed(SENTENCES)) == vocab
    assert all(vocab.stoi[word] == index for index, word in enumerate(vocab.itos))


def test_min_freq_keeps_frequent_words() -> None:
    vocab = Vocab.build(SENTENCES, min_freq=2)
    assert vocab.itos[4:] == ("cat", "sat", "the")
    assert vocab.encode(["the", "dog"]) == [vocab.stoi["the"], Vocab.UNK_ID]


def test_specials_in_sentences_are_not_words() -> None:
    assert Vocab.build([["<bos>", "x", "<eos>"]]).itos[4:] == ("x",)


def test_contains_and_len(vocab: Vocab) -> None:
    assert "cat" in vocab and "<unk>" in vocab
    assert "bird" not in vocab and 5 not in vocab
    assert len(vocab) == len(vocab.itos) == len(vocab.stoi)


def test_views_are_read_only(vocab: Vocab) -> None:
    with pytest.raises(TypeError):
        vocab.stoi["bird"] = 99  # type: ignore[index]
    assert isinstance(vocab.itos, tuple)


def test_encode_decode_round_trip(vocab: Vocab) -> None:
    for sentence in SENTENCES:
        ids = vocab.encode(sentence, add_bos=True, add_eos=True)
        assert ids[0] == Vocab.BOS_ID and ids[-1] == Vocab.EOS_ID and len(ids) == len(sentence) + 2
        assert vocab.decode(ids) == sentence
        assert vocab.decode(torch.tensor(ids)) == sentence
        assert vocab.decode(ids, strip_special=False) == ["<bos>", *sentence, "<eos>"]
    assert vocab.encode(["cat"]) == [vocab.stoi["cat"]]
    assert vocab.encode(["cat"], add_eos=True) == [vocab.stoi["cat"], Vocab.EOS_ID]
    assert vocab.encode([]) == []


def test_unknown_words_map_to_unk(vocab: Vocab) -> None:
    ids = vocab.encode(["the", "bird", "sat"])
    assert ids[1] == Vocab.UNK_ID
    assert vocab.decode(ids) == ["the", "<unk>", "sat"]


def test_decode_stops_at_first_eos_and_drops_pad_and_bos(vocab: Vocab) -> None:
    cat, sat = vocab.stoi["cat"], vocab.stoi["sat"]
    ids = [Vocab.BOS_ID, cat, Vocab.PAD_ID, sat, Vocab.EOS_ID, cat, Vocab.EOS_ID, Vocab.PAD_ID]
    assert vocab.decode(ids) == ["cat", "sat"]
    assert vocab.decode(torch.tensor(ids, dtype=torch.int32)) == ["cat", "sat"]
    assert vocab.decode(ids, strip_special=False) == [
        "<bos>", "cat", "<pad>", "sat", "<eos>", "cat", "<eos>", "<pad>",
    ]  # fmt: skip
    assert vocab.decode(torch.tensor([], dtype=torch.long)) == []


def test_state_dict_round_trip(vocab: Vocab) -> None:
    state = vocab.state_dict()
    assert state == {"itos": list(vocab.itos)}
    assert Vocab.from_state_dict(state) == vocab
    # Plain lists of strings: loadable with weights_only=True.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = Vocab.from_state_dict(torch.load(buffer, weights_only=True))
    assert restored == vocab and restored.encode(["cat", "bird"]) == vocab.encode(["cat", "bird"])
    assert hash(restored) == hash(vocab)
    assert Vocab(["x"]) != vocab and vocab != "not a vocab"


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda v: Vocab.build(SENTENCES, min_freq=0), ValueError, r"`min_freq` must be a positive integer, got 0"),
        (lambda v: Vocab.build(["a cat"]), TypeError, r"expected a sequence of words, got the string 'a cat'"),
        (lambda v: v.encode("cat"), TypeError, r"expected a sequence of words, got the string 'cat'; tokenize"),
        (lambda v: v.encode(["cat", 3]), TypeError, r"words must be strings, got 3 of type int"),
        (lambda v: v.decode(torch.zeros(2, 3, dtype=torch.long)), ValueError, r"1-D tensor \[T\], got shape \(2, 3\)"),
        (lambda v: v.decode(torch.zeros(3)), TypeError, r"integer tensor, got dtype torch.float32"),
        (lambda v: v.decode([1, 10]), ValueError, r"ids must lie in \[0, 10\) for this vocabulary, got 10"),
        (lambda v: v.decode([-1]), ValueError, r"ids must lie in \[0, 10\) for this vocabulary, got -1"),
        (lambda v: v.decode([1.0]), TypeError, r"`ids` must hold integers, got 1.0 of type float"),
        (lambda v: Vocab(["a", "a"]), ValueError, r"unique and not specials .*'a' is repeated"),
        (lambda v: Vocab(["<unk>"]), ValueError, r"'<unk>' is a special token"),
        (lambda v: Vocab([""]), ValueError, r"non-empty strings, got ''"),
        (lambda v: Vocab([1]), TypeError, r"vocabulary words must be strings, got 1 of type int"),
        (lambda v: Vocab.from_state_dict({"words": []}), ValueError, r"must have the key 'itos', got keys \['words'\]"),
        (lambda v: Vocab.from_state_dict({"itos": ["a", "b"]}), ValueError, r"must start with the specials"),
    ],
)
def test_bad_input_raises(vocab: Vocab, call, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call(vocab)
