"""Train a small decoder-only language model on the English text that ships with Python, then compress it.

The corpus is CPython's own documentation topics (``pydoc_data.topics``, split by topic; nothing
is downloaded), tokenized with a byte-level BPE trained on the training topics. The run:

1. trains a ``CausalLMTransformer`` (about 1 M parameters by default) for ``--minutes`` with a
   progress bar, keeps the best validation checkpoint and prints its test perplexity and a few
   sampled continuations of prompts;
2. trains nanoGPT's recipe (``benchmarks/nanogpt.py``: its ``GPT`` and training loop, same data,
   size and optimiser settings) for the same wall time;
3. trains a student half as wide for ``--student-steps``, alone and with ``KnowledgeDistillation``
   from the first model (the student's code is the same);
4. fine-tunes the first model with ``QuantizationAwareTraining`` (int8 activations, int4 weights)
   and converts it, beside the same fine-tuning in fp32;

and prints one table: parameters, test perplexity, linear-weight bytes and training step time.

    python examples/train_lm.py                     # the full run (about 10 minutes on 2 cores)
    python examples/train_lm.py --minutes 0.2 --student-steps 5 --qat-steps 2 --d-model 32  # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from llmkit.callbacks import KnowledgeDistillation, QuantizationAwareTraining
from llmkit.callbacks.quantization import quantized_weight_bytes
from llmkit.data import PythonDocsDataModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lm import nanogpt_logits, ours, params, perplexity, train_nanogpt

PROMPTS = ("The for statement", "An exception is raised when", "A class definition")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall time of the LM and of nanoGPT")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--tokenizer", choices=["bpe", "bytes"], default="bpe")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=200)
    parser.add_argument("--student-d-model", type=int, default=None, help="default: half of --d-model")
    parser.add_argument("--student-steps", type=int, default=400)
    parser.add_argument("--qat-steps", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=40, help="sampled after each prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/train_lm"))
    return parser.parse_args()


class StepTimer(L.Callback):
    """Milliseconds of each training step."""

    def __init__(self) -> None:
        self.ms: list[float] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop the clock."""
        self.ms.append(1000 * (time.perf_counter() - self._start))

    def median(self) -> float:
        """The median step, leaving out the first few (warm-up)."""
        return statistics.median(self.ms[3:] or self.ms)


def fit(model: L.LightningModule, data: PythonDocsDataModule, args: argparse.Namespace, callbacks: list[L.Callback],
        *, steps: int = -1, minutes: float | None = None, name: str,
        keep_best: bool = True) -> tuple[L.LightningModule, float, float, int]:
    """Train with validation every ``--eval-interval`` steps.

    Returns the model (with the best validation checkpoint's weights if ``keep_best``), the median
    milliseconds per step, the seconds taken and the steps made.
    """
    timer = StepTimer()
    checkpoint = ModelCheckpoint(dirpath=args.output, filename=name, monitor="val_loss", enable_version_counter=False)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, gradient_clip_val=1.0,
        max_time=timedelta(minutes=minutes) if minutes is not None else None,
        val_check_interval=min(args.eval_interval, steps) if steps > 0 else args.eval_interval,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[*callbacks, checkpoint, timer],
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    if keep_best and checkpoint.best_model_path:  # else the last weights (no validation ran, or QAT converted)
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
    return model, timer.median(), seconds, trainer.global_step


def test_ppl(model: L.LightningModule, data: PythonDocsDataModule) -> float:
    (scores,) = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(model, data, verbose=False)
    return scores["test_ppl"]


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    args.output.mkdir(parents=True, exist_ok=True)
    data = PythonDocsDataModule(
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, block_size=args.block_size,
        batch_size=args.batch_size, tokenizer_dir=str(args.output),
    )
    rows: list[tuple[str, int, float, tuple[int, int], float]] = []

    # 1. The language model, for --minutes of wall time.
    L.seed_everything(args.seed, verbose=False)
    model = ours(args, data.vocab_size)
    model, ms, seconds, steps = fit(model, data, args, [], minutes=args.minutes, name="lm")
    lm_ppl = test_ppl(model, data)
    rows.append(("llmkit CausalLMTransformer", params(model), lm_ppl, quantized_weight_bytes(model), ms))
    print(f"\ntest perplexity {lm_ppl:.2f} after {seconds / 60:.1f} min; sampled continuations:")
    generator = torch.Generator().manual_seed(args.seed)
    model.eval()
    for prompt in PROMPTS:
        ids = torch.tensor([data.encode(prompt)])
        new = model.generate(ids, args.new_tokens, do_sample=True, temperature=0.8, top_k=50, generator=generator)
        print(f"  {prompt!r} -> {data.decode(new[0])!r}")

    # 2. nanoGPT's recipe for the same wall time (its schedule decays over the steps ours made).
    gpt, gpt_steps, gpt_seconds = train_nanogpt(args, data, seconds, max(args.warmup + 1, steps))
    gpt_ppl = perplexity(nanogpt_logits(gpt), data.blocks("test"), 64)
    gpt_ms = 1000 * gpt_seconds / max(gpt_steps, 1)  # evaluation included: an upper bound of its step
    rows.append(("nanoGPT recipe, same time", params(gpt), gpt_ppl, quantized_weight_bytes(gpt), gpt_ms))

    # 3. A student half as wide, alone and distilled from the model (a copy: the teacher is frozen), for
    # the same steps from one seed.
    student_width = args.student_d_model or args.d_model // 2
    students = {}
    teacher = copy.deepcopy(model)
    for name, callbacks in (("student alone", []), ("student distilled", [KnowledgeDistillation(teacher)])):
        L.seed_everything(args.seed, verbose=False)
        student = ours(args, data.vocab_size, d_model=student_width, decay_steps=args.student_steps,
                       warmup_steps=min(args.warmup, args.student_steps // 5))
        student, ms, *_ = fit(student, data, args, callbacks, steps=args.student_steps, name=name.replace(" ", "_"))
        students[name] = test_ppl(student, data)
        rows.append((f"{name}, {args.student_steps} steps", params(student), students[name],
                     quantized_weight_bytes(student), ms))

    # 4. Quantization-aware fine-tuning of the model, then int8-activation / int4-weight conversion;
    # beside it the same fine-tuning in fp32 (same steps, data order and learning rate), so that the
    # comparison is between two models trained alike, not between a model and a longer-trained one.
    finetuned = {}
    for name, callbacks in (("fp32", []), ("QAT 8da4w", [QuantizationAwareTraining()])):
        L.seed_everything(args.seed, verbose=False)
        tuned = copy.deepcopy(model)
        tuned.hparams.update(lr=args.lr / 10, warmup_steps=0, decay_steps=args.qat_steps)
        tuned, ms, *_ = fit(
            tuned, data, args, callbacks, steps=args.qat_steps, name=name.split()[0].lower(), keep_best=False
        )
        finetuned[name] = test_ppl(tuned, data)
        # The parameters are the model's: conversion unties the output from the embedding, storing it apart.
        rows.append((f"{name}, fine-tuned {args.qat_steps} steps", params(model), finetuned[name],
                     quantized_weight_bytes(tuned), ms))

    print(f"\nPython docs LM, {args.tokenizer} vocabulary {data.vocab_size}, blocks of {args.block_size}; "
          "test perplexity over every test token\n")
    width = max(len(row[0]) for row in rows)
    print(f"| {'model':<{width}} | {'params':>9} | {'test ppl':>8} | {'linear weights':>18} | {'ms/step':>7} |")
    print(f"|{'-' * (width + 2)}|{'-' * 11}|{'-' * 10}|{'-' * 20}|{'-' * 9}|")
    for name, size, ppl, (stored, fp32), ms in rows:
        weights = f"{stored / 1024:.0f} KiB ({stored / fp32:.2f}x)"
        print(f"| {name:<{width}} | {size:>9,} | {ppl:8.2f} | {weights:>18} | {ms:7.1f} |")
    alone, distilled = students["student alone"], students["student distilled"]
    print(f"\nllmkit / nanoGPT test perplexity at equal wall time: {lm_ppl / gpt_ppl:.3f}")
    print(f"distilled student {'better' if distilled < alone else 'not better'} than alone: "
          f"{distilled:.2f} vs {alone:.2f}")
    print(f"QAT 8da4w perplexity {100 * (finetuned['QAT 8da4w'] / finetuned['fp32'] - 1):+.1f}% against fp32 "
          f"fine-tuned alike ({100 * (finetuned['QAT 8da4w'] / lm_ppl - 1):+.1f}% against the model before)")
    print(f"checkpoints and tokenizer.json in {args.output}")


if __name__ == "__main__":
    main()
