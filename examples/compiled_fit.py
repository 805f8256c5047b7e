"""Train the number translator compiled with torch.compile, both ways, beside the same fit in eager mode.

1. ``Seq2SeqTransformer(compile=True)``: the model's forward passes go through inductor; the input
   checks, logging and generation stay eager. Same seed, same data: the losses follow the eager
   fit's (inductor draws its own dropout masks, so they are close, not equal), and the step time is
   printed beside eager's.
2. ``trainer.fit(torch.compile(student))``, Lightning's way (it compiles the steps), with
   KnowledgeDistillation from the eager model, QuantizationAwareTraining and FGM adversarial
   training together; then the student is converted to int4 weights and tested.

    python examples/compiled_fit.py               # about 3 minutes on 2 cores, compilation included
    python examples/compiled_fit.py --steps 8 --d-model 32 --layers 1 --high 300   # a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as L
import torch

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import AdversarialTraining, KnowledgeDistillation, QuantizationAwareTraining
from llmkit.data import NumberWordsDataModule


class StepTimes(L.Callback):
    """Seconds of each training step and the loss it returned."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """Stop the clock; keep the loss."""
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--high", type=int, default=9_999, help="numbers 0..high")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for message in (".*does not have many workers.*", ".*leaves .* linear layer.*in float.*"):
        warnings.filterwarnings("ignore", message)
    data = NumberWordsDataModule(high=args.high, val_size=64, test_size=128, batch_size=64)
    data.setup("fit")

    def translator(**kwargs: Any) -> Seq2SeqTransformer:
        return Seq2SeqTransformer(
            data.src_vocab_size, data.tgt_vocab_size, d_model=args.d_model, num_heads=4,
            num_encoder_layers=args.layers, num_decoder_layers=args.layers, dim_feedforward=4 * args.d_model,
            dropout=0.05, max_len=32, lr=2e-3, warmup_steps=max(args.steps // 10, 1), val_generate_batches=0,
            **kwargs,
        )

    def fit(model: L.LightningModule | torch.nn.Module, callbacks: list[L.Callback]) -> StepTimes:
        timer = StepTimes()
        L.Trainer(
            accelerator="cpu", max_steps=args.steps, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_model_summary=False, limit_val_batches=0, callbacks=[*callbacks, timer],
        ).fit(model, data)
        return timer

    print("1. The same fit, eager and with compile=True (inductor)")
    runs = {}
    for name, compile in (("eager", False), ("compile=True", True)):
        L.seed_everything(args.seed, verbose=False)
        model = translator(compile=compile)
        runs[name] = (model, fit(model, []))
    warm = min(5, args.steps - 1)  # the compiled fit compiles on its first steps
    print(f"| {'fit':<14} | {'first step s':>12} | {'median step ms':>14} | {'final loss':>10} |")
    print(f"|{'-' * 16}|{'-' * 14}|{'-' * 16}|{'-' * 12}|")
    for name, (_, timer) in runs.items():
        step = 1000 * statistics.median(timer.times[warm:])
        print(f"| {name:<14} | {timer.times[0]:12.1f} | {step:14.1f} | {timer.losses[-1]:10.3f} |")

    print("\n2. trainer.fit(torch.compile(student)) with KD (the eager model teaches), QAT and FGM, then int4")
    teacher = runs["eager"][0].eval()
    L.seed_everything(args.seed, verbose=False)
    student = translator()
    qat = QuantizationAwareTraining()  # converts the student when the fit ends
    callbacks = [KnowledgeDistillation(teacher, ignore_index=data.pad_id), qat, AdversarialTraining("fgm")]
    timer = fit(torch.compile(student), callbacks)
    tester = L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, enable_progress_bar=False)
    scores = tester.test(student, data, verbose=False)[0]
    step = 1000 * statistics.median(timer.times[warm:])
    print(f"compiled student: first step {timer.times[0]:.1f} s, median step {step:.1f} ms, "
          f"final loss {timer.losses[-1]:.3f}; converted to {type(student.output.weight).__name__}:")
    print(f"test BLEU {scores['test_bleu']:.3f}, perplexity {scores['test_ppl']:.2f}")


if __name__ == "__main__":
    main()
