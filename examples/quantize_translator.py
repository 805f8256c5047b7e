"""Quantize the English->French number translator to int4 weights: post-training vs QAT.

The fp32 translator is trained (or loaded with ``--model``), then quantized two ways with the
same torchao scheme (``--scheme``, int8 dynamic activations and int4 weights in groups of 32 by
default): post-training quantization (PTQ: convert as it is), and quantization-aware training
(QAT: fine-tune with ``QuantizationAwareTraining`` on the Trainer, then convert). The table
compares test BLEU, perplexity, the linear layers' weight bytes and CPU greedy-translation time;
it is also saved as ``results.json`` under ``--output`` (for docs/make_figures.py).

    python examples/quantize_translator.py                      # the full run (minutes on 2 cores)
    python examples/quantize_translator.py --model outputs/distill_translator/teacher.ckpt
    python examples/quantize_translator.py --steps 10 --qat-steps 4  # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import QuantizationAwareTraining
from llmkit.callbacks.quantization import quantized_weight_bytes
from llmkit.data import NumberWordsDataModule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="an fp32 translator checkpoint (default: train one)")
    parser.add_argument("--steps", type=int, default=600, help="fp32 training steps")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--scheme", default="8da4w", help="8da4w, 8da8w, 4w or 8w")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--qat-steps", type=int, default=100, help="QAT fine-tuning steps")
    parser.add_argument("--qat-lr", type=float, default=5e-4)
    parser.add_argument("--high", type=int, default=9_999)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--output", type=Path, default=Path("outputs/quantize_translator"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def trainer(steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=-1, val_check_interval=min(300, steps),
        check_val_every_n_epoch=None, gradient_clip_val=1.0, callbacks=callbacks, logger=False,
        enable_model_summary=False,
    )


def translation_ms(model: Seq2SeqTransformer, src: torch.Tensor, runs: int = 3) -> float:
    model.generate(src)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.generate(src)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    data = NumberWordsDataModule(high=args.high, val_size=args.val_size, test_size=args.test_size, seed=args.seed)
    L.seed_everything(args.seed, verbose=False)
    if args.model is None:
        model = Seq2SeqTransformer(
            data.src_vocab_size, data.tgt_vocab_size, d_model=args.d_model, num_heads=4,
            num_encoder_layers=args.layers, num_decoder_layers=args.layers, dim_feedforward=4 * args.d_model,
            dropout=0.05, max_len=max(data.max_src_len, data.max_tgt_len) + 8, lr=2e-3,
            warmup_steps=min(200, max(1, args.steps // 5)), val_generate_batches=2, label_smoothing=0.0,
        )
        checkpoint = ModelCheckpoint(dirpath=args.output, filename="fp32", monitor="val_loss",
                                     enable_version_counter=False)
        trainer(args.steps, [checkpoint]).fit(model, data)
        model = Seq2SeqTransformer.load_from_checkpoint(checkpoint.best_model_path)
    else:
        model = Seq2SeqTransformer.load_from_checkpoint(args.model, map_location="cpu", weights_only=True)

    ptq = QuantizationAwareTraining(scheme=args.scheme, group_size=args.group_size).convert(copy.deepcopy(model))

    qat_model = copy.deepcopy(model)
    qat_model.hparams.lr, qat_model.hparams.warmup_steps = args.qat_lr, 1
    qat = QuantizationAwareTraining(scheme=args.scheme, group_size=args.group_size)
    start = time.perf_counter()
    trainer(args.qat_steps, [qat]).fit(qat_model, data)
    qat_minutes = (time.perf_counter() - start) / 60

    tester = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    src = next(iter(data.test_dataloader()))["src"]
    rows = []
    for name, candidate in (("fp32", model), (f"PTQ {args.scheme}", ptq),
                            (f"QAT {args.scheme}, {args.qat_steps} steps", qat_model)):
        (scores,) = tester.test(candidate, data, verbose=False)
        stored, fp32 = quantized_weight_bytes(candidate)
        rows.append((name, scores, stored, fp32, translation_ms(candidate.eval(), src)))

    print(f"\nen->fr number words; test on {args.test_size} unseen numbers; QAT fine-tuning took "
          f"{qat_minutes:.1f} min\n")
    print(f"| {'model':<28} | {'test BLEU':>9} | {'test ppl':>8} | {'linear weights':>16} | "
          f"{'translate ' + str(len(src)) + ' (ms)':>18} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 10}|{'-' * 18}|{'-' * 20}|")
    for name, scores, stored, fp32, ms in rows:
        size = f"{stored / 1024:.0f} KiB ({stored / fp32:.2f}x)"
        print(f"| {name:<28} | {scores['test_bleu']:9.4f} | {scores['test_ppl']:8.3f} | {size:>16} | {ms:18.0f} |")
    (_, fp32_scores, *_), (_, ptq_scores, *_), (_, qat_scores, *_) = rows
    print(f"\nQAT BLEU {'>=' if qat_scores['test_bleu'] >= ptq_scores['test_bleu'] else '<'} PTQ BLEU; "
          f"QAT is {100 * (fp32_scores['test_bleu'] - qat_scores['test_bleu']):.2f} BLEU points below fp32")
    args.output.mkdir(parents=True, exist_ok=True)
    table = [{"model": name, "test_bleu": float(scores["test_bleu"]), "test_ppl": float(scores["test_ppl"]),
              "weight_bytes": int(stored), "fp32_weight_bytes": int(fp32), "translate_ms": ms}
             for name, scores, stored, fp32, ms in rows]
    (args.output / "results.json").write_text(json.dumps(
        {"scheme": args.scheme, "group_size": args.group_size, "qat_steps": args.qat_steps,
         "test_size": args.test_size, "translate_sentences": len(src), "rows": table}, indent=1))
    torch.save(qat_model.state_dict(), args.output / f"qat_{args.scheme}.pt")
    print(f"converted weights: {args.output / f'qat_{args.scheme}.pt'}")


if __name__ == "__main__":
    main()
