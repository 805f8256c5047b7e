"""Time Seq2SeqTransformer beside a torch.nn.Transformer model of identical size, in one process.

1. A training step (forward, label-smoothed loss, backward, AdamW step) against the same model
   built on ``torch.nn.Transformer``: same embeddings, positional encoding, tied output, masks,
   loss and optimizer, on the same batches.
2. Greedy generation of 128 new tokens with and without the KV cache (EOS is forbidden, so every
   row has the same length), and beam search (4 beams) against greedy.

    python benchmarks/seq2seq.py [--steps 10] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from _timing import median_ms
from torch import Tensor, nn

from llmkit import Seq2SeqTransformer
from llmkit.nn import SinusoidalPositionalEncoding


class TorchTransformerModel(nn.Module):
    """The same model on torch.nn.Transformer (post-LN), for comparison."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, ff: int, dropout: float, max_len: int):
        super().__init__()
        self.d_model = d_model
        self.src_embed = nn.Embedding(vocab, d_model, padding_idx=0)
        self.tgt_embed = nn.Embedding(vocab, d_model, padding_idx=0)
        self.positional = SinusoidalPositionalEncoding(d_model=d_model, max_len=max_len)
        self.dropout = nn.Dropout(dropout)
        self.transformer = nn.Transformer(
            d_model=d_model, nhead=heads, num_encoder_layers=layers, num_decoder_layers=layers,
            dim_feedforward=ff, dropout=dropout, batch_first=True,
        )
        # nn.Transformer always ends its stacks with a LayerNorm; the paper's post-LN model has none.
        self.transformer.encoder.norm = nn.Identity()
        self.transformer.decoder.norm = nn.Identity()
        self.output = nn.Linear(d_model, vocab, bias=False)
        self.output.weight = self.tgt_embed.weight

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Logits ``[B, T, V]``, as ``Seq2SeqTransformer.forward``."""
        scale = math.sqrt(self.d_model)
        src_x = self.dropout(self.positional(self.src_embed(src) * scale))
        tgt_x = self.dropout(self.positional(self.tgt_embed(tgt_in) * scale))
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], dtype=src_x.dtype)
        pad = src == 0
        hidden = self.transformer(
            src_x, tgt_x, tgt_mask=causal, tgt_is_causal=True,
            src_key_padding_mask=pad, memory_key_padding_mask=pad,
        )
        return self.output(hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model (median)")
    parser.add_argument("--runs", type=int, default=3, help="timed generation runs (median)")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.runs = 3, 1
    torch.manual_seed(0)
    vocab, d_model, heads, layers, ff, dropout, batch, length = 8000, 256, 4, 3, 1024, 0.1, 32, 32
    ours = Seq2SeqTransformer(
        vocab, vocab, d_model=d_model, num_heads=heads, num_encoder_layers=layers, num_decoder_layers=layers,
        dim_feedforward=ff, dropout=dropout, max_len=256, check_inputs=False,
    )
    theirs = TorchTransformerModel(vocab, d_model, heads, layers, ff, dropout, max_len=256)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, (n_ours, n_theirs)

    src = torch.randint(4, vocab, (batch, length))
    tgt = torch.randint(4, vocab, (batch, length + 1))
    tgt[:, 0] = 1
    src[::4, length // 2 :] = 0  # some padding
    tgt[::3, length // 2 :] = 0

    def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        logits = model(src, tgt[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tgt[:, 1:].reshape(-1), ignore_index=0, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.98))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.98))
    ours.train()
    theirs.train()
    # Interleave the two so that both see the same machine load.
    ours_times, theirs_times = [], []
    for _ in range(args.steps):
        ours_times.append(median_ms(lambda: train_step(ours, opt_ours), 1))
        theirs_times.append(median_ms(lambda: train_step(theirs, opt_theirs), 1))
    ours_ms, theirs_ms = statistics.median(ours_times), statistics.median(theirs_times)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {d_model}, {layers}+{layers} layers, "
          f"vocab {vocab}, {n_ours / 1e6:.1f} M parameters\n")
    print(f"| {'measure':<50} | {'llmkit':>10} | {'baseline':>10} | {'ratio':>7} |")
    print(f"|{'-' * 52}|{'-' * 12}|{'-' * 12}|{'-' * 9}|")
    print(f"| {f'train step, batch {batch}x{length} (vs nn.Transformer)':<50} | {ours_ms:8.1f}ms | "
          f"{theirs_ms:8.1f}ms | {ours_ms / theirs_ms:6.2f}x |")

    ours.eval()
    sources = src[:8]
    new = 128

    def generate(**kwargs: object) -> Tensor:
        return ours.generate(sources, max_new_tokens=new, min_new_tokens=new, **kwargs)

    cached = generate(use_cache=True)
    uncached = generate(use_cache=False)
    assert torch.equal(cached, uncached), "cached and uncached greedy decoding differ"
    cached_ms = median_ms(lambda: generate(use_cache=True), args.runs)
    uncached_ms = median_ms(lambda: generate(use_cache=False), args.runs)
    beam_ms = median_ms(lambda: generate(num_beams=4), args.runs)
    print(f"| {f'greedy, 8 sources x {new} new tokens: cache vs none':<50} | {cached_ms:8.0f}ms | "
          f"{uncached_ms:8.0f}ms | {uncached_ms / cached_ms:5.2f}x faster |")
    print(f"| {'beam 4 (cached) vs greedy (cached)':<50} | {beam_ms:8.0f}ms | {cached_ms:8.0f}ms | "
          f"{beam_ms / cached_ms:6.2f}x |")
    print("\nSame tokens with and without the cache: yes")


if __name__ == "__main__":
    main()
