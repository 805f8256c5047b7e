"""Clocks and the translator shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
from torch.utils.data import DataLoader

from llmkit import Seq2SeqTransformer
from llmkit.data import NumberWordsDataModule


class StepTimer(L.Callback):
    """Seconds of each training step (forward, backward, optimizer step and callbacks)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop the clock."""
        self.times.append(time.perf_counter() - self._start)


class EpochTimer(L.Callback):
    """Seconds of each training epoch, from its start to its end."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock."""
        self.times.append(time.perf_counter() - self._start)


def fit_step_ms(
    model: L.LightningModule,
    data: L.LightningDataModule | DataLoader,
    steps: int,
    callbacks: list[L.Callback],
    warmup: int = 3,
    **trainer_kwargs: Any,
) -> list[float]:
    """Each step's milliseconds, after the first ``warmup``, of ``Trainer.fit`` for ``steps`` on CPU.

    No logger, checkpoints or validation; ``trainer_kwargs`` (e.g. ``gradient_clip_val``) go to the Trainer.
    """
    timer = StepTimer()
    L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[*callbacks, timer], **trainer_kwargs,
    ).fit(model, data)
    return [1000 * t for t in timer.times[warmup:]]


def median_ms(fn: Callable[[], object], runs: int = 5) -> float:
    """Median milliseconds of ``runs`` calls of ``fn``, after one untimed call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def translator(data: NumberWordsDataModule, d_model: int, layers: int = 3, **kwargs: Any) -> Seq2SeqTransformer:
    """The benchmarks' NumberWords translator: ``layers`` encoder and decoder layers, 4 heads, FFN 4x.

    ``kwargs`` go to ``Seq2SeqTransformer`` (e.g. ``compile=True``).
    """
    return Seq2SeqTransformer(
        data.src_vocab_size, data.tgt_vocab_size, d_model=d_model, num_heads=4, num_encoder_layers=layers,
        num_decoder_layers=layers, dim_feedforward=4 * d_model, dropout=0.05, max_len=32, lr=1e-3, warmup_steps=10,
        **kwargs,
    )
