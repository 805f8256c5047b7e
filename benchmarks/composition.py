"""The cost of llmkit's composition mechanism itself: a callback that wraps training_step and adds nothing.

Two measures, side by side in one process:

1. ``Trainer.fit`` steps of a 1-layer translator (d_model 32, NumberWords batches of 64) with no
   callback and with the do-nothing composing callback, interleaved rounds, medians;
2. the wrapper chain alone: ``module.training_step(batch, 0)`` through the installed wrapper
   against the module's own method, on a module whose step does nothing (microseconds per call).

Run alone on a quiet machine: ``python benchmarks/composition.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as L
import torch
from _timing import fit_step_ms, translator

from llmkit.callbacks._composition import ComposingCallback, Composition
from llmkit.data import NumberWordsDataModule


class Nothing(ComposingCallback):
    """Attaches through the composition, wraps training_step, adds nothing."""

    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, composition: Composition) -> None:
        composition.wrap_step(self.layer, lambda inner, *args, **kwargs: inner(*args, **kwargs))


class Idle(L.LightningModule):
    """A step that does nothing: what is left to time is the call itself."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """Return the batch."""
        return batch


class Training:
    """Stands in for a Trainer that is in its training loop."""

    training = True
    callbacks: tuple[L.Callback, ...] = ()


def call_us(module: L.LightningModule, calls: int) -> float:
    """Microseconds per ``module.training_step(0, 0)`` call."""
    step = module.training_step
    start = time.perf_counter()
    for _ in range(calls):
        step(0, 0)
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="steps per fit")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved fits of each")
    parser.add_argument("--calls", type=int, default=200_000, help="calls per timing of the wrapper chain")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    data = NumberWordsDataModule(batch_size=64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    plain: list[float] = []
    wrapped: list[float] = []
    for _ in range(args.rounds):
        torch.manual_seed(0)
        plain += fit_step_ms(translator(data, 32, layers=1), data, args.steps, [])
        torch.manual_seed(0)
        wrapped += fit_step_ms(translator(data, 32, layers=1), data, args.steps, [Nothing()])

    idle = Idle()
    idle._trainer = Training()  # type: ignore[assignment]
    direct = [call_us(idle, args.calls) for _ in range(args.rounds)]
    Composition.attach(idle._trainer, idle, Nothing())  # type: ignore[arg-type]
    through = [call_us(idle, args.calls) for _ in range(args.rounds)]
    Composition.detach(idle)

    base, ms = statistics.median(plain), statistics.median(wrapped)
    print("| measure | no callback | do-nothing wrapper | difference |")
    print("|---|---|---|---|")
    print(f"| fit step, 1+1 layers, d 32 (ms) | {base:.3f} | {ms:.3f} | {ms - base:+.3f} ms |")
    a, b = statistics.median(direct), statistics.median(through)
    print(f"| training_step call alone (us) | {a:.2f} | {b:.2f} | {(b - a) / 1000:+.4f} ms |")


if __name__ == "__main__":
    main()
