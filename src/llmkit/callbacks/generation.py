"""GenerationEvaluation: decode part of the validation set, score it with text metrics, log examples."""

from __future__ import annotations

import csv
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import Metric
from typing_extensions import override

from llmkit.generation.scoring import DecodeFn, Example, GenerateFn, GenerationScorer, SplitFn

_COLUMNS = ["source", "prediction", "reference"]


class GenerationEvaluation(L.Callback):
    """Decode a few validation batches with the module's ``generate``, score them, and log metrics and examples.

    On validation epochs where ``(current_epoch + 1) % every_n_epochs == 0`` (every ``trainer.validate``
    call; never in the sanity check), after each of the first ``num_batches`` batches of the first
    validation dataloader, a :class:`llmkit.generation.scoring.GenerationScorer` generates for the
    batch (``generate_fn(module, batch)``, else ``module.generate(source)``), turns the ids into text
    with ``decode_fn`` when given, and updates the metrics (see the scorer for the batch forms, the
    leading BOS of ``"src"``/``"tgt"`` targets and how ``ignore_ids`` are dropped). Generation runs
    under ``torch.no_grad()`` and the validation step's precision context, with the module in eval
    mode as Lightning's validation sets it.

    At the epoch's end it logs every metric as ``prefix + name`` (``val_bleu``; a metric returning a
    dict, e.g. ``ROUGEScore``, as ``val_rouge_rougeL_fmeasure`` when named ``"rouge"``), and a table of
    the first ``num_examples`` samples (source, prediction, reference) to the loggers that take text:
    ``TensorBoardLogger`` (a Markdown table through ``add_text``), loggers with ``log_text`` (W&B's
    ``WandbLogger``: columns and rows), ``CSVLogger`` (rows appended to
    ``<log_dir>/generation_examples.csv`` with the epoch and step).

    Under DDP each process decodes its own shard, with no collective: no process waits on another's
    generation, however long. At the epoch's end the metrics' states are gathered (torchmetrics'
    sync), so the logged values are the scores of all processes' samples, equal on every process;
    the examples are the first process's. The metrics belong to the callback, not to the module:
    the module's attributes and ``state_dict`` are left exactly as they were, and the callback's own
    state is empty (a checkpoint resumes with it as with any other callback).

    Args:
        metrics: torchmetrics ``Metric`` objects, by name (``{"bleu": BLEUScore()}``) or in a sequence.
        every_n_epochs: decode on every ``every_n_epochs``-th epoch's validation.
        num_batches: decode at most this many batches per validation.
        generate_fn: ``generate_fn(module, batch) -> token ids [B, L]``, instead of ``module.generate(source)``
            (e.g. for a Hugging Face model inside the module: ``lambda m, b: m.model.generate(...)``).
        decode_fn: ``decode_fn(rows: list[list[int]]) -> list[str]``: text for metrics that take text.
        num_examples: rows of the examples table.
        prefix: prefix of the logged names.
        ignore_ids: token ids that are not text (EOS, padding).
        split_fn: ``split_fn(batch) -> (source, reference)``, for batches of other forms.
        source_decode_fn: decodes the examples' sources (default: ``decode_fn``).
        strip_first_target_token: score id references without their first column (default: for
            ``"src"``/``"tgt"`` batches, whose targets start with BOS).
        generate_kwargs: keyword arguments of ``module.generate`` (not with ``generate_fn``).

    Raises:
        ValueError: If ``every_n_epochs`` or ``num_batches`` is below 1, or for the scorer's reasons
            (:class:`llmkit.generation.scoring.GenerationScorer`).
        TypeError: If a metric is not a torchmetrics ``Metric`` or a function is not callable; at setup,
            if the module has no ``generate`` and there is no ``generate_fn``.

    Examples:
        >>> import lightning.pytorch as L
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from llmkit import Seq2SeqTransformer
        >>> from llmkit.metrics import BLEUScore
        >>> model = Seq2SeqTransformer(12, 12, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
        ...                            dim_feedforward=32, max_len=8, val_generate_batches=0)
        >>> batch = {"src": torch.tensor([[5, 6, 2], [7, 2, 0]]), "tgt": torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])}
        >>> evaluation = GenerationEvaluation({"bleu": BLEUScore(ignore_index=0)}, ignore_ids=(0, 2))
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        >>> trainer.fit(model, DataLoader([batch], batch_size=None), DataLoader([batch], batch_size=None))
        >>> "val_bleu" in trainer.callback_metrics
        True
    """

    def __init__(
        self,
        metrics: Mapping[str, Metric] | Sequence[Metric] | Metric,
        every_n_epochs: int = 1,
        num_batches: int = 2,
        generate_fn: GenerateFn | None = None,
        decode_fn: DecodeFn | None = None,
        *,
        num_examples: int = 4,
        prefix: str = "val_",
        ignore_ids: Sequence[int] = (),
        split_fn: SplitFn | None = None,
        source_decode_fn: DecodeFn | None = None,
        strip_first_target_token: bool | None = None,
        generate_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("num_batches", num_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str, got {type(prefix).__name__}")
        self.scorer = GenerationScorer(
            metrics, generate_fn=generate_fn, decode_fn=decode_fn, num_examples=num_examples, ignore_ids=ignore_ids,
            split_fn=split_fn, source_decode_fn=source_decode_fn, strip_first_target_token=strip_first_target_token,
            generate_kwargs=generate_kwargs,
        )
        self.every_n_epochs, self.num_batches, self.prefix = every_n_epochs, num_batches, prefix
        self._active = False

    @property
    @override
    def state_key(self) -> str:
        # Two of these (other prefixes) may sit in one Trainer.
        return self._generate_state_key(prefix=self.prefix)

    # -----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Now, not at the first validation after an epoch of training.
        self.scorer.check_module(pl_module)

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = self._decodes_now(trainer)
        if self._active:
            # Here, not in setup: the strategy moves the module to its device after setup.
            self.scorer.reset()
            self.scorer.to(pl_module.device)

    @override
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active and dataloader_idx == 0 and batch_idx < self.num_batches:
            with trainer.precision_plugin.val_step_context():
                self.scorer.update(pl_module, batch)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        values = self.scorer.compute()  # every process: the metrics' states sync here
        for name, value in values.items():
            # Equal on every process already; sync_dist with "max" is exact and keeps Lightning from warning
            # that an epoch-level value logged under DDP is not synced.
            pl_module.log(f"{self.prefix}{name}", value, sync_dist=True, reduce_fx="max")
        examples = self.scorer.examples
        if examples and trainer.is_global_zero:
            for logger in trainer.loggers:
                self._log_examples(logger, examples, trainer)
        self.scorer.reset()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = False
        self.scorer.reset()

    # -----------------------------------------------------------------------------------------

    def _decodes_now(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True  # trainer.validate(): the user asked for this one
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _log_examples(self, logger: Logger, examples: list[Example], trainer: L.Trainer) -> None:
        key = f"{self.prefix}generation_examples"
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, _markdown_table(examples), global_step=trainer.global_step)
        elif callable(log_text := getattr(logger, "log_text", None)):
            step = {"step": trainer.global_step} if "step" in _parameters(log_text) else {}
            log_text(key=key, columns=list(_COLUMNS), data=[list(example) for example in examples], **step)
        elif isinstance(logger, CSVLogger):
            _append_csv(os.path.join(logger.log_dir, "generation_examples.csv"), examples, trainer)


def _parameters(fn: Any) -> Mapping[str, Any]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C function: no signature to read
        return {}


def _markdown_table(examples: list[Example]) -> str:
    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + " --- |" * len(_COLUMNS)]
    lines += ["| " + " | ".join(cell(text) for text in example) + " |" for example in examples]
    return "\n".join(lines)


def _append_csv(path: str, examples: list[Example], trainer: L.Trainer) -> None:
    fs = get_filesystem(path)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    new = not fs.exists(path)
    with fs.open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["epoch", "step", *_COLUMNS])
        writer.writerows([trainer.current_epoch, trainer.global_step, *example] for example in examples)
