"""Logits processors: small callables that reshape next-token scores before a token is chosen.

A processor maps ``(tokens, logits)`` to new logits: ``tokens`` ``[N, t]`` is each row's history
(BOS first), ``logits`` ``[N, V]`` the scores of the next token. It returns a new tensor and never
changes its input. Processors compose as a list, applied left to right by :func:`apply_processors`;
a user's own processor is any callable with that signature (see :class:`LogitsProcessor`).

:func:`build_processors` turns ``generate``'s keywords into that list, in this fixed order (Hugging
Face's: constraints first, then the user's processors, then the sampling warpers)::

    RepetitionPenalty -> NoRepeatNGram -> BadWords -> user's logits_processors (in their order)
        -> Temperature -> TopK -> TopP -> MinP            (the last four only when do_sample)

The constraints see the model's own scores (the repetition penalty is defined on them, and a banned
token stays banned whatever follows); temperature comes before the truncations, so that ``top_k``,
``top_p`` and ``min_p`` cut the distribution that is actually sampled from. A processor that would be
the identity (temperature 1, ``top_k`` 0, ``top_p`` 1, ``min_p`` 0, penalty 1, n-gram size 0) is left out.

Every processor returns exactly (``torch.equal``) what the matching Hugging Face transformers
processor returns on the same inputs (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``MinPLogitsWarper``, ``RepetitionPenaltyLogitsProcessor``,
``NoRepeatNGramLogitsProcessor``, ``NoBadWordsLogitsProcessor``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BadWords",
    "LogitsProcessor",
    "MinP",
    "NoRepeatNGram",
    "RepetitionPenalty",
    "Temperature",
    "TopK",
    "TopP",
    "apply_processors",
    "build_processors",
]


@runtime_checkable
class LogitsProcessor(Protocol):
    """Any callable ``(tokens [N, t], logits [N, V]) -> logits [N, V]`` that leaves its inputs unchanged."""

    def __call__(self, tokens: Tensor, logits: Tensor, /) -> Tensor: ...  # noqa: D102


# --- argument checks, shared by the classes and build_processors (one source of truth) ---------------


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} of type {type(value).__name__}")
    return float(value)


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}")
    return int(value)


def _check_positive(name: str, value: object) -> float:
    number = _check_real(name, value)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value}")
    return number


def _check_top_p(name: str, value: object) -> float:
    number = _check_real(name, value)
    if not 0 < number <= 1:
        raise ValueError(f"`{name}` must be in (0, 1], got {value}")
    return number


def _check_min_p(name: str, value: object) -> float:
    number = _check_real(name, value)
    if not 0 <= number <= 1:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return number


def _check_filter_value(value: object) -> float:
    number = _check_real("filter_value", value)
    if math.isnan(number):
        raise ValueError(f"`filter_value` must not be nan, got {value}")
    return number


def _numpy_path(logits: Tensor) -> bool:
    """Whether numpy's sort and selection stand in for torch's.

    They do on CPU, where they are several times faster, for 32- and 64-bit floats (16-bit ones have too
    many ties, see :class:`TopP`).
    """
    return logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64)


def _truncation_repr(processor: TopK | TopP | MinP, argument: str) -> str:
    return (
        f"{type(processor).__name__}({argument}={getattr(processor, argument)}, "
        f"min_tokens_to_keep={processor.min_tokens_to_keep}, filter_value={processor.filter_value})"
    )


# --- the processors -----------------------------------------------------------------------------------


class Temperature:
    """Divide the logits by a temperature: below 1 sharpens the distribution, above 1 flattens it.

    Args:
        temperature: a finite number > 0.

    Raises:
        TypeError: If ``temperature`` is not a real number.
        ValueError: If ``temperature`` is not finite and > 0.

    Examples:
        >>> import torch
        >>> Temperature(0.5)(torch.tensor([[0]]), torch.tensor([[1.0, -2.0]]))
        tensor([[ 2., -4.]])
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = _check_positive("temperature", temperature)

    def __call__(self, tokens: Tensor, logits: Tensor) -> Tensor:
        """``[N, t], [N, V] -> [N, V]``: ``logits / temperature``."""
        return logits / self.temperature

    def __repr__(self) -> str:
        return f"Temperature(temperature={self.temperature})"


class TopK:
    """Keep the ``top_k`` largest logits of each row (and every logit tied with the k-th); filter the rest.

    On CPU, for float32 and float64, numpy's selection finds the k-th largest value (about twice as fast
    as ``torch.topk``, and the same value).

    Args:
        top_k: how many tokens to keep, ``>= 1`` (``top_k=0``, "off", is :func:`build_processors`'s
            business: it leaves the processor out).
        min_tokens_to_keep: keep at least this many, whatever ``top_k``.
        filter_value: what filtered logits become.

    Raises:
        TypeError: If ``top_k`` or ``min_tokens_to_keep`` is not an int.
        ValueError: If ``top_k < 1`` or ``min_tokens_to_keep < 1``.

    Examples:
        >>> import torch
        >>> TopK(2)(torch.tensor([[0]]), torch.tensor([[1.0, 3.0, 2.0, 0.0]]))
        tensor([[-inf, 3., 2., -inf]])
    """

    def __init__(self, top_k: int, *, min_tokens_to_keep: int = 1, filter_value: float = -math.inf) -> None:
        self.top_k = _check_int("top_k", top_k, minimum=1)
        self.min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, minimum=1)
        self.filter_value = _check_filter_value(filter_value)

    def __call__(self, tokens: Tensor, logits: Tensor) -> Tensor:
        """``[N, t], [N, V] -> [N, V]``: logits below each row's k-th largest become ``filter_value``."""
        vocab_size = logits.shape[-1]
        k = min(max(self.top_k, self.min_tokens_to_keep), vocab_size)
        if _numpy_path(logits):  # the same value, by selection rather than a partial sort (nan counts as largest)
            selected = np.partition(logits.detach().numpy(), vocab_size - k, axis=-1)
            kth_largest = torch.from_numpy(selected[..., vocab_size - k, None])  # [N, 1]
        else:
            kth_largest = torch.topk(logits, k).values[..., -1:]
        return torch.where(logits < kth_largest, self.filter_value, logits)

    def __repr__(self) -> str:
        return _truncation_repr(self, "top_k")


class TopP:
    """Nucleus filtering: keep the most likely tokens whose probabilities add up to at least ``top_p``.

    Hugging Face's arithmetic, step for step: sort each row ascending, softmax, cumulative sum; a token
    goes when its cumulative probability is ``<= 1 - top_p``, except the ``min_tokens_to_keep`` most likely.

    Speed: the full sort is most of the cost, and on CPU ``torch.sort`` (which also returns indices) is
    slow, so for float32 and float64 numpy sorts the values alone. They are all the arithmetic needs: the
    same sorted values give the same softmax and cumulative sum, bit for bit, and the tokens to drop are
    then exactly those below the first kept value. Only when tied logits straddle the cut does it matter
    which of them ``torch.sort`` put first; then, on other devices, and for 16-bit floats (whose many ties
    make that common) the processor runs Hugging Face's ``torch.sort`` path.

    Args:
        top_p: the probability mass to keep, in ``(0, 1]``.
        min_tokens_to_keep: keep at least this many tokens per row.
        filter_value: what filtered logits become.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``top_p`` is outside ``(0, 1]`` or ``min_tokens_to_keep < 1``.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
        >>> TopP(0.7)(torch.tensor([[0]]), logits).exp()  # 0.5 + 0.3 >= 0.7: the rest goes
        tensor([[0.5000, 0.3000, 0.0000, 0.0000]])
    """

    def __init__(self, top_p: float, *, min_tokens_to_keep: int = 1, filter_value: float = -math.inf) -> None:
        self.top_p = _check_top_p("top_p", top_p)
        self.min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, minimum=1)
        self.filter_value = _check_filter_value(filter_value)

    def __call__(self, tokens: Tensor, logits: Tensor) -> Tensor:
        """``[N, t], [N, V] -> [N, V]``: logits outside each row's nucleus become ``filter_value``."""
        filtered = self._filter_by_sorted_values(logits) if _numpy_path(logits) else None
        return self._filter_by_sort(logits) if filtered is None else filtered

    def _filter_by_sort(self, logits: Tensor) -> Tensor:
        # Hugging Face's TopPLogitsWarper, operation for operation.
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_to_remove = cumulative_probs <= (1 - self.top_p)
        sorted_to_remove[..., -self.min_tokens_to_keep :] = False
        to_remove = torch.empty_like(sorted_to_remove).scatter_(-1, sorted_indices, sorted_to_remove)
        return torch.where(to_remove, self.filter_value, logits)

    def _filter_by_sorted_values(self, logits: Tensor) -> Tensor | None:
        # The same sorted values give the same softmax and cumsum, bit for bit, whatever sorted them.
        sorted_logits = torch.empty(logits.shape, dtype=logits.dtype, device="cpu").copy_(logits.detach())
        sorted_logits.numpy().sort(axis=-1)  # in place, in memory that torch allocated (as torch.sort's output)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # The cumulative probabilities never decrease, so the removed tokens are a prefix of the sorted row,
        # as long as `cumulative_probs <= 1 - top_p` (the threshold rounded to the logits' dtype, as there).
        threshold = torch.full((*logits.shape[:-1], 1), 1 - self.top_p, dtype=logits.dtype, device="cpu")
        num_removed = torch.searchsorted(cumulative_probs, threshold, right=True)  # [N, 1]
        # A row with a nan or +inf logit is all nan after the softmax: nothing is <= the threshold.
        num_removed.masked_fill_(cumulative_probs[..., -1:].isnan(), 0)
        num_removed.clamp_(max=max(logits.shape[-1] - self.min_tokens_to_keep, 0))
        first_kept = sorted_logits.gather(-1, num_removed)
        last_removed = sorted_logits.gather(-1, (num_removed - 1).clamp_(min=0))
        if bool(((last_removed == first_kept) & (num_removed > 0)).any()):
            return None  # a tie across the cut: which tied tokens go depends on torch.sort's order
        return torch.where(logits < first_kept, self.filter_value, logits)

    def __repr__(self) -> str:
        return _truncation_repr(self, "top_p")


class MinP:
    """Keep the tokens whose probability is at least ``min_p`` times that of the row's most likely token.

    Args:
        min_p: the fraction of the top probability a token needs, in ``[0, 1]``.
        min_tokens_to_keep: keep at least this many tokens per row.
        filter_value: what filtered logits become.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``min_p`` is outside ``[0, 1]`` or ``min_tokens_to_keep < 1``.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[0.6, 0.3, 0.1]]).log()
        >>> MinP(0.4)(torch.tensor([[0]]), logits).exp()  # 0.1 < 0.4 * 0.6
        tensor([[0.6000, 0.3000, 0.0000]])
    """

    def __init__(self, min_p: float, *, min_tokens_to_keep: int = 1, filter_value: float = -math.inf) -> None:
        self.min_p = _check_min_p("min_p", min_p)
        self.min_tokens_to_keep = _check_int("min_tokens_to_keep", min_tokens_to_keep, minimum=1)
        self.filter_value = _check_filter_value(filter_value)

    def __call__(self, tokens: Tensor, logits: Tensor) -> Tensor:
        """``[N, t], [N, V] -> [N, V]``: logits of tokens below ``min_p * max_prob`` become ``filter_value``."""
        probs = torch.softmax(logits, dim=-1)
        to_remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        # The most likely token is never below min_p (<= 1) times itself, so keeping one needs no top-k.
        if self.min_tokens_to_keep > 1:
            k = min(self.min_tokens_to_keep, probs.shape[-1])
            to_remove.scatter_(-1, torch.topk(probs, k, dim=-1).indices, False)
        return torch.where(to_remove, self.filter_value, logits)

    def __repr__(self) -> str:
        return _truncation_repr(self, "min_p")


class RepetitionPenalty:
    """Penalise every token already in the row's history, once (CTRL, Keskar et al. 2019).

    A seen token's logit is divided by ``penalty`` when positive and multiplied by it when negative, so
    ``penalty > 1`` discourages repeats and ``penalty < 1`` encourages them. Ids ``>= V`` in the history
    are ignored, as in Hugging Face.

    Args:
        penalty: a finite number > 0; 1 is no penalty.

    Raises:
        TypeError: If ``penalty`` is not a real number.
        ValueError: If ``penalty`` is not finite and > 0.

    Examples:
        >>> import torch
        >>> RepetitionPenalty(2.0)(torch.tensor([[0, 1, 1]]), torch.tensor([[4.0, -4.0, 4.0]]))
        tensor([[ 2., -8.,  4.]])
    """

    def __init__(self, penalty: float) -> None:
        self.penalty = _check_positive("penalty", penalty)

    def __call__(self, tokens: Tensor, logits: Tensor) -> Tensor:
        """``[N, t], [N, V] -> [N, V]``: seen tokens' logits penalised."""
        vocab_size = logits.shape[-1]
        # A spare column past the vocabulary absorbs the ids that the logits do not cover.
        ids = tokens.clamp(max=vocab_size)
        padded = F.pad(logits, (0, 1))
        seen = padded.gather(-1, ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return padded.scatter_(-1, ids, seen)[..., :vocab_size]

    def __repr__(self) -> str:
        return f"RepetitionPenalty(penalty={self.penalty})"


class NoRepeatNGram:
    """Forbid any token that would repeat an n-gram already in the row's history (fairseq, HF).

    Vectorised: the history is unfolded into its n-gram windows; every window whose first ``n - 1``
    tokens equal the history's last ``n - 1`` bans its last token.

    Args:
        ngram_size: ``n >= 1``; with ``n = 1`` no token may appear twice.

    Raises:
        TypeError: If ``ngram_size`` is not an int.
        ValueError: If ``ngram_size < 1``.

    Examples:
        >>> import torch
        >>> NoRepeatNGram(2)(torch.tensor([[0, 1, 2, 1]]), torch.zeros(1, 4))  # "1 2" was seen
        tensor([[0., 0., -inf, 0.]])
    """

    def __init__(self, ngram_size: int) -> None:
        self.ngram_size = _check_int("ngram_size", ngram_size, minimum=1)

    def __call__(self, tokens: Tensor, logits: Tensor) -> Tensor:
        """``[N, t], [N, V] -> [N, V]``: tokens that would complete a seen n-gram become ``-inf``."""
        n, length = self.ngram_size, tokens.shape[-1]
        if length < n:  # no complete n-gram yet
            return logits.clone()
        prefix = tokens[:, length + 1 - n :]  # [N, n - 1]
        windows = tokens.unfold(1, n, 1)  # [N, t - n + 1, n]
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # [N, t - n + 1]
        # Non-matching windows (and ids past the vocabulary) write to a spare column that is dropped.
        vocab_size = logits.shape[-1]
        banned = torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size)  # [N, t - n + 1]
        return F.pad(logits, (0, 1)).scatter_(1, banned, -math.inf)[:, :vocab_size]

    def __repr__(self) -> str:
        return f"NoRepeatNGram(ngram_size={self.ngram_size})"


class BadWords:
    """Forbid token sequences: a sequence's last token is banned wherever the history ends with the rest.

    Single-token sequences are banned everywhere, through one precomputed ``[V]`` mask (a bias of 0 or
    ``-inf``, added to the logits as Hugging Face does). Longer ones are grouped by length and matched
    against the end of every row's history in one comparison per group.

    Args:
        bad_words_ids: the forbidden sequences of token ids, e.g. ``[[5], [7, 8]]``.
        vocab_size: when given, ids are checked against it here rather than at the first call.

    Raises:
        TypeError: If ``bad_words_ids`` is not a sequence of sequences of ints.
        ValueError: If it is empty, holds an empty sequence, a negative id or an id ``>= vocab_size``;
            at call time, if it holds an id ``>= V``.

    Examples:
        >>> import torch
        >>> ban = BadWords([[3], [1, 2]])
        >>> ban(torch.tensor([[0, 1], [0, 2]]), torch.zeros(2, 4))  # "1 2" is banned after 1 only
        tensor([[0., 0., -inf, -inf],
                [0., 0., 0., -inf]])
    """

    def __init__(self, bad_words_ids: Sequence[Sequence[int]], vocab_size: int | None = None) -> None:
        if isinstance(bad_words_ids, (str, bytes, Tensor)) or not isinstance(bad_words_ids, Sequence):
            raise TypeError(f"`bad_words_ids` must be a list of lists of token ids, got {bad_words_ids!r}")
        if len(bad_words_ids) == 0:
            raise ValueError("`bad_words_ids` must hold at least one sequence, got an empty list")
        sequences: list[tuple[int, ...]] = []
        for sequence in bad_words_ids:
            if isinstance(sequence, (str, bytes, Tensor)) or not isinstance(sequence, Sequence):
                raise TypeError(f"`bad_words_ids` must be a list of lists of token ids, got the item {sequence!r}")
            if len(sequence) == 0:
                raise ValueError(f"`bad_words_ids` must not hold an empty sequence, got {list(bad_words_ids)!r}")
            for token in sequence:
                if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                    raise TypeError(f"`bad_words_ids` must hold int token ids, got {token!r} in {list(sequence)!r}")
                if token < 0:
                    raise ValueError(f"`bad_words_ids` must hold token ids >= 0, got {token} in {list(sequence)!r}")
            sequences.append(tuple(int(token) for token in sequence))
        self.bad_words_ids = [list(sequence) for sequence in sequences]
        self.max_id = max(max(sequence) for sequence in sequences)
        if vocab_size is not None:
            _check_int("vocab_size", vocab_size, minimum=1)
            self._check_ids(vocab_size)
        self.vocab_size = vocab_size
        self._single = sorted({sequence[0] for sequence in sequences if len(sequence) == 1})
        by_length: dict[int, list[tuple[int, ...]]] = {}
        for sequence in sorted(set(sequences)):
            if len(sequence) > 1:
                by_length.setdefault(len(sequence) - 1, []).append(sequence)
        # Per prefix length L: the prefixes [G, L] and their last tokens [G], on CPU until first used.
        self._groups = [
            (torch.tensor([s[:-1] for s in group]), torch.tensor([s[-1] for s in group]))
            for group in by_length.values()
        ]
        self._cache: dict[tuple[int, torch.device, torch.dtype], tuple[Tensor, list[tuple[Tensor, Tensor]]]] = {}

    def _check_ids(self, vocab_size: int) -> None:
        if self.max_id >= vocab_size:
            raise ValueError(
                f"`bad_words_ids` must hold ids in [0, {vocab_size}) (the vocabulary), got the id {self.max_id}"
            )

    def _tables(self, logits: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        vocab_size = logits.shape[-1]
        key = (vocab_size, logits.device, logits.dtype)
        if key not in self._cache:
            self._check_ids(vocab_size)
            single = torch.zeros(vocab_size, dtype=logits.dtype, device=logits.device)
            single[self._single] = -math.inf
            groups = [(prefixes.to(logits.device), last.to(logits.device)) for prefixes, last in self._groups]
            self._cache[key] = (single, groups)
        return self._cache[key]

    def __call__(self, tokens: Tensor, logits: Tensor) -> Tensor:
        """``[N, t], [N, V] -> [N, V]``: banned tokens' logits become ``-inf``."""
        # HF's arithmetic: the logits plus a bias of 0 (allowed) or -inf (banned). An addition is also
        # several times faster than a boolean select on CPU.
        bias, groups = self._tables(logits)
        length = tokens.shape[-1]
        usable = [(prefixes, last) for prefixes, last in groups if prefixes.shape[1] <= length]
        if usable:
            vocab_size = logits.shape[-1]
            # Non-matching sequences write to a spare column that is dropped.
            multi = logits.new_zeros((logits.shape[0], vocab_size + 1))
            for prefixes, last in usable:
                matches = (tokens[:, None, length - prefixes.shape[1] :] == prefixes).all(dim=-1)  # [N, G]
                multi.scatter_(1, torch.where(matches, last, vocab_size), -math.inf)
            bias = bias + multi[:, :vocab_size]
        return logits + bias

    def __repr__(self) -> str:
        return f"BadWords(bad_words_ids={self.bad_words_ids!r}, vocab_size={self.vocab_size})"


# --- composition --------------------------------------------------------------------------------------


def apply_processors(processors: Iterable[LogitsProcessor], tokens: Tensor, logits: Tensor) -> Tensor:
    """Apply processors left to right.

    Args:
        processors: the processors, e.g. from :func:`build_processors`.
        tokens: ``[N, t]`` histories, BOS first.
        logits: ``[N, V]`` next-token scores.

    Returns:
        ``[N, V]`` the processed scores (``logits`` itself when the list is empty).

    Examples:
        >>> import torch
        >>> apply_processors([Temperature(2.0), TopK(1)], torch.tensor([[0]]), torch.tensor([[2.0, 4.0]]))
        tensor([[-inf, 2.]])
    """
    for processor in processors:
        logits = processor(tokens, logits)
    return logits


def build_processors(
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    logits_processors: Iterable[LogitsProcessor] = (),
    vocab_size: int | None = None,
) -> list[LogitsProcessor]:
    """Validate ``generate``'s keywords (HF's names) and build the processor list, in the module's order.

    Every argument is checked here, before any decoding. The sampling arguments are checked whatever
    ``do_sample``, except ``temperature``, which greedy and beam search ignore (``temperature=0`` is a
    common way to ask for greedy decoding).

    Args:
        do_sample: whether tokens are sampled; the sampling warpers are built only then.
        temperature: the softmax temperature, ``> 0`` when sampling.
        top_k: keep the ``top_k`` most likely tokens, ``>= 0``; 0 is off.
        top_p: nucleus mass, in ``(0, 1]``; 1 is off.
        min_p: min-p fraction, in ``[0, 1]``; 0 is off.
        repetition_penalty: ``> 0``; 1 is off.
        no_repeat_ngram_size: ``>= 0``; 0 is off.
        bad_words_ids: sequences of token ids never to produce; ``None`` is off.
        logits_processors: the user's processors, applied after the constraints and before the warpers.
        vocab_size: when given, ``bad_words_ids`` are checked against it now.

    Returns:
        The processors, for :func:`apply_processors`.

    Raises:
        TypeError: If an argument has the wrong type or a user processor is not callable.
        ValueError: If an argument is out of range.

    Examples:
        >>> processors = build_processors(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
        >>> processors  # doctest: +ELLIPSIS
        [RepetitionPenalty(penalty=1.2), Temperature(temperature=0.7), TopP(top_p=0.9, ...)]
        >>> build_processors(do_sample=False, temperature=0.7, top_p=0.9)  # greedy: no warpers
        []
    """
    if not isinstance(do_sample, bool):
        raise TypeError(f"`do_sample` must be a bool, got {do_sample!r}")
    temperature = _check_positive("temperature", temperature) if do_sample else temperature
    top_k = _check_int("top_k", top_k, minimum=0)
    top_p = _check_top_p("top_p", top_p)
    min_p = _check_min_p("min_p", min_p)
    repetition_penalty = _check_positive("repetition_penalty", repetition_penalty)
    no_repeat_ngram_size = _check_int("no_repeat_ngram_size", no_repeat_ngram_size, minimum=0)
    if vocab_size is not None:
        _check_int("vocab_size", vocab_size, minimum=1)
    user = list(logits_processors)
    for processor in user:
        if not callable(processor):
            raise TypeError(f"`logits_processors` must hold callables (tokens, logits) -> logits, got {processor!r}")

    processors: list[LogitsProcessor] = []
    if repetition_penalty != 1:
        processors.append(RepetitionPenalty(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGram(no_repeat_ngram_size))
    if bad_words_ids is not None:
        processors.append(BadWords(bad_words_ids, vocab_size=vocab_size))
    processors.extend(user)
    if do_sample:
        if temperature != 1:
            processors.append(Temperature(temperature))
        if top_k > 0:
            processors.append(TopK(top_k))
        if top_p < 1:
            processors.append(TopP(top_p))
        if min_p > 0:
            processors.append(MinP(min_p))
    return processors
