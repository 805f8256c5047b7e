"""Distillation, quantization-aware training and adversarial training on one Trainer, in any order.

A teacher translator (English -> French number words) trains first; then a student half its
width trains with ``KnowledgeDistillation``, ``QuantizationAwareTraining`` and
``AdversarialTraining`` attached together, once with the callbacks listed one way and once the
reverse way. The two runs give the same losses step by step (the callbacks attach in one fixed
order whatever the list's), the student is left exactly its own module (no attribute, hook or
submodule of the callbacks remains), and its converted int4 weights still translate.

    python examples/compose_callbacks.py                                   # under a minute and a half on 2 cores
    python examples/compose_callbacks.py --teacher-steps 20 --steps 4 --d-model 32   # a smoke test
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as L
import torch
from torch import nn

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import AdversarialTraining, KnowledgeDistillation, QuantizationAwareTraining
from llmkit.callbacks.quantization import quantized_weight_bytes
from llmkit.data import NumberWordsDataModule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200, help="steps of the composed student fit")
    parser.add_argument("--d-model", type=int, default=64, help="the teacher's width (the student's is half)")
    parser.add_argument("--high", type=int, default=999)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Losses(L.Callback):
    """The loss each step returned to Lightning."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """Record the step's loss."""
        self.values.append(float(outputs["loss"]))


def translator(data: NumberWordsDataModule, d_model: int, steps: int) -> Seq2SeqTransformer:
    return Seq2SeqTransformer(
        data.src_vocab_size, data.tgt_vocab_size, d_model=d_model, num_heads=4, num_encoder_layers=2,
        num_decoder_layers=2, dim_feedforward=4 * d_model, dropout=0.0, max_len=data.max_tgt_len + 8, lr=2e-3,
        warmup_steps=max(1, steps // 5),
    )


def fit(model: nn.Module, data: NumberWordsDataModule, steps: int, callbacks: list[L.Callback]) -> None:
    L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, callbacks=callbacks,
    ).fit(model, data)


def left_behind(module: nn.Module, attributes: set[str]) -> list[str]:
    """What a callback could leave on a module: instance attributes, hooks, submodules."""
    extra = [f"attribute {name}" for name in sorted(set(vars(module)) - attributes)]
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
             "_load_state_dict_post_hooks")
    extra += [f"{h} on {n or 'the module'}" for n, m in module.named_modules() for h in hooks if getattr(m, h)]
    extra += [f"submodule {n}" for n, _ in module.named_children() if n.startswith("kd_")]
    return extra


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", ".*leaves .* linear layer.*in float.*")
    data = NumberWordsDataModule(high=args.high, val_size=64, test_size=64, seed=args.seed)
    L.seed_everything(args.seed, verbose=False)
    teacher = translator(data, args.d_model, args.teacher_steps)
    fit(teacher, data, args.teacher_steps, [])

    runs = {}
    for label, order in (("kd, qat, adv", (0, 1, 2)), ("adv, qat, kd", (2, 1, 0))):
        L.seed_everything(args.seed + 1, verbose=False)
        student = translator(data, args.d_model // 2, args.steps)
        attributes = set(vars(student))
        # Fake quantization for the second half; converted below, after looking at the module.
        qat = QuantizationAwareTraining(start_step=args.steps // 2, convert_on_fit_end=False)
        callbacks = [KnowledgeDistillation(teacher, ignore_index=data.pad_id), qat, AdversarialTraining("fgm")]
        losses = Losses()
        fit(student, data, args.steps, [*(callbacks[i] for i in order), losses])
        runs[label] = (student, losses.values, left_behind(student, attributes))
        qat.convert(student)

    (first, a, left_a), (_, b, left_b) = runs.values()
    same = max(abs(x - y) for x, y in zip(a, b, strict=True))
    stored, fp32 = quantized_weight_bytes(first)
    print(f"\n{'callbacks listed':<16} {'first loss':>10} {'last loss':>10} {'left behind':>12}")
    for label, (_, values, left) in runs.items():
        print(f"{label:<16} {values[0]:>10.4f} {values[-1]:>10.4f} {len(left):>12}")
    print(f"largest loss difference between the two orders: {same:.2e} over {len(a)} steps")
    print(f"the student's linear weights after conversion: {stored / fp32:.2f}x their fp32 bytes")
    src = next(iter(data.test_dataloader()))["src"][:3]
    with torch.no_grad():
        for row_src, row_out in zip(src, first.generate(src), strict=True):
            print(f"  {data.decode(row_src, side='src')!r} -> {data.decode(row_out)!r}")
    if left_a or left_b or same > 1e-5:
        raise SystemExit(f"the orders differ or something was left behind: {left_a or left_b}")


if __name__ == "__main__":
    main()
