"""NumberWordsDataModule: tokenization, splits, vocabularies, batches, shuffling and argument checks."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from num2words import num2words

from llmkit.data import NumberWordsDataModule, Vocab, detokenize, tokenize
from llmkit.data.numbers import EpochShuffleSampler, _number_words
from tests.accelerator import ACCELERATOR

LANGS = ["en", "fr", "de", "es"]


def make(**kwargs: Any) -> NumberWordsDataModule:
    """A module on [0, 999] by default, with the warnings about <unk> words silenced."""
    kwargs = {"high": 999, "val_size": 100, "test_size": 100, "batch_size": 16, **kwargs}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*map to <unk>")
        return NumberWordsDataModule(**kwargs)


@pytest.fixture(scope="module")
def default_dm() -> NumberWordsDataModule:
    return NumberWordsDataModule()


# --- tokenization ---------------------------------------------------------------------------------


def test_tokenize_splits_hyphens_and_commas() -> None:
    assert tokenize("twenty-one") == ["twenty", "-", "one"]
    assert tokenize("one thousand, two") == ["one", "thousand", ",", "two"]
    assert tokenize("quatre-vingt-dix-neuf") == ["quatre", "-", "vingt", "-", "dix", "-", "neuf"]
    assert tokenize("vingt et un") == ["vingt", "et", "un"]
    assert tokenize("") == []
    assert detokenize([]) == ""
    assert detokenize(["one", "thousand", ",", "two", "hundred", "and", "twenty", "-", "one"]) == (
        "one thousand, two hundred and twenty-one"
    )


@pytest.mark.parametrize("lang", LANGS)
def test_detokenize_inverts_tokenize_on_num2words(lang: str) -> None:
    # Every number of the default range (through the module's cache of num2words' texts, which the
    # data module tests reuse), then a sparse sweep up to ten million (commas, "millions").
    dense = _number_words(lang, 0, 9_999)
    assert len(dense) == 10_000 and dense[421] == num2words(421, lang=lang)
    sparse = [num2words(number, lang=lang) for number in range(10_000, 10_000_000, 4_999)]
    for number, text in enumerate([*dense, *sparse]):
        assert detokenize(tokenize(text)) == text, (number, lang, tokenize(text))


# --- splits ---------------------------------------------------------------------------------------


def test_default_splits_are_disjoint_and_cover_the_range(default_dm: NumberWordsDataModule) -> None:
    splits = {split: default_dm.numbers(split) for split in ("train", "val", "test")}
    assert {split: len(numbers) for split, numbers in splits.items()} == {"train": 9000, "val": 500, "test": 500}
    assert sorted(n for numbers in splits.values() for n in numbers) == list(range(10_000))


def test_sizes_are_respected_and_test_split_does_not_move() -> None:
    small = make(train_size=50, val_size=30, test_size=20)
    full = make(val_size=30, test_size=20)
    assert [len(small.numbers(s)) for s in ("train", "val", "test")] == [50, 30, 20]
    assert len(full.numbers("train")) == 1000 - 50
    assert small.numbers("test") == full.numbers("test") and small.numbers("val") == full.numbers("val")
    assert small.numbers("train") == full.numbers("train")[:50]
    assert len({*small.numbers("train"), *small.numbers("val"), *small.numbers("test")}) == 100


def test_same_seed_same_splits_other_seed_other_splits() -> None:
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for split in ("train", "val", "test"):
        assert a.numbers(split) == b.numbers(split)
        assert a.pairs(split) == b.pairs(split)
        assert a.numbers(split) != c.numbers(split)
    assert a.src_vocab == b.src_vocab and a.tgt_vocab == b.tgt_vocab


def test_pairs_are_num2words_texts() -> None:
    dm = make(src_lang="de", tgt_lang="es", high=1500)
    for split in ("train", "val", "test"):
        for number, (src, tgt) in zip(dm.numbers(split), dm.pairs(split), strict=True):
            assert src == num2words(number, lang="de") and tgt == num2words(number, lang="es")


# --- vocabularies and lengths ---------------------------------------------------------------------


def test_vocab_sizes_are_known_before_setup(default_dm: NumberWordsDataModule) -> None:
    dm = NumberWordsDataModule()  # no setup(), no dataloader
    assert dm.src_vocab_size == len(dm.src_vocab) == default_dm.src_vocab_size
    assert dm.tgt_vocab_size == len(dm.tgt_vocab) == default_dm.tgt_vocab_size
    assert isinstance(dm.src_vocab, Vocab) and dm.src_vocab_size > 4 and dm.tgt_vocab_size > 4
    assert (dm.pad_id, dm.bos_id, dm.eos_id) == (Vocab.PAD_ID, Vocab.BOS_ID, Vocab.EOS_ID) == (0, 1, 2)
    assert dict(dm.hparams) == {
        "src_lang": "en", "tgt_lang": "fr", "low": 0, "high": 9_999, "val_size": 500, "test_size": 500,
        "train_size": None, "batch_size": 64, "seed": 0, "num_workers": 0,
    }  # fmt: skip


def test_vocabularies_come_from_the_training_split(default_dm: NumberWordsDataModule) -> None:
    train = default_dm.pairs("train")
    assert set(default_dm.src_vocab.itos[4:]) == {w for src, _ in train for w in tokenize(src)}
    assert set(default_dm.tgt_vocab.itos[4:]) == {w for _, tgt in train for w in tokenize(tgt)}
    # With the defaults no validation or test word is missing from the training split.
    for split in ("val", "test"):
        for src, tgt in default_dm.pairs(split):
            assert all(w in default_dm.src_vocab for w in tokenize(src))
            assert all(w in default_dm.tgt_vocab for w in tokenize(tgt))


def test_words_seen_only_outside_train_map_to_unk() -> None:
    # The teens are one word each in English: in [0, 19] the val/test ones are unknown.
    with pytest.warns(UserWarning, match=r"word\(s\) of the (val|test) split are not in the training split"):
        dm = NumberWordsDataModule(high=19, val_size=3, test_size=3, batch_size=8)
    batch = next(iter(dm.val_dataloader()))
    for row, (src, _) in zip(batch["src"], dm.pairs("val"), strict=True):
        assert src not in dm.src_vocab
        assert row[0].item() == Vocab.UNK_ID and row[1].item() == Vocab.EOS_ID
        assert dm.decode(row, side="src") == "<unk>"


def test_max_lengths_cover_every_split(default_dm: NumberWordsDataModule) -> None:
    src_lens = [len(tokenize(s)) + 1 for split in ("train", "val", "test") for s, _ in default_dm.pairs(split)]
    tgt_lens = [len(tokenize(t)) + 2 for split in ("train", "val", "test") for _, t in default_dm.pairs(split)]
    assert default_dm.max_src_len == max(src_lens)
    assert default_dm.max_tgt_len == max(tgt_lens)


# --- batches --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", ["train", "val", "test", "predict"])
def test_batches_are_padded_with_bos_and_eos_in_place(loader: str) -> None:
    dm = make()
    batches = list(getattr(dm, f"{loader}_dataloader")())
    assert sum(len(batch["number"]) for batch in batches) == len(dm.numbers("test" if loader == "predict" else loader))
    for batch in batches[:3]:
        src, tgt, number = batch["src"], batch["tgt"], batch["number"]
        assert src.dtype == tgt.dtype == number.dtype == torch.long
        assert src.ndim == tgt.ndim == 2 and src.shape[0] == tgt.shape[0] == number.shape[0] <= dm.batch_size
        assert src.shape[1] <= dm.max_src_len and tgt.shape[1] <= dm.max_tgt_len
        assert (tgt[:, 0] == dm.bos_id).all() and (src != dm.bos_id).all()
        for src_row, tgt_row, n in zip(src, tgt, number.tolist(), strict=True):
            for row, words, first in ((src_row, tokenize(num2words(n, lang="en")), 0), (tgt_row, None, 1)):
                eos = (row == dm.eos_id).nonzero().flatten().tolist()
                assert len(eos) == 1  # one EOS, then only padding
                assert (row[eos[0] + 1 :] == dm.pad_id).all() and (row[: eos[0]] != dm.pad_id).all()
                if words is not None:
                    assert eos[0] - first == len(words)
            assert dm.decode(src_row, side="src") == num2words(n, lang="en")
            assert dm.decode(tgt_row) == dm.decode(tgt_row.tolist(), side="tgt") == num2words(n, lang="fr")
        # Padding is only as long as the longest row of the batch.
        assert (src[:, -1] != dm.pad_id).any() and (tgt[:, -1] != dm.pad_id).any()


def test_evaluation_loaders_keep_the_split_order() -> None:
    dm = make()
    for loader, split in (("val", "val"), ("test", "test"), ("predict", "test")):
        order = [n for batch in getattr(dm, f"{loader}_dataloader")() for n in batch["number"].tolist()]
        assert order == dm.numbers(split)


def test_collate_pads_on_the_right() -> None:
    batch = NumberWordsDataModule.collate(
        [(torch.tensor([7, 2]), torch.tensor([1, 5, 2]), 3), (torch.tensor([6, 8, 9, 2]), torch.tensor([1, 2]), 11)]
    )
    assert batch["src"].tolist() == [[7, 2, 0, 0], [6, 8, 9, 2]]
    assert batch["tgt"].tolist() == [[1, 5, 2], [1, 2, 0]]
    assert batch["number"].tolist() == [3, 11]


# --- training order -------------------------------------------------------------------------------


def epoch_order(loader: torch.utils.data.DataLoader) -> list[int]:
    return [n for batch in loader for n in batch["number"].tolist()]


def test_train_order_depends_on_seed_and_epoch_only() -> None:
    """Epoch ``e`` is shuffled by ``torch.randperm`` seeded with ``seed + e``.

    Without Lightning each full pass over a train loader moves to the next epoch; ``set_epoch`` (which
    Lightning calls each epoch) jumps to any epoch, so a resumed run sees the same orders.
    """
    dm_a, dm_b, dm_c = make(seed=5), make(seed=5), make(seed=6)
    loader_a, loader_b = dm_a.train_dataloader(), dm_b.train_dataloader()
    a = [epoch_order(loader_a) for _ in range(3)]
    b = [epoch_order(loader_b) for _ in range(3)]
    assert a == b  # same seed: same order, epoch by epoch
    assert a[0] != a[1] != a[2]  # a new order each epoch
    assert all(sorted(order) == sorted(dm_a.numbers("train")) for order in a)
    assert a[0] != dm_a.numbers("train")  # shuffled
    assert epoch_order(dm_c.train_dataloader()) != a[0]  # another seed, another order
    # Jumping to an epoch, as a resumed run does, gives that epoch's order.
    fresh = dm_a.train_dataloader()
    fresh.sampler.set_epoch(2)
    assert epoch_order(fresh) == a[2]
    # The order of epoch e is randperm seeded by seed + e.
    train = dm_a.numbers("train")
    expected = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(5 + 1)).tolist()]
    assert a[1] == expected


def test_epoch_shuffle_sampler() -> None:
    sampler = EpochShuffleSampler(size=10, seed=0)
    assert len(sampler) == 10
    orders = [list(sampler) for _ in range(2)]
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(10))
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]


class _RecordNumbers(pl.LightningModule):
    """Records the numbers of each training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen[-1].extend(batch["number"].tolist())
        return (self.weight * batch["src"].float().mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_sets_the_epoch_of_the_sampler() -> None:
    dm = make(high=199, val_size=10, test_size=10, batch_size=32, seed=1)
    model = _RecordNumbers()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator=ACCELERATOR,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    loader = make(high=199, val_size=10, test_size=10, batch_size=32, seed=1).train_dataloader()
    assert model.seen == [epoch_order(loader) for _ in range(3)]


# --- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"src_lang": "xx"}, ValueError, r"`src_lang` must be one of num2words' languages \[.*'en'.*\], got 'xx'"),
        ({"tgt_lang": "french"}, ValueError, r"`tgt_lang` must be one of num2words' languages .*, got 'french'"),
        ({"tgt_lang": 3}, TypeError, r"`tgt_lang` must be a num2words language code \(str\), got 3"),
        ({"low": 10, "high": 5}, ValueError, r"`low` must be <= `high`, got low=10 > high=5"),
        ({"high": 9, "val_size": 5, "test_size": 5}, ValueError, r"val_size \+ test_size = 10 leaves no training"),
        (
            {"high": 99, "val_size": 10, "test_size": 10, "train_size": 81},
            ValueError,
            r"train_size \+ val_size \+ test_size = 101 is more than the 100 numbers in \[0, 99\]",
        ),
        ({"train_size": 0}, ValueError, r"`train_size` must be >= 1 or None, got 0"),
        ({"val_size": -1}, ValueError, r"`val_size` must be >= 0, got -1"),
        ({"test_size": -2}, ValueError, r"`test_size` must be >= 0, got -2"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be >= 1, got 0"),
        ({"num_workers": -1}, ValueError, r"`num_workers` must be >= 0, got -1"),
        ({"high": 99.5}, TypeError, r"`high` must be an int, got 99.5 of type float"),
        ({"batch_size": True}, TypeError, r"`batch_size` must be an int, got True of type bool"),
        ({"train_size": "all"}, TypeError, r"`train_size` must be an int, got 'all' of type str"),
        (
            {"tgt_lang": "es", "low": 10**27, "high": 10**27 + 5, "val_size": 1, "test_size": 1},
            ValueError,
            rf"num2words cannot write {10**27} in language 'es' \(OverflowError: .*\); try a smaller range",
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make(**kwargs)


def test_bad_split_and_side_raise() -> None:
    dm = make(high=99, val_size=5, test_size=5)
    with pytest.raises(ValueError, match=r"`split` must be one of \('train', 'val', 'test'\), got 'dev'"):
        dm.numbers("dev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`split` must be one of .*, got 'validation'"):
        dm.pairs("validation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`side` must be one of \('src', 'tgt'\), got 'source'"):
        dm.decode([1, 2], side="source")  # type: ignore[arg-type]
