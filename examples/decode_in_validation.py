"""Decode a few validation batches while training, score them with BLEU and chrF, and log examples.

``GenerationEvaluation`` works on any LightningModule with a ``generate`` (or a ``generate_fn``): here
the Transformer learns English -> French number words, and at each validation the callback
translates the first ``--val-batches`` batches, turns the ids into words with the data module's
vocabulary, and logs ``val_bleu``, ``val_chrf`` and a table of examples (to the CSV logger's
``generation_examples.csv`` here; to TensorBoard or W&B when those loggers are used).

    python examples/decode_in_validation.py                 # a minute or two on 2 cores
    python examples/decode_in_validation.py --max-steps 20  # a smoke test

At the end it shows the trained model's n-best list (with scores), top-p samples and diverse beams
for one source.
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import GenerationEvaluation
from llmkit.data import NumberWordsDataModule
from llmkit.metrics import BLEUScore, CHRFScore


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--high", type=int, default=9_999, help="numbers 0..high")
    parser.add_argument("--val-size", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=50, help="validate every this many training steps")
    parser.add_argument("--val-batches", type=int, default=2, help="validation batches decoded each time")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--output", type=Path, default=Path("outputs/decode_in_validation"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class PrintScores(L.Callback):
    """Print the scores of each validation (after GenerationEvaluation logged them)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        print(f"step {trainer.global_step:>5}  val_loss {float(metrics['val_loss']):.3f}  "
              f"val_bleu {float(metrics['val_bleu']):.4f}  val_chrf {float(metrics['val_chrf']):.4f}")


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(args.seed, verbose=False)
    data = NumberWordsDataModule(high=args.high, val_size=args.val_size, test_size=args.val_size,
                                 batch_size=args.batch_size, seed=args.seed)
    model = Seq2SeqTransformer(
        src_vocab_size=data.src_vocab_size, tgt_vocab_size=data.tgt_vocab_size, d_model=args.d_model, num_heads=4,
        num_encoder_layers=args.layers, num_decoder_layers=args.layers, dim_feedforward=4 * args.d_model,
        dropout=0.05, max_len=max(data.max_src_len, data.max_tgt_len) + 8, lr=args.lr, warmup_steps=100,
        val_generate_batches=0,  # the callback decodes instead
    )
    evaluation = GenerationEvaluation(
        {"bleu": BLEUScore(), "chrf": CHRFScore()},
        num_batches=args.val_batches,
        # Rows of target ids -> text (the vocabulary skips <bos>/<pad> and stops at <eos>).
        decode_fn=lambda rows: [data.decode(row) for row in rows],
        source_decode_fn=lambda rows: [data.decode(row, side="src") for row in rows],
        generate_kwargs={"max_new_tokens": data.max_tgt_len + 2},
    )
    logger = CSVLogger(args.output, name="", version="")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.max_steps, max_epochs=-1,
        val_check_interval=min(args.val_every, args.max_steps), check_val_every_n_epoch=None, gradient_clip_val=1.0,
        callbacks=[evaluation, PrintScores()], logger=logger,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    print(f"{trainer.global_step} steps in {time.perf_counter() - start:.1f} s")

    path = Path(logger.log_dir) / "generation_examples.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    last = [row for row in rows if row["step"] == rows[-1]["step"]]
    print(f"\nexamples of the last validation (step {last[0]['step']}), all in {path}:")
    for row in last:
        print(f"  {row['source']}\n   -> {row['prediction']}\n  ref {row['reference']}")
    show_decoding(model, data)


def show_decoding(model: Seq2SeqTransformer, data: NumberWordsDataModule) -> None:
    """The trained model's n-best list, samples and diverse beams for one validation source."""
    src = next(iter(data.val_dataloader()))["src"][:1]
    print(f"\nsource: {data.decode(src[0], side='src')}")
    n_best = model.generate(src, num_beams=4, num_return_sequences=3, return_scores=True)
    for ids, score in zip(n_best.sequences, n_best.scores.tolist(), strict=True):
        print(f"  beam 4, n-best   {score:7.3f}  {data.decode(ids)}")
    samples = model.generate(src, do_sample=True, temperature=1.2, top_p=0.9, num_return_sequences=3,
                             generator=torch.Generator().manual_seed(0), return_scores=True)
    for ids, score in zip(samples.sequences, samples.scores.tolist(), strict=True):
        print(f"  top-p 0.9, T 1.2 {score:7.3f}  {data.decode(ids)}")
    diverse = model.generate(src, num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=2)
    for ids in diverse:
        print(f"  diverse beams            {data.decode(ids)}")


if __name__ == "__main__":
    main()
