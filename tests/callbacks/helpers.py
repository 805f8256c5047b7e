"""What the callback tests share: a quiet Trainer, a loss recorder, a module snapshot, the toy models and batches."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from llmkit import CausalLMTransformer, Seq2SeqTransformer
from tests.accelerator import accelerator_for


def trainer(**kwargs) -> L.Trainer:
    """A Trainer with no logger, checkpoints, progress bar, summary or validation unless asked.

    On the tests' accelerator (``LLMKIT_TEST_ACCELERATOR``). Several processes (``devices=2``,
    ``num_nodes=2``) stay on CPU: gloo is the CPU backend, and a GPU machine may have one device.
    """
    defaults = dict(
        accelerator=accelerator_for(kwargs.get("devices", 1), kwargs.get("num_nodes", 1)), devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


class RecordLosses(L.Callback):
    """The loss each training step returned (after every callback changed it)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def seq2seq_batch() -> dict[str, Tensor]:
    """Three padded source/target pairs over a 13-word vocabulary (PAD 0, BOS 1, EOS 2)."""
    src = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0], [4, 2, 0, 0]])
    tgt = torch.tensor([[1, 10, 11, 12, 2], [1, 5, 2, 0, 0], [1, 2, 0, 0, 0]])
    return {"src": src, "tgt": tgt}


def translator(d_model: int = 32, vocab: int = 13) -> Seq2SeqTransformer:
    """A one-layer translator for :func:`seq2seq_batch`, without dropout."""
    return Seq2SeqTransformer(
        vocab, vocab, d_model=d_model, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
        dim_feedforward=2 * d_model, dropout=0.0, max_len=16, lr=1e-3, warmup_steps=1,
    )


def snapshot(module: nn.Module) -> dict[str, object]:
    """What a callback could leave behind on a module: attributes, methods, submodules, hooks, state keys."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
             "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
    return {
        "attributes": sorted(vars(module)),
        "methods": {name: vars(module).get(name) for name in ("training_step", "on_load_checkpoint", "log")},
        "modules": [(name, type(m).__name__) for name, m in module.named_modules()],
        "hooks": {name: [len(getattr(m, h, {})) for h in hooks] for name, m in module.named_modules()},
        "state": sorted(module.state_dict()),
    }


LM_VOCAB = 64


def language_model(d_model: int = 32, *, positional: str = "rope") -> CausalLMTransformer:
    """A two-layer, four-head causal LM over :data:`LM_VOCAB` tokens (``d_model=64``: a wider teacher), no dropout.

    Widths are multiples of 32, so QAT's default int4 groups of 32 apply to every projection. The
    schedule's length is fixed (``decay_steps``), not the Trainer's: fits of different lengths
    and a plain loop over the module's own ``configure_optimizers`` share their learning rates.
    """
    return CausalLMTransformer(
        LM_VOCAB, d_model=d_model, num_heads=4, num_layers=2, dim_feedforward=2 * d_model, dropout=0.0,
        positional=positional, max_len=32, lr=3e-3, warmup_steps=1, decay_steps=16,
    )


def lm_batch(seed: int = 0, batch_size: int = 4, length: int = 17) -> Tensor:
    """Token ids ``[B, T]``: rows counting up from a random start by a random stride (1-3), modulo the vocabulary.

    A pattern the model can learn (the next token follows from the last two), with 16 positions to predict.
    """
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, LM_VOCAB, (batch_size, 1), generator=generator)
    stride = torch.randint(1, 4, (batch_size, 1), generator=generator)
    return (start + stride * torch.arange(length)) % LM_VOCAB
