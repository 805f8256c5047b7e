"""Greedy search, sampling and beam search over a decoder step function.

A *step function* maps the tokens decoded so far, ``[N, t]`` (BOS first), to the scores of the
next token, ``[N, V]``: logits for greedy search and sampling, log-probabilities for beam search
(whose hypothesis scores are their sums). It may keep its own state between calls (a KV cache);
beam search then calls ``reorder(index)`` after each step so that row ``i`` of that state
follows the beam that now sits in row ``i``.

At each step, in this order: EOS is forbidden while fewer than ``min_new_tokens`` tokens have
been generated; the ``logits_processors`` run in their list order (see
:func:`llmkit.generation.build_processors` for the order it builds); a row whose
``decoder_prefix`` is not exhausted takes its next prefix token instead of choosing.

Outputs are ``[N, L]``: the tokens after BOS, each row ending at its EOS (when one was produced
within ``max_new_tokens``) and padded with ``pad_id``; with ``return_scores=True`` a
:class:`GenerationOutput` that adds the scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor

StepFn = Callable[[Tensor], Tensor]
ReorderFn = Callable[[Tensor], None]
Processor = Callable[[Tensor, Tensor], Tensor]
"""A logits processor: ``processor(tokens [N, t], scores [N, V]) -> scores [N, V]``, Hugging Face's argument order."""


@dataclass(frozen=True)
class GenerationOutput:
    """Generated tokens with their scores.

    Attributes:
        sequences: ``[N, L]`` LongTensor, as the search returns without scores.
        scores: ``[N]`` float: greedy search and sampling, the sum of ``token_scores``; beam search,
            the hypothesis score ``sum(token_scores) / len ** length_penalty`` that ranked it.
        token_scores: ``[N, L]`` float, 0 after a row's end. Greedy search and sampling: the
            log-probability of each token under the processed distribution it was chosen from
            (a forced prefix token: under the model's distribution before the processors). Beam
            search: each step's increment of the hypothesis' running score.
    """

    sequences: Tensor
    scores: Tensor
    token_scores: Tensor


def _check_lengths(max_new_tokens: int, min_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"`min_new_tokens` must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")


def check_prefix(decoder_prefix: Tensor, *, batch_size: int, max_new_tokens: int) -> None:
    """Check a forced prefix: ``[batch_size, P]`` integer ids with ``P <= max_new_tokens``.

    Raises:
        TypeError: If it is not an integer tensor.
        ValueError: If its shape does not fit.
    """
    if not isinstance(decoder_prefix, Tensor) or decoder_prefix.is_floating_point() or decoder_prefix.is_complex():
        raise TypeError(f"`decoder_prefix` must be an integer LongTensor [batch, P], got {type(decoder_prefix)}")
    if decoder_prefix.ndim != 2 or decoder_prefix.shape[0] != batch_size:
        raise ValueError(
            f"`decoder_prefix` must have shape [batch={batch_size}, P], got {tuple(decoder_prefix.shape)}"
        )
    if decoder_prefix.shape[1] > max_new_tokens:
        raise ValueError(
            f"`decoder_prefix` has {decoder_prefix.shape[1]} tokens, more than max_new_tokens={max_new_tokens}"
        )


class _Prefix:
    """A per-row forced prefix ``[N, P]``, padded with ``pad_id`` after each row's last forced token."""

    def __init__(self, prefix: Tensor | None, pad_id: int, device: torch.device | str) -> None:
        self.tokens = prefix.to(device=device, dtype=torch.long) if prefix is not None else None
        self.lengths = (self.tokens != pad_id).long().cumprod(dim=1).sum(dim=1) if self.tokens is not None else None
        self.width = int(self.lengths.max()) if self.lengths is not None and self.lengths.numel() else 0

    def forced(self, index: int) -> tuple[Tensor, Tensor] | None:
        """``(rows still forced [N] bool, their tokens [N])`` at step ``index``, or None past the prefix."""
        if self.tokens is None or self.lengths is None or index >= self.width:
            return None
        return self.lengths > index, self.tokens[:, index]


def first_tokens(bos_id: int | Tensor, rows: int, device: torch.device | str) -> Tensor:
    """The tokens the ``rows`` start from: ``[rows, 1]`` of ``bos_id``, or a prompt ``[B, P]`` repeated to ``rows``.

    A decoder-only language model starts from its prompt rather than BOS: row ``r`` continues
    prompt row ``r // (rows // B)``, so the rows of one prompt (its beams, or its samples) are
    adjacent. The searches return only what follows these first tokens.

    Raises:
        TypeError: If a tensor ``bos_id`` is not an integer tensor.
        ValueError: If a prompt is not ``[B, P >= 1]`` with ``B`` dividing ``rows``.
    """
    if not isinstance(bos_id, Tensor):
        return torch.full((rows, 1), bos_id, dtype=torch.long, device=device)
    if bos_id.is_floating_point() or bos_id.is_complex() or bos_id.dtype == torch.bool:
        raise TypeError(f"a prompt must hold integer token ids, got dtype {bos_id.dtype}")
    if bos_id.ndim != 2 or bos_id.shape[1] < 1 or bos_id.shape[0] < 1 or rows % bos_id.shape[0]:
        raise ValueError(
            f"a prompt must have shape [B, P >= 1] with B dividing the {rows} rows, got {tuple(bos_id.shape)}"
        )
    return bos_id.to(device=device, dtype=torch.long).repeat_interleave(rows // bos_id.shape[0], dim=0)


def _process(
    tokens: Tensor, scores: Tensor, processors: Sequence[Processor], *, index: int, min_new_tokens: int, eos_id: int
) -> Tensor:
    if index < min_new_tokens and 0 <= eos_id < scores.shape[1]:  # an id outside the vocabulary never ends a row
        scores = scores.index_fill(1, torch.tensor([eos_id], device=scores.device), -math.inf)
    for processor in processors:
        scores = processor(tokens, scores)
    return scores


def _draw(scores: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row of ``softmax(scores)`` ``[N, V]``: the first whose cumulative probability exceeds ``u``."""
    cumulative = scores.float().softmax(dim=-1).cumsum(dim=-1)
    uniform = torch.rand(scores.shape[0], 1, generator=generator, device=scores.device)
    # Scaled by the row's total, so float rounding of the sum never lets u fall past the end; a
    # zero-probability token repeats its predecessor's cumulative value and is never the first above u.
    index = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return index.clamp_(max=scores.shape[1] - 1).squeeze(1)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> Tensor:
    """Rows of ids of different lengths as one ``[len(rows), longest]`` LongTensor padded with ``pad_id``."""
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


@torch.no_grad()
def _token_by_token(
    step: StepFn,
    *,
    batch_size: int,
    bos_id: int | Tensor,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    min_new_tokens: int,
    device: torch.device | str,
    logits_processors: Sequence[Processor],
    decoder_prefix: Tensor | None,
    do_sample: bool,
    generator: torch.Generator | None,
    return_scores: bool,
) -> GenerationOutput:
    _check_lengths(max_new_tokens, min_new_tokens)
    if decoder_prefix is not None:
        check_prefix(decoder_prefix, batch_size=batch_size, max_new_tokens=max_new_tokens)
    prefix = _Prefix(decoder_prefix, pad_id, device)
    tokens = first_tokens(bos_id, batch_size, device)
    start = tokens.shape[1]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    token_scores: list[Tensor] = []
    for index in range(max_new_tokens):
        raw = step(tokens)
        scores = _process(tokens, raw, logits_processors, index=index, min_new_tokens=min_new_tokens, eos_id=eos_id)
        next_token = _draw(scores, generator) if do_sample else scores.argmax(dim=-1)
        forced = prefix.forced(index)
        if forced is not None:
            next_token = torch.where(forced[0], forced[1], next_token)
        if return_scores:
            chosen = scores.float().log_softmax(dim=-1).gather(1, next_token[:, None]).squeeze(1)
            if forced is not None:
                unprocessed = raw.float().log_softmax(dim=-1).gather(1, next_token[:, None]).squeeze(1)
                chosen = torch.where(forced[0], unprocessed, chosen)
            token_scores.append(chosen.masked_fill(finished, 0.0))
        next_token = torch.where(finished, pad_id, next_token)
        tokens = torch.cat([tokens, next_token.unsqueeze(1)], dim=1)
        finished |= next_token == eos_id
        if bool(finished.all()):
            break
    sequences = tokens[:, start:]
    if token_scores:
        per_token = torch.stack(token_scores, dim=1)
    else:
        per_token = sequences.new_zeros(sequences.shape, dtype=torch.float)
    return GenerationOutput(sequences, per_token.sum(dim=1), per_token)


@overload
def greedy_search(
    step: StepFn, *, batch_size: int, bos_id: int | Tensor, eos_id: int, pad_id: int, max_new_tokens: int,
    min_new_tokens: int = ..., device: torch.device | str = ..., logits_processors: Sequence[Processor] = ...,
    decoder_prefix: Tensor | None = ..., return_scores: Literal[False] = ...,
) -> Tensor: ...
@overload
def greedy_search(
    step: StepFn, *, batch_size: int, bos_id: int | Tensor, eos_id: int, pad_id: int, max_new_tokens: int,
    min_new_tokens: int = ..., device: torch.device | str = ..., logits_processors: Sequence[Processor] = ...,
    decoder_prefix: Tensor | None = ..., return_scores: Literal[True],
) -> GenerationOutput: ...
def greedy_search(
    step: StepFn,
    *,
    batch_size: int,
    bos_id: int | Tensor,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    device: torch.device | str = "cpu",
    logits_processors: Sequence[Processor] = (),
    decoder_prefix: Tensor | None = None,
    return_scores: bool = False,
) -> Tensor | GenerationOutput:
    """Take the highest-scoring token at every step; a row stops at its EOS.

    Args:
        step: the step function, ``[B, t] -> [B, V]`` logits (or log-probabilities).
        batch_size: rows ``B``.
        bos_id: the token every row starts from, or a prompt ``[batch_size, P]`` each row continues
            (not part of the output; see :func:`first_tokens`).
        eos_id: the token that ends a row.
        pad_id: fills a row after its EOS.
        max_new_tokens: the most tokens generated per row.
        min_new_tokens: EOS is forbidden before this many tokens.
        device: where the tokens live.
        logits_processors: applied to the step's scores in order (module docstring).
        decoder_prefix: ``[B, P]`` tokens forced at the first steps of each row, each row's
            prefix ending at its first ``pad_id``; ``P <= max_new_tokens``.
        return_scores: return a :class:`GenerationOutput` instead of the tokens alone.

    Returns:
        ``[B, L]`` with ``L <= max_new_tokens``, or a :class:`GenerationOutput`.

    Raises:
        ValueError: If the lengths are out of range or the prefix does not fit.

    Examples:
        >>> import torch
        >>> table = torch.log_softmax(torch.eye(4) * 5, dim=-1).roll(1, dims=1)  # token i -> i + 1
        >>> greedy_search(lambda tokens: table[tokens[:, -1]], batch_size=1, bos_id=0, eos_id=3,
        ...               pad_id=0, max_new_tokens=5)
        tensor([[1, 2, 3]])
    """
    out = _token_by_token(
        step, batch_size=batch_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, device=device, logits_processors=logits_processors,
        decoder_prefix=decoder_prefix, do_sample=False, generator=None, return_scores=return_scores,
    )
    return out if return_scores else out.sequences


@overload
def sample(
    step: StepFn, *, batch_size: int, bos_id: int | Tensor, eos_id: int, pad_id: int, max_new_tokens: int,
    min_new_tokens: int = ..., device: torch.device | str = ..., logits_processors: Sequence[Processor] = ...,
    decoder_prefix: Tensor | None = ..., generator: torch.Generator | None = ..., return_scores: Literal[False] = ...,
) -> Tensor: ...
@overload
def sample(
    step: StepFn, *, batch_size: int, bos_id: int | Tensor, eos_id: int, pad_id: int, max_new_tokens: int,
    min_new_tokens: int = ..., device: torch.device | str = ..., logits_processors: Sequence[Processor] = ...,
    decoder_prefix: Tensor | None = ..., generator: torch.Generator | None = ..., return_scores: Literal[True],
) -> GenerationOutput: ...
def sample(
    step: StepFn,
    *,
    batch_size: int,
    bos_id: int | Tensor,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    device: torch.device | str = "cpu",
    logits_processors: Sequence[Processor] = (),
    decoder_prefix: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_scores: bool = False,
) -> Tensor | GenerationOutput:
    """Draw each token from the softmax of the processed scores; a row stops at its EOS.

    Temperature, top-k, top-p and min-p are processors (:func:`llmkit.generation.build_processors`).
    Each draw inverts the cumulative distribution at one uniform number from ``generator`` per row
    (exact in distribution, and one random number per row instead of ``torch.multinomial``'s one
    per vocabulary entry), so one seed gives the same tokens.

    Args:
        step: the step function, ``[B, t] -> [B, V]`` logits.
        batch_size: rows ``B`` (repeat each source ``k`` times for ``k`` samples of it).
        bos_id: the token every row starts from, or a prompt ``[batch_size, P]`` each row continues
            (not part of the output; see :func:`first_tokens`).
        eos_id: the token that ends a row.
        pad_id: fills a row after its EOS.
        max_new_tokens: the most tokens generated per row.
        min_new_tokens: EOS is forbidden before this many tokens.
        device: where the tokens live.
        logits_processors: applied to the step's scores in order before the draw.
        decoder_prefix: ``[B, P]`` forced first tokens, as in :func:`greedy_search`.
        generator: the random generator of the draws (on ``device``).
        return_scores: return a :class:`GenerationOutput` instead of the tokens alone.

    Returns:
        ``[B, L]`` with ``L <= max_new_tokens``, or a :class:`GenerationOutput`.

    Raises:
        ValueError: If the lengths are out of range or the prefix does not fit.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # uniform, but EOS (3) is the only finite token
        >>> sample(lambda tokens: logits.index_fill(1, torch.tensor([0, 1, 2]), -float("inf")),
        ...        batch_size=2, bos_id=0, eos_id=3, pad_id=0, max_new_tokens=4,
        ...        generator=torch.Generator().manual_seed(0))
        tensor([[3],
                [3]])
    """
    out = _token_by_token(
        step, batch_size=batch_size, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, device=device, logits_processors=logits_processors,
        decoder_prefix=decoder_prefix, do_sample=True, generator=generator, return_scores=return_scores,
    )
    return out if return_scores else out.sequences


class _Finished:
    """The best ``num_beams`` finished hypotheses of one source (or one group of its beams)."""

    def __init__(self, num_beams: int) -> None:
        self.num_beams = num_beams
        self.hypotheses: list[tuple[float, list[int], list[float]]] = []

    def add(self, score: float, tokens: list[int], token_scores: list[float]) -> None:
        if len(self.hypotheses) < self.num_beams or score > self.worst:
            self.hypotheses.append((score, tokens, token_scores))
            self.hypotheses.sort(key=lambda item: -item[0])
            del self.hypotheses[self.num_beams :]

    @property
    def worst(self) -> float:
        return self.hypotheses[-1][0] if self.hypotheses else -float("inf")

    def is_done(self, best_running: float, length: int, length_penalty: float) -> bool:
        # No running beam can still beat the worst kept hypothesis, judging by its score at the
        # current length (the heuristic of HF's BeamSearchScorer, early_stopping=False).
        if len(self.hypotheses) < self.num_beams:
            return False
        return self.worst >= best_running / length**length_penalty


def check_beam_arguments(
    *, num_beams: int, num_return_sequences: int = 1, num_beam_groups: int = 1, diversity_penalty: float = 0.0
) -> None:
    """Check beam search's counts.

    Raises:
        ValueError: If ``num_beams < 1``, ``num_return_sequences`` is not in ``[1, num_beams]``,
            ``num_beam_groups`` does not divide ``num_beams``, or ``diversity_penalty < 0``.
    """
    if num_beams < 1:
        raise ValueError(f"`num_beams` must be at least 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"`num_return_sequences` must be in [1, num_beams={num_beams}] for beam search, got {num_return_sequences}"
        )
    if num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(
            f"`num_beam_groups` must be at least 1 and divide num_beams={num_beams}, got {num_beam_groups}"
        )
    if not diversity_penalty >= 0.0:
        raise ValueError(f"`diversity_penalty` must be >= 0, got {diversity_penalty}")


@overload
def beam_search(
    step: StepFn, *, reorder: ReorderFn, batch_size: int, num_beams: int, bos_id: int | Tensor, eos_id: int,
    pad_id: int, max_new_tokens: int, min_new_tokens: int = ..., length_penalty: float = ...,
    device: torch.device | str = ...,
    logits_processors: Sequence[Processor] = ..., decoder_prefix: Tensor | None = ..., num_return_sequences: int = ...,
    num_beam_groups: int = ..., diversity_penalty: float = ..., return_scores: Literal[False] = ...,
) -> Tensor: ...
@overload
def beam_search(
    step: StepFn, *, reorder: ReorderFn, batch_size: int, num_beams: int, bos_id: int | Tensor, eos_id: int,
    pad_id: int, max_new_tokens: int, min_new_tokens: int = ..., length_penalty: float = ...,
    device: torch.device | str = ...,
    logits_processors: Sequence[Processor] = ..., decoder_prefix: Tensor | None = ..., num_return_sequences: int = ...,
    num_beam_groups: int = ..., diversity_penalty: float = ..., return_scores: Literal[True],
) -> GenerationOutput: ...
@torch.no_grad()
def beam_search(
    step: StepFn,
    *,
    reorder: ReorderFn,
    batch_size: int,
    num_beams: int,
    bos_id: int | Tensor,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    device: torch.device | str = "cpu",
    logits_processors: Sequence[Processor] = (),
    decoder_prefix: Tensor | None = None,
    num_return_sequences: int = 1,
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
    return_scores: bool = False,
) -> Tensor | GenerationOutput:
    """Beam search with length normalisation as in fairseq and Hugging Face, n-best lists and diverse groups.

    Rows ``b * num_beams .. (b + 1) * num_beams - 1`` of the step function's input are the beams
    of source ``b``. A finished hypothesis scores ``sum(log p) / len ** length_penalty``, where
    ``len`` counts its generated tokens, EOS included. A source stops when no running beam can
    beat its ``num_beams`` finished ones; at ``max_new_tokens`` its running beams are scored as
    finished. The ``num_return_sequences`` best hypotheses of each source are returned, best first.

    Diverse beam search (Vijayakumar et al., 2016; HF's group beam search): the beams of a source
    form ``num_beam_groups`` groups of ``num_beams / num_beam_groups``, each a beam search of its
    own, stepped in order; a group's scores lose ``diversity_penalty`` times the number of earlier
    groups' beams (of the same source) that chose the same token at this step. The n-best list is
    the best of all groups' finished hypotheses.

    Args:
        step: the step function, ``[B * num_beams, t] -> [B * num_beams, V]`` log-probabilities.
        reorder: called with ``[B * num_beams]`` row indices after each step.
        batch_size: sources ``B``.
        num_beams: beams per source.
        bos_id: the token every beam starts from, or a prompt ``[batch_size, P]`` (see :func:`first_tokens`).
        eos_id: the token that ends a hypothesis.
        pad_id: fills the rows after EOS.
        max_new_tokens: the most tokens generated.
        min_new_tokens: EOS is forbidden before this many tokens.
        length_penalty: the exponent of the length; above 1 favours longer hypotheses.
        device: where the tokens live.
        logits_processors: applied to the step's log-probabilities in order.
        decoder_prefix: ``[B, P]`` tokens forced at the first steps of each source.
        num_return_sequences: hypotheses returned per source, ``<= num_beams``.
        num_beam_groups: groups of beams for diverse beam search; divides ``num_beams``.
        diversity_penalty: the penalty per earlier group's beam that took a token.
        return_scores: return a :class:`GenerationOutput` instead of the tokens alone.

    Returns:
        ``[B * num_return_sequences, L]``, the hypotheses of one source adjacent and best first;
        or a :class:`GenerationOutput`.

    Raises:
        ValueError: If a count or length is out of range or the prefix does not fit.

    Examples:
        >>> import torch
        >>> table = torch.log_softmax(torch.eye(4) * 5, dim=-1).roll(1, dims=1)  # token i -> i + 1
        >>> beam_search(lambda tokens: table[tokens[:, -1]], reorder=lambda index: None, batch_size=1,
        ...             num_beams=2, bos_id=0, eos_id=3, pad_id=0, max_new_tokens=5)
        tensor([[1, 2, 3]])
    """
    _check_lengths(max_new_tokens, min_new_tokens)
    check_beam_arguments(
        num_beams=num_beams, num_return_sequences=num_return_sequences, num_beam_groups=num_beam_groups,
        diversity_penalty=diversity_penalty,
    )
    if decoder_prefix is not None:
        check_prefix(decoder_prefix, batch_size=batch_size, max_new_tokens=max_new_tokens)
        decoder_prefix = decoder_prefix.repeat_interleave(num_beams, dim=0)
    prefix = _Prefix(decoder_prefix, pad_id, device)
    groups, group_size = num_beam_groups, num_beams // num_beam_groups
    rows = batch_size * num_beams
    tokens = first_tokens(bos_id, rows, device)
    start = tokens.shape[1]
    history_scores = torch.zeros(rows, 0, device=device)
    # Only the first beam of each group is live at the start, so the first step does not pick
    # the same continuation group_size times.
    beam_scores = torch.full((batch_size, groups, group_size), -math.inf, device=device)
    beam_scores[:, :, 0] = 0.0
    finished = [[_Finished(group_size) for _ in range(groups)] for _ in range(batch_size)]
    done = [[False] * groups for _ in range(batch_size)]
    for index in range(max_new_tokens):
        length = index + 1
        raw = step(tokens).float()
        scores = _process(tokens, raw, logits_processors, index=index, min_new_tokens=min_new_tokens, eos_id=eos_id)
        forced = prefix.forced(index)
        if forced is not None:
            # A forced token keeps its own log-probability; every other continuation is cut.
            only = torch.full_like(scores, -math.inf).scatter_(1, forced[1][:, None], raw.gather(1, forced[1][:, None]))
            scores = torch.where(forced[0][:, None], only, scores)
        vocab = scores.shape[1]
        scores = scores.view(batch_size, groups, group_size, vocab)

        next_scores = [[[-math.inf] * group_size for _ in range(groups)] for _ in range(batch_size)]
        next_tokens = [[[pad_id] * group_size for _ in range(groups)] for _ in range(batch_size)]
        next_rows = [
            [[b * num_beams + g * group_size + k for k in range(group_size)] for g in range(groups)]
            for b in range(batch_size)
        ]
        next_increments = [[[0.0] * group_size for _ in range(groups)] for _ in range(batch_size)]
        taken = torch.zeros(batch_size, vocab, device=device)
        for g in range(groups):
            group_scores = scores[:, g]
            if diversity_penalty and g:
                group_scores = group_scores - diversity_penalty * taken[:, None, :]
            candidates = (beam_scores[:, g, :, None] + group_scores).view(batch_size, group_size * vocab)
            top_scores, top_index = candidates.topk(min(2 * group_size, group_size * vocab), dim=1)
            top_beam = torch.div(top_index, vocab, rounding_mode="floor")
            top_token = top_index % vocab
            scores_list, beams_list, tokens_list = top_scores.tolist(), top_beam.tolist(), top_token.tolist()
            increments = group_scores.reshape(batch_size, group_size * vocab).gather(1, top_index).tolist()
            for b in range(batch_size):
                if done[b][g]:
                    continue
                kept = 0
                candidates_b = zip(scores_list[b], beams_list[b], tokens_list[b], increments[b], strict=True)
                for rank, (score, beam, token, increment) in enumerate(candidates_b):
                    if score == -math.inf:
                        break
                    row = b * num_beams + g * group_size + beam
                    if token == eos_id:
                        # As HF: an EOS among the top group_size candidates finishes a hypothesis.
                        if rank < group_size:
                            finished[b][g].add(
                                score / length**length_penalty,
                                [*tokens[row, start:].tolist(), eos_id],
                                [*history_scores[row].tolist(), increment],
                            )
                        continue
                    next_scores[b][g][kept], next_tokens[b][g][kept] = score, token
                    next_rows[b][g][kept], next_increments[b][g][kept] = row, increment
                    kept += 1
                    if kept == group_size:
                        break
                done[b][g] = kept == 0 or finished[b][g].is_done(
                    max(next_scores[b][g][:kept]), length, length_penalty
                )
            if diversity_penalty and g + 1 < groups:
                # HF's Hamming diversity: how many beams of earlier groups took each token at this step.
                pairs = [
                    (b, t) for b in range(batch_size)
                    for t, s in zip(next_tokens[b][g], next_scores[b][g], strict=True) if s > -math.inf
                ]
                if pairs:
                    where = torch.tensor(pairs, device=device)
                    taken.index_put_((where[:, 0], where[:, 1]), torch.ones(len(pairs), device=device), accumulate=True)
        if all(all(row) for row in done):
            break
        row_index = torch.tensor(next_rows, device=device).view(-1)
        new_tokens = torch.tensor(next_tokens, device=device).view(-1, 1)
        tokens = torch.cat([tokens.index_select(0, row_index), new_tokens], dim=1)
        history_scores = torch.cat(
            [history_scores.index_select(0, row_index), torch.tensor(next_increments, device=device).view(-1, 1)], dim=1
        )
        beam_scores = torch.tensor(next_scores, device=device)
        reorder(row_index)

    final_scores = beam_scores.tolist()
    best: list[tuple[float, list[int], list[float]]] = []
    for b in range(batch_size):
        pool: list[tuple[float, list[int], list[float]]] = []
        for g in range(groups):
            if not done[b][g]:
                length = tokens.shape[1] - start
                for k in range(group_size):
                    if final_scores[b][g][k] > -math.inf:
                        row = b * num_beams + g * group_size + k
                        finished[b][g].add(
                            final_scores[b][g][k] / length**length_penalty,
                            tokens[row, start:].tolist(), history_scores[row].tolist(),
                        )
            pool.extend(finished[b][g].hypotheses)
        pool.sort(key=lambda item: -item[0])
        pool = pool[:num_return_sequences]
        pool += [(-math.inf, [], [])] * (num_return_sequences - len(pool))
        best.extend(pool)
    sequences = pad_rows([tokens_ for _, tokens_, _ in best], pad_id, device)
    if not return_scores:
        return sequences
    per_token = torch.zeros(sequences.shape, device=device)
    for i, (_, _, increments) in enumerate(best):
        per_token[i, : len(increments)] = torch.tensor(increments, device=device)
    return GenerationOutput(sequences, torch.tensor([score for score, _, _ in best], device=device), per_token)
