"""Checking and flattening the two input forms the text metrics accept.

A corpus is either text (``preds: Sequence[str]``, ``target: Sequence[str | Sequence[str]]``,
references per sample) or token ids (``preds: [B, T]``, ``target: [B, T]`` or ``[B, R, T]``).
Both become the flat form of :mod:`llmkit.metrics.functional._ngrams`: the tokens of all
sentences concatenated, each sentence's length, and the sample each reference belongs to.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor

TextTarget = Sequence[str] | Sequence[Sequence[str]]


@dataclass
class FlatCorpus:
    """Hypotheses and references as flat token ids.

    Attributes:
        hyp_tokens: ``[sum(hyp_lens)]`` int64 ids of all hypotheses, concatenated.
        hyp_lens: ``[B]`` length of each hypothesis.
        ref_tokens: ``[sum(ref_lens)]`` int64 ids of all references, concatenated.
        ref_lens: ``[L]`` length of each reference.
        ref_owner: ``[L]`` the sample each reference belongs to, non-decreasing.
    """

    hyp_tokens: Tensor
    hyp_lens: Tensor
    ref_tokens: Tensor
    ref_lens: Tensor
    ref_owner: Tensor

    @property
    def num_samples(self) -> int:
        """The number of hypotheses."""
        return self.hyp_lens.numel()


def is_token_ids(preds: Any, target: Any) -> bool:
    """Tell the token-id form from the text form, rejecting a mix of the two.

    Raises:
        TypeError: If only one of ``preds`` and ``target`` is a tensor.
    """
    preds_is_tensor, target_is_tensor = isinstance(preds, Tensor), isinstance(target, Tensor)
    if preds_is_tensor != target_is_tensor:
        raise TypeError(
            "`preds` and `target` must both be text or both be token-id tensors, got "
            f"{type(preds).__name__} and {type(target).__name__}"
        )
    return preds_is_tensor


def check_text_corpus(preds: Sequence[str], target: TextTarget) -> tuple[list[str], list[list[str]]]:
    """Check a text corpus and return it as a list of hypotheses and a list of reference lists.

    Args:
        preds: one hypothesis string per sample.
        target: per sample, a reference string or a non-empty sequence of reference strings.

    Raises:
        TypeError: If ``preds`` or ``target`` is a bare string, or holds something else than strings.
        ValueError: If they hold different numbers of samples, or a sample has no reference.
    """
    for name, value in (("preds", preds), ("target", target)):
        if isinstance(value, str):
            raise TypeError(
                f"`{name}` must be a sequence with one entry per sample, got a single str {value[:40]!r}; "
                "wrap it in a list"
            )
        if not isinstance(value, Sequence):
            raise TypeError(f"`{name}` must be a sequence with one entry per sample, got {type(value).__name__}")
    if len(preds) != len(target):
        raise ValueError(
            f"`preds` and `target` must hold the same number of samples, got {len(preds)} and {len(target)}"
        )
    hyps = list(preds)
    if not all(isinstance(hyp, str) for hyp in hyps):
        index, bad = next((i, hyp) for i, hyp in enumerate(hyps) if not isinstance(hyp, str))
        raise TypeError(f"`preds[{index}]` must be a str, got {type(bad).__name__}")
    refs: list[list[str]] = []
    for index, sample_refs in enumerate(target):
        if isinstance(sample_refs, str):
            refs.append([sample_refs])
            continue
        if not isinstance(sample_refs, Sequence):
            raise TypeError(
                f"`target[{index}]` must be a str or a sequence of str, got {type(sample_refs).__name__}"
            )
        if len(sample_refs) == 0:
            raise ValueError(f"`target[{index}]` holds no reference; every sample needs at least one")
        for ref_index, ref in enumerate(sample_refs):
            if not isinstance(ref, str):
                raise TypeError(f"`target[{index}][{ref_index}]` must be a str, got {type(ref).__name__}")
        refs.append(list(sample_refs))
    return hyps, refs


TokenStream = tuple[list[str], str, int]
"""The words of ``num_lines`` lines, the separator token between lines, and ``num_lines``."""


def encode_streams(*streams: TokenStream) -> list[tuple[Tensor, Tensor]]:
    """Number the words of token streams, one vocabulary for all, and cut them into lines.

    Args:
        streams: ``(words, separator, num_lines)`` each, as the tokenizers' streams.

    Returns:
        Per stream, ``([sum(lens)] int64 ids, [num_lines] int64 lengths)``.
    """
    vocab = {word: index for index, word in enumerate(dict.fromkeys(chain.from_iterable(s[0] for s in streams)))}
    out = []
    for words, separator, num_lines in streams:
        ids = array("q", map(vocab.__getitem__, words))
        tokens = torch.frombuffer(ids, dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long)
        is_separator = tokens == vocab.get(separator, -1)
        cuts = torch.nonzero(is_separator).squeeze(1)
        if cuts.numel() != max(num_lines - 1, 0):
            raise RuntimeError(f"a stream of {num_lines} lines holds {cuts.numel()} separators")
        bounds = torch.cat([cuts.new_tensor([-1]), cuts, cuts.new_tensor([tokens.numel()])])
        lens = torch.diff(bounds) - 1 if num_lines else torch.zeros(0, dtype=torch.long)
        out.append((tokens[~is_separator], lens))
    return out


def flatten_text(hyp_stream: TokenStream, ref_stream: TokenStream, ref_owner: Sequence[int]) -> FlatCorpus:
    """Encode tokenized hypotheses and references (one shared vocabulary) as a :class:`FlatCorpus`."""
    (hyp_tokens, hyp_lens), (ref_tokens, ref_lens) = encode_streams(hyp_stream, ref_stream)
    return FlatCorpus(
        hyp_tokens=hyp_tokens,
        hyp_lens=hyp_lens,
        ref_tokens=ref_tokens,
        ref_lens=ref_lens,
        ref_owner=torch.tensor(ref_owner, dtype=torch.long),
    )


def flatten_token_ids(preds: Tensor, target: Tensor, ignore_index: int | None) -> FlatCorpus:
    """Check token-id tensors and flatten them, dropping ``ignore_index`` positions.

    A reference row that is all ``ignore_index`` counts as missing (as sacrebleu's ``None``),
    so that ``[B, R, T]`` targets can hold different numbers of references per sample; a
    sample whose rows are all missing keeps one empty reference.

    Args:
        preds: ``[B, T]`` integer token ids.
        target: ``[B, T']`` or ``[B, R, T']`` integer token ids.
        ignore_index: the id of padding, dropped before counting; ``None`` keeps every position.

    Raises:
        TypeError: If either tensor is not of an integer dtype.
        ValueError: If the shapes do not fit, or an id left after dropping padding is negative.
    """
    for name, value in (("preds", preds), ("target", target)):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"`{name}` token ids must be an integer tensor, got dtype {value.dtype}")
    if preds.ndim != 2:
        raise ValueError(f"`preds` token ids must have shape [batch, length], got {tuple(preds.shape)}")
    if target.ndim not in (2, 3):
        raise ValueError(
            "`target` token ids must have shape [batch, length] or [batch, references, length], "
            f"got {tuple(target.shape)}"
        )
    if target.shape[0] != preds.shape[0]:
        raise ValueError(
            f"`preds` and `target` must hold the same number of samples, got {preds.shape[0]} and {target.shape[0]}"
        )
    if target.ndim == 2:
        target = target.unsqueeze(1)
    preds, target = preds.long(), target.long()
    if ignore_index is None:
        hyp_tokens = preds.reshape(-1)
        hyp_lens = torch.full((preds.shape[0],), preds.shape[1], dtype=torch.long, device=preds.device)
        row_keep = torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)
        ref_tokens = target.reshape(-1)
        ref_lens = torch.full(target.shape[:2], target.shape[2], dtype=torch.long, device=target.device)
    else:
        hyp_keep = preds != ignore_index
        hyp_tokens, hyp_lens = preds[hyp_keep], hyp_keep.sum(1)
        ref_keep = target != ignore_index
        ref_lens = ref_keep.sum(2)
        row_keep = ref_lens > 0
        row_keep[:, 0] |= ~row_keep.any(1)
        ref_tokens = target[ref_keep & row_keep.unsqueeze(2)]
    owner = torch.arange(target.shape[0], device=target.device).unsqueeze(1).expand_as(row_keep)
    for name, tokens in (("preds", hyp_tokens), ("target", ref_tokens)):
        if tokens.numel() and int(tokens.min()) < 0:
            raise ValueError(
                f"`{name}` holds negative token id {int(tokens.min())}; "
                "if it marks padding, pass it as `ignore_index`"
            )
    return FlatCorpus(
        hyp_tokens=hyp_tokens,
        hyp_lens=hyp_lens,
        ref_tokens=ref_tokens,
        ref_lens=ref_lens[row_keep],
        ref_owner=owner[row_keep],
    )
