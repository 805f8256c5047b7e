"""PythonDocs: a language-modelling corpus that ships with CPython (``pydoc_data.topics``, no download)."""

from __future__ import annotations

import difflib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from llmkit.data.numbers import SPLITS, EpochShuffleSampler, Split, _check_int, _check_split

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZERS: tuple[str, ...] = ("bpe", "bytes")
# Between two topics of a split: each topic ends with "\n", so two blank lines part them.
SEPARATOR = "\n\n"
TOKENIZER_FILE = "tokenizer.json"


def _topics() -> dict[str, str]:
    """CPython's own help texts: ``pydoc_data.topics.topics``, topic name -> English text."""
    from pydoc_data.topics import topics

    return dict(topics)


class _Tokenizer(Protocol):
    """What the data module needs of a tokenizer: ids in ``[0, vocab_size)``, text back, a JSON form."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> str: ...


class _ByteTokenizer:
    """UTF-8 bytes: id ``b`` is byte ``b``; 256 ids, nothing to train."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A cut inside a multi-byte character reads U+FFFD, as the byte-level BPE decoder does.
        return bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": "bytes", "vocab_size": 256})


class _BPETokenizer:
    """A Hugging Face ``tokenizers`` byte-level BPE (GPT-2's pre-tokenization, no special tokens)."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> _BPETokenizer:
        """Train on ``texts`` up to ``vocab_size`` ids (the 256 byte symbols first, then one per merge)."""
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ModuleNotFoundError as error:  # pragma: no cover - the `data` extra is part of `dev`
            raise ModuleNotFoundError(
                "PythonDocsDataModule(tokenizer='bpe') needs tokenizers: `pip install 'llmkit[data]'`"
            ) from error

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text encodes
            special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> _BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def to_json(self) -> str:
        return str(self.tokenizer.to_str())


def _tokenizer_from_json(text: str, where: str) -> _Tokenizer:
    """Read what ``to_json`` wrote: the bytes stub or a Hugging Face ``tokenizer.json``."""
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not a tokenizer JSON: {error}") from error
    if isinstance(content, dict) and content.get("type") == "bytes":
        return _ByteTokenizer()
    try:
        return _BPETokenizer.from_json(text)
    except Exception as error:  # tokenizers raises its own Exception type
        raise ValueError(f"{where} is not a Hugging Face tokenizer JSON: {error}") from error


class _Blocks(Dataset[Tensor]):
    """The rows of a ``[N, block_size + 1]`` tensor, one block per example."""

    def __init__(self, blocks: Tensor) -> None:
        self.data = blocks

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]


class PythonDocsDataModule(LightningDataModule):
    r"""Next-token prediction on the English help texts that ship with CPython: nothing to download.

    The corpus is ``pydoc_data.topics.topics`` (what ``help("assert")`` prints): 79 topics of the
    language reference, 464,970 characters on CPython 3.11 (other CPython versions ship other texts).

    **Splits, by topic.** The topic names are sorted, shuffled with ``random.Random(seed)`` and cut in
    that order into ``max(1, round(test_topics * 79))`` test topics, ``max(1, round(val_topics * 79))``
    validation topics and the rest for training, so that no topic is in two splits. A split's text is its
    topics in sorted name order, joined by ``"\n\n"``. With the defaults (seed 0, CPython 3.11):

    ========  ======  ==========  ==========================  ========
    split     topics  characters  tokens (BPE, 2048 ids)      bytes
    ========  ======  ==========  ==========================  ========
    train         63     417,441  115,922 (3.60 chars/token)   418,449
    val            8      16,935    4,273 (3.96 chars/token)    16,956
    test           8      30,746    8,242 (3.73 chars/token)    30,864
    ========  ======  ==========  ==========================  ========

    Topics vary from 202 to 62,522 characters, so the validation and test shares of the text are not those
    of the topics (here 4% and 7%), and they move with ``seed``.

    **Tokenizers.** ``"bpe"``: a byte-level BPE (GPT-2's pre-tokenization, Hugging Face ``tokenizers``)
    trained on the training topics alone (each topic one sequence), up to ``vocab_size`` ids: the 256 byte
    symbols, then one id per merge. Training takes about 0.2 s on 2 CPU cores and is deterministic (the same
    ids on every run and in every process).
    ``"bytes"``: the UTF-8 bytes, 256 ids; ``vocab_size`` is then ignored. Neither has special tokens:
    every block is full, so nothing is padded, and topics are parted by the blank lines of the text.
    The tokenizer is built on first need, which :attr:`vocab_size` is, so the size is known before
    ``setup`` (``LightningCLI`` links ``data.vocab_size`` to the model's as soon as the module exists).
    :meth:`decode` inverts :meth:`encode` on any text (checked on every split).

    **Saved beside the checkpoints.** :meth:`state_dict` holds the tokenizer (its JSON), so Lightning
    stores it in every checkpoint and :meth:`load_state_dict` makes a resumed run use exactly that
    tokenizer, even where training would now give another. :meth:`save_tokenizer` writes
    ``tokenizer.json`` (for BPE, Hugging Face's format: ``tokenizers.Tokenizer.from_file`` reads it);
    ``setup`` writes it into ``tokenizer_dir`` when one is given; :meth:`load_tokenizer` reads it back.

    **Blocks.** Each split's token stream ``ids`` is cut into blocks of ``block_size + 1`` tokens that
    overlap by one: block ``i`` is ``ids[i * block_size : i * block_size + block_size + 1]`` and the
    incomplete tail is dropped. A model that predicts token ``t + 1`` from tokens ``<= t`` within each
    block thus predicts every token of the stream (after the first, up to the tail) exactly once.
    Batches are ``LongTensor[B, block_size + 1]``. Training batches are shuffled by
    :class:`~llmkit.data.numbers.EpochShuffleSampler` (the order of epoch ``e`` depends on ``seed + e``
    alone); validation, test and predict (the test split) batches are in stream order, the last one
    possibly smaller.

    Args:
        tokenizer: ``"bpe"`` or ``"bytes"``.
        vocab_size: the BPE's size, at least 256 (the bytes); ignored by ``"bytes"``. The trained size
            (:attr:`vocab_size`) is smaller only if the training text runs out of pairs to merge.
        block_size: tokens a model sees per block (a block holds ``block_size + 1``).
        batch_size: blocks per batch.
        val_topics: share of the topics held out for validation, in (0, 1); at least one topic.
        test_topics: share of the topics held out for testing, in (0, 1); at least one topic.
        seed: seeds the split and the training order.
        num_workers: ``DataLoader`` worker processes.
        tokenizer_dir: a directory ``setup`` writes ``tokenizer.json`` into (e.g. the checkpoints'); none
            when ``None``.

    Raises:
        ValueError: for an unknown ``tokenizer`` (with the close match), ``vocab_size < 256``,
            ``block_size``/``batch_size < 1``, fractions outside (0, 1) or that leave no training topic,
            ``num_workers < 0``, a ``tokenizer_dir`` that is a file; in ``setup``, a split too short for
            one block.
        TypeError: for arguments of the wrong type.

    Examples:
        >>> data = PythonDocsDataModule(block_size=64, batch_size=8)
        >>> data.vocab_size, data.topics("val")[:2]
        (2048, ['await', 'bltin-type-objects'])
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch.shape, batch.dtype
        (torch.Size([8, 65]), torch.int64)
        >>> ids = data.encode("def f(x):\n    return x")
        >>> data.decode(ids)
        'def f(x):\n    return x'
        >>> blocks = data.blocks("val")
        >>> torch.equal(blocks[1], data.split_ids("val")[64:129])
        True
    """

    def __init__(
        self,
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        block_size: int = 128,
        batch_size: int = 32,
        val_topics: float = 0.1,
        test_topics: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not isinstance(tokenizer, str) or tokenizer not in TOKENIZERS:
            hint = difflib.get_close_matches(str(tokenizer), TOKENIZERS, n=1)
            raise ValueError(
                f"`tokenizer` must be one of {TOKENIZERS}, got {tokenizer!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        for name, value, least in (
            ("vocab_size", vocab_size, 256),
            ("block_size", block_size, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            _check_int(name, value)
            if value < least:
                raise ValueError(f"`{name}` must be >= {least}, got {value}")
        _check_int("seed", seed)
        for name, fraction in (("val_topics", val_topics), ("test_topics", test_topics)):
            if isinstance(fraction, bool) or not isinstance(fraction, int | float):
                raise TypeError(f"`{name}` must be a float, got {fraction!r} of type {type(fraction).__name__}")
            if not 0.0 < fraction < 1.0:  # NaN fails this too
                raise ValueError(f"`{name}` must be in (0, 1), got {fraction}")
        if tokenizer_dir is not None:
            if not isinstance(tokenizer_dir, str | os.PathLike):
                raise TypeError(f"`tokenizer_dir` must be a path or None, got {tokenizer_dir!r}")
            if Path(tokenizer_dir).is_file():
                raise ValueError(f"`tokenizer_dir` must be a directory, got the file {str(tokenizer_dir)!r}")

        self.tokenizer_name, self.requested_vocab_size = tokenizer, vocab_size
        self.block_size, self.batch_size, self.seed, self.num_workers = block_size, batch_size, seed, num_workers
        self.tokenizer_dir = None if tokenizer_dir is None else Path(tokenizer_dir)

        texts = _topics()
        names = sorted(texts)
        n_val, n_test = max(1, round(val_topics * len(names))), max(1, round(test_topics * len(names)))
        if n_val + n_test >= len(names):
            raise ValueError(
                f"`val_topics` + `test_topics` must leave topics to train on: {val_topics} + {test_topics} of "
                f"{len(names)} topics takes {n_val} + {n_test}"
            )
        random.Random(seed).shuffle(names)
        self._topics: dict[str, list[str]] = {
            "test": sorted(names[:n_test]),
            "val": sorted(names[n_test : n_test + n_val]),
            "train": sorted(names[n_test + n_val :]),
        }
        self._texts = {split: SEPARATOR.join(texts[name] for name in self._topics[split]) for split in SPLITS}
        self._train_texts = [texts[name] for name in self._topics["train"]]
        self._tokenizer: _Tokenizer | None = None
        self._ids: dict[str, Tensor] = {}

    # --- the tokenizer --------------------------------------------------------------------------------

    @property
    def _tok(self) -> _Tokenizer:
        """The tokenizer, trained (or made) on first need."""
        if self._tokenizer is None:
            if self.tokenizer_name == "bytes":
                self._tokenizer = _ByteTokenizer()
            else:
                self._tokenizer = _BPETokenizer.train(self._train_texts, self.requested_vocab_size)
                if self._tokenizer.vocab_size < self.requested_vocab_size:
                    rank_zero_warn(
                        f"PythonDocsDataModule: the BPE stopped at {self._tokenizer.vocab_size} ids, fewer than "
                        f"`vocab_size`={self.requested_vocab_size}: the training topics have no more pairs to merge"
                    )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's number of ids (256 for bytes; the trained size for BPE); builds the tokenizer."""
        return self._tok.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, each in ``[0, vocab_size)``.

        Raises:
            TypeError: if ``text`` is not a ``str``.
        """
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str, got {type(text).__name__}")
        return self._tok.encode(text)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of token ids: ``decode(encode(text)) == text``.

        Args:
            ids: a list of ids or a 1-D tensor ``[T]``, e.g. a row of a batch or of a model's ``generate``.
                Ids that cut a multi-byte character read as U+FFFD.

        Raises:
            ValueError: for a tensor that is not 1-D, or ids outside ``[0, vocab_size)``.
        """
        if isinstance(ids, Tensor):
            if ids.ndim != 1:
                raise ValueError(f"`ids` must be a 1-D tensor [T], got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        values = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in values if not 0 <= i < size]
        if bad:
            raise ValueError(f"`ids` must be in [0, {size}) (the vocabulary), got {bad[:5]}")
        return self._tok.decode(values)

    def save_tokenizer(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer to ``directory/tokenizer.json`` (made if missing) and return that path.

        For ``"bpe"`` it is Hugging Face's ``tokenizer.json``; for ``"bytes"`` a two-key stub
        ``{"type": "bytes", "vocab_size": 256}``. The file is replaced atomically.
        """
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{TOKENIZER_FILE}.{os.getpid()}.tmp")
        partial.write_text(self._tok.to_json(), encoding="utf-8")
        partial.replace(path)
        return path

    def load_tokenizer(self, path: str | os.PathLike[str]) -> None:
        """Use the tokenizer that :meth:`save_tokenizer` wrote (a ``tokenizer.json`` or its directory).

        Raises:
            ValueError: if the file is not a tokenizer, or of the other kind than ``tokenizer``.
        """
        file = Path(path)
        file = file / TOKENIZER_FILE if file.is_dir() else file
        self._install(_tokenizer_from_json(file.read_text(encoding="utf-8"), where=str(file)))

    def state_dict(self) -> dict[str, Any]:
        """``{"tokenizer": "bpe" | "bytes", "tokenizer_json": str}``: stored by Lightning in each checkpoint."""
        return {"tokenizer": self.tokenizer_name, "tokenizer_json": self._tok.to_json()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Use the checkpoint's tokenizer from now on (the token streams are encoded anew).

        Raises:
            ValueError: if the checkpoint's tokenizer is of the other kind than ``tokenizer``.
        """
        saved = state_dict.get("tokenizer_json")
        if saved is not None:
            self._install(_tokenizer_from_json(saved, where="the checkpoint's tokenizer"))

    def _install(self, tokenizer: _Tokenizer) -> None:
        if tokenizer.kind != self.tokenizer_name:
            raise ValueError(
                f"the saved tokenizer is {tokenizer.kind!r} but this module's `tokenizer` is {self.tokenizer_name!r}"
            )
        if self._tokenizer is not None:
            if self._tokenizer.to_json() == tokenizer.to_json():
                return  # the same ids: keep the encoded streams
            rank_zero_warn(
                "PythonDocsDataModule: the saved tokenizer differs from the one trained here; using the saved one"
            )
        self._tokenizer = tokenizer
        self._ids.clear()
        if self.tokenizer_dir is not None:
            self._write_tokenizer_dir()

    @rank_zero_only
    def _write_tokenizer_dir(self) -> None:
        assert self.tokenizer_dir is not None
        self.save_tokenizer(self.tokenizer_dir)

    # --- the splits --------------------------------------------------------------------------------------

    def topics(self, split: Split) -> list[str]:
        """The topic names of ``split`` (``"train"``, ``"val"`` or ``"test"``), in text order."""
        return list(self._topics[_check_split(split)])

    def text(self, split: Split) -> str:
        r"""The text of ``split``: its topics joined by ``"\n\n"``."""
        return self._texts[_check_split(split)]

    def split_ids(self, split: Split) -> Tensor:
        """``LongTensor[L]``: the whole token stream of ``split`` (``encode(text(split))``), cached."""
        split = _check_split(split)  # type: ignore[assignment]
        if split not in self._ids:
            self._ids[split] = torch.tensor(self.encode(self._texts[split]), dtype=torch.long)
        return self._ids[split]

    def blocks(self, split: Split) -> Tensor:
        """``LongTensor[N, block_size + 1]``: the blocks of ``split``, one token of overlap, tail dropped.

        Raises:
            ValueError: if the split has fewer than ``block_size + 1`` tokens.
        """
        ids = self.split_ids(split)
        if len(ids) < self.block_size + 1:
            raise ValueError(
                f"the {split} split has {len(ids)} tokens, too few for one block of `block_size` + 1 = "
                f"{self.block_size + 1}; lower `block_size` or give it more topics"
            )
        return ids.unfold(0, self.block_size + 1, self.block_size)  # (N, block_size + 1), a view of ids

    def prepare_data(self) -> None:
        """Nothing to download: the texts ship with CPython."""

    def setup(self, stage: str | None = None) -> None:
        """Build the tokenizer, encode every split, check each has a block, write ``tokenizer_dir``."""
        for split in SPLITS:
            self.blocks(split)  # type: ignore[arg-type]
        if self.tokenizer_dir is not None:
            self._write_tokenizer_dir()

    def train_dataloader(self) -> DataLoader[Tensor]:
        """Training blocks, shuffled by :class:`~llmkit.data.numbers.EpochShuffleSampler` (``seed + epoch``)."""
        blocks = self.blocks("train")
        return self._loader(blocks, sampler=EpochShuffleSampler(size=len(blocks), seed=self.seed))

    def val_dataloader(self) -> DataLoader[Tensor]:
        """Validation blocks, in stream order."""
        return self._loader(self.blocks("val"))

    def test_dataloader(self) -> DataLoader[Tensor]:
        """Test blocks, in stream order."""
        return self._loader(self.blocks("test"))

    def predict_dataloader(self) -> DataLoader[Tensor]:
        """The test blocks, in stream order."""
        return self._loader(self.blocks("test"))

    def _loader(self, blocks: Tensor, sampler: EpochShuffleSampler | None = None) -> DataLoader[Tensor]:
        return DataLoader(
            _Blocks(blocks),
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
