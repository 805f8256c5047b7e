"""AdversarialTraining's step time against the plain step, in one process.

Each method's passes: FGM one clean and one adversarial forward+backward (bound 2.2x); FGSM with
its random start one more; PGD-k and FreeLB-k the clean pass, k - 1 ascent passes and the last
(bound k + 1.2x). Medians of ``Trainer.fit`` steps of Seq2SeqTransformer translators on the
NumberWords task (batch 64), perturbing the embedding outputs; plain and adversarial runs
interleaved round by round.

    python benchmarks/adversarial.py [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from _timing import fit_step_ms, translator

from llmkit.callbacks import AdversarialTraining
from llmkit.data import NumberWordsDataModule

# (name, method, steps, bound as a multiple of the plain step)
METHODS = (
    ("fgm", "fgm", 1, 2.2),
    ("fgsm (random start)", "fgsm", 1, None),
    ("pgd-3", "pgd", 3, 4.2),
    ("pgd-5", "pgd", 5, 6.2),
    ("freelb-3", "freelb", 3, 4.2),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="d_model of the translators")
    parser.add_argument("--methods", nargs="+", default=[name for name, *_ in METHODS], help="rows to time")
    parser.add_argument("--quick", action="store_true", help="8 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 8, 1
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    data = NumberWordsDataModule(batch_size=64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; NumberWords en->fr, batch 64, "
          "3+3 layers, embeddings perturbed\n")
    print(f"| {'d_model, method':<26} | {'plain ms':>8} | {'adversarial ms':>14} | {'ratio':>6} | {'bound':>6} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 16}|{'-' * 8}|{'-' * 8}|")
    methods = [row for row in METHODS if row[0] in args.methods]
    for d_model in args.widths:
        plain: list[float] = []
        times: dict[str, list[float]] = {name: [] for name, *_ in methods}
        for _ in range(args.rounds):
            torch.manual_seed(0)
            plain += fit_step_ms(translator(data, d_model), data, args.steps, [])
            for name, method, steps, _ in methods:
                torch.manual_seed(0)
                callback = AdversarialTraining(method, epsilon=1.0, steps=steps)
                times[name] += fit_step_ms(translator(data, d_model), data, args.steps, [callback])
        base = statistics.median(plain)
        for name, _, _, bound in methods:
            ms = statistics.median(times[name])
            limit = f"{bound:5.1f}x" if bound else "     -"
            print(f"| {f'{d_model}, {name}':<26} | {base:8.1f} | {ms:14.1f} | {ms / base:5.2f}x | {limit} |")


if __name__ == "__main__":
    main()
