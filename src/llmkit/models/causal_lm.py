"""CausalLMTransformer: a decoder-only language model (GPT-2, nanoGPT, LLaMA's layout) as a LightningModule."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn

from llmkit._compile import compiles, eager
from llmkit.generation import GenerationConfig, Processor
from llmkit.generation.search import pad_rows
from llmkit.metrics import Perplexity
from llmkit.nn import CausalDecoder, DecoderState, RotaryEmbedding, SinusoidalPositionalEncoding
from llmkit.nn.transformer import ACTIVATIONS

#: Label value that contributes nothing to the loss (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100
POSITIONALS = ("rope", "learned", "sinusoidal")

Batch = Tensor | Mapping[str, Tensor]


def warmup_cosine_schedule(step: int, warmup_steps: int, decay_steps: int | None, min_lr_ratio: float) -> float:
    """NanoGPT's learning-rate shape, scaled to peak at 1: linear warm-up, cosine decay, then a floor.

    Step ``s`` (0-based) of warm-up takes ``(s + 1) / (warmup_steps + 1)``; from ``warmup_steps``
    to ``decay_steps`` the factor falls along half a cosine from 1 to ``min_lr_ratio``, and stays
    there. ``decay_steps=None`` keeps 1 after warm-up.

    Examples:
        >>> warmup_cosine_schedule(0, 9, 100, 0.1), warmup_cosine_schedule(100, 9, 100, 0.1)
        (0.1, 0.1)
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay_steps is None:
        return 1.0
    if step >= decay_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(decay_steps - warmup_steps, 1)
    return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)


def _logits(model: CausalLMTransformer, ids: Tensor) -> Tensor:
    """Logits ``[B, T, V]`` of the checked ids' next tokens: the whole pass, which ``compile=True`` compiles."""
    return model.output(model.decoder(model.embed_positions(ids, 0)))


@functools.cache
def _compiled_logits() -> Callable[[CausalLMTransformer, Tensor], Tensor]:
    # One compiled function for every model, kept outside the module (a deepcopy never calls back into it).
    return cast(Callable[[CausalLMTransformer, Tensor], Tensor], torch.compile(_logits))


def _incremental_step(model: CausalLMTransformer, ids: Tensor, state: DecoderState) -> Tensor:
    """Logits ``[N, V]`` of the token after ``ids`` ``[N, t]``, the positions before them held in ``state``."""
    hidden = model.decoder(model.embed_positions(ids, state.position), state=state)
    return model.output(hidden[:, -1]).float()


@functools.cache
def _compiled_incremental_step() -> Callable[[CausalLMTransformer, Tensor, DecoderState], Tensor]:
    # Over a static cache the shapes never change with the length: one graph for the prompt, one per token.
    return cast(Callable[[CausalLMTransformer, Tensor, DecoderState], Tensor], torch.compile(_incremental_step))


class CausalLMTransformer(L.LightningModule):
    """A decoder-only transformer language model, ready to train, evaluate and sample from.

    Token embeddings (plus learned or sinusoidal positions, or rotary positions in every
    attention) go through pre-LN blocks of masked self-attention and feed-forward
    (:class:`~llmkit.nn.CausalDecoder`), a final layer norm and an output projection tied to the
    embedding. With ``positional="learned"`` and ``activation="gelu"`` it is GPT-2's and nanoGPT's
    ``GPT``, parameter for parameter. Training minimises the next-token cross-entropy with AdamW
    (decay on matrices only, as nanoGPT) and nanoGPT's warm-up + cosine schedule.

    Batches are a ``LongTensor[B, T]`` of token ids, or a mapping with ``"input_ids"`` ``[B, T]``
    and optionally ``"labels"`` ``[B, T]`` (aligned with the inputs, shifted here; ``-100`` is
    ignored) and ``"attention_mask"`` (1 on tokens, 0 on padding; padding must be at the end of
    a row). Without labels every next token is a label, except ``pad_id`` and masked positions.
    Positions ``0 .. T-2`` are fed and predict tokens ``1 .. T-1``, so ``T`` may be ``max_len + 1``
    (a :class:`~llmkit.data.PythonDocsDataModule` batch is ``block_size + 1`` tokens).

    Args:
        vocab_size: vocabulary size ``V``.
        d_model: model width.
        num_heads: attention heads; must divide ``d_model``.
        num_layers: decoder blocks.
        dim_feedforward: feed-forward inner width.
        dropout: dropout on embeddings, attention weights and each block's sublayer outputs.
        activation: ``"gelu"`` (GPT-2), ``"relu"`` or ``"swiglu"`` (LLaMA).
        positional: ``"rope"`` (rotary, GPT-NeoX/LLaMA), ``"learned"`` (GPT-2) or ``"sinusoidal"``.
        max_len: the longest sequence, prompt and generated tokens together.
        pad_id: padding id (never a label, never generated), or ``None``.
        eos_id: the id that ends a generated row, or ``None`` (rows run to ``max_new_tokens``).
        tie_output: the output projection shares the token embedding's weight.
        rope_base: the rotary wavelength base.
        lr: peak learning rate, reached at the end of warm-up.
        warmup_steps: linear warm-up steps.
        decay_steps: the step where the cosine decay reaches ``min_lr_ratio * lr`` (``None``: the
            trainer's estimated total steps when finite, else no decay).
        min_lr_ratio: the learning-rate floor as a share of ``lr``.
        weight_decay: AdamW's decay on weight matrices (not biases, norms).
        betas: AdamW's betas (nanoGPT's 0.9, 0.95).
        label_smoothing: label smoothing of the training loss.
        max_new_tokens: the default generation length (``None``: up to ``max_len``).
        check_inputs: check token ids on every batch (a device sync per check).
        compile: run the forward pass through ``torch.compile`` (inductor); checks stay eager.

    Raises:
        ValueError: If an argument is out of range or unknown (``positional``, ``activation``).

    Examples:
        >>> import torch
        >>> model = CausalLMTransformer(50, d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, max_len=32)
        >>> ids = torch.randint(0, 50, (2, 10))
        >>> model(ids).shape  # logits [B, T, V]
        torch.Size([2, 10, 50])
        >>> model.generate(ids[:, :4], max_new_tokens=5).shape  # only the new tokens
        torch.Size([2, 5])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 512,
        num_heads: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "gelu",
        positional: str = "rope",
        max_len: int = 1024,
        pad_id: int | None = None,
        eos_id: int | None = None,
        tie_output: bool = True,
        rope_base: float = 10000.0,
        lr: float = 6e-4,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        label_smoothing: float = 0.0,
        max_new_tokens: int | None = None,
        check_inputs: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_arguments()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.position_embed = nn.Embedding(max_len, d_model) if positional == "learned" else None
        self.positional = (
            SinusoidalPositionalEncoding(d_model=d_model, max_len=max_len) if positional == "sinusoidal" else None
        )
        rotary = (
            RotaryEmbedding(head_dim=d_model // num_heads, max_len=max_len, base=rope_base)
            if positional == "rope" else None
        )
        self.embed_dropout = nn.Dropout(dropout)
        self.decoder = CausalDecoder(
            num_layers=num_layers, d_model=d_model, num_heads=num_heads, dim_feedforward=dim_feedforward,
            dropout=dropout, activation=activation, rotary=rotary,
        )
        self.output = nn.Linear(d_model, vocab_size, bias=False)
        self._reset_parameters()
        if tie_output:
            # One Parameter, not a copy: the output projection is the token embedding.
            self.output.weight = self.embed.weight
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    @property
    def hp(self) -> AttributeDict:
        """The hyperparameters saved by ``save_hyperparameters()``, with attribute access."""
        return cast(AttributeDict, self.hparams)

    def _check_arguments(self) -> None:
        hp = self.hp
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "dim_feedforward", "max_len"):
            if hp[name] < 1:
                raise ValueError(f"`{name}` must be at least 1, got {hp[name]}")
        if hp.d_model % hp.num_heads:
            raise ValueError(f"`d_model` ({hp.d_model}) must be divisible by `num_heads` ({hp.num_heads})")
        if hp.positional not in POSITIONALS:
            raise ValueError(f"`positional` must be one of {POSITIONALS}, got {hp.positional!r}")
        if hp.activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {tuple(ACTIVATIONS)}, got {hp.activation!r}")
        if hp.positional == "rope" and (hp.d_model // hp.num_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head width, got d_model / num_heads = {hp.d_model // hp.num_heads}"
            )
        for name in ("pad_id", "eos_id"):
            if hp[name] is not None and not 0 <= hp[name] < hp.vocab_size:
                raise ValueError(f"`{name}` must be None or a token id in [0, {hp.vocab_size - 1}], got {hp[name]}")
        if not 0.0 <= hp.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {hp.dropout}")
        if not 0.0 <= hp.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {hp.label_smoothing}")
        if not 0.0 <= hp.min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {hp.min_lr_ratio}")
        if hp.warmup_steps < 0 or (hp.decay_steps is not None and hp.decay_steps < hp.warmup_steps):
            raise ValueError(
                f"`warmup_steps` must be >= 0 and `decay_steps` None or >= warmup_steps, "
                f"got {hp.warmup_steps} and {hp.decay_steps}"
            )
        if hp.max_new_tokens is not None and not 1 <= hp.max_new_tokens < hp.max_len:
            raise ValueError(
                f"`max_new_tokens` must be in [1, max_len - 1 = {hp.max_len - 1}], got {hp.max_new_tokens}"
            )

    def _reset_parameters(self) -> None:
        # GPT-2's initialisation: N(0, 0.02) everywhere, biases zero, and the projections that feed
        # the residual stream scaled by 1/sqrt(2 * layers) so its variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * self.hp.num_layers)
        for name, parameter in self.named_parameters():
            if parameter.dim() < 2:
                if name.endswith(".bias"):
                    nn.init.zeros_(parameter)
                continue
            std = residual_std if name.endswith(("out_proj.weight", "linear2.weight")) else 0.02
            nn.init.normal_(parameter, mean=0.0, std=std)
        if self.hp.pad_id is not None:
            with torch.no_grad():
                self.embed.weight[self.hp.pad_id].zero_()

    # -----------------------------------------------------------------------------------------
    # The model

    def check_ids(self, name: str, ids: Tensor, *, max_len: int | None = None) -> None:
        """Check ``ids`` are ``[B, T]`` integer token ids in the vocabulary with ``T <= max_len``.

        Raises:
            TypeError: If ``ids`` is not an integer tensor.
            ValueError: If its shape, length or ids are out of range.
        """
        max_len = self.hp.max_len if max_len is None else max_len
        if not isinstance(ids, Tensor) or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"`{name}` must be an integer tensor of token ids, got {getattr(ids, 'dtype', type(ids))}")
        if ids.ndim != 2:
            raise ValueError(f"`{name}` must have shape [batch, length], got {tuple(ids.shape)}")
        if ids.shape[1] > max_len:
            raise ValueError(f"`{name}` has length {ids.shape[1]}, longer than max_len={max_len}")
        if self.hp.check_inputs and ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= self.hp.vocab_size:
                raise ValueError(
                    f"`{name}` holds token ids in [{low}, {high}], outside the vocabulary [0, {self.hp.vocab_size - 1}]"
                )

    def embed_positions(self, ids: Tensor, offset: int | Tensor) -> Tensor:
        """Token embeddings of ``ids`` ``[B, T]`` with the positions ``offset ..`` added, after dropout: ``[B, T, D]``.

        Rotary positions are applied inside attention instead, so with ``positional="rope"`` this is
        the token embedding alone. ``offset`` may be a static cache's 0-dim tensor position.
        """
        x = self.embed(ids)
        if self.position_embed is not None:
            positions = offset + torch.arange(ids.shape[1], device=ids.device)
            # [B, T] positions, not [T]: its output then has the batch axis an attack's perturbation needs.
            x = x + self.position_embed(positions.expand(ids.shape[0], -1))
        elif self.positional is not None:
            x = self.positional(x, offset=offset)
        return self.embed_dropout(x)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` of the next token at every position of ``ids`` ``[B, T]`` (``T <= max_len``)."""
        self.check_ids("ids", ids)
        return (_compiled_logits() if compiles(self, self.hp.compile) else _logits)(self, ids)

    # -----------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
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
        """Continue ``prompt_ids`` ``[B, P]``: ``[B * num_return_sequences, L]``, the new tokens only.

        The keywords are :meth:`Seq2SeqTransformer.generate`'s (Hugging Face's): greedy search by
        default, sampling with ``do_sample``, beam search with ``num_beams > 1``. The prompts of one
        call share their length ``P`` (no padding): call once per length for prompts of different
        lengths. The processors (repetition penalty, n-gram blocking) see the prompt, as in Hugging
        Face. A row ends at ``eos_id`` (when set) and is padded after it with ``pad_id`` (or
        ``eos_id``). With the KV cache (``use_cache``) the prompt is encoded once and each step
        feeds one token; the tokens are the same without it.

        Args:
            prompt_ids: ``[B, P]`` token ids, ``1 <= P < max_len``.
            max_new_tokens: the most tokens generated (default: ``hparams.max_new_tokens``, else
                up to ``max_len``); ``P + max_new_tokens <= max_len``.
            num_beams: 1 for greedy search or sampling, more for beam search.
            length_penalty: beam search's length exponent.
            use_cache: decode incrementally with a KV cache.
            min_new_tokens: forbid EOS before this many tokens.
            do_sample: draw each token from the processed distribution.
            temperature: sampling temperature (> 0).
            top_k: sample among the ``k`` most likely tokens (0: all).
            top_p: nucleus sampling's probability mass.
            min_p: drop tokens below ``min_p`` times the top probability.
            repetition_penalty: penalise tokens already in the prompt or generated (1: none).
            no_repeat_ngram_size: never repeat an n-gram of this size (0: off).
            bad_words_ids: token sequences never completed.
            num_return_sequences: the n-best of beam search, or samples per prompt.
            num_beam_groups: diverse beam search's groups.
            diversity_penalty: diverse beam search's penalty.
            logits_processors: the user's processors ``(tokens [N, t], scores [N, V]) -> [N, V]``.
            decoder_prefix: ``[B, Q]`` tokens forced first after the prompt (a row's ending at ``pad_id``).
            generator: the random generator of sampling.
            return_scores: return a :class:`~llmkit.generation.GenerationOutput`.
            cache_implementation: ``"dynamic"`` or ``"static"`` (fixed shapes, for compiled steps).
            compile: run each step through ``torch.compile`` over a static cache.

        Returns:
            ``[B * num_return_sequences, L]`` LongTensor with ``L <= max_new_tokens``, or a ``GenerationOutput``.

        Raises:
            ValueError: If the prompt is empty, as long as ``max_len`` or holds ids outside the
                vocabulary; if ``max_new_tokens < 1`` or the prompt and the new tokens exceed
                ``max_len``; if an option is out of range.
        """
        hp = self.hp
        self.check_ids("prompt_ids", prompt_ids)
        length = prompt_ids.shape[1]
        if length < 1 or length >= hp.max_len:
            raise ValueError(
                f"`prompt_ids` must hold 1 to max_len - 1 = {hp.max_len - 1} tokens per row, got {length}"
            )
        if max_new_tokens is None:
            max_new_tokens = hp.max_new_tokens if hp.max_new_tokens is not None else hp.max_len - length
            max_new_tokens = min(max_new_tokens, hp.max_len - length)
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
        if length + max_new_tokens > hp.max_len:
            raise ValueError(
                f"a prompt of {length} tokens and max_new_tokens={max_new_tokens} exceed max_len={hp.max_len}"
            )
        config = GenerationConfig(
            num_beams=num_beams, length_penalty=length_penalty, min_new_tokens=min_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, bad_words_ids=bad_words_ids,
            num_return_sequences=num_return_sequences, num_beam_groups=num_beam_groups,
            diversity_penalty=diversity_penalty, logits_processors=logits_processors,
        )
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"`cache_implementation` must be 'dynamic' or 'static', got {cache_implementation!r}")
        static = compile or cache_implementation == "static"
        if static and not use_cache:
            raise ValueError("a static cache or `compile=True` needs `use_cache=True`")
        fill = hp.pad_id if hp.pad_id is not None else hp.eos_id if hp.eos_id is not None else 0
        prefix = None
        if decoder_prefix is not None:
            prefix = (
                decoder_prefix.to(prompt_ids.device) if isinstance(decoder_prefix, Tensor)
                else pad_rows(decoder_prefix, fill, prompt_ids.device)
            )
        config.check(
            batch_size=prompt_ids.shape[0], max_new_tokens=max_new_tokens, vocab_size=hp.vocab_size,
            decoder_prefix=prefix,
        )
        rows = prompt_ids.shape[0] * config.rows_per_source
        was_training = self.training
        self.eval()
        try:
            state = (
                self.decoder.init_state(
                    batch_size=rows, max_len=length + max_new_tokens, static=static, device=prompt_ids.device
                )
                if use_cache else None
            )
            one_step = _compiled_incremental_step() if compile else _incremental_step
            fed = 0  # how many positions the cache holds: the prompt at the first call, then one per call

            def step(tokens: Tensor) -> Tensor:
                nonlocal fed
                if state is None:
                    return _logits(self, tokens)[:, -1].float()
                new, fed = tokens[:, fed:].contiguous(), tokens.shape[1]
                return one_step(self, new, state)

            return config.search(
                step, reorder=state.reorder if state is not None else (lambda index: None),
                batch_size=prompt_ids.shape[0], bos_id=prompt_ids,
                # No EOS: an id outside the vocabulary, which no row ever produces.
                eos_id=hp.eos_id if hp.eos_id is not None else -1, pad_id=fill,
                max_new_tokens=max_new_tokens, device=prompt_ids.device, decoder_prefix=prefix,
                suppress_ids=[hp.pad_id] if hp.pad_id is not None and hp.pad_id != hp.eos_id else [],
                generator=generator, return_scores=return_scores,
            )
        finally:
            self.train(was_training)

    # -----------------------------------------------------------------------------------------
    # Lightning

    def _unpack(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(ids [B, T], labels [B, T])``: labels aligned with ``ids``, ``-100`` where nothing is predicted."""
        if isinstance(batch, Tensor):
            ids, labels, mask = batch, None, None
        elif isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(f"a batch mapping needs the key 'input_ids', got {sorted(batch)}")
            ids, labels, mask = batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
        else:
            raise TypeError(
                f"a batch must be a LongTensor [B, T] or a mapping with 'input_ids', got {type(batch).__name__}"
            )
        self.check_ids("input_ids", ids, max_len=self.hp.max_len + 1)  # the last token is only a label
        if ids.shape[1] < 2:
            raise ValueError(f"a training sequence needs at least 2 tokens, got shape {tuple(ids.shape)}")
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(f"`attention_mask` has shape {tuple(mask.shape)}, `input_ids` {tuple(ids.shape)}")
            if self.hp.check_inputs and bool((mask[:, 1:] > mask[:, :-1]).any()):
                raise ValueError("`attention_mask` must put the padding at the end of each row (right padding)")
        if labels is None:
            labels = ids
            if self.hp.pad_id is not None:
                labels = labels.masked_fill(ids == self.hp.pad_id, IGNORE_INDEX)
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        else:
            if labels.shape != ids.shape:
                raise ValueError(f"`labels` has shape {tuple(labels.shape)}, `input_ids` {tuple(ids.shape)}")
            targets = labels[:, 1:]  # the first column is never a target
            if self.hp.check_inputs and targets.numel():
                kept = targets[targets != IGNORE_INDEX]
                if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= self.hp.vocab_size):
                    raise ValueError(
                        f"`labels` hold ids in [{int(kept.min())}, {int(kept.max())}] outside the vocabulary "
                        f"[0, {self.hp.vocab_size - 1}] (or {IGNORE_INDEX}, ignored)"
                    )
        return ids, labels

    def _shared_step(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [B, T-1, V], targets [B, T-1], loss)``: positions ``0 .. T-2`` predict tokens ``1 .. T-1``."""
        ids, labels = self._unpack(batch)
        # The last position has nothing to predict: it is not fed (nanoGPT's x, y), so a batch of
        # block_size + 1 tokens runs the model on block_size positions.
        inputs, targets = ids[:, :-1], labels[:, 1:]
        logits = self(inputs)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, label_smoothing=self.hp.label_smoothing,
        )
        return logits, targets, loss

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Next-token cross-entropy over the labelled tokens; logs ``train_loss``."""
        _, targets, loss = self._shared_step(batch)
        self._log_training(loss, targets.shape[0])
        return loss

    @eager
    def _log_training(self, loss: Tensor, batch_size: int) -> None:
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)

    @eager
    def _record_evaluation(self, stage: str, logits: Tensor, targets: Tensor, loss: Tensor) -> None:
        ppl: Perplexity = getattr(self, f"{stage}_ppl")
        # The loss is a mean over a batch's tokens; the perplexity weighs every token alike across batches.
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True, batch_size=targets.shape[0])
        ppl.update(logits, targets)
        self.log(f"{stage}_ppl", ppl, prog_bar=stage == "val", batch_size=targets.shape[0])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_ppl`` (perplexity over every labelled token of the epoch)."""
        self._record_evaluation("val", *self._shared_step(batch))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_ppl``."""
        self._record_evaluation("test", *self._shared_step(batch))

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Greedy continuations ``[B, L]`` of the batch's ids (a tensor, or a mapping's ``"input_ids"``)."""
        ids = batch if isinstance(batch, Tensor) else batch["input_ids"]
        return self.generate(ids)

    def setup(self, stage: str) -> None:
        """Check the data module's ``block_size`` (when it has one) against ``max_len``.

        Raises:
            ValueError: If the data's blocks are longer than ``max_len``.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        block_size = getattr(datamodule, "block_size", None)
        if isinstance(block_size, int) and block_size > self.hp.max_len:
            raise ValueError(
                f"the data module's block_size ({block_size}) is larger than the model's max_len ({self.hp.max_len})"
            )

    def configure_optimizers(self) -> Any:
        """AdamW (decay on matrices, not on biases and norms; fused where it can be), warm-up and cosine decay."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # torch's fused AdamW (one kernel for every parameter) where it applies: plain parameters on CPU or CUDA.
        fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.hp.lr, betas=tuple(self.hp.betas), fused=fused or None)
        decay_steps = self.hp.decay_steps
        if decay_steps is None and self._trainer is not None:
            total = self.trainer.estimated_stepping_batches
            decay_steps = int(total) if math.isfinite(total) else None
        warmup, ratio = self.hp.warmup_steps, self.hp.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_schedule(step, warmup, decay_steps, ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
