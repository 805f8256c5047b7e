"""Reading logits and targets out of any module's outputs and batches (shared by the callbacks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

TARGET_KEYS = ("labels", "label", "targets", "target", "tgt", "y")


def default_logits(output: Any) -> Tensor:
    """The logits in a forward's output.

    The output itself if it is a tensor, else the first item of a tuple/list, the ``"logits"``
    entry of a mapping, or a ``.logits`` attribute (Hugging Face style).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    raise TypeError(
        f"cannot find logits in a forward output of type {type(output).__name__}; pass `logits_fn` to pick them"
    )


def find_target(batch: Any) -> Tensor:
    """The batch's ``labels``/``target``/``tgt``/``y`` entry, or the last item of a tuple/list batch."""
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        raise ValueError(
            f"cannot find the targets in a batch with keys {sorted(batch)} (looked for {TARGET_KEYS}); "
            "pass `target_fn`"
        )
    if isinstance(batch, tuple | list) and batch and isinstance(batch[-1], Tensor):
        return batch[-1]
    raise ValueError(f"cannot find the targets in a batch of type {type(batch).__name__}; pass `target_fn`")


def aligned_targets(batch: Any, logits: Tensor, target_fn: Callable[[Any], Tensor] | None = None) -> Tensor:
    """The targets of ``logits`` ``[..., V]``, shaped ``[...]`` (one per token).

    From ``target_fn(batch)`` or :func:`find_target`; a ``[B, T + 1]`` target of ``[B, T, V]``
    logits is the teacher-forcing sequence, whose targets are ``tgt[:, 1:]``.
    """
    tokens = logits.numel() // logits.shape[-1]
    target = target_fn(batch) if target_fn is not None else find_target(batch)
    if target.numel() != tokens and target.ndim == 2 and target[:, 1:].numel() == tokens:
        target = target[:, 1:]  # teacher forcing: the labels are the targets after the first
    if target.numel() != tokens:
        raise ValueError(
            f"the targets {tuple(target.shape)} do not align with the logits {tuple(logits.shape)} "
            "(one target per token); pass `target_fn`"
        )
    return target.reshape(logits.shape[:-1])
