"""One set of decoding options, checked before any decoding, that picks the search and its processors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llmkit.generation.processors import BadWords, build_processors
from llmkit.generation.search import (
    GenerationOutput,
    Processor,
    ReorderFn,
    StepFn,
    beam_search,
    check_beam_arguments,
    check_prefix,
    greedy_search,
    sample,
)


@dataclass(frozen=True)
class GenerationConfig:
    """The decoding keywords of ``generate`` (Hugging Face's names), checked when built.

    The search is greedy when ``num_beams == 1`` and ``do_sample`` is false, sampling when
    ``do_sample`` is true, beam search (diverse with ``num_beam_groups > 1``) when
    ``num_beams > 1``. Processors are built by :func:`~llmkit.generation.build_processors`.

    Attributes:
        num_beams: beams per source; 1 for greedy search or sampling.
        length_penalty: beam search's length exponent.
        min_new_tokens: EOS is forbidden before this many tokens.
        do_sample: draw tokens instead of taking the best.
        temperature: sampling temperature (> 0).
        top_k: keep the ``k`` best tokens when sampling (0: all).
        top_p: keep the smallest set of tokens with probability ``>= top_p`` when sampling.
        min_p: drop tokens less likely than ``min_p`` times the best when sampling.
        repetition_penalty: HF's (CTRL's) penalty on tokens already generated (1: none).
        no_repeat_ngram_size: no n-gram of this size occurs twice in a row (0: off).
        bad_words_ids: token sequences that are never completed.
        num_return_sequences: sequences per source: the n-best of beam search, or samples.
        num_beam_groups: diverse beam search's groups; divides ``num_beams``.
        diversity_penalty: diverse beam search's penalty per earlier group's use of a token.
        logits_processors: the user's processors, run after the constraints and before the
            sampling warpers.

    Raises:
        ValueError: If an option is out of range or the options contradict each other.

    Examples:
        >>> GenerationConfig(do_sample=True, top_p=0.9, num_return_sequences=3).rows_per_source
        3
    """

    num_beams: int = 1
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: Sequence[Sequence[int]] | None = None
    num_return_sequences: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    logits_processors: Sequence[Processor] = field(default=())

    def __post_init__(self) -> None:
        if self.num_beams > 1:
            check_beam_arguments(
                num_beams=self.num_beams, num_return_sequences=self.num_return_sequences,
                num_beam_groups=self.num_beam_groups, diversity_penalty=self.diversity_penalty,
            )
            if self.do_sample:
                raise ValueError("`do_sample=True` with `num_beams > 1` (beam sampling) is not supported")
        else:
            if self.num_beams < 1:
                raise ValueError(f"`num_beams` must be at least 1, got {self.num_beams}")
            if self.num_return_sequences < 1:
                raise ValueError(f"`num_return_sequences` must be at least 1, got {self.num_return_sequences}")
            if self.num_return_sequences > 1 and not self.do_sample:
                raise ValueError(
                    f"greedy search gives one sequence per source, got num_return_sequences="
                    f"{self.num_return_sequences}: use num_beams >= {self.num_return_sequences} or do_sample=True"
                )
            if self.num_beam_groups != 1:
                raise ValueError(f"`num_beam_groups` ({self.num_beam_groups}) needs num_beams > 1")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"`length_penalty` must be finite, got {self.length_penalty}")
        if self.min_new_tokens < 0:
            raise ValueError(f"`min_new_tokens` must be >= 0, got {self.min_new_tokens}")
        self.processors()  # checks the processors' arguments

    @property
    def rows_per_source(self) -> int:
        """How many rows each source takes while decoding (beams, or samples)."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    def processors(self, *, vocab_size: int | None = None) -> list[Processor]:
        """The processors in their fixed order (``vocab_size`` also checks the banned ids)."""
        return build_processors(
            do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size, bad_words_ids=self.bad_words_ids,
            logits_processors=self.logits_processors, vocab_size=vocab_size,
        )

    def check(self, *, batch_size: int, max_new_tokens: int, vocab_size: int, decoder_prefix: Tensor | None) -> None:
        """Check what depends on the call: lengths, the prefix and every id against the vocabulary.

        Raises:
            ValueError: If ``max_new_tokens < 1``, ``min_new_tokens > max_new_tokens``, or the prefix
                does not fit or holds ids outside ``[0, vocab_size)``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
        if self.min_new_tokens > max_new_tokens:
            raise ValueError(
                f"`min_new_tokens` must be in [0, max_new_tokens={max_new_tokens}], got {self.min_new_tokens}"
            )
        self.processors(vocab_size=vocab_size)
        if decoder_prefix is not None:
            check_prefix(decoder_prefix, batch_size=batch_size, max_new_tokens=max_new_tokens)
            if decoder_prefix.numel():
                low, high = int(decoder_prefix.min()), int(decoder_prefix.max())
                if low < 0 or high >= vocab_size:
                    raise ValueError(
                        f"`decoder_prefix` holds token ids in [{low}, {high}], outside the vocabulary "
                        f"[0, {vocab_size - 1}]"
                    )

    def search(
        self,
        step: StepFn,
        *,
        reorder: ReorderFn,
        batch_size: int,
        bos_id: int | Tensor,
        eos_id: int,
        pad_id: int,
        max_new_tokens: int,
        device: torch.device | str,
        decoder_prefix: Tensor | None = None,
        suppress_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
        return_scores: bool = False,
    ) -> Tensor | GenerationOutput:
        """Run the search these options pick.

        Args:
            step: ``[N, t] -> [N, V]`` *logits* of the next token, ``N = batch_size * rows_per_source``
                (rows of one source adjacent); beam search takes their log-softmax.
            reorder: beam search's reorder of the step's state.
            batch_size: sources ``B``.
            bos_id: the token every row starts from, or a prompt ``[B, P]`` the rows continue (a
                decoder-only model's; the output holds only the tokens after it).
            eos_id: the token that ends a row.
            pad_id: fills a row after its EOS.
            max_new_tokens: the most tokens generated.
            device: where the tokens live.
            decoder_prefix: ``[B, P]`` forced first tokens per source (``pad_id`` ends a row's prefix).
            suppress_ids: tokens never generated (set to ``-inf`` before every other processor).
            generator: the random generator of sampling.
            return_scores: return a :class:`GenerationOutput`.

        Returns:
            ``[B * num_return_sequences, L]`` tokens, one source's rows adjacent, or a
            :class:`GenerationOutput`.
        """
        processors: list[Processor] = [BadWords([[i] for i in suppress_ids])] if suppress_ids else []
        processors += self.processors()
        common: dict[str, Any] = {
            "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id, "max_new_tokens": max_new_tokens,
            "min_new_tokens": self.min_new_tokens, "device": device, "logits_processors": processors,
            "return_scores": return_scores,
        }
        if self.num_beams > 1:

            def log_softmax_step(tokens: Tensor) -> Tensor:
                return torch.log_softmax(step(tokens).float(), dim=-1)

            return beam_search(
                log_softmax_step, reorder=reorder, batch_size=batch_size, num_beams=self.num_beams,
                length_penalty=self.length_penalty, decoder_prefix=decoder_prefix,
                num_return_sequences=self.num_return_sequences, num_beam_groups=self.num_beam_groups,
                diversity_penalty=self.diversity_penalty, **common,
            )
        rows = batch_size * self.rows_per_source
        if decoder_prefix is not None:
            decoder_prefix = decoder_prefix.repeat_interleave(self.rows_per_source, dim=0)
        if self.do_sample:
            return sample(step, batch_size=rows, decoder_prefix=decoder_prefix, generator=generator, **common)
        return greedy_search(step, batch_size=rows, decoder_prefix=decoder_prefix, **common)
