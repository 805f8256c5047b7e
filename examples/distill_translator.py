"""Distil the English->French number translator into a student a quarter of its size.

A teacher translator is trained (or loaded with ``--teacher``), then the same small student is
trained twice for the same steps from the same seed: alone, and with ``KnowledgeDistillation``
attached to the Trainer (the student's code is the same): soft targets from the teacher's
logits and, as hints (FitNets), the teacher's encoder and decoder outputs through learned
projections. The table compares parameters, test BLEU, ROUGE-L, perplexity and training step
time; a few of the distilled student's translations follow, beside their references. The
checkpoints are saved under ``--output``, each with its training curves (``<name>_curves.json``:
the training loss at every step and BLEU on the first two validation batches every
``--curve-every`` steps, for docs/make_figures.py). No label smoothing here, so that test
perplexity measures the fit.

    python examples/distill_translator.py                          # the full run (minutes on 2 cores)
    python examples/distill_translator.py --teacher outputs/distill_translator/teacher.ckpt
    python examples/distill_translator.py --teacher-steps 10 --steps 10  # a smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import KnowledgeDistillation
from llmkit.data import NumberWordsDataModule
from llmkit.generation import GenerationScorer
from llmkit.metrics import BLEUScore


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None, help="a teacher checkpoint (default: train one)")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--teacher-d-model", type=int, default=64)
    parser.add_argument("--student-d-model", type=int, default=32)
    parser.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each, both models")
    parser.add_argument("--steps", type=int, default=150, help="training steps of each student")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--hint-layers", nargs="*", default=["encoder", "decoder"],
                        help="modules whose outputs the student also matches (same names in both), e.g. encoder")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="of every model trained here (0: test perplexity measures fit, not the smoothing)")
    parser.add_argument("--high", type=int, default=9_999, help="numbers 0..high")
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--curve-every", type=int, default=25,
                        help="steps between the validation BLEU points of the saved training curves")
    parser.add_argument("--output", type=Path, default=Path("outputs/distill_translator"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class StepTimer(L.Callback):
    """Seconds of each training step (forward, backward and optimizer step, callbacks included)."""

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


class Curves(L.Callback):
    """The training loss at every step, and BLEU on a few validation batches every ``every`` steps.

    The validation batches are decoded greedily at the start and every ``every`` steps, with the
    random number generator's state restored after and every module put back in its mode, so the
    training (its dropout masks included) is exactly what it is without this callback.
    """

    def __init__(self, data: NumberWordsDataModule, every: int, batches: int = 2) -> None:
        with torch.random.fork_rng(devices=[]):  # a DataLoader's iterator draws a seed
            self.batches = list(itertools.islice(data.val_dataloader(), batches))
        self.every = every
        self.scorer = GenerationScorer({"bleu": BLEUScore(ignore_index=data.pad_id)},
                                       ignore_ids=(data.pad_id, data.eos_id))
        self.train_loss: list[tuple[int, float]] = []
        self.val_bleu: list[tuple[int, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the initial model."""
        self.val_bleu.append((trainer.global_step, self._bleu(pl_module)))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record the module's own ``train_loss`` (without distillation's term); score every ``every`` steps."""
        step = trainer.global_step
        if "train_loss" in trainer.callback_metrics:
            self.train_loss.append((step, float(trainer.callback_metrics["train_loss"])))
        if step % self.every == 0 or step == trainer.max_steps:
            self.val_bleu.append((step, self._bleu(pl_module)))

    def _bleu(self, model: L.LightningModule) -> float:
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                for batch in self.batches:
                    self.scorer.update(model, batch)
                return float(self.scorer.compute()["bleu"])
        finally:
            self.scorer.reset()
            for module, training in modes:
                module.train(training)

    def save(self, path: Path, name: str, params: int) -> None:
        """Write ``{"model", "params", "train_loss": [[step, loss]...], "val_bleu": [[step, bleu]...]}`` (and more)."""
        sentences = sum(len(batch["src"]) for batch in self.batches)
        path.write_text(json.dumps({"model": name, "params": params, "train_loss": self.train_loss,
                                    "val_bleu": self.val_bleu, "val_sentences": sentences}))


def translator(
    data: NumberWordsDataModule, d_model: int, layers: int, steps: int, label_smoothing: float = 0.1
) -> Seq2SeqTransformer:
    return Seq2SeqTransformer(
        src_vocab_size=data.src_vocab_size, tgt_vocab_size=data.tgt_vocab_size, d_model=d_model, num_heads=4,
        num_encoder_layers=layers, num_decoder_layers=layers, dim_feedforward=4 * d_model, dropout=0.05,
        max_len=max(data.max_src_len, data.max_tgt_len) + 8, lr=2e-3, warmup_steps=min(200, max(1, steps // 5)),
        val_generate_batches=2, label_smoothing=label_smoothing,
    )


def fit(
    model: Seq2SeqTransformer, data: NumberWordsDataModule, steps: int, output: Path, name: str,
    callbacks: list[L.Callback], curve_every: int,
) -> tuple[Seq2SeqTransformer, dict[str, float], float]:
    """Train for ``steps``, keep the best validation loss, test it; returns model, scores, step ms.

    The training curves go to ``output / f"{name}_curves.json"``.
    """
    checkpoint = ModelCheckpoint(dirpath=output, filename=name, monitor="val_loss", enable_version_counter=False)
    timer = StepTimer()
    params = sum(p.numel() for p in model.parameters())
    curves = Curves(data, curve_every)  # after the timer: its decoding is not timed
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, val_check_interval=min(300, steps),
        check_val_every_n_epoch=None, gradient_clip_val=1.0, callbacks=[*callbacks, checkpoint, timer, curves],
        logger=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
    curves.save(output / f"{name}_curves.json", name, params)
    best = Seq2SeqTransformer.load_from_checkpoint(checkpoint.best_model_path)
    scores = trainer.test(best, data, verbose=False)[0]
    return best, scores, 1000 * statistics.median(timer.times[len(timer.times) // 10 :])


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    data = NumberWordsDataModule(
        high=args.high, val_size=args.val_size, test_size=args.test_size, batch_size=args.batch_size, seed=args.seed
    )
    rows: list[tuple[str, Seq2SeqTransformer, dict[str, float], float | None]] = []
    if args.teacher is None:
        L.seed_everything(args.seed, verbose=False)
        teacher = translator(data, args.teacher_d_model, args.layers, args.teacher_steps, args.label_smoothing)
        teacher, scores, ms = fit(teacher, data, args.teacher_steps, args.output, "teacher", [], args.curve_every)
        rows.append((f"teacher ({args.teacher_steps} steps)", teacher, scores, ms))
    else:
        teacher = Seq2SeqTransformer.load_from_checkpoint(args.teacher, map_location="cpu", weights_only=True)
        tester = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        scores = tester.test(teacher, data, verbose=False)
        rows.append((f"teacher ({args.teacher.name})", teacher, scores[0], None))

    for name, callbacks in (
        ("student alone", []),
        (f"student distilled (T={args.temperature:g}, alpha={args.alpha:g})",
         [KnowledgeDistillation(teacher, temperature=args.temperature, alpha=args.alpha, ignore_index=data.pad_id,
                                layers={name: name for name in args.hint_layers})]),
    ):
        L.seed_everything(args.seed, verbose=False)
        student = translator(data, args.student_d_model, args.layers, args.steps, args.label_smoothing)
        student, scores, ms = fit(student, data, args.steps, args.output, name.split(" (")[0].replace(" ", "_"),
                                  callbacks, args.curve_every)
        rows.append((f"{name}, {args.steps} steps", student, scores, ms))

    print(f"\nen->fr number words, {len(data.numbers('train'))} training pairs; "
          f"test on {args.test_size} unseen numbers\n")
    print(f"| {'model':<52} | {'params':>8} | {'test BLEU':>9} | {'ROUGE-L':>7} | {'test ppl':>8} | {'step ms':>7} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 9}|")
    for name, model, scores, ms in rows:
        params = sum(p.numel() for p in model.parameters())
        step = f"{ms:7.1f}" if ms is not None else f"{'-':>7}"
        bleu, rouge, ppl = scores["test_bleu"], scores["test_rougeL"], scores["test_ppl"]
        print(f"| {name:<52} | {params / 1e6:7.2f}M | {bleu:9.4f} | {rouge:7.4f} | {ppl:8.3f} | {step} |")
    batch = next(iter(data.test_dataloader()))
    student = rows[-1][1]
    for number, src, out, tgt in zip(batch["number"][:4], batch["src"], student.generate(batch["src"][:4]),
                                     batch["tgt"], strict=False):
        print(f"\n{int(number):>6}  {data.decode(src, side='src')}\n   -> {data.decode(out)}  (distilled student)"
              f"\n  ref {data.decode(tgt)}")
    alone, distilled = rows[-2][2], rows[-1][2]
    better = distilled["test_bleu"] >= alone["test_bleu"] and distilled["test_ppl"] <= alone["test_ppl"]
    print(f"\ndistilled student {'beats' if better else 'does not beat'} the student alone on BLEU and perplexity")


if __name__ == "__main__":
    main()
