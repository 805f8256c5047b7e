"""Train the Transformer to translate numbers from English words to French words, on CPU.

The data is generated on the spot with num2words ("four hundred and twenty-one" ->
"quatre cent vingt et un"), with no number in two splits. After training, the test split is
scored (BLEU, ROUGE-L, perplexity), a few translations are shown beside their references, and
the checkpoint is saved.

    python examples/translate_numbers.py                 # the full run (a few minutes on 2 cores)
    python examples/translate_numbers.py --max-steps 20  # a smoke test
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from llmkit import Seq2SeqTransformer
from llmkit.data import NumberWordsDataModule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src-lang", default="en")
    parser.add_argument("--tgt-lang", default="fr")
    parser.add_argument("--high", type=int, default=9_999, help="numbers 0..high")
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--max-steps", type=int, default=1_500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--output", type=Path, default=Path("outputs/translate_numbers"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(args.seed, verbose=False)
    data = NumberWordsDataModule(
        src_lang=args.src_lang, tgt_lang=args.tgt_lang, high=args.high, val_size=args.val_size,
        test_size=args.test_size, batch_size=args.batch_size, seed=args.seed,
    )
    model = Seq2SeqTransformer(
        src_vocab_size=data.src_vocab_size,
        tgt_vocab_size=data.tgt_vocab_size,
        d_model=args.d_model,
        num_heads=4,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        dim_feedforward=4 * args.d_model,
        dropout=args.dropout,
        max_len=max(data.max_src_len, data.max_tgt_len) + 8,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        val_generate_batches=2,
    )
    checkpoint = ModelCheckpoint(dirpath=args.output, filename="translator", save_last=False, monitor="val_loss")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        max_epochs=-1,
        val_check_interval=min(300, args.max_steps),
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        callbacks=[checkpoint],
        logger=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    best = Seq2SeqTransformer.load_from_checkpoint(checkpoint.best_model_path)
    scores = trainer.test(best, data, verbose=False)[0]
    params = sum(p.numel() for p in best.parameters())

    print(f"\n{args.src_lang}->{args.tgt_lang} number words, {len(data.numbers('train'))} training pairs, "
          f"{params / 1e6:.2f} M parameters, {trainer.global_step} steps in {seconds / 60:.1f} min")
    print(f"test BLEU {scores['test_bleu']:.4f}  ROUGE-L {scores['test_rougeL']:.4f}  "
          f"perplexity {scores['test_ppl']:.3f}")
    batch = next(iter(data.test_dataloader()))
    translations = best.generate(batch["src"][:6])
    for number, src, out, tgt in zip(batch["number"], batch["src"], translations, batch["tgt"], strict=False):
        print(f"\n{int(number):>6}  {data.decode(src, side='src')}\n   -> {data.decode(out)}\n  ref {data.decode(tgt)}")
    print(f"\ncheckpoint: {checkpoint.best_model_path}")


if __name__ == "__main__":
    main()
