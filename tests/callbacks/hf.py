"""Tiny Hugging Face models in a user's own LightningModule: the fixtures of ``test_hf.py``.

Users wrap an HF model in an ordinary LightningModule whose ``training_step`` returns
``self.model(**batch).loss`` and defines no ``forward``; llmkit's callbacks must work on it with
no extra argument. Models are built from configs with random, seeded weights (nothing is
downloaded), no dropout (so that a step can be recomputed by hand), widths that are multiples of
32 (so int4 group-32 QAT applies to every projection), small enough that a Trainer step takes a few
milliseconds on one CPU thread.

- :func:`build` ``(kind, *, seed)`` -> the HF model; :data:`KINDS` the kinds;
- :class:`HFModule` ``(model_or_factory, *, lr)`` -> the user's LightningModule;
- :func:`loader` ``(kind, *, batches, batch_size, seed)`` -> a DataLoader of dict batches;
- :func:`make` ``(kind, *, seed)`` -> ``(module, train_loader, val_loader)``;
- :func:`fresh_copy` ``(module, *, seed)`` -> a module of the same config with other weights (a teacher).
- :data:`TOKEN_EMBEDDINGS`, :data:`EMBEDDING_SHAPES` each kind's token embeddings and their shapes on :func:`batch`.

Pad id 0 everywhere; padding sits on the right; ``labels`` hold ``-100`` at padded positions
(seq2seq and LM) or one class per sample (BERT).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

transformers = pytest.importorskip("transformers")

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

KINDS = ("t5", "bart", "bert", "gpt2")
SEQ2SEQ = ("t5", "bart")
VOCAB = 64
WIDTH = 32
PAD = 0
IGNORE = -100  # HF's label for "no loss here"
SOURCE_LEN = 8
TARGET_LEN = 6


def config(kind: str) -> transformers.PretrainedConfig:
    """The tiny config of ``kind`` (``"t5"``, ``"bart"``, ``"bert"`` or ``"gpt2"``), without dropout."""
    if kind == "t5":
        return transformers.T5Config(
            vocab_size=VOCAB, d_model=WIDTH, d_kv=WIDTH // 2, d_ff=2 * WIDTH, num_layers=1, num_decoder_layers=1,
            num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
            pad_token_id=PAD, eos_token_id=1, decoder_start_token_id=PAD,
        )
    if kind == "bart":
        return transformers.BartConfig(
            vocab_size=VOCAB, d_model=WIDTH, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=2 * WIDTH, decoder_ffn_dim=2 * WIDTH, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        )
    if kind == "bert":
        return transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=2 * WIDTH, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, classifier_dropout=0.0, pad_token_id=PAD, num_labels=2,
        )
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=WIDTH, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=1,
        )
    raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")


_CLASSES = {
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
    "bert": "BertForSequenceClassification",
    "gpt2": "GPT2LMHeadModel",
}


def build(kind: str, *, seed: int = 0) -> nn.Module:
    """The HF model of ``kind`` from :func:`config`, random weights drawn from ``seed`` (global RNG untouched)."""
    cls = getattr(transformers, _CLASSES[kind])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config(kind))


class HFModule(L.LightningModule):
    """What a user writes around an HF model: ``training_step`` returns ``self.model(**batch).loss``.

    No ``forward``: the one submodule ``self.model`` is called directly, as users do.

    Args:
        model: the HF model, or a factory that builds it.
        lr: AdamW's learning rate.
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], *, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model if isinstance(model, nn.Module) else model()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.model(**batch).loss
        self.log("val_loss", loss, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def _lengths(batch_size: int, full: int, generator: torch.Generator) -> Tensor:
    """Row 0 full, row 1 three tokens, the others drawn: every batch has padding and a full row."""
    lengths = torch.randint(3, full + 1, (batch_size,), generator=generator)
    lengths[0], lengths[1] = full, 3
    return lengths


def _tokens(lengths: Tensor, full: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(ids, attention_mask)`` ``[B, full]``: ids in ``[3, VOCAB)``, right-padded with ``PAD``."""
    mask = torch.arange(full).unsqueeze(0) < lengths.unsqueeze(1)  # (B, full)
    ids = torch.randint(3, VOCAB, (len(lengths), full), generator=generator).masked_fill(~mask, PAD)
    return ids, mask.long()


def batch(kind: str, *, batch_size: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """One dict batch for ``kind``: ``input_ids``, ``attention_mask`` ``[B, S]`` and ``labels``.

    ``labels``: ``[B, T]`` target ids with ``-100`` at padding (T5, BART), ``[B, S]`` the input ids
    with ``-100`` at padding (GPT-2; HF shifts them inside), or ``[B]`` classes in {0, 1} (BERT).
    """
    if kind not in _CLASSES:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    generator = torch.Generator().manual_seed(seed)
    input_ids, attention_mask = _tokens(_lengths(batch_size, SOURCE_LEN, generator), SOURCE_LEN, generator)
    if kind in SEQ2SEQ:
        target, target_mask = _tokens(_lengths(batch_size, TARGET_LEN, generator), TARGET_LEN, generator)
        labels = target.masked_fill(target_mask == 0, IGNORE)
    elif kind == "gpt2":
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    else:
        labels = torch.arange(batch_size) % 2
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loader(kind: str, *, batches: int = 3, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """A DataLoader of ``batches`` ready-made dict batches (see :func:`batch`), always in the same order."""
    data = [batch(kind, batch_size=batch_size, seed=seed * 1000 + i) for i in range(batches)]
    return DataLoader(data, batch_size=None, shuffle=False)  # type: ignore[arg-type]


def make(kind: str, *, seed: int = 0, lr: float = 1e-3) -> tuple[HFModule, DataLoader, DataLoader]:
    """``(module, train_loader, val_loader)`` for ``kind``: 3 training batches, 1 validation batch."""
    return HFModule(build(kind, seed=seed), lr=lr), loader(kind, batches=3, seed=0), loader(kind, batches=1, seed=7)


def kind_of(module: HFModule) -> str:
    """The kind of an :class:`HFModule` built here."""
    name = type(module.model).__name__
    return next(kind for kind, cls in _CLASSES.items() if cls == name)


def fresh_copy(module: HFModule, *, seed: int = 1) -> HFModule:
    """A module of the same kind and config with weights drawn from ``seed`` (e.g. a teacher)."""
    return HFModule(build(kind_of(module), seed=seed), lr=module.hparams.lr)


BATCH_SIZE = 4  # the default batch size of batch() and loader()
# The token embeddings of each kind, as named in an HFModule (the shared table, then the encoder's and decoder's).
TOKEN_EMBEDDINGS = {
    "t5": ["model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens"],
    "bart": ["model.model.shared", "model.model.encoder.embed_tokens", "model.model.decoder.embed_tokens"],
    "bert": ["model.bert.embeddings.word_embeddings"],
    "gpt2": ["model.transformer.wte"],
}
# The shapes of the token embeddings computed on a default batch(kind): the input's, then the decoder's.
EMBEDDING_SHAPES = {
    "t5": [(BATCH_SIZE, SOURCE_LEN, WIDTH), (BATCH_SIZE, TARGET_LEN, WIDTH)],
    "bart": [(BATCH_SIZE, SOURCE_LEN, WIDTH), (BATCH_SIZE, TARGET_LEN, WIDTH)],
    "bert": [(BATCH_SIZE, SOURCE_LEN, WIDTH)],
    "gpt2": [(BATCH_SIZE, SOURCE_LEN, WIDTH)],
}
