"""Adversarial training of the English->French number translator, and its robustness under attack.

The translator is trained plainly (or loaded with ``--plain``, e.g. the distillation example's
teacher, which is this recipe), then trained again from the same seed for the same steps with
``AdversarialTraining`` attached to the Trainer (the model's code is the same): FGM on the
embedding outputs by default (``--methods`` adds FGSM, PGD, FreeLB). Each model is scored on the
test set: clean BLEU, teacher-forced token accuracy, and token accuracy under a PGD-10 attack on
the embeddings at a fixed epsilon, measured in ``Trainer.validate`` by the ``RobustnessEvaluation``
callback (which attacks despite Lightning's ``inference_mode``; its margin objective makes tokens
wrong rather than piling loss on a few). The table also gives every method's training step time,
from short runs in this process. The table, the data settings and the checkpoints' paths (relative
to it) are saved as ``results.json`` under ``--output`` (docs/make_figures.py reads it).

Epsilon is an l2 radius per sentence pair, over all its source and target token embeddings (each
token's embedding has a norm of about 1 here).

    python examples/adversarial_translator.py                      # the full run (minutes on 2 cores)
    python examples/adversarial_translator.py --plain outputs/distill_translator/teacher.ckpt
    python examples/adversarial_translator.py --steps 10 --timing-steps 4  # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import AdversarialTraining, RobustnessEvaluation
from llmkit.data import NumberWordsDataModule

METHODS = ("fgm", "fgsm", "pgd", "freelb")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", type=Path, default=None,
                        help="a plainly trained translator of this recipe (default: train one)")
    parser.add_argument("--steps", type=int, default=600, help="training steps of every model")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["fgm"], choices=METHODS,
                        help="methods to train a translator with (all are timed)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="l2 radius of training and of the attack")
    parser.add_argument("--train-steps", type=int, default=3, help="ascent steps of PGD and FreeLB in training")
    parser.add_argument("--adv-weight", type=float, default=0.5)
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the evaluation attack")
    parser.add_argument("--timing-steps", type=int, default=20, help="steps of each timing run")
    parser.add_argument("--high", type=int, default=9_999)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--output", type=Path, default=Path("outputs/adversarial_translator"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class StepTimer(L.Callback):
    """Seconds of each training step (every pass of the attack included)."""

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


def translator(data: NumberWordsDataModule, args: argparse.Namespace) -> Seq2SeqTransformer:
    """The distillation example's teacher recipe."""
    return Seq2SeqTransformer(
        data.src_vocab_size, data.tgt_vocab_size, d_model=args.d_model, num_heads=4,
        num_encoder_layers=args.layers, num_decoder_layers=args.layers, dim_feedforward=4 * args.d_model,
        dropout=0.05, max_len=max(data.max_src_len, data.max_tgt_len) + 8, lr=2e-3,
        warmup_steps=min(200, max(1, args.steps // 5)), val_generate_batches=2, label_smoothing=0.0,
    )


def adversarial(method: str, args: argparse.Namespace) -> AdversarialTraining:
    steps = args.train_steps if method in ("pgd", "freelb") else None
    return AdversarialTraining(method, epsilon=args.epsilon, steps=steps, norm="l2", adv_weight=args.adv_weight)


def train(data: NumberWordsDataModule, args: argparse.Namespace, name: str, callbacks: list[L.Callback]) -> Path:
    """Train from the seed for ``args.steps``; the path of the best validation-loss checkpoint."""
    L.seed_everything(args.seed, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=args.output, filename=name, monitor="val_loss", enable_version_counter=False)
    L.Trainer(
        accelerator="cpu", max_steps=args.steps, max_epochs=-1, val_check_interval=min(300, args.steps),
        check_val_every_n_epoch=None, gradient_clip_val=1.0, callbacks=[*callbacks, checkpoint], logger=False,
        enable_model_summary=False,
    ).fit(translator(data, args), data)
    return Path(checkpoint.best_model_path)


def step_ms(data: NumberWordsDataModule, args: argparse.Namespace, callbacks: list[L.Callback]) -> float:
    """Median milliseconds of a training step, after the first few, in a short run."""
    L.seed_everything(args.seed, verbose=False)
    timer = StepTimer()
    L.Trainer(
        accelerator="cpu", max_steps=args.timing_steps + 3, gradient_clip_val=1.0, callbacks=[*callbacks, timer],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    ).fit(translator(data, args), data)
    return 1000 * statistics.median(timer.times[3:])


def save_results(
    args: argparse.Namespace, checkpoints: dict[str, Path], scores: dict[str, tuple[float, float, float]],
    times: dict[str, float],
) -> None:
    """``results.json`` under ``args.output``: the settings, the checkpoints (paths relative to it) and the table."""
    args.output.mkdir(parents=True, exist_ok=True)
    results = {
        "data": {"high": args.high, "val_size": args.val_size, "test_size": args.test_size, "seed": args.seed},
        "epsilon": args.epsilon, "norm": "l2", "attack_steps": args.attack_steps, "train_steps": args.steps,
        "checkpoints": {name: os.path.relpath(Path(path).resolve(), args.output.resolve())
                        for name, path in checkpoints.items()},
        "scores": {name: {"test_bleu": bleu, "clean_acc": clean, "robust_acc": robust}
                   for name, (bleu, clean, robust) in scores.items()},
        "step_ms": times,
    }
    (args.output / "results.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    data = NumberWordsDataModule(high=args.high, val_size=args.val_size, test_size=args.test_size, seed=args.seed)
    checkpoints = {"plain": args.plain or train(data, args, "plain", [])}
    for method in args.methods:
        print(f"\ntraining with {method}")
        checkpoints[method] = train(data, args, method, [adversarial(method, args)])

    robust = RobustnessEvaluation(method="pgd", epsilon=args.epsilon, steps=args.attack_steps, norm="l2",
                                  ignore_index=data.pad_id)
    evaluator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[robust])
    scores = {}
    for name, path in checkpoints.items():
        model = Seq2SeqTransformer.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        (tested,) = evaluator.test(model, data, verbose=False)
        (attacked,) = evaluator.validate(model, dataloaders=data.test_dataloader(), verbose=False)
        scores[name] = (tested["test_bleu"], attacked["val_clean_acc"], attacked["val_robust_acc"])
    print("\ntiming every method")
    times = {"plain": step_ms(data, args, [])}
    for method in METHODS:
        times[method] = step_ms(data, args, [adversarial(method, args)])

    print(f"\nen->fr number words, {args.steps} training steps per model; test on {args.test_size} unseen numbers; "
          f"attack: PGD-{args.attack_steps} on the embeddings, l2, epsilon {args.epsilon} per pair\n")
    attacked_name = f"PGD-{args.attack_steps} token acc"
    print(f"| {'training':<12} | {'test BLEU':>9} | {'token acc':>9} | {attacked_name:>16} | {'step ms':>7} | "
          f"{'x plain':>7} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 11}|{'-' * 18}|{'-' * 9}|{'-' * 9}|")
    for name, ms in times.items():
        label = f"{name}-{args.train_steps}" if name in ("pgd", "freelb") else name
        if name in scores:
            bleu, clean, attacked_acc = scores[name]
            cells = f"{bleu:9.4f} | {clean:9.4f} | {attacked_acc:16.4f}"
        else:
            cells = f"{'-':>9} | {'-':>9} | {'-':>16}"
        print(f"| {label:<12} | {cells} | {ms:7.1f} | {ms / times['plain']:6.2f}x |")
    save_results(args, checkpoints, scores, times)
    plain = scores["plain"]
    print()
    for method in args.methods:
        bleu, _, attacked_acc = scores[method]
        print(f"{method}: PGD-{args.attack_steps} token accuracy {attacked_acc - plain[2]:+.4f} vs plain, "
              f"clean BLEU {100 * (bleu - plain[0]):+.2f} points")


if __name__ == "__main__":
    main()
