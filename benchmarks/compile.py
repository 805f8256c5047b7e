"""The callbacks' step-time overheads under ``torch.compile`` against their eager overheads, in one process.

QuantizationAwareTraining (8da4w: int8 dynamic activations, int4 weights in groups of 32), whose
fake quantizers are many small elementwise ops a compiler fuses; KnowledgeDistillation (a teacher
forward per step); AdversarialTraining FGM (a clean and an adversarial pass). Each is timed against
the plain step of the same model, eager and compiled (``Seq2SeqTransformer(compile=True)``:
inductor on CPU), as medians of ``Trainer.fit`` steps on one NumberWords batch of 64 repeated
(one shape: the compiled runs compile once, not once per length), after the steps that compile.
Runs are interleaved round by round so that every contender sees the same machine load.

    python benchmarks/compile.py [--steps 30] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable

import lightning.pytorch as L
import torch
from _timing import fit_step_ms, translator
from torch.utils.data import DataLoader

from llmkit.callbacks import AdversarialTraining, KnowledgeDistillation, QuantizationAwareTraining
from llmkit.data import NumberWordsDataModule

WARMUP = 6  # steps left out of the medians: inductor compiles the first ones (forward, backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (after the warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs of each")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256], help="d_model of the QAT rows")
    parser.add_argument("--quick", action="store_true", help="8 steps, 1 round, d_model 64")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.widths = 8, 1, [64]
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", ".*leaves .* linear layer.*in float.*")
    data = NumberWordsDataModule(batch_size=64)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batches = DataLoader([batch] * (WARMUP + args.steps), batch_size=None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; a NumberWords en->fr batch of 64 "
          f"({batch['src'].shape[1]} + {batch['tgt'].shape[1]} tokens), 3+3 layers; "
          f"medians of {args.steps} steps x {args.rounds} rounds after {WARMUP} warm-up steps\n")
    print(f"| {'d_model, callback':<24} | {'eager plain':>11} | {'eager with':>10} | {'eager ratio':>11} | "
          f"{'compiled plain':>14} | {'compiled with':>13} | {'compiled ratio':>14} |")
    print(f"|{'-' * 26}|{'-' * 13}|{'-' * 12}|{'-' * 13}|{'-' * 16}|{'-' * 15}|{'-' * 16}|")
    # Each row: (name, d_model, the callback for an eager or a compiled run).
    rows: list[tuple[str, int, Callable[[bool], L.Callback]]] = [
        (f"{d}, QAT 8da4w", d, lambda _: QuantizationAwareTraining(scheme="8da4w", convert_on_fit_end=False))
        for d in args.widths
    ]
    torch.manual_seed(0)
    teachers = {False: translator(data, 128).eval()}
    teachers[True] = translator(data, 128, compile=True).eval()  # the same weights, its forward compiled
    teachers[True].load_state_dict(teachers[False].state_dict())
    rows.append(("64, KD <- (128, 3+3)", 64, lambda c: KnowledgeDistillation(teachers[c], ignore_index=0)))
    rows += [(f"{d}, FGM", d, lambda _: AdversarialTraining("fgm", epsilon=1.0)) for d in (64, 128)]
    for name, d_model, make in rows:
        times: dict[tuple[bool, bool], list[float]] = {(c, w): [] for c in (False, True) for w in (False, True)}
        for _ in range(args.rounds):
            for compiled in (False, True):
                for with_callback in (False, True):
                    torch.manual_seed(0)
                    model = translator(data, d_model, compile=compiled)
                    callbacks = [make(compiled)] if with_callback else []
                    times[compiled, with_callback] += fit_step_ms(
                        model, batches, WARMUP + args.steps, callbacks, warmup=WARMUP
                    )
        ms = {key: statistics.median(values) for key, values in times.items()}
        print(f"| {name:<24} | {ms[False, False]:9.1f}ms | {ms[False, True]:8.1f}ms | "
              f"{ms[False, True] / ms[False, False]:10.2f}x | {ms[True, False]:12.1f}ms | {ms[True, True]:11.1f}ms | "
              f"{ms[True, True] / ms[True, False]:13.2f}x |", flush=True)


if __name__ == "__main__":
    main()
