"""NumberWords: translate numbers written in words from one language to another (no download)."""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler

from llmkit.data.vocab import Vocab

Split = Literal["train", "val", "test"]
Side = Literal["src", "tgt"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

# A word is a run of anything but spaces, '-' and ','; '-' and ',' are tokens of their own.
_TOKEN = re.compile(r"[^\s,\-]+|[,\-]")


def tokenize(text: str) -> list[str]:
    """Split number words into words, keeping ``-`` and ``,`` as tokens of their own.

    Args:
        text: e.g. ``num2words(1021)``.

    Returns:
        The tokens; :func:`detokenize` gives ``text`` back whenever it is spaced as num2words spaces
        (one space between words, none around ``-``, none before ``,``).

    Examples:
        >>> tokenize("one thousand, two hundred and twenty-one")
        ['one', 'thousand', ',', 'two', 'hundred', 'and', 'twenty', '-', 'one']
    """
    return _TOKEN.findall(text)


def detokenize(words: Sequence[str]) -> str:
    """Join tokens into text: the inverse of :func:`tokenize`.

    Args:
        words: tokens, ``-`` and ``,`` among them.

    Returns:
        The words joined by spaces, with no space around ``-`` and none before ``,``.

    Examples:
        >>> detokenize(["quatre", "-", "vingt", "-", "un", ",", "un"])
        'quatre-vingt-un, un'
    """
    parts: list[str] = []
    glue = True  # no space before the first word, nor after a '-'
    for word in words:
        if not (glue or word in ("-", ",")):
            parts.append(" ")
        parts.append(word)
        glue = word == "-"
    return "".join(parts)


def _converters() -> dict[str, Any]:
    try:
        from num2words import CONVERTER_CLASSES  # type: ignore[import-untyped]
    except ModuleNotFoundError as error:  # pragma: no cover - the `data` extra is part of `dev`
        raise ModuleNotFoundError("NumberWordsDataModule needs num2words: `pip install 'llmkit[data]'`") from error
    return dict(CONVERTER_CLASSES)


def _check_lang(name: str, lang: object) -> None:
    # num2words falls back to the first two letters of an unknown code ("english" -> "en",
    # "fra" -> "fr"), so it never says no to a typo: we accept only its exact codes.
    if not isinstance(lang, str):
        raise TypeError(f"`{name}` must be a num2words language code (str), got {lang!r}")
    choices = sorted(_converters())
    if lang not in choices:
        raise ValueError(f"`{name}` must be one of num2words' languages {choices}, got {lang!r}")


@functools.lru_cache(maxsize=8)
def _number_words(lang: str, low: int, high: int) -> tuple[str, ...]:
    """``num2words(n, lang=lang)`` for every ``n`` in ``[low, high]``, cached: fr takes ~1.5 s per 10k."""
    from num2words import num2words

    texts = []
    for number in range(low, high + 1):
        try:
            texts.append(str(num2words(number, lang=lang)))
        except (NotImplementedError, OverflowError, ValueError, TypeError) as error:
            raise ValueError(
                f"num2words cannot write {number} in language {lang!r} "
                f"({type(error).__name__}: {error or 'not implemented'}); try a smaller range [low, high]"
            ) from error
    return tuple(texts)


class _Examples(Dataset[tuple[Tensor, Tensor, int]]):
    """Encoded ``(src, tgt, number)`` triples of one split."""

    def __init__(self, src: list[Tensor], tgt: list[Tensor], numbers: list[int]) -> None:
        self.src, self.tgt, self.numbers = src, tgt, numbers

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.src[index], self.tgt[index], self.numbers[index]


class EpochShuffleSampler(Sampler[int]):
    """Shuffle ``range(size)`` anew each epoch, from ``seed + epoch`` alone.

    The order of epoch ``e`` is ``torch.randperm(size)`` drawn from a generator seeded with
    ``seed + e`` (``DistributedSampler``'s rule), so it does not depend on what ran before: a run
    resumed from a checkpoint sees the orders an uninterrupted run would have seen. Lightning calls
    :meth:`set_epoch` before each training epoch (also through its distributed wrapper, whose ranks
    then share the order and take their own slices). Without Lightning, each full pass over the
    sampler moves on to the next epoch by itself, so a plain ``for epoch ...`` loop gets epochs
    0, 1, 2, ... unless it calls :meth:`set_epoch`.

    Args:
        size: the number of examples.
        seed: the base seed.

    Examples:
        >>> sampler = EpochShuffleSampler(size=5, seed=0)
        >>> first, second = list(sampler), list(sampler)
        >>> sampler.set_epoch(0)
        >>> list(sampler) == first and first != second and sorted(second) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, *, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        yield from torch.randperm(self.size, generator=generator).tolist()


class NumberWordsDataModule(LightningDataModule):
    """Numbers written in words in two languages: a translation task that downloads nothing.

    Each number of ``[low, high]`` gives one pair, e.g. English ``"four hundred and twenty-one"``
    and French ``"quatre cent vingt et un"``, written by ``num2words``. The numbers are shuffled
    with ``random.Random(seed)`` and cut into test, validation and training splits, in that order,
    so that no number is in two splits and the test split does not move when ``train_size`` changes.
    Texts are split into words by :func:`tokenize`; the two word-level vocabularies are built in
    ``__init__`` from the training split alone (a word seen only in validation or test maps to
    ``<unk>``, and a warning says so), so that their sizes are known before ``setup``, e.g. for
    ``LightningCLI``'s argument links.

    Batches are ``{"src": LongTensor[B, S], "tgt": LongTensor[B, T], "number": LongTensor[B]}``:
    ``src`` is the words then ``<eos>``, ``tgt`` is ``<bos>``, the words, ``<eos>``, both padded on
    the right with ``pad_id`` (0). Training batches are shuffled by :class:`EpochShuffleSampler`
    (the order of epoch ``e`` depends on ``seed + e`` alone); validation, test and predict batches
    keep the split's order, and predict is the test split.

    Note:
        The vocabularies are word-level, so languages that write a number as one compound word suit
        them badly: in German ``num2words(4321, lang="de")`` is ``"viertausenddreihunderteinundzwanzig"``,
        every number is a word of its own and every validation and test word is ``<unk>`` (with the
        defaults en->fr has none, en->es none, en->de 500 per split). ``"en"``, ``"fr"`` and ``"es"`` work well.

    Args:
        src_lang: num2words language code of the source, e.g. ``"en"``, ``"fr"``, ``"de"``, ``"es"``.
        tgt_lang: num2words language code of the target.
        low: the smallest number.
        high: the largest number (inclusive).
        val_size: the number of validation pairs.
        test_size: the number of test pairs.
        train_size: the number of training pairs; ``None`` takes every number left.
        batch_size: pairs per batch.
        seed: seeds the split and the training order.
        num_workers: ``DataLoader`` worker processes.

    Raises:
        ValueError: for an unknown language, ``low > high``, negative split sizes, splits that do not fit in
            ``[low, high]``, an empty training split, ``batch_size < 1``, ``num_workers < 0``, or a number
            num2words cannot write.
        TypeError: for arguments of the wrong type.

    Examples:
        >>> dm = NumberWordsDataModule(low=20, high=99, val_size=4, test_size=4, batch_size=4)
        >>> dm.pairs("train")[0]
        ('eighty-six', 'quatre-vingt-six')
        >>> dm.src_vocab_size, dm.tgt_vocab_size, dm.max_src_len, dm.max_tgt_len
        (22, 28, 4, 9)
        >>> batch = next(iter(dm.val_dataloader()))
        >>> batch["src"].shape, batch["tgt"].shape, batch["number"].tolist()
        (torch.Size([4, 4]), torch.Size([4, 7]), [44, 51, 88, 31])
        >>> batch["tgt"][0].tolist()
        [1, 14, 4, 16, 2, 0, 0]
        >>> dm.decode(batch["tgt"][0])
        'quarante-quatre'
    """

    def __init__(
        self,
        src_lang: str = "en",
        tgt_lang: str = "fr",
        low: int = 0,
        high: int = 9_999,
        val_size: int = 500,
        test_size: int = 500,
        train_size: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_lang("src_lang", src_lang)
        _check_lang("tgt_lang", tgt_lang)
        train_size = _check_sizes(
            low=low, high=high, val_size=val_size, test_size=test_size, train_size=train_size, seed=seed
        )
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            _check_int(name, value)
            if value < least:
                raise ValueError(f"`{name}` must be >= {least}, got {value}")
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

        numbers = list(range(low, high + 1))
        random.Random(seed).shuffle(numbers)
        self._numbers: dict[str, list[int]] = {
            "test": numbers[:test_size],
            "val": numbers[test_size : test_size + val_size],
            "train": numbers[test_size + val_size : test_size + val_size + train_size],
        }
        src_texts, tgt_texts = _number_words(src_lang, low, high), _number_words(tgt_lang, low, high)
        self._pairs = {
            split: [(src_texts[n - low], tgt_texts[n - low]) for n in split_numbers]
            for split, split_numbers in self._numbers.items()
        }
        self._check_round_trip()

        tokens = {split: [(tokenize(s), tokenize(t)) for s, t in pairs] for split, pairs in self._pairs.items()}
        self._src_vocab = Vocab.build(src for src, _ in tokens["train"])
        self._tgt_vocab = Vocab.build(tgt for _, tgt in tokens["train"])
        self._warn_unknown_words(tokens)
        self._datasets = {
            split: _Examples(
                [torch.tensor(self._src_vocab.encode(src, add_eos=True)) for src, _ in split_tokens],
                [torch.tensor(self._tgt_vocab.encode(tgt, add_bos=True, add_eos=True)) for _, tgt in split_tokens],
                self._numbers[split],
            )
            for split, split_tokens in tokens.items()
        }
        self._max_src_len = max(len(src) for dataset in self._datasets.values() for src in dataset.src)
        self._max_tgt_len = max(len(tgt) for dataset in self._datasets.values() for tgt in dataset.tgt)

    @property
    def src_vocab(self) -> Vocab:
        """The source vocabulary (training words)."""
        return self._src_vocab

    @property
    def tgt_vocab(self) -> Vocab:
        """The target vocabulary (training words)."""
        return self._tgt_vocab

    @property
    def src_vocab_size(self) -> int:
        """``len(src_vocab)``, specials included."""
        return len(self._src_vocab)

    @property
    def tgt_vocab_size(self) -> int:
        """``len(tgt_vocab)``, specials included."""
        return len(self._tgt_vocab)

    @property
    def pad_id(self) -> int:
        """The padding id of both sides (0)."""
        return Vocab.PAD_ID

    @property
    def bos_id(self) -> int:
        """The begin-of-sequence id of both sides (1)."""
        return Vocab.BOS_ID

    @property
    def eos_id(self) -> int:
        """The end-of-sequence id of both sides (2)."""
        return Vocab.EOS_ID

    @property
    def max_src_len(self) -> int:
        """The longest encoded source over all splits, ``<eos>`` included."""
        return self._max_src_len

    @property
    def max_tgt_len(self) -> int:
        """The longest encoded target over all splits, ``<bos>`` and ``<eos>`` included."""
        return self._max_tgt_len

    def numbers(self, split: Split) -> list[int]:
        """The numbers of ``split`` (``"train"``, ``"val"`` or ``"test"``), in dataloader order before shuffling."""
        return list(self._numbers[_check_split(split)])

    def pairs(self, split: Split) -> list[tuple[str, str]]:
        """The ``(source text, target text)`` pairs of ``split``, in the order of :meth:`numbers`."""
        return list(self._pairs[_check_split(split)])

    def decode(self, ids: Sequence[int] | Tensor, side: Side = "tgt") -> str:
        """Turn ids of one side into text.

        Args:
            ids: a list of ids or a 1-D tensor ``[T]``, e.g. a row of a batch or of ``generate``'s output;
                ``<bos>`` and ``<pad>`` are skipped and decoding stops at the first ``<eos>``.
            side: ``"src"`` or ``"tgt"``, the vocabulary to read the ids with.

        Returns:
            The detokenized text (unknown words read ``<unk>``).

        Raises:
            ValueError: for another ``side``, or ids the vocabulary does not have.

        Examples:
            >>> dm = NumberWordsDataModule(low=20, high=99, val_size=4, test_size=4)
            >>> dm.decode(dm.src_vocab.encode(tokenize("twenty-one"), add_eos=True), side="src")
            'twenty-one'
        """
        vocabs = {"src": self._src_vocab, "tgt": self._tgt_vocab}
        if side not in vocabs:
            raise ValueError(f"`side` must be one of {tuple(vocabs)}, got {side!r}")
        return detokenize(vocabs[side].decode(ids))

    @staticmethod
    def collate(examples: Sequence[tuple[Tensor, Tensor, int]]) -> dict[str, Tensor]:
        """Pad ``(src, tgt, number)`` examples on the right with ``pad_id`` into one batch.

        Args:
            examples: ``src: LongTensor[S_i]``, ``tgt: LongTensor[T_i]`` and the number, per example.

        Returns:
            ``{"src": LongTensor[B, S], "tgt": LongTensor[B, T], "number": LongTensor[B]}``, ``S`` and ``T``
            the longest in the batch.

        Examples:
            >>> batch = NumberWordsDataModule.collate([(torch.tensor([5, 2]), torch.tensor([1, 6, 2]), 7),
            ...                                        (torch.tensor([2]), torch.tensor([1, 2]), 0)])
            >>> batch["src"].tolist(), batch["tgt"].tolist(), batch["number"].tolist()
            ([[5, 2], [2, 0]], [[1, 6, 2], [1, 2, 0]], [7, 0])
        """
        src, tgt, numbers = zip(*examples, strict=True)
        return {
            "src": pad_sequence(list(src), batch_first=True, padding_value=Vocab.PAD_ID),
            "tgt": pad_sequence(list(tgt), batch_first=True, padding_value=Vocab.PAD_ID),
            "number": torch.tensor(numbers, dtype=torch.long),
        }

    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """Training batches, shuffled by :class:`EpochShuffleSampler` (``seed + epoch``)."""
        dataset = self._datasets["train"]
        return self._loader(dataset, sampler=EpochShuffleSampler(size=len(dataset), seed=self.seed))

    def val_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """Validation batches, in split order."""
        return self._loader(self._datasets["val"])

    def test_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """Test batches, in split order."""
        return self._loader(self._datasets["test"])

    def predict_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """The test batches, in split order."""
        return self._loader(self._datasets["test"])

    def _loader(self, dataset: _Examples, sampler: Sampler[int] | None = None) -> DataLoader[dict[str, Tensor]]:
        return DataLoader(
            dataset,  # type: ignore[arg-type]  # the collate function turns the triples into dicts
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
        )

    def _check_round_trip(self) -> None:
        # decode() promises num2words' own text; say so when a language spaces words otherwise.
        for split_pairs in self._pairs.values():
            for pair in split_pairs:
                for text, lang in zip(pair, (self.src_lang, self.tgt_lang), strict=True):
                    if detokenize(tokenize(text)) != text:
                        rank_zero_warn(
                            f"NumberWordsDataModule: {lang!r} text {text!r} does not survive tokenize/detokenize "
                            f"(it reads {detokenize(tokenize(text))!r}); decoded texts will differ from num2words'"
                        )
                        return

    def _warn_unknown_words(self, tokens: dict[str, list[tuple[list[str], list[str]]]]) -> None:
        for split in ("val", "test"):
            for side, vocab in ((0, self._src_vocab), (1, self._tgt_vocab)):
                unknown = sorted({word for pair in tokens[split] for word in pair[side] if word not in vocab})
                if unknown:
                    rank_zero_warn(
                        f"NumberWordsDataModule: {len(unknown)} {('src', 'tgt')[side]} word(s) of the {split} split "
                        f"are not in the training split and map to <unk>: {unknown[:10]}"
                    )


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}")


def _check_sizes(*, low: int, high: int, val_size: int, test_size: int, train_size: int | None, seed: int) -> int:
    """Validate the range and split sizes; return the training size."""
    for name, value in (("low", low), ("high", high), ("val_size", val_size), ("test_size", test_size), ("seed", seed)):
        _check_int(name, value)
    if low > high:
        raise ValueError(f"`low` must be <= `high`, got low={low} > high={high}")
    for name, value in (("val_size", val_size), ("test_size", test_size)):
        if value < 0:
            raise ValueError(f"`{name}` must be >= 0, got {value}")
    total = high - low + 1
    left = total - val_size - test_size
    if train_size is None:
        if left < 1:
            raise ValueError(
                f"val_size + test_size = {val_size + test_size} leaves no training numbers in "
                f"[{low}, {high}] ({total} numbers)"
            )
        return left
    _check_int("train_size", train_size)
    if train_size < 1:
        raise ValueError(f"`train_size` must be >= 1 or None, got {train_size}")
    if train_size > left:
        raise ValueError(
            f"train_size + val_size + test_size = {train_size + val_size + test_size} is more than the "
            f"{total} numbers in [{low}, {high}]"
        )
    return train_size


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return split
