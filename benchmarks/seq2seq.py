"""Time Seq2SeqTransformer beside a torch.nn.Transformer model of identical size, in one process.

1. A training step (``training_step`` with the library's defaults: label smoothing, padding masks,
   input checks; backward; AdamW step) against the plain ``torch.nn.Transformer`` recipe of the
   same size (same embeddings, positional encoding, tied output and optimizer; plain cross-entropy,
   no masks) on a batch without padding; the same step on a padded batch; and with
   ``compile=True`` (inductor) against eager.
2. Greedy generation of 128 new tokens with and without the KV cache (EOS is forbidden, so every
   row has the same length), and beam search (4 beams) against greedy.
3. Decoding against Hugging Face: cached greedy against ``BartForConditionalGeneration.generate`` of
   the same size (tokens/s); sampling with top-p and temperature against greedy (time per token);
   the compiled decode step over a static cache against eager cached greedy (same tokens).
4. ``GenerationEvaluation`` on 2 validation batches of 64: a validation epoch with the callback
   against one without, the difference against the decoding time alone.

    python benchmarks/seq2seq.py [--steps 10] [--quick] [--part train|generate|all]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable

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

    def forward(self, src: Tensor, tgt_in: Tensor, masks: bool = True) -> Tensor:
        """Logits ``[B, T, V]``, as ``Seq2SeqTransformer.forward``; ``masks=False``: no padding masks."""
        scale = math.sqrt(self.d_model)
        src_x = self.dropout(self.positional(self.src_embed(src) * scale))
        tgt_x = self.dropout(self.positional(self.tgt_embed(tgt_in) * scale))
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], dtype=src_x.dtype)
        pad = src == 0 if masks else None
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
    parser.add_argument("--part", choices=["train", "generate", "all"], default="all", help="which tables")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (slow to compile)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.runs = 3, 1
    if args.part in ("generate", "all"):
        decoding_table(args)
        evaluation_table(args)
    if args.part == "generate":
        return
    torch.manual_seed(0)
    vocab, d_model, heads, layers, ff, dropout, batch, length = 8000, 256, 4, 3, 1024, 0.1, 32, 32
    kwargs = dict(d_model=d_model, num_heads=heads, num_encoder_layers=layers, num_decoder_layers=layers,
                  dim_feedforward=ff, dropout=dropout, max_len=256)
    ours = Seq2SeqTransformer(vocab, vocab, **kwargs)  # the defaults: label smoothing, masks, input checks
    theirs = TorchTransformerModel(vocab, d_model, heads, layers, ff, dropout, max_len=256)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, (n_ours, n_theirs)

    # A batch without padding: the plain recipe (no masks) is then the same computation.
    src = torch.randint(4, vocab, (batch, length))
    tgt = torch.randint(4, vocab, (batch, length + 1))
    tgt[:, 0] = 1
    full = {"src": src, "tgt": tgt}
    padded = {"src": src.clone(), "tgt": tgt.clone()}
    padded["src"][::4, length // 2 :] = 0
    padded["tgt"][::3, length // 2 :] = 0
    warnings.filterwarnings("ignore", ".*self.log.*")  # training_step outside a Trainer: nothing is logged

    def ours_step(model: Seq2SeqTransformer, optimizer: torch.optim.Optimizer, data: dict[str, Tensor]) -> None:
        loss = model.training_step(data, 0)  # with its defaults: label smoothing, padding masks, checks
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def plain_step(optimizer: torch.optim.Optimizer) -> None:
        # The plain nn.Transformer recipe: plain cross-entropy, no padding masks.
        logits = theirs(src, tgt[:, :-1], masks=False)
        loss = F.cross_entropy(logits.reshape(-1, vocab), tgt[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))

    contenders: dict[str, Callable[[], None]] = {}
    opt_ours, opt_theirs = optimizer(ours), optimizer(theirs)
    contenders["ours"] = lambda: ours_step(ours, opt_ours, full)
    contenders["ours padded"] = lambda: ours_step(ours, opt_ours, padded)
    contenders["theirs"] = lambda: plain_step(opt_theirs)
    compile_s = None
    if not args.no_compile:
        compiled = Seq2SeqTransformer(vocab, vocab, compile=True, **kwargs)
        compiled.load_state_dict(ours.state_dict())
        opt_compiled = optimizer(compiled)
        contenders["compiled"] = lambda: ours_step(compiled, opt_compiled, full)
        start = time.perf_counter()
        for _ in range(3):
            contenders["compiled"]()  # inductor compiles the forward and the backward
        compile_s = time.perf_counter() - start
    ours.train()
    theirs.train()
    # Interleave the contenders so that all see the same machine load.
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.steps):
        for name, step in contenders.items():
            times[name].append(median_ms(step, 1))
    ms = {name: statistics.median(values) for name, values in times.items()}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {d_model}, {layers}+{layers} layers, "
          f"vocab {vocab}, {n_ours / 1e6:.1f} M parameters; medians of {args.steps} interleaved steps\n")
    print(f"| {'measure':<58} | {'llmkit':>10} | {'baseline':>10} | {'ratio':>7} |")
    print(f"|{'-' * 60}|{'-' * 12}|{'-' * 12}|{'-' * 9}|")
    print(f"| {f'train step {batch}x{length}, defaults vs plain nn.Transformer recipe':<58} | {ms['ours']:8.1f}ms | "
          f"{ms['theirs']:8.1f}ms | {ms['ours'] / ms['theirs']:6.2f}x |")
    print(f"| {'train step, a padded batch (masks) vs the unpadded one':<58} | {ms['ours padded']:8.1f}ms | "
          f"{ms['ours']:8.1f}ms | {ms['ours padded'] / ms['ours']:6.2f}x |")
    if compile_s is not None:
        print(f"| {f'train step, compile=True vs eager (compiled in {compile_s:.0f} s)':<58} | "
              f"{ms['compiled']:8.1f}ms | {ms['ours']:8.1f}ms | {ms['compiled'] / ms['ours']:6.2f}x |")

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
    print(f"| {f'greedy, 8 sources x {new} new tokens: cache vs none':<58} | {cached_ms:8.0f}ms | "
          f"{uncached_ms:8.0f}ms | {uncached_ms / cached_ms:5.2f}x faster |")
    print(f"| {'beam 4 (cached) vs greedy (cached)':<58} | {beam_ms:8.0f}ms | {cached_ms:8.0f}ms | "
          f"{beam_ms / cached_ms:6.2f}x |")
    print("\nSame tokens with and without the cache: yes")


def decoding_table(args: argparse.Namespace) -> None:
    """Cached greedy against HF generate, sampling against greedy, compiled against eager, per token."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    vocab, d_model, heads, layers, ff, batch, length, new = 8000, 256, 4, 3, 1024, 8, 32, 128
    ours = Seq2SeqTransformer(
        vocab, vocab, d_model=d_model, num_heads=heads, num_encoder_layers=layers, num_decoder_layers=layers,
        dim_feedforward=ff, dropout=0.0, max_len=256, check_inputs=False,
    ).eval()
    hf = BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ff, decoder_ffn_dim=ff,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        forced_bos_token_id=None, forced_eos_token_id=None, scale_embedding=True, dropout=0.0,
    )).eval()
    src = torch.randint(4, vocab, (batch, length))
    src[::4, length // 2 :] = 0

    def ours_greedy() -> Tensor:
        return ours.generate(src, max_new_tokens=new, min_new_tokens=new)

    def ours_sample() -> Tensor:
        return ours.generate(src, max_new_tokens=new, min_new_tokens=new, do_sample=True, top_p=0.9,
                             temperature=0.8, generator=torch.Generator().manual_seed(0))

    def ours_sample_temperature() -> Tensor:
        return ours.generate(src, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=0.8,
                             generator=torch.Generator().manual_seed(0))

    def hf_greedy() -> Tensor:
        with torch.no_grad():
            return hf.generate(input_ids=src, attention_mask=src != 0, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, num_beams=1)

    timed = {"ours_greedy": ours_greedy, "ours_sample": ours_sample, "ours_sample_t": ours_sample_temperature,
             "hf_greedy": hf_greedy}
    compiled_same = None
    if not args.no_compile:

        def ours_compiled() -> Tensor:
            return ours.generate(src, max_new_tokens=new, min_new_tokens=new, cache_implementation="static",
                                 compile=True)

        compile_start = time.perf_counter()
        compiled_same = torch.equal(ours_compiled(), ours_greedy())
        compile_s = time.perf_counter() - compile_start
        timed["ours_compiled"] = ours_compiled
    for fn in timed.values():
        fn()  # warm-up
    # Interleave the runs so that every contender sees the same machine load.
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.runs):
        for name, fn in timed.items():
            times[name].append(median_ms(fn, 1))
    ms = {name: statistics.median(values) for name, values in times.items()}
    tokens = batch * new
    rate = {name: tokens / (value / 1000) for name, value in ms.items()}
    print(f"\nDecoding {batch} sources x {new} new tokens (EOS forbidden), d_model {d_model}, {layers}+{layers} "
          f"layers, vocab {vocab}; median of {args.runs} interleaved runs\n")
    print(f"| {'measure':<58} | {'llmkit':>12} | {'baseline':>12} | {'ratio':>7} |")
    print(f"|{'-' * 60}|{'-' * 14}|{'-' * 14}|{'-' * 9}|")
    print(f"| {'cached greedy vs HF BART generate (tokens/s)':<58} | {rate['ours_greedy']:8.0f} t/s | "
          f"{rate['hf_greedy']:8.0f} t/s | {rate['ours_greedy'] / rate['hf_greedy']:6.2f}x |")
    per_token = {name: value / new for name, value in ms.items()}
    print(f"| {'sampling top-p 0.9, T 0.8 vs greedy (ms per token)':<58} | {per_token['ours_sample']:9.2f}ms | "
          f"{per_token['ours_greedy']:9.2f}ms | {ms['ours_sample'] / ms['ours_greedy']:6.2f}x |")
    print(f"| {'sampling, temperature 0.8 only, vs greedy (ms per token)':<58} | "
          f"{per_token['ours_sample_t']:9.2f}ms | {per_token['ours_greedy']:9.2f}ms | "
          f"{ms['ours_sample_t'] / ms['ours_greedy']:6.2f}x |")
    if "ours_compiled" in ms:
        print(f"| {'compiled static-cache greedy vs eager cached (tokens/s)':<58} | "
              f"{rate['ours_compiled']:8.0f} t/s | {rate['ours_greedy']:8.0f} t/s | "
              f"{rate['ours_compiled'] / rate['ours_greedy']:6.2f}x |")
        print(f"\nCompiled and eager greedy give the same tokens: {'yes' if compiled_same else 'NO'}; "
              f"first call (compilation) {compile_s:.0f} s")


def evaluation_table(args: argparse.Namespace) -> None:
    """GenerationEvaluation's cost: validation with and without it, against decoding alone."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    from llmkit.callbacks import GenerationEvaluation
    from llmkit.metrics import BLEUScore

    torch.manual_seed(0)
    vocab, batch, length, new = 8000, 64, 24, 24
    model = Seq2SeqTransformer(
        vocab, vocab, d_model=256, num_heads=4, num_encoder_layers=3, num_decoder_layers=3, dim_feedforward=1024,
        dropout=0.0, max_len=64, check_inputs=False, val_generate_batches=0, max_new_tokens=new,
    )
    src = torch.randint(4, vocab, (2 * batch, length))
    tgt = torch.randint(4, vocab, (2 * batch, length + 1))
    tgt[:, 0], tgt[:, -1] = 1, 2
    loader = DataLoader(TensorDataset(src, tgt), batch_size=batch)

    def validate(callbacks: list[L.Callback]) -> float:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        start = time.perf_counter()
        trainer.validate(model, loader, verbose=False)
        return time.perf_counter() - start

    def decode_alone() -> float:
        start = time.perf_counter()
        with torch.inference_mode():  # as in Lightning's validation loop
            for s, _ in loader:
                model.generate(s)
        return time.perf_counter() - start

    plain, with_callback, decoding = [], [], []
    for _ in range(args.runs):
        plain.append(validate([]))
        with_callback.append(validate([GenerationEvaluation({"bleu": BLEUScore(ignore_index=0)}, num_batches=2,
                                                            ignore_ids=(2,))]))
        decoding.append(decode_alone())
    p, w, d = (statistics.median(values) for values in (plain, with_callback, decoding))
    print(f"\nGenerationEvaluation, 2 validation batches of {batch} ({new} new tokens), median of {args.runs}\n")
    print(f"| {'measure':<44} | {'seconds':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|")
    print(f"| {'validation without the callback':<44} | {p:8.2f} |")
    print(f"| {'validation with GenerationEvaluation':<44} | {w:8.2f} |")
    print(f"| {'decoding the same batches alone':<44} | {d:8.2f} |")
    print(f"| {'overhead beyond decoding (with - without - decoding)':<44} | {w - p - d:8.2f} |")
    print(f"\nOverhead: {(w - p - d) / d * 100:+.1f}% of the decoding time")


if __name__ == "__main__":
    main()
