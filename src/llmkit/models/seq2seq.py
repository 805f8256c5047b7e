"""Seq2SeqTransformer: the encoder-decoder of "Attention Is All You Need" as a LightningModule."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn

from llmkit._compile import compiles, eager
from llmkit.generation import GenerationConfig, GenerationScorer, Processor
from llmkit.generation.search import pad_rows
from llmkit.metrics import BLEUScore, Perplexity, ROUGEScore
from llmkit.nn import (
    Decoder,
    DecoderState,
    Encoder,
    SinusoidalPositionalEncoding,
    label_smoothed_cross_entropy,
    padding_mask_to_allowed,
)

Batch = Mapping[str, Tensor] | tuple[Tensor, ...] | list[Tensor]


def inverse_sqrt_schedule(step: int, warmup_steps: int) -> float:
    """The paper's learning-rate shape, scaled to peak at 1: linear warm-up, then ``1/sqrt(step)``."""
    step = max(step, 1)
    if warmup_steps <= 0:
        return 1.0
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def _generate_for_scoring(model: nn.Module, batch: Batch) -> Tensor:
    """Greedy translations of the batch's sources, up to 10 tokens longer than their references."""
    if not isinstance(model, Seq2SeqTransformer):
        raise TypeError(f"expected a Seq2SeqTransformer, got {type(model).__name__}")
    src, tgt = model._unpack(batch)
    return model.generate(src, max_new_tokens=min(tgt.shape[1] + 9, model.hp.max_len - 1))


def _last_token_step(model: Seq2SeqTransformer, last: Tensor, memory: Tensor, state: DecoderState) -> Tensor:
    """Logits ``[N, V]`` of the token after ``last`` ``[N, 1]``, the positions before it in ``state``."""
    return model.decode(last, memory, state=state)[:, -1].float()


def _teacher_forcing(model: Seq2SeqTransformer, src: Tensor, tgt_in: Tensor) -> Tensor:
    """Logits ``[B, T, V]`` of every next target token: the checked inputs' encoder and decoder passes."""
    memory = model._encode(src)
    return model.decode(tgt_in, memory, memory_mask=model.memory_mask(src))


@functools.cache
def _compiled_teacher_forcing() -> Callable[[Seq2SeqTransformer, Tensor, Tensor], Tensor]:
    # One compiled function for every model with `compile=True`: kept outside the module, so that a
    # deepcopy (a teacher, a converted copy) never calls back into the original model.
    return cast(Callable[[Seq2SeqTransformer, Tensor, Tensor], Tensor], torch.compile(_teacher_forcing))


@functools.cache
def _compiled_last_token_step() -> Callable[[Seq2SeqTransformer, Tensor, Tensor, DecoderState], Tensor]:
    # One compiled function for every model: Dynamo guards on the module and the shapes, so a new
    # model or batch shape compiles once more, and the decoded length never does (static cache).
    return cast(Callable[[Seq2SeqTransformer, Tensor, Tensor, DecoderState], Tensor], torch.compile(_last_token_step))


class Seq2SeqTransformer(L.LightningModule):
    """The Transformer encoder-decoder (Vaswani et al., 2017), ready to train, validate and generate.

    Token embeddings are scaled by ``sqrt(d_model)`` and summed with sinusoidal positional
    encodings; the encoder and decoder stacks are post-LN as in the paper (pre-LN with
    ``norm_first=True``); a linear layer (tied to the target embedding by default) gives the
    logits. Training minimises label-smoothed cross-entropy over non-pad target tokens with AdamW
    and the paper's inverse-square-root warm-up (override ``configure_optimizers`` as usual).

    Batches are a mapping with ``"src"`` and ``"tgt"``, or a tuple ``(src, tgt)``: ``src`` is
    ``[B, S]`` padded with ``pad_id``; ``tgt`` is ``[B, T]``, ``BOS ... EOS`` padded with ``pad_id``.

    Args:
        src_vocab_size: source vocabulary size.
        tgt_vocab_size: target vocabulary size.
        d_model: model width.
        num_heads: attention heads; must divide ``d_model``.
        num_encoder_layers: encoder layers.
        num_decoder_layers: decoder layers.
        dim_feedforward: feed-forward inner width.
        dropout: dropout on embeddings, attention weights and sublayer outputs.
        activation: ``"relu"`` (the paper) or ``"gelu"``.
        norm_first: pre-LN (with a final norm) instead of the paper's post-LN.
        max_len: the longest source, and the longest target including BOS.
        pad_id: padding id (both vocabularies).
        bos_id: beginning-of-sequence id.
        eos_id: end-of-sequence id.
        label_smoothing: label smoothing of the training loss.
        share_embeddings: one embedding for source and target (the vocabularies must be equal).
        tie_output: the output projection shares the target embedding's weight.
        lr: peak learning rate, reached at the end of warm-up.
        warmup_steps: linear warm-up steps before the ``1/sqrt(step)`` decay.
        weight_decay: AdamW's weight decay (not applied to biases, norms and embeddings).
        betas: AdamW's betas (the paper's 0.9, 0.98).
        val_generate_batches: validation batches decoded greedily per epoch for ``val_bleu`` and
            ``val_rougeL`` (0: none).
        max_new_tokens: the default generation length (``None``: ``max_len - 1``).
        check_inputs: check token ids and lengths on every batch (a device sync per check).
        compile: run the teacher-forced encoder and decoder passes (training, validation, test)
            through ``torch.compile`` (inductor); the input checks stay eager, outside the graph.
            ``trainer.fit(torch.compile(model))`` works too (Lightning's way: it compiles the steps).

    Raises:
        ValueError: If an argument is out of range (e.g. ``d_model`` not divisible by ``num_heads``).

    Examples:
        >>> import torch
        >>> model = Seq2SeqTransformer(11, 13, d_model=16, num_heads=2, num_encoder_layers=1,
        ...                            num_decoder_layers=1, dim_feedforward=32, max_len=20)
        >>> src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
        >>> model(src, torch.tensor([[1, 4], [1, 5]])).shape  # logits [B, T, V]
        torch.Size([2, 2, 13])
        >>> model.generate(src, max_new_tokens=6).shape[0]
        2
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        max_len: int = 256,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        label_smoothing: float = 0.1,
        share_embeddings: bool = False,
        tie_output: bool = True,
        lr: float = 5e-4,
        warmup_steps: int = 4000,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        val_generate_batches: int = 1,
        max_new_tokens: int | None = None,
        check_inputs: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_arguments()
        self.src_embed = nn.Embedding(src_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embed = (
            self.src_embed if share_embeddings else nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        )
        self.positional = SinusoidalPositionalEncoding(d_model=d_model, max_len=max_len)
        self.embed_dropout = nn.Dropout(dropout)
        layer_args: dict[str, Any] = {
            "d_model": d_model, "num_heads": num_heads, "dim_feedforward": dim_feedforward,
            "dropout": dropout, "activation": activation, "norm_first": norm_first,
        }
        self.encoder = Encoder(num_layers=num_encoder_layers, **layer_args)
        self.decoder = Decoder(num_layers=num_decoder_layers, **layer_args)
        self.output = nn.Linear(d_model, tgt_vocab_size, bias=False)
        self._reset_parameters()
        if tie_output:
            # One Parameter, not a copy: the output projection is the target embedding.
            self.output.weight = self.tgt_embed.weight
        self.val_ppl = Perplexity(ignore_index=pad_id)
        self.val_bleu = BLEUScore(ignore_index=pad_id)
        self.val_rouge = ROUGEScore(rouge_keys=("rougeL",), ignore_index=pad_id)
        self.test_ppl = Perplexity(ignore_index=pad_id)
        self.test_bleu = BLEUScore(ignore_index=pad_id)
        self.test_rouge = ROUGEScore(rouge_keys=("rougeL",), ignore_index=pad_id)
        # One code path with GenerationEvaluation: generate, drop EOS and padding, update BLEU and ROUGE-L.
        self._scorers = {
            stage: GenerationScorer(
                {"bleu": getattr(self, f"{stage}_bleu"), "rouge": getattr(self, f"{stage}_rouge")},
                generate_fn=_generate_for_scoring, ignore_ids=(pad_id, eos_id), num_examples=0,
            )
            for stage in ("val", "test")
        }

    @property
    def hp(self) -> AttributeDict:
        """The hyperparameters saved by ``save_hyperparameters()``, with attribute access."""
        return cast(AttributeDict, self.hparams)

    def _check_arguments(self) -> None:
        hp = self.hp
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "dim_feedforward", "max_len"):
            if hp[name] < 1:
                raise ValueError(f"`{name}` must be at least 1, got {hp[name]}")
        if hp.d_model % hp.num_heads:
            raise ValueError(f"`d_model` ({hp.d_model}) must be divisible by `num_heads` ({hp.num_heads})")
        if hp.share_embeddings and hp.src_vocab_size != hp.tgt_vocab_size:
            raise ValueError(
                "`share_embeddings=True` needs one vocabulary, got src_vocab_size="
                f"{hp.src_vocab_size} and tgt_vocab_size={hp.tgt_vocab_size}"
            )
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= hp[name] < min(hp.src_vocab_size, hp.tgt_vocab_size):
                raise ValueError(f"`{name}` must be a valid token id below both vocabulary sizes, got {hp[name]}")
        if not 0.0 <= hp.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {hp.label_smoothing}")
        if not 0.0 <= hp.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {hp.dropout}")
        if hp.max_new_tokens is not None and not 1 <= hp.max_new_tokens <= hp.max_len - 1:
            raise ValueError(
                f"`max_new_tokens` must be in [1, max_len - 1 = {hp.max_len - 1}], got {hp.max_new_tokens}"
            )

    def _reset_parameters(self) -> None:
        # Xavier for the projections (as torch.nn.Transformer); embeddings N(0, d^-1/2), so that
        # after the sqrt(d) scaling they have unit variance and, tied, give unit-scale logits.
        for name, parameter in self.named_parameters():
            if "embed" in name:
                nn.init.normal_(parameter, mean=0.0, std=self.hp.d_model**-0.5)
                with torch.no_grad():
                    parameter[self.hp.pad_id].zero_()
            elif parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    # -----------------------------------------------------------------------------------------
    # The model

    def _check_ids(self, name: str, ids: Tensor, vocab_size: int, max_len: int) -> None:
        if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"`{name}` must have shape [batch, length], got {tuple(ids.shape)}")
        if ids.shape[1] > max_len:
            raise ValueError(f"`{name}` has length {ids.shape[1]}, longer than max_len={max_len}")
        if self.hp.check_inputs and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"`{name}` holds token ids in [{low}, {high}], outside the vocabulary [0, {vocab_size - 1}]"
                )

    def encode(self, src: Tensor) -> Tensor:
        """Encode ``src`` ``[B, S]`` into memory ``[B, S, D]`` (padding positions included)."""
        self._check_ids("src", src, self.hp.src_vocab_size, self.hp.max_len)
        return self._encode(src)

    def _encode(self, src: Tensor) -> Tensor:
        x = self.embed_dropout(self.positional(self.src_embed(src) * math.sqrt(self.hp.d_model)))
        return self.encoder(x, mask=self.memory_mask(src))

    def memory_mask(self, src: Tensor) -> Tensor:
        """``[B, 1, 1, S]`` bool: the source positions that may be attended (not padding)."""
        return padding_mask_to_allowed(src == self.hp.pad_id)

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        *,
        memory_mask: Tensor | None = None,
        state: DecoderState | None = None,
    ) -> Tensor:
        """Logits ``[B, T, V]`` of the next token at every position of ``tgt_in`` ``[B, T]``.

        Args:
            tgt_in: target tokens, BOS first (with ``state``: only the positions after the cached ones).
            memory: the encoder output ``[B, S, D]``.
            memory_mask: from :meth:`memory_mask`; ``None`` attends to every source position.
            state: incremental decoding state from ``self.decoder.init_state``.
        """
        offset = state.position if state is not None else 0
        x = self.positional(self.tgt_embed(tgt_in) * math.sqrt(self.hp.d_model), offset=offset)
        hidden = self.decoder(self.embed_dropout(x), memory=memory, memory_mask=memory_mask, state=state)
        return self.output(hidden)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: logits ``[B, T, V]`` for ``tgt_in`` ``[B, T]`` given ``src`` ``[B, S]``."""
        self._check_ids("src", src, self.hp.src_vocab_size, self.hp.max_len)
        self._check_ids("tgt_in", tgt_in, self.hp.tgt_vocab_size, self.hp.max_len)
        if src.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"`src` and `tgt` batch sizes differ: {src.shape[0]} and {tgt_in.shape[0]}")
        return (_compiled_teacher_forcing() if compiles(self, self.hp.compile) else _teacher_forcing)(self, src, tgt_in)

    # -----------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        use_cache: bool = True,
        min_new_tokens: int = 0,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        bad_words_ids: Sequence[Sequence[int]] | None = None,
        num_return_sequences: int = 1,
        num_beam_groups: int = 1,
        diversity_penalty: float = 0.0,
        logits_processors: Sequence[Processor] = (),
        decoder_prefix: Tensor | Sequence[Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
        return_scores: bool = False,
        cache_implementation: str = "dynamic",
        compile: bool = False,
    ) -> Any:
        """Translate ``src`` ``[B, S]``: ``[B * num_return_sequences, L]`` token ids after BOS, ending at EOS.

        Rows are padded with ``pad_id`` after their EOS; the rows of one source are adjacent (best
        first for beam search). Padding and BOS are never generated. Greedy search by default,
        sampling with ``do_sample``, beam search with ``num_beams > 1`` (diverse with
        ``num_beam_groups``); the keywords are Hugging Face's, and every option is checked before
        any decoding (:class:`~llmkit.generation.GenerationConfig`).

        Args:
            src: source token ids.
            max_new_tokens: the most tokens generated (default: ``hparams.max_new_tokens`` or ``max_len - 1``).
            num_beams: 1 for greedy search or sampling, more for beam search.
            length_penalty: beam search's length exponent (``score = log p / len ** length_penalty``).
            use_cache: decode incrementally with a KV cache (same tokens, much faster).
            min_new_tokens: forbid EOS before this many tokens.
            do_sample: draw each token from the processed distribution.
            temperature: sampling temperature (> 0).
            top_k: sample among the ``k`` most likely tokens (0: all).
            top_p: sample within the smallest set of probability ``>= top_p`` (nucleus).
            min_p: drop tokens below ``min_p`` times the top probability.
            repetition_penalty: penalise tokens already generated (1: none).
            no_repeat_ngram_size: never repeat an n-gram of this size (0: off).
            bad_words_ids: token sequences never completed.
            num_return_sequences: the n-best of beam search, or samples per source.
            num_beam_groups: diverse beam search's groups.
            diversity_penalty: diverse beam search's penalty.
            logits_processors: the user's processors ``(tokens [N, t], scores [N, V]) -> [N, V]``.
            decoder_prefix: ``[B, P]`` target tokens forced first (after BOS), each row's prefix
                ending at its first ``pad_id``; a LongTensor or lists of ids (padded here).
            generator: the random generator of sampling, on ``src``'s device.
            return_scores: return a :class:`~llmkit.generation.GenerationOutput` with the sequences'
                and tokens' log-probabilities.
            cache_implementation: ``"dynamic"`` (the cache grows with the output) or ``"static"``
                (preallocated to ``max_new_tokens + 1`` positions, the position a tensor: fixed shapes).
            compile: run each decoding step through ``torch.compile`` over a static cache (implies
                ``cache_implementation="static"``). It compiles once per model and input shape, never
                per length; the first call pays the compilation. Same tokens as eager.

        Returns:
            ``[B * num_return_sequences, L]`` LongTensor, or a ``GenerationOutput``.

        Raises:
            ValueError: If an option is out of range or contradicts another, the prefix does not fit,
                or a token id is outside the vocabulary.
        """
        hp = self.hp
        limit = hp.max_len - 1
        if max_new_tokens is None:
            max_new_tokens = hp.max_new_tokens if hp.max_new_tokens is not None else limit
        if max_new_tokens > limit:
            raise ValueError(f"`max_new_tokens` ({max_new_tokens}) exceeds max_len - 1 = {limit}")
        config = GenerationConfig(
            num_beams=num_beams, length_penalty=length_penalty, min_new_tokens=min_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, bad_words_ids=bad_words_ids,
            num_return_sequences=num_return_sequences, num_beam_groups=num_beam_groups,
            diversity_penalty=diversity_penalty, logits_processors=logits_processors,
        )
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"`cache_implementation` must be 'dynamic' or 'static', got {cache_implementation!r}")
        if (compile or cache_implementation == "static") and not use_cache:
            raise ValueError("a static cache or `compile=True` needs `use_cache=True`")
        static = compile or cache_implementation == "static"
        self._check_ids("src", src, hp.src_vocab_size, hp.max_len)
        prefix = self._as_prefix(decoder_prefix, src.device)
        config.check(
            batch_size=src.shape[0], max_new_tokens=max_new_tokens, vocab_size=hp.tgt_vocab_size, decoder_prefix=prefix
        )
        was_training = self.training
        self.eval()
        try:
            memory, mask = self._encode(src), self.memory_mask(src)
            if config.rows_per_source > 1:
                memory = memory.repeat_interleave(config.rows_per_source, dim=0)
                mask = mask.repeat_interleave(config.rows_per_source, dim=0)
            state = (
                self.decoder.init_state(memory, mask, max_len=max_new_tokens + 1, static=static) if use_cache else None
            )
            one_step = _compiled_last_token_step() if compile else _last_token_step

            def step(tokens: Tensor) -> Tensor:
                if state is not None:  # every call adds one token: the cache holds all but the last
                    return one_step(self, tokens[:, -1:].contiguous(), memory, state)
                return self.decode(tokens, memory, memory_mask=mask)[:, -1].float()

            return config.search(
                step, reorder=state.reorder if state is not None else (lambda index: None),
                batch_size=src.shape[0], bos_id=hp.bos_id, eos_id=hp.eos_id, pad_id=hp.pad_id,
                max_new_tokens=max_new_tokens, device=src.device, decoder_prefix=prefix,
                # Padding and BOS are never generated (BOS only starts a sequence).
                suppress_ids=sorted({hp.pad_id, hp.bos_id} - {hp.eos_id}),
                generator=generator, return_scores=return_scores,
            )
        finally:
            self.train(was_training)

    def _as_prefix(self, prefix: Tensor | Sequence[Sequence[int]] | None, device: torch.device) -> Tensor | None:
        if prefix is None:
            return None
        return prefix.to(device) if isinstance(prefix, Tensor) else pad_rows(prefix, self.hp.pad_id, device)

    # -----------------------------------------------------------------------------------------
    # Lightning

    def _unpack(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Mapping):
            if "src" not in batch or "tgt" not in batch:
                raise ValueError(f"a batch mapping needs keys 'src' and 'tgt', got {sorted(batch)}")
            return batch["src"], batch["tgt"]
        if isinstance(batch, tuple | list) and len(batch) >= 2 and all(isinstance(t, Tensor) for t in batch[:2]):
            return batch[0], batch[1]
        raise ValueError(
            "a batch must be a mapping with 'src' and 'tgt' or a tuple (src, tgt) of tensors, "
            f"got {type(batch).__name__}"
        )

    def _loss(self, logits: Tensor, tgt_out: Tensor) -> Tensor:
        # F.cross_entropy's value, its label smoothing fused into one pass (llmkit.nn.loss).
        return label_smoothed_cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), tgt_out.reshape(-1),
            ignore_index=self.hp.pad_id, label_smoothing=self.hp.label_smoothing,
        )

    def _shared_step(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        src, tgt = self._unpack(batch)
        if tgt.ndim != 2 or tgt.shape[1] < 2:
            raise ValueError(f"`tgt` must have shape [batch, length >= 2] (BOS ... EOS), got {tuple(tgt.shape)}")
        # forward checks tgt[:, :-1]; the last column is only ever a label.
        self._check_ids("tgt", tgt[:, -1:], self.hp.tgt_vocab_size, self.hp.max_len)
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
        logits = self(src, tgt_in)
        return src, tgt_out, logits, self._loss(logits, tgt_out)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Label-smoothed cross-entropy of the next target token; logs ``train_loss``."""
        src, _, _, loss = self._shared_step(batch)
        self._log_training(loss, src.shape[0])
        return loss

    # Under `trainer.fit(torch.compile(model))` Lightning compiles the whole steps: logging, metric
    # updates and generation run eagerly, outside the graph (Dynamo cannot trace `self.log`).
    @eager
    def _log_training(self, loss: Tensor, batch_size: int) -> None:
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)

    def _evaluate(self, batch: Batch, batch_idx: int, stage: str, generate_batches: int | None) -> None:
        src, tgt_out, logits, loss = self._shared_step(batch)
        self._record_evaluation(batch, batch_idx, stage, generate_batches, src, tgt_out, logits, loss)

    @eager
    def _record_evaluation(
        self, batch: Batch, batch_idx: int, stage: str, generate_batches: int | None,
        src: Tensor, tgt_out: Tensor, logits: Tensor, loss: Tensor,
    ) -> None:
        ppl: Perplexity = getattr(self, f"{stage}_ppl")
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True, batch_size=src.shape[0])
        ppl.update(logits, tgt_out)
        self.log(f"{stage}_ppl", ppl, batch_size=src.shape[0])
        if generate_batches is None or batch_idx < generate_batches:
            self._scorers[stage].update(self, batch)

    def _log_generation_scores(self, stage: str) -> None:
        scorer = self._scorers[stage]
        values = scorer.compute()  # on every process (the states sync); {} when no process decoded
        if values:
            # Already equal on every process: "max" keeps them and silences Lightning's sync warning.
            self.log(f"{stage}_bleu", values["bleu"], prog_bar=True, sync_dist=True, reduce_fx="max")
            self.log(f"{stage}_rougeL", values["rouge_rougeL_fmeasure"], sync_dist=True, reduce_fx="max")
        scorer.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Logs ``val_loss``, ``val_ppl`` and, on the first ``val_generate_batches``, ``val_bleu``/``val_rougeL``."""
        self._evaluate(batch, batch_idx, "val", self.hp.val_generate_batches)

    def on_validation_epoch_end(self) -> None:
        """Log ``val_bleu`` and ``val_rougeL`` of the decoded batches."""
        self._log_generation_scores("val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Logs ``test_loss``, ``test_ppl``, ``test_bleu`` and ``test_rougeL`` over every test batch."""
        self._evaluate(batch, batch_idx, "test", None)

    def on_test_epoch_end(self) -> None:
        """Log ``test_bleu`` and ``test_rougeL`` of the decoded batches."""
        self._log_generation_scores("test")

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Greedy translations ``[B, L]`` of the batch's sources (a batch may also be a bare ``src``)."""
        src = batch if isinstance(batch, Tensor) else self._unpack(batch)[0]
        return self.generate(src)

    def configure_optimizers(self) -> Any:
        """AdamW (no decay on biases, norms, embeddings) with warm-up and inverse-square-root decay."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            (decay if parameter.dim() > 1 and "embed" not in name else no_decay).append(parameter)
        groups = [
            {"params": decay, "weight_decay": self.hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hp.lr, betas=tuple(self.hp.betas))
        warmup = self.hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inverse_sqrt_schedule(step + 1, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
