"""CausalLMTransformer against nanoGPT's recipe on the Python docs corpus, side by side in one process.

Three parts, on the same data (``PythonDocsDataModule``: the byte-level BPE trained on the train
topics), the same size (nanoGPT's MLP is ``4 * d_model`` wide, so ours is too) and the same
optimiser settings (AdamW, nanoGPT's warm-up + cosine schedule, gradient clipping at 1):

- ``step``: milliseconds per training step (forward, backward, clipping, optimiser step) of ours
  under ``lightning.Trainer.fit`` and of nanoGPT's ``GPT`` in its own loop, interleaved round by
  round; ours with rotary positions (the default) and with learned positions (nanoGPT's layout).
- ``sample``: sampling 256 new tokens after a 16-token prompt with and without the KV cache, with
  the static cache and compiled steps (``compile=True``; compiled before timing), and
  nanoGPT's ``generate`` (which has no cache).
- ``walltime``: each trains for the same wall time (10 minutes by default), validating every
  ``--eval-interval`` steps and keeping the best validation checkpoint (nanoGPT's recipe), then
  reports test perplexity over every test token.

    python benchmarks/lm.py [--part all|step|sample|walltime] [--minutes 10] [--quick]

``benchmarks/nanogpt.py`` is the straight copy of nanoGPT's ``GPT`` and training step.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from _timing import fit_step_ms, median_ms
from lightning.pytorch.callbacks import ModelCheckpoint
from nanogpt import GPT, GPTConfig, get_batch, get_lr, train_step
from torch import Tensor, nn
from torch.utils.data import DataLoader

from llmkit import CausalLMTransformer
from llmkit.data import PythonDocsDataModule


def ours(args: argparse.Namespace, vocab_size: int, **kwargs: Any) -> CausalLMTransformer:
    settings: dict[str, Any] = {
        "d_model": args.d_model, "num_heads": args.heads, "num_layers": args.layers,
        "dim_feedforward": 4 * args.d_model, "dropout": args.dropout, "max_len": args.block_size,
        "lr": args.lr, "warmup_steps": args.warmup, "min_lr_ratio": 0.1, "weight_decay": 0.1, "betas": (0.9, 0.99),
    }
    return CausalLMTransformer(vocab_size, **{**settings, **kwargs})


def nanogpt(args: argparse.Namespace, vocab_size: int, block_size: int | None = None) -> GPT:
    config = GPTConfig(
        block_size=block_size or args.block_size, vocab_size=vocab_size, n_layer=args.layers, n_head=args.heads,
        n_embd=args.d_model, dropout=args.dropout, bias=True,
    )
    return GPT(config)


def nanogpt_optimizer(model: GPT, args: argparse.Namespace) -> torch.optim.Optimizer:
    return model.configure_optimizers(0.1, args.lr, (0.9, 0.99), "cpu")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perplexity(logits_of: Any, blocks: Tensor, batch_size: int) -> float:
    """Perplexity over every next token of ``blocks`` ``[N, T + 1]``: exp of the mean cross-entropy (float64 sums)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            block = blocks[start : start + batch_size]
            logits = logits_of(block[:, :-1])
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).double(), block[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += block[:, 1:].numel()
    return math.exp(total / count)


def nanogpt_logits(model: GPT) -> Any:
    def logits_of(x: Tensor) -> Tensor:
        # nanoGPT returns the last position only without targets: give dummy targets for all positions.
        logits, _ = model(x, x.contiguous())
        return logits

    return logits_of


def part_step(args: argparse.Namespace, data: PythonDocsDataModule) -> None:
    blocks = data.blocks("train")
    loader = DataLoader(blocks, batch_size=args.batch_size, shuffle=True, drop_last=True)
    steps = args.steps + args.warmup_timing
    contenders = {
        "llmkit, rotary (default)": lambda: ours(args, data.vocab_size),
        "llmkit, learned positions": lambda: ours(args, data.vocab_size, positional="learned"),
    }
    times: dict[str, list[float]] = {name: [] for name in [*contenders, "nanoGPT recipe"]}
    sizes: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, build in contenders.items():
            torch.manual_seed(0)
            model = build()
            sizes[name] = params(model)
            times[name] += fit_step_ms(
                model, loader, steps, [], warmup=args.warmup_timing, gradient_clip_val=1.0, max_epochs=-1
            )
        torch.manual_seed(0)
        gpt = nanogpt(args, data.vocab_size)
        sizes["nanoGPT recipe"] = params(gpt)
        optimizer = nanogpt_optimizer(gpt, args)
        gpt.train()
        batches = iter(loader)
        for step in range(steps):
            try:
                block = next(batches)
            except StopIteration:
                batches = iter(loader)
                block = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, args.lr, args.warmup, args.steps, args.lr / 10)
            start = time.perf_counter()
            train_step(gpt, optimizer, block[:, :-1], block[:, 1:], 1.0)
            if step >= args.warmup_timing:
                times["nanoGPT recipe"].append(1000 * (time.perf_counter() - start))
    baseline = statistics.median(times["nanoGPT recipe"])
    count = len(times["nanoGPT recipe"])
    print(f"\nTraining step, batch {args.batch_size} x {args.block_size} tokens, median of {count}")
    print(f"{'model':<28}{'params':>10}{'ms/step':>10}{'vs nanoGPT':>12}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<28}{sizes[name]:>10,}{median:>10.1f}{median / baseline:>11.2f}x")


def part_sample(args: argparse.Namespace, data: PythonDocsDataModule) -> None:
    new_tokens, prompt_length = args.new_tokens, 16
    max_len = prompt_length + new_tokens
    prompt = data.split_ids("test")[:prompt_length][None]
    torch.manual_seed(0)
    model = ours(args, data.vocab_size, max_len=max_len).eval()
    torch.manual_seed(0)
    gpt = nanogpt(args, data.vocab_size, block_size=max_len).eval()

    def sample(use_cache: bool, compile: bool = False) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        return model.generate(
            prompt, new_tokens, do_sample=True, use_cache=use_cache, compile=compile, generator=generator
        )

    same = torch.equal(sample(True), sample(False))
    same_compiled = torch.equal(sample(True, compile=True), sample(False))  # also compiles, untimed
    cached = median_ms(lambda: sample(True), runs=args.sample_runs)
    uncached = median_ms(lambda: sample(False), runs=args.sample_runs)
    compiled = median_ms(lambda: sample(True, compile=True), runs=args.sample_runs)
    with torch.no_grad():
        peer = median_ms(lambda: gpt.generate(prompt, new_tokens), runs=args.sample_runs)
    print(f"\nSampling {new_tokens} new tokens after {prompt_length} (batch 1), median of {args.sample_runs}")
    print(f"{'decoder':<32}{'ms':>10}{'tokens/s':>10}{'speed-up':>10}")
    rows = (
        ("llmkit, KV cache", cached), ("llmkit, static cache, compiled", compiled),
        ("llmkit, no cache", uncached), ("nanoGPT generate", peer),
    )
    for name, ms in rows:
        print(f"{name:<32}{ms:>10.1f}{1000 * new_tokens / ms:>10.0f}{uncached / ms:>9.2f}x")
    print(f"same tokens with and without the cache: {same}; compiled: {same_compiled}")


def part_walltime(args: argparse.Namespace, data: PythonDocsDataModule) -> None:
    seconds = 60 * args.minutes
    test_blocks, train_ids = data.blocks("test"), data.split_ids("train")
    # Both schedules decay over the steps nanoGPT's recipe makes in the time (measured on 10 steps).
    torch.manual_seed(0)
    probe = nanogpt(args, data.vocab_size)
    probe_optimizer = nanogpt_optimizer(probe, args)
    generator = torch.Generator().manual_seed(0)
    draw = lambda: get_batch(train_ids, args.block_size, args.batch_size, generator)  # noqa: E731
    for _ in range(3):
        train_step(probe, probe_optimizer, *draw(), 1.0)
    start = time.perf_counter()
    for _ in range(10):
        train_step(probe, probe_optimizer, *draw(), 1.0)
    decay_steps = max(args.warmup + 1, int(seconds / ((time.perf_counter() - start) / 10)))

    rows = []
    torch.manual_seed(0)
    model = ours(args, data.vocab_size, decay_steps=decay_steps)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = ModelCheckpoint(dirpath=directory, monitor="val_loss", mode="min")
        trainer = L.Trainer(
            accelerator="cpu", max_time=timedelta(seconds=seconds), max_steps=-1, max_epochs=-1, logger=False,
            gradient_clip_val=1.0, val_check_interval=args.eval_interval, check_val_every_n_epoch=None,
            callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(model, data)
        elapsed = time.perf_counter() - start
        steps = trainer.global_step
        best = CausalLMTransformer.load_from_checkpoint(checkpoint.best_model_path).eval()
    rows.append(("llmkit CausalLMTransformer", params(model), steps, elapsed, perplexity(best, test_blocks, 64)))

    gpt, step, elapsed = train_nanogpt(args, data, seconds, decay_steps)
    rows.append(("nanoGPT recipe", params(gpt), step, elapsed, perplexity(nanogpt_logits(gpt), test_blocks, 64)))

    print(f"\nEqual wall time: {args.minutes} min of training each, best validation checkpoint, test perplexity")
    print(f"(decay over {decay_steps} steps, validation every {args.eval_interval})")
    print(f"{'model':<28}{'params':>10}{'steps':>8}{'seconds':>9}{'test ppl':>10}")
    for name, size, count, took, ppl in rows:
        print(f"{name:<28}{size:>10,}{count:>8}{took:>9.0f}{ppl:>10.2f}")
    print(f"ratio (llmkit / nanoGPT): {rows[0][4] / rows[1][4]:.3f}")


def train_nanogpt(
    args: argparse.Namespace, data: PythonDocsDataModule, seconds: float, decay_steps: int
) -> tuple[GPT, int, float]:
    """Train with nanoGPT's recipe for ``seconds``: random blocks, its schedule, the best validation checkpoint kept.

    Returns the model (in eval mode, with the best weights), the steps made and the seconds taken.
    """
    torch.manual_seed(0)
    gpt = nanogpt(args, data.vocab_size)
    optimizer = nanogpt_optimizer(gpt, args)
    train_ids, val_blocks = data.split_ids("train"), data.blocks("val")
    generator = torch.Generator().manual_seed(0)
    best_val, best_state, step = math.inf, copy.deepcopy(gpt.state_dict()), 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, args.lr, args.warmup, decay_steps, args.lr / 10)
        gpt.train()
        train_step(gpt, optimizer, *get_batch(train_ids, args.block_size, args.batch_size, generator), 1.0)
        step += 1
        if step % args.eval_interval == 0:
            gpt.eval()
            val = perplexity(nanogpt_logits(gpt), val_blocks, 64)
            if val < best_val:
                best_val, best_state = val, copy.deepcopy(gpt.state_dict())
    elapsed = time.perf_counter() - start
    if best_val < math.inf:
        gpt.load_state_dict(best_state)
    return gpt.eval(), step, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "step", "sample", "walltime"], default="all")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time of each, walltime part")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=250)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round, step part")
    parser.add_argument("--warmup-timing", type=int, default=5, help="untimed first steps, step part")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--sample-runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, seconds")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.steps, args.rounds, args.new_tokens, args.sample_runs = 0.1, 3, 1, 16, 1
        args.d_model, args.layers, args.vocab_size, args.block_size, args.eval_interval = 32, 1, 512, 32, 10
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(torch.get_num_threads())
    data = PythonDocsDataModule(vocab_size=args.vocab_size, block_size=args.block_size, batch_size=args.batch_size)
    data.setup("fit")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tokenizer: BPE {data.vocab_size}")
    if args.part in ("all", "step"):
        part_step(args, data)
    if args.part in ("all", "sample"):
        part_sample(args, data)
    if args.part in ("all", "walltime"):
        part_walltime(args, data)


if __name__ == "__main__":
    main()
