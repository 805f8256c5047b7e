"""QuantizationAwareTraining: fake-quantized step time, converted size and CPU latency, in one process.

Training step time with fake quantization against the plain step, and the converted model's
weight bytes and latency against fp32.

Seq2SeqTransformer translators on the NumberWords task (batch 64), with torchao's 8da4w scheme
(int8 dynamic activations, int4 weights in groups of 32) and the weight-only 4w scheme. Step times
are medians of ``Trainer.fit`` steps, plain and fake-quantized runs interleaved.

    python benchmarks/qat.py [--steps 40] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
from _timing import fit_step_ms, median_ms, translator

from llmkit.callbacks import QuantizationAwareTraining
from llmkit.callbacks.quantization import quantized_weight_bytes
from llmkit.data import NumberWordsDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--quick", action="store_true", help="10 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 10, 1
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    data = NumberWordsDataModule(batch_size=64)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; NumberWords en->fr, batch 64\n")
    print(f"| {'d_model 3+3 layers, scheme':<28} | {'plain ms':>8} | {'fake-quant ms':>13} | {'ratio':>6} | "
          f"{'weights':>7} | {'fp32 fwd ms':>11} | {'int fwd ms':>10} | {'fp32 gen ms':>11} | {'int gen ms':>10} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 15}|{'-' * 8}|{'-' * 9}|{'-' * 13}|{'-' * 12}|{'-' * 13}|{'-' * 12}|")
    for d_model in (64, 128, 256):
        for scheme in ("8da4w", "4w"):
            plain: list[float] = []
            fake: list[float] = []
            for _ in range(args.rounds):
                torch.manual_seed(0)
                plain += fit_step_ms(translator(data, d_model), data, args.steps, [])
                torch.manual_seed(0)
                qat = QuantizationAwareTraining(scheme=scheme, convert_on_fit_end=False)
                fake += fit_step_ms(translator(data, d_model), data, args.steps, [qat])
            fp32_model = translator(data, d_model).eval()
            int_model = QuantizationAwareTraining(scheme=scheme).convert(copy.deepcopy(fp32_model)).eval()
            stored, fp32 = quantized_weight_bytes(int_model)
            src, tgt_in = batch["src"], batch["tgt"][:, :-1]
            with torch.no_grad():
                fwd = [median_ms(lambda m=m, s=src, t=tgt_in: m(s, t)) for m in (fp32_model, int_model)]
            gen = [median_ms(lambda m=m, s=src[:16]: m.generate(s, max_new_tokens=16), runs=3)
                   for m in (fp32_model, int_model)]
            ratio = statistics.median(fake) / statistics.median(plain)
            name = f"{d_model}, {scheme}"
            print(f"| {name:<28} | {statistics.median(plain):8.1f} | {statistics.median(fake):13.1f} | "
                  f"{ratio:5.2f}x | {stored / fp32:6.2f}x | {fwd[0]:11.1f} | {fwd[1]:10.1f} | {gen[0]:11.0f} | "
                  f"{gen[1]:10.0f} |")


if __name__ == "__main__":
    main()
