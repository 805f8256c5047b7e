"""A word-level vocabulary with the four special tokens every llmkit model expects."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torch import Tensor


class Vocab:
    """A word-level vocabulary: ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` then the words, sorted.

    The ids of the specials are fixed (``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``,
    ``UNK_ID = 3``), so that models can take them as constants, and the words follow in
    sorted order, so that the same words always give the same ids. The whole state is one
    list of strings (:meth:`state_dict`), which ``torch.save(..., weights_only=True)`` and
    ``save_hyperparameters`` both accept.

    Args:
        words: the words after the specials, in id order; each at most once and none of them a special.

    Raises:
        TypeError: if a word is not a string.
        ValueError: if a word is empty, repeated or one of the specials.

    Examples:
        >>> vocab = Vocab.build([["one", "two"], ["two", "three"]])
        >>> vocab.itos
        ('<pad>', '<bos>', '<eos>', '<unk>', 'one', 'three', 'two')
        >>> vocab.encode(["two", "four"], add_bos=True, add_eos=True)
        [1, 6, 3, 2]
        >>> vocab.decode([1, 6, 4, 2, 0, 0])
        ['two', 'one']
    """

    PAD: str = "<pad>"
    BOS: str = "<bos>"
    EOS: str = "<eos>"
    UNK: str = "<unk>"
    PAD_ID: int = 0
    BOS_ID: int = 1
    EOS_ID: int = 2
    UNK_ID: int = 3
    SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)

    def __init__(self, words: Iterable[str] = ()) -> None:
        itos = list(self.SPECIALS)
        stoi = {token: index for index, token in enumerate(itos)}
        for word in words:
            if not isinstance(word, str):
                raise TypeError(f"vocabulary words must be strings, got {word!r} of type {type(word).__name__}")
            if not word:
                raise ValueError("vocabulary words must be non-empty strings, got ''")
            if word in stoi:
                kind = "a special token" if word in self.SPECIALS else "repeated"
                raise ValueError(
                    f"vocabulary words must be unique and not specials {self.SPECIALS}: {word!r} is {kind}"
                )
            stoi[word] = len(itos)
            itos.append(word)
        self._itos: tuple[str, ...] = tuple(itos)
        self._stoi: dict[str, int] = stoi

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], *, min_freq: int = 1) -> Vocab:
        """Build a vocabulary from tokenized sentences.

        Args:
            sentences: each sentence a sequence of words (already tokenized).
            min_freq: keep the words seen at least this many times; the rest will map to ``<unk>``.

        Returns:
            The specials then the kept words in sorted order.

        Raises:
            ValueError: if ``min_freq < 1``.
            TypeError: if a sentence is a single string rather than a sequence of words.

        Examples:
            >>> len(Vocab.build([["a", "b", "a"]], min_freq=2))
            5
        """
        if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"`min_freq` must be a positive integer, got {min_freq!r}")
        counts: Counter[str] = Counter()
        for sentence in sentences:
            _check_words(sentence)
            counts.update(word for word in sentence if word not in cls.SPECIALS)
        return cls(sorted(word for word, count in counts.items() if count >= min_freq))

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, word: object) -> bool:
        return word in self._stoi

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self._itos == other._itos

    def __hash__(self) -> int:
        return hash(self._itos)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={len(self)})"

    @property
    def itos(self) -> tuple[str, ...]:
        """Every token by id, specials first (read-only)."""
        return self._itos

    @property
    def stoi(self) -> Mapping[str, int]:
        """The id of every token (a read-only view)."""
        return MappingProxyType(self._stoi)

    def encode(self, words: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Map words to ids; unknown words become ``UNK_ID``.

        Args:
            words: a tokenized sentence.
            add_bos: put ``BOS_ID`` first.
            add_eos: put ``EOS_ID`` last.

        Returns:
            ``len(words) + add_bos + add_eos`` ids.

        Raises:
            TypeError: if ``words`` is a string (tokenize it first) or holds something other than strings.

        Examples:
            >>> Vocab(["cat"]).encode(["cat", "dog"], add_eos=True)
            [4, 3, 2]
        """
        _check_words(words)
        ids = [self._stoi.get(word, self.UNK_ID) for word in words]
        if add_bos:
            ids.insert(0, self.BOS_ID)
        if add_eos:
            ids.append(self.EOS_ID)
        return ids

    def decode(self, ids: Sequence[int] | Tensor, *, strip_special: bool = True) -> list[str]:
        """Map ids back to tokens.

        Args:
            ids: a list of ids or a 1-D integer tensor ``[T]``.
            strip_special: stop at the first ``<eos>`` and drop ``<pad>`` and ``<bos>`` (``<unk>`` stays,
                as the trace of an unknown word); ``False`` returns one token per id.

        Returns:
            The tokens.

        Raises:
            ValueError: if ``ids`` is a tensor that is not 1-D, or an id is outside ``[0, len(self))``.
            TypeError: if ``ids`` is a floating-point tensor or holds something other than integers.

        Examples:
            >>> vocab = Vocab(["cat"])
            >>> vocab.decode([1, 4, 3, 2, 4])
            ['cat', '<unk>']
            >>> vocab.decode([1, 4, 2, 0], strip_special=False)
            ['<bos>', 'cat', '<eos>', '<pad>']
        """
        if isinstance(ids, Tensor):
            if ids.ndim != 1:
                raise ValueError(f"`ids` must be a 1-D tensor [T], got shape {tuple(ids.shape)}")
            if ids.is_floating_point() or ids.is_complex():
                raise TypeError(f"`ids` must be an integer tensor, got dtype {ids.dtype}")
            ids = ids.tolist()
        tokens = []
        for index in ids:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"`ids` must hold integers, got {index!r} of type {type(index).__name__}")
            if not 0 <= index < len(self._itos):
                raise ValueError(f"ids must lie in [0, {len(self._itos)}) for this vocabulary, got {index}")
            if strip_special:
                if index == self.EOS_ID:
                    break
                if index in (self.PAD_ID, self.BOS_ID):
                    continue
            tokens.append(self._itos[index])
        return tokens

    def state_dict(self) -> dict[str, list[str]]:
        """The whole vocabulary as plain lists: ``{"itos": [...]}`` (specials included)."""
        return {"itos": list(self._itos)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Vocab:
        """Rebuild a vocabulary from :meth:`state_dict`.

        Args:
            state: a mapping with ``"itos"``, the list of every token by id.

        Returns:
            A vocabulary equal to the one saved.

        Raises:
            ValueError: if ``"itos"`` is missing or does not start with the specials.

        Examples:
            >>> vocab = Vocab(["cat", "dog"])
            >>> Vocab.from_state_dict(vocab.state_dict()) == vocab
            True
        """
        if "itos" not in state:
            raise ValueError(f"a Vocab state must have the key 'itos', got keys {sorted(state)}")
        itos = list(state["itos"])
        if tuple(itos[: len(cls.SPECIALS)]) != cls.SPECIALS:
            raise ValueError(f"a Vocab state must start with the specials {cls.SPECIALS}, got {itos[:4]}")
        return cls(itos[len(cls.SPECIALS) :])


def _check_words(words: object) -> None:
    # A bare string is a sequence of characters: encoding it would silently give one id per letter.
    if isinstance(words, str):
        raise TypeError(f"expected a sequence of words, got the string {words!r}; tokenize it first")
    if isinstance(words, Sequence):
        for word in words:
            if not isinstance(word, str):
                raise TypeError(f"words must be strings, got {word!r} of type {type(word).__name__}")
