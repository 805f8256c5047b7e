"""PythonDocsDataModule: topic splits, the BPE against one trained by hand, round trips, blocks, saving, checks."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path
from pydoc_data.topics import topics as TOPICS

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import llmkit.data.python_docs as python_docs
from llmkit.data import PythonDocsDataModule

SPLITS = ("train", "val", "test")


def oracle_split(seed: int, val: float = 0.1, test: float = 0.1) -> dict[str, list[str]]:
    """The documented rule, written out: sort, shuffle with random.Random(seed), test then val then train."""
    names = sorted(TOPICS)
    n_val, n_test = max(1, round(val * len(names))), max(1, round(test * len(names)))
    random.Random(seed).shuffle(names)
    return {
        "test": sorted(names[:n_test]),
        "val": sorted(names[n_test : n_test + n_val]),
        "train": sorted(names[n_test + n_val :]),
    }


def oracle_bpe(texts: list[str], vocab_size: int = 2048) -> Tokenizer:
    """A byte-level BPE trained with tokenizers' own API on ``texts``, as its documentation shows."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def bpe() -> PythonDocsDataModule:
    """The default module (BPE 2048, block 128), tokenizer trained once for the whole file."""
    return PythonDocsDataModule()


@pytest.fixture(scope="module")
def bpe_oracle() -> Tokenizer:
    return oracle_bpe([TOPICS[name] for name in oracle_split(0)["train"]])


@pytest.fixture(scope="module")
def byte_dm() -> PythonDocsDataModule:
    return PythonDocsDataModule(tokenizer="bytes", block_size=100, batch_size=64)


# --- splits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "val", "test"), [(0, 0.1, 0.1), (3, 0.3, 0.05), (7, 0.001, 0.001)])
def test_split_by_topic_is_the_documented_rule_and_covers_every_topic_once(seed: int, val: float, test: float) -> None:
    dm = PythonDocsDataModule(seed=seed, val_topics=val, test_topics=test)
    expected = oracle_split(seed, val, test)
    parts = {split: dm.topics(split) for split in SPLITS}
    assert parts == expected
    assert sorted(name for names in parts.values() for name in names) == sorted(TOPICS)  # disjoint, complete
    assert len(TOPICS) == 79  # CPython 3.11, as documented
    for split in SPLITS:
        assert dm.text(split) == "\n\n".join(TOPICS[name] for name in expected[split])
    assert len(parts["val"]) >= 1 and len(parts["test"]) >= 1


def test_default_split_sizes_are_the_documented_ones() -> None:
    dm = PythonDocsDataModule()
    assert [len(dm.topics(s)) for s in SPLITS] == [63, 8, 8]
    assert [len(dm.text(s)) for s in SPLITS] == [417_441, 16_935, 30_746]


def test_split_is_deterministic_for_a_seed_and_moves_with_it() -> None:
    a, b, c = PythonDocsDataModule(seed=1), PythonDocsDataModule(seed=1), PythonDocsDataModule(seed=2)
    assert all(a.topics(s) == b.topics(s) and a.text(s) == b.text(s) for s in SPLITS)
    assert a.topics("test") != c.topics("test")
    assert a._tokenizer is None and c._tokenizer is None  # splitting trains nothing


# --- tokenizers --------------------------------------------------------------------------------------


def test_bpe_is_trained_on_the_training_topics_alone(bpe: PythonDocsDataModule, bpe_oracle: Tokenizer) -> None:
    assert bpe.vocab_size == bpe_oracle.get_vocab_size() == 2048  # known before setup
    assert bpe.state_dict()["tokenizer_json"] == bpe_oracle.to_str()
    # The comparison can tell: the same training on every topic gives another vocabulary.
    assert oracle_bpe(list(TOPICS.values())).to_str() != bpe_oracle.to_str()


def test_bpe_training_is_deterministic(bpe: PythonDocsDataModule) -> None:
    again = PythonDocsDataModule()
    assert again.state_dict() == bpe.state_dict()


def test_round_trip_and_ids_on_every_split(
    bpe: PythonDocsDataModule, bpe_oracle: Tokenizer, byte_dm: PythonDocsDataModule
) -> None:
    for split in SPLITS:
        text = bpe.text(split)
        assert bpe.split_ids(split).tolist() == bpe_oracle.encode(text).ids
        assert bpe.decode(bpe.split_ids(split)) == text
        assert byte_dm.split_ids(split).tolist() == list(text.encode("utf-8"))
        assert byte_dm.decode(byte_dm.split_ids(split)) == text
    assert [len(bpe.split_ids(s)) for s in SPLITS] == [115_922, 4_273, 8_242]  # the documented sizes
    assert int(bpe.split_ids("train").max()) < bpe.vocab_size


def test_text_outside_the_corpus_round_trips(bpe: PythonDocsDataModule, byte_dm: PythonDocsDataModule) -> None:
    text = "Größe → \U0001d518nicode\tand\r\n  spaces  \x00 ✓"  # a 4-byte character too
    for dm in (bpe, byte_dm):
        ids = dm.encode(text)
        assert dm.decode(ids) == dm.decode(torch.tensor(ids)) == text
    # A cut inside a multi-byte character reads U+FFFD, not an exception.
    assert byte_dm.decode(byte_dm.encode("é")[:1]) == "\ufffd"


def test_bytes_ignores_vocab_size_and_never_imports_a_bpe() -> None:
    dm = PythonDocsDataModule(tokenizer="bytes", vocab_size=4096)
    assert dm.vocab_size == 256
    assert isinstance(dm._tokenizer, python_docs._ByteTokenizer)


def test_tokenizers_is_imported_only_inside_functions() -> None:
    # Lightning imports transformers (hence tokenizers) where it is installed, so sys.modules cannot tell:
    # read the module's top level instead (the TYPE_CHECKING block aside).
    tree = ast.parse(Path(python_docs.__file__).read_text())
    for node in tree.body:
        if isinstance(node, ast.If):  # if TYPE_CHECKING:
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not any(name.split(".")[0] == "tokenizers" for name in names), ast.dump(node)


def test_bpe_that_runs_out_of_merges_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    small = {f"t{i}": f"topic {i}: spam eggs spam\n" for i in range(10)}
    monkeypatch.setattr(python_docs, "_topics", lambda: small)
    dm = PythonDocsDataModule(vocab_size=4096, block_size=2)
    with pytest.warns(UserWarning, match="the BPE stopped at \\d+ ids, fewer than `vocab_size`=4096"):
        size = dm.vocab_size
    assert 256 < size < 4096
    assert all(dm.decode(dm.split_ids(s)) == dm.text(s) for s in SPLITS)


# --- blocks and loaders ------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_blocks_are_the_slicing_rule_and_predict_every_token_once(bpe: PythonDocsDataModule, block_size: int) -> None:
    for tokenizer in ("bpe", "bytes"):
        dm = PythonDocsDataModule(tokenizer=tokenizer, block_size=block_size)
        if tokenizer == "bpe":
            dm.load_state_dict(bpe.state_dict())  # the same BPE, without training it again
        for split in SPLITS:
            ids = dm.split_ids(split).tolist()
            blocks = dm.blocks(split)
            n = (len(ids) - 1) // block_size
            expected = [ids[i * block_size : i * block_size + block_size + 1] for i in range(n)]
            assert blocks.dtype == torch.long and blocks.tolist() == expected
            # Inputs blocks[:, :-1] predict targets blocks[:, 1:]: each stream token after the first,
            # up to the dropped tail, is a target exactly once.
            assert blocks[:, 1:].flatten().tolist() == ids[1 : n * block_size + 1]
            assert len(ids) - 1 - n * block_size < block_size  # the dropped tail is shorter than a block


def test_loaders_batch_blocks_as_plain_tensors(byte_dm: PythonDocsDataModule) -> None:
    byte_dm.setup("fit")
    for split, loader in (("val", byte_dm.val_dataloader()), ("test", byte_dm.test_dataloader())):
        batches = list(loader)
        assert all(isinstance(b, torch.Tensor) and b.shape[1:] == (101,) and b.dtype == torch.long for b in batches)
        assert torch.equal(torch.cat(batches), byte_dm.blocks(split))  # in order, nothing dropped
        n = len(byte_dm.blocks(split))
        assert [len(b) for b in batches] == [64] * (n // 64) + ([n % 64] if n % 64 else [])  # drop_last=False
    assert torch.equal(torch.cat(list(byte_dm.predict_dataloader())), byte_dm.blocks("test"))

    loader = byte_dm.train_dataloader()
    blocks = byte_dm.blocks("train")
    epoch0 = torch.cat(list(loader))
    epoch1 = torch.cat(list(loader))
    assert epoch0.shape == blocks.shape and not torch.equal(epoch0, blocks)  # shuffled
    key = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
    assert key(epoch0) == key(blocks)  # every block once per epoch
    assert not torch.equal(epoch0, epoch1)
    loader.sampler.set_epoch(0)  # type: ignore[union-attr]
    assert torch.equal(torch.cat(list(loader)), epoch0)  # the order of an epoch depends on seed + epoch alone


# --- saving and restoring the tokenizer --------------------------------------------------------------


def test_state_dict_restores_the_checkpoint_tokenizer(bpe: PythonDocsDataModule) -> None:
    state = bpe.state_dict()
    assert state["tokenizer"] == "bpe" and json.loads(state["tokenizer_json"])["model"]["type"] == "BPE"
    # A module whose own training would differ (another size) uses the checkpoint's tokenizer, untrained.
    other = PythonDocsDataModule(vocab_size=512)
    other.load_state_dict(state)
    assert other.vocab_size == 2048
    assert torch.equal(other.split_ids("val"), bpe.split_ids("val"))
    # Already trained and encoded: it warns, switches, and encodes anew.
    trained = PythonDocsDataModule(vocab_size=512)
    assert trained.vocab_size == 512 and len(trained.split_ids("val")) > len(bpe.split_ids("val"))
    with pytest.warns(UserWarning, match="the saved tokenizer differs from the one trained here"):
        trained.load_state_dict(state)
    assert torch.equal(trained.split_ids("val"), bpe.split_ids("val"))


def test_state_dict_round_trip_for_bytes(byte_dm: PythonDocsDataModule) -> None:
    fresh = PythonDocsDataModule(tokenizer="bytes")
    fresh.load_state_dict(byte_dm.state_dict())
    assert fresh.vocab_size == 256 and fresh.decode(fresh.encode("ok é")) == "ok é"
    fresh.load_state_dict({})  # nothing saved: nothing changes
    assert fresh.vocab_size == 256


def test_save_and_load_tokenizer(bpe: PythonDocsDataModule, byte_dm: PythonDocsDataModule, tmp_path: Path) -> None:
    path = bpe.save_tokenizer(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.json"
    text = bpe.text("test")
    assert Tokenizer.from_file(str(path)).encode(text).ids == bpe.split_ids("test").tolist()  # HF reads it
    for where in (path, path.parent):
        fresh = PythonDocsDataModule(vocab_size=300)
        fresh.load_tokenizer(where)
        assert fresh.vocab_size == 2048 and fresh.encode(text) == bpe.split_ids("test").tolist()

    stub = byte_dm.save_tokenizer(tmp_path / "bytes")
    fresh = PythonDocsDataModule(tokenizer="bytes")
    fresh.load_tokenizer(stub)
    assert fresh.vocab_size == 256
    with pytest.raises(ValueError, match="the saved tokenizer is 'bytes' but this module's `tokenizer` is 'bpe'"):
        PythonDocsDataModule().load_tokenizer(stub)
    with pytest.raises(ValueError, match="the saved tokenizer is 'bpe' but this module's `tokenizer` is 'bytes'"):
        fresh.load_state_dict(bpe.state_dict())


def test_setup_writes_tokenizer_dir_and_a_restore_rewrites_it(bpe: PythonDocsDataModule, tmp_path: Path) -> None:
    target = tmp_path / "run" / "tok"
    dm = PythonDocsDataModule(vocab_size=300, tokenizer_dir=str(target))
    dm.setup("fit")
    written = (target / "tokenizer.json").read_text()
    assert Tokenizer.from_str(written).get_vocab_size() == 300
    with pytest.warns(UserWarning, match="the saved tokenizer differs"):
        dm.load_state_dict(bpe.state_dict())
    assert (target / "tokenizer.json").read_text() == bpe.state_dict()["tokenizer_json"]
    assert [p.name for p in target.iterdir()] == ["tokenizer.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("content", "match"),
    [("not json", "is not a tokenizer JSON"), ('{"model": 3}', "is not a Hugging Face tokenizer JSON")],
)
def test_a_file_that_is_no_tokenizer_is_refused(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        PythonDocsDataModule().load_tokenizer(tmp_path)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"tokenizer": "bep"},
            ValueError,
            r"`tokenizer` must be one of \('bpe', 'bytes'\), got 'bep' \(did you mean 'bpe'\?\)",
        ),
        ({"tokenizer": "byte"}, ValueError, r"got 'byte' \(did you mean 'bytes'\?\)"),
        ({"tokenizer": "words"}, ValueError, r"`tokenizer` must be one of \('bpe', 'bytes'\), got 'words'$"),
        ({"tokenizer": None}, ValueError, r"`tokenizer` must be one of \('bpe', 'bytes'\), got None"),
        ({"vocab_size": 255}, ValueError, "`vocab_size` must be >= 256, got 255"),
        ({"block_size": 0}, ValueError, "`block_size` must be >= 1, got 0"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be >= 1, got 0"),
        ({"num_workers": -1}, ValueError, "`num_workers` must be >= 0, got -1"),
        ({"val_topics": 0.0}, ValueError, r"`val_topics` must be in \(0, 1\), got 0.0"),
        ({"test_topics": 1.0}, ValueError, r"`test_topics` must be in \(0, 1\), got 1.0"),
        ({"val_topics": float("nan")}, ValueError, r"`val_topics` must be in \(0, 1\), got nan"),
        (
            {"val_topics": 0.5, "test_topics": 0.5},
            ValueError,
            r"must leave topics to train on: 0.5 \+ 0.5 of 79 topics takes 40 \+ 40",
        ),
        ({"vocab_size": 2048.0}, TypeError, "`vocab_size` must be an int, got 2048.0 of type float"),
        ({"block_size": True}, TypeError, "`block_size` must be an int, got True of type bool"),
        ({"seed": "0"}, TypeError, "`seed` must be an int, got '0' of type str"),
        ({"val_topics": "0.1"}, TypeError, "`val_topics` must be a float, got '0.1' of type str"),
        ({"tokenizer_dir": 3}, TypeError, "`tokenizer_dir` must be a path or None, got 3"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        PythonDocsDataModule(**kwargs)  # type: ignore[arg-type]


def test_tokenizer_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "tokenizer.json"
    file.write_text("{}")
    with pytest.raises(ValueError, match=r"`tokenizer_dir` must be a directory, got the file .*tokenizer\.json"):
        PythonDocsDataModule(tokenizer_dir=file)


def test_a_split_too_short_for_one_block_is_refused_in_setup() -> None:
    dm = PythonDocsDataModule(tokenizer="bytes", block_size=20_000)
    with pytest.raises(
        ValueError, match=r"the val split has 16956 tokens, too few for one block of `block_size` \+ 1 = 20001"
    ):
        dm.setup("fit")


def test_bad_split_ids_and_text_are_refused(byte_dm: PythonDocsDataModule) -> None:
    with pytest.raises(ValueError, match=r"`split` must be one of \('train', 'val', 'test'\), got 'dev'"):
        byte_dm.text("dev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`split` must be one of .*got 'validation'"):
        byte_dm.blocks("validation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`ids` must be in \[0, 256\) \(the vocabulary\), got \[256, -1\]"):
        byte_dm.decode([65, 256, -1])
    with pytest.raises(ValueError, match=r"`ids` must be a 1-D tensor \[T\], got shape \(1, 2\)"):
        byte_dm.decode(torch.tensor([[65, 66]]))
    with pytest.raises(TypeError, match="`text` must be a str, got bytes"):
        byte_dm.encode(b"abc")  # type: ignore[arg-type]
