"""Greedy and beam search over a decoder step function.

A *step function* maps the tokens decoded so far, ``[N, t]`` (BOS first), to the log-probabilities
of the next token, ``[N, V]``. It may keep its own state between calls (a KV cache); beam search
then calls ``reorder(index)`` after each step so that row ``i`` of that state follows the beam
that now sits in row ``i``.

Outputs are ``[B, L]``: the tokens after BOS, each row ending at its EOS (when one was produced
within ``max_new_tokens``) and padded with ``pad_id``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor], Tensor]
ReorderFn = Callable[[Tensor], None]


def _check_lengths(max_new_tokens: int, min_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"`min_new_tokens` must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")


@torch.no_grad()
def greedy_search(
    step: StepFn,
    *,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Take the most likely token at every step; a row stops at its EOS.

    Args:
        step: the step function, ``[B, t] -> [B, V]`` log-probabilities.
        batch_size: rows ``B``.
        bos_id: the token every row starts from.
        eos_id: the token that ends a row.
        pad_id: fills a row after its EOS.
        max_new_tokens: the most tokens generated per row.
        min_new_tokens: EOS is forbidden before this many tokens.
        device: where the tokens live.

    Returns:
        ``[B, L]`` with ``L <= max_new_tokens``.

    Raises:
        ValueError: If the lengths are out of range.

    Example:
        >>> import torch
        >>> table = torch.log_softmax(torch.eye(4) * 5, dim=-1).roll(1, dims=1)  # token i -> i + 1
        >>> greedy_search(lambda tokens: table[tokens[:, -1]], batch_size=1, bos_id=0, eos_id=3,
        ...               pad_id=0, max_new_tokens=5)
        tensor([[1, 2, 3]])
    """
    _check_lengths(max_new_tokens, min_new_tokens)
    tokens = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for index in range(max_new_tokens):
        log_probs = step(tokens)
        if index < min_new_tokens:
            log_probs = log_probs.clone()
            log_probs[:, eos_id] = -torch.inf
        next_token = torch.where(finished, pad_id, log_probs.argmax(dim=-1))
        tokens = torch.cat([tokens, next_token.unsqueeze(1)], dim=1)
        finished |= next_token == eos_id
        if bool(finished.all()):
            break
    return tokens[:, 1:]


class _Finished:
    """The best ``num_beams`` finished hypotheses of one source."""

    def __init__(self, num_beams: int) -> None:
        self.num_beams = num_beams
        self.hypotheses: list[tuple[float, list[int]]] = []

    def add(self, score: float, tokens: list[int]) -> None:
        if len(self.hypotheses) < self.num_beams or score > self.worst:
            self.hypotheses.append((score, tokens))
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


@torch.no_grad()
def beam_search(
    step: StepFn,
    *,
    reorder: ReorderFn,
    batch_size: int,
    num_beams: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Beam search with length normalisation as in fairseq and Hugging Face.

    Rows ``b * num_beams .. (b + 1) * num_beams - 1`` of the step function's input are the beams
    of source ``b``. A finished hypothesis scores ``sum(log p) / len ** length_penalty``, where
    ``len`` counts its generated tokens, EOS included. A source stops when no running beam can
    beat its ``num_beams`` finished ones; at ``max_new_tokens`` its running beams are scored as
    finished. The best hypothesis of each source is returned.

    Args:
        step: the step function, ``[B * num_beams, t] -> [B * num_beams, V]`` log-probabilities.
        reorder: called with ``[B * num_beams]`` row indices after each step.
        batch_size: sources ``B``.
        num_beams: beams per source.
        bos_id: the token every beam starts from.
        eos_id: the token that ends a hypothesis.
        pad_id: fills the rows after EOS.
        max_new_tokens: the most tokens generated.
        min_new_tokens: EOS is forbidden before this many tokens.
        length_penalty: the exponent of the length; above 1 favours longer hypotheses.
        device: where the tokens live.

    Returns:
        ``[B, L]``.

    Raises:
        ValueError: If ``num_beams < 1`` or the lengths are out of range.

    Example:
        >>> import torch
        >>> table = torch.log_softmax(torch.eye(4) * 5, dim=-1).roll(1, dims=1)  # token i -> i + 1
        >>> beam_search(lambda tokens: table[tokens[:, -1]], reorder=lambda index: None, batch_size=1,
        ...             num_beams=2, bos_id=0, eos_id=3, pad_id=0, max_new_tokens=5)
        tensor([[1, 2, 3]])
    """
    _check_lengths(max_new_tokens, min_new_tokens)
    if num_beams < 1:
        raise ValueError(f"`num_beams` must be at least 1, got {num_beams}")
    rows = batch_size * num_beams
    tokens = torch.full((rows, 1), bos_id, dtype=torch.long, device=device)
    # Only the first beam of each source is live at the start, so the first step does not pick
    # the same continuation num_beams times.
    beam_scores = torch.full((batch_size, num_beams), -float("inf"), device=device)
    beam_scores[:, 0] = 0.0
    finished = [_Finished(num_beams) for _ in range(batch_size)]
    done = [False] * batch_size
    for index in range(max_new_tokens):
        length = index + 1
        log_probs = step(tokens).float()
        if index < min_new_tokens:
            log_probs = log_probs.clone()
            log_probs[:, eos_id] = -torch.inf
        vocab = log_probs.shape[1]
        candidates = (beam_scores.reshape(-1, 1) + log_probs).view(batch_size, num_beams * vocab)
        top_scores, top_index = candidates.topk(min(2 * num_beams, num_beams * vocab), dim=1)
        top_beam = torch.div(top_index, vocab, rounding_mode="floor")
        top_token = top_index % vocab
        scores_list, beams_list, tokens_list = top_scores.tolist(), top_beam.tolist(), top_token.tolist()

        # Beams left without a finite continuation stay dead (-inf) instead of winning with 0.
        next_scores = [[-float("inf")] * num_beams for _ in range(batch_size)]
        next_tokens = [[pad_id] * num_beams for _ in range(batch_size)]
        next_rows = [[b * num_beams + k for k in range(num_beams)] for b in range(batch_size)]
        history = tokens[:, 1:].tolist()
        for b in range(batch_size):
            if done[b]:
                continue
            kept = 0
            candidates_b = zip(scores_list[b], beams_list[b], tokens_list[b], strict=True)
            for rank, (score, beam, token) in enumerate(candidates_b):
                if score == -float("inf"):
                    break
                row = b * num_beams + beam
                if token == eos_id:
                    # As HF: an EOS among the top num_beams candidates finishes a hypothesis.
                    if rank < num_beams:
                        finished[b].add(score / length**length_penalty, [*history[row], eos_id])
                    continue
                next_scores[b][kept], next_tokens[b][kept], next_rows[b][kept] = score, token, row
                kept += 1
                if kept == num_beams:
                    break
            done[b] = kept == 0 or finished[b].is_done(max(next_scores[b][:kept]), length, length_penalty)
        if all(done):
            break
        row_index = torch.tensor(next_rows, device=device).view(-1)
        tokens = torch.cat([tokens[row_index], torch.tensor(next_tokens, device=device).view(-1, 1)], dim=1)
        beam_scores = torch.tensor(next_scores, device=device)
        reorder(row_index)

    history = tokens[:, 1:].tolist()
    final_scores = beam_scores.tolist()
    best: list[list[int]] = []
    for b in range(batch_size):
        if not done[b]:
            length = tokens.shape[1] - 1
            for k in range(num_beams):
                if final_scores[b][k] > -float("inf"):
                    finished[b].add(final_scores[b][k] / length**length_penalty, history[b * num_beams + k])
        best.append(finished[b].hypotheses[0][1] if finished[b].hypotheses else [])
    width = max((len(hypothesis) for hypothesis in best), default=0)
    out = torch.full((batch_size, width), pad_id, dtype=torch.long, device=device)
    for b, hypothesis in enumerate(best):
        out[b, : len(hypothesis)] = torch.tensor(hypothesis, dtype=torch.long, device=device)
    return out
