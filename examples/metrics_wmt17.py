"""Rank the WMT17 English->German systems with llmkit's BLEU, ROUGE and perplexity.

Each system's 3004 translations are scored against the reference in batches, the way a
validation loop feeds a metric. BLEU is checked against sacrebleu when it is installed.
Perplexity comes from a character-bigram model fitted to the references: a crude fluency
score, but a real use of ``Perplexity`` on logits with padding.

    python examples/metrics_wmt17.py [--limit N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import bz2
import pickle
from pathlib import Path

import torch
from torchmetrics import MetricCollection

from llmkit.metrics import BLEUScore, Perplexity, ROUGEScore

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wmt17_en_de_systems.pkl.bz2"
PAD = 0


def load(limit: int) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The systems' outputs and the reference; a two-system toy corpus where the data is absent."""
    if not DATA.exists():
        print(f"{DATA} not found: scoring a toy corpus instead.")
        reference = ["Der Hund biss den Mann.", "Es war nicht unerwartet."]
        return [("toy-a", ["Der Hund biss den Mann.", "Es war nicht überraschend."]),
                ("toy-b", ["Ein Hund hat einen Mann gebissen.", "Niemand war überrascht."])], reference
    with bz2.open(DATA, "rb") as handle:
        *systems, (_, streams) = pickle.load(handle)
    return [(name.split(".")[1], outputs[:limit]) for name, outputs in systems], streams[0][:limit]


class CharBigram:
    """Add-one character-bigram model: ``logits(text)`` gives next-character logits ``[B, T, V]``."""

    def __init__(self, texts: list[str]) -> None:
        # 0 is padding (and the start of every text); the last id stands for unseen characters.
        self.chars = {c: i + 1 for i, c in enumerate(sorted({c for t in texts for c in t}))}
        self.unknown = len(self.chars) + 1
        counts = torch.ones(self.unknown + 1, self.unknown + 1)
        for ids in self.encode(texts):
            counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True)
        self.log_probs = torch.log(counts / counts.sum(1, keepdim=True))

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """Character ids of each text, after a leading padding id."""
        return [torch.tensor([PAD] + [self.chars.get(c, self.unknown) for c in t]) for t in texts]

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, T, V], targets [B, T])`` for texts, padded with ``PAD``."""
        ids = torch.nn.utils.rnn.pad_sequence(self.encode(texts), batch_first=True, padding_value=PAD)
        logits = self.log_probs[ids[:, :-1]]  # [B, T, V]: the next character given this one
        return logits, ids[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=3004, help="sentences per system")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    systems, reference = load(args.limit)
    bigram = CharBigram(reference)
    metrics = MetricCollection({"bleu": BLEUScore(), "rouge": ROUGEScore(rouge_keys=("rouge1", "rougeL"))})
    ppl = Perplexity(ignore_index=PAD)

    rows = []
    for name, outputs in systems:
        for start in range(0, len(outputs), args.batch_size):
            hyps, refs = outputs[start : start + args.batch_size], reference[start : start + args.batch_size]
            metrics.update(hyps, [[ref] for ref in refs])
            ppl.update(*bigram.batch(hyps))
        scores = metrics.compute()
        rows.append((name, scores["bleu"].item(), scores["rouge1_fmeasure"].item(),
                     scores["rougeL_fmeasure"].item(), ppl.compute().item(), outputs))
        metrics.reset()
        ppl.reset()

    print(f"\n{'system':<22} {'BLEU':>6} {'ROUGE-1':>8} {'ROUGE-L':>8} {'char-PPL':>9}  sacrebleu")
    try:
        import sacrebleu
    except ModuleNotFoundError:
        sacrebleu = None
    worst = 0.0
    for name, bleu, rouge1, rouge_l, char_ppl, outputs in sorted(rows, key=lambda r: -r[1]):
        check = ""
        if sacrebleu is not None:
            expected = sacrebleu.corpus_bleu(outputs, [reference]).score / 100
            worst = max(worst, abs(expected - bleu))
            check = f"{100 * expected:6.2f}"
        print(f"{name:<22} {100 * bleu:6.2f} {100 * rouge1:8.2f} {100 * rouge_l:8.2f} {char_ppl:9.3f}  {check}")
    if sacrebleu is not None:
        print(f"\nllmkit BLEU vs sacrebleu on {len(rows)} systems: largest difference {worst:.1e}")


if __name__ == "__main__":
    main()
