"""Distil the English->French number translator into a student a quarter of its size.

A teacher translator is trained (or loaded with ``--teacher``), then the same small student is
trained twice for the same steps from the same seed: alone, and with ``KnowledgeDistillation``
attached to the Trainer (the student's code is the same): soft targets from the teacher's
logits and, as hints (FitNets), the teacher's encoder and decoder outputs through learned
projections. The table compares parameters, test BLEU, ROUGE-L, perplexity and training step
time; a few of the distilled student's translations follow, beside their references. The
checkpoints are saved under ``--output``. No label smoothing here, so that test perplexity
measures the fit.

    python examples/distill_translator.py                          # the full run (minutes on 2 cores)
    python examples/distill_translator.py --teacher outputs/distill_translator/teacher.ckpt
    python examples/distill_translator.py --teacher-steps 10 --steps 10  # a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import KnowledgeDistillation
from llmkit.data import NumberWordsDataModule


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
    callbacks: list[L.Callback],
) -> tuple[Seq2SeqTransformer, dict[str, float], float]:
    """Train for ``steps``, keep the best validation loss, test it; returns model, scores, step ms."""
    checkpoint = ModelCheckpoint(dirpath=output, filename=name, monitor="val_loss", enable_version_counter=False)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, val_check_interval=min(300, steps),
        check_val_every_n_epoch=None, gradient_clip_val=1.0, callbacks=[*callbacks, checkpoint, timer],
        logger=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
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
        teacher, scores, ms = fit(teacher, data, args.teacher_steps, args.output, "teacher", [])
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
                                  callbacks)
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
