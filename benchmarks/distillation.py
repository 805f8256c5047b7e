"""KnowledgeDistillation's step-time overhead against the student trained alone, in one process.

A distillation step adds one teacher forward (no grad) to the student's forward, backward and
optimizer step, so with forward FLOPs ``F`` and a backward of about twice the forward, the
expected ratio is ``1 + F_teacher / (3 * F_student)``. The FLOPs are counted with
``torch.utils.flop_counter`` on the real batches; the step times are medians of
``Trainer.fit`` steps on the NumberWords translation task (Seq2SeqTransformer students and
teachers), interleaved run by run.

    python benchmarks/distillation.py [--steps 60] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from _timing import fit_step_ms, translator
from torch.utils.flop_counter import FlopCounterMode

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import KnowledgeDistillation
from llmkit.data import NumberWordsDataModule


def forward_flops(module: Seq2SeqTransformer, batch: dict[str, torch.Tensor]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(batch["src"], batch["tgt"][:, :-1])
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--quick", action="store_true", help="15 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 15, 1
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    data = NumberWordsDataModule(batch_size=64)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; NumberWords en->fr, batch 64\n")
    print(f"| {'student <- teacher (d_model, layers)':<38} | {'F_t/F_s':>7} | {'alone ms':>8} | {'with KD ms':>10} | "
          f"{'ratio':>6} | {'expected':>8} | {'ratio/expected':>14} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 10}|{'-' * 12}|{'-' * 8}|{'-' * 10}|{'-' * 16}|")
    for (d_s, l_s), (d_t, l_t) in (((64, 3), (128, 3)), ((128, 2), (256, 4))):
        torch.manual_seed(0)
        teacher = translator(data, d_t, l_t)
        flops = forward_flops(teacher, batch) / forward_flops(translator(data, d_s, l_s), batch)
        alone: list[float] = []
        with_kd: list[float] = []
        for _ in range(args.rounds):
            alone += fit_step_ms(translator(data, d_s, l_s), data, args.steps, [])
            kd = KnowledgeDistillation(teacher, ignore_index=0)
            with_kd += fit_step_ms(translator(data, d_s, l_s), data, args.steps, [kd])
        ratio = statistics.median(with_kd) / statistics.median(alone)
        expected = 1 + flops / 3
        name = f"({d_s}, {l_s}+{l_s}) <- ({d_t}, {l_t}+{l_t})"
        print(f"| {name:<38} | {flops:7.2f} | {statistics.median(alone):8.1f} | {statistics.median(with_kd):10.1f} | "
              f"{ratio:5.2f}x | {expected:7.2f}x | {ratio / expected:13.2f}x |")


if __name__ == "__main__":
    main()
