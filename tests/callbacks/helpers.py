"""What the callback tests share: a quiet Trainer on the tests' accelerator, a loss recorder, the toy batch."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import Tensor

from llmkit import Seq2SeqTransformer
from tests.accelerator import accelerator_for


def trainer(**kwargs) -> L.Trainer:
    """A Trainer with no logger, checkpoints, progress bar, summary or validation unless asked.

    On the tests' accelerator (``LLMKIT_TEST_ACCELERATOR``). Several processes (``devices=2``,
    ``num_nodes=2``) stay on CPU: gloo is the CPU backend, and a GPU machine may have one device.
    """
    defaults = dict(
        accelerator=accelerator_for(kwargs.get("devices", 1), kwargs.get("num_nodes", 1)), devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


class RecordLosses(L.Callback):
    """The loss each training step returned (after every callback changed it)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def seq2seq_batch() -> dict[str, Tensor]:
    """Three padded source/target pairs over a 13-word vocabulary (PAD 0, BOS 1, EOS 2)."""
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0], [4, 2, 0, 0]])
    tgt = torch.tensor([[1, 10, 11, 12, 2], [1, 5, 2, 0, 0], [1, 2, 0, 0, 0]])
    return {"src": src, "tgt": tgt}


def translator(d_model: int = 32, vocab: int = 13) -> Seq2SeqTransformer:
    """A one-layer translator for :func:`seq2seq_batch`, without dropout."""
    return Seq2SeqTransformer(
        vocab, vocab, d_model=d_model, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
        dim_feedforward=2 * d_model, dropout=0.0, max_len=16, lr=1e-3, warmup_steps=1,
    )
