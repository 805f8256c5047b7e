"""Reading logits and targets out of any module's outputs and batches (shared by the callbacks)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

TARGET_KEYS = ("labels", "label", "targets", "target", "tgt", "y")
#: The target value that counts for nothing when no ``ignore_index`` is given (PyTorch's and Hugging Face's).
IGNORE_INDEX = -100


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


def aligned_targets(
    batch: Any, logits: Tensor, target_fn: Callable[[Any], Tensor] | None = None, *, shift_fill: int | None = None
) -> Tensor:
    """The targets of ``logits`` ``[..., V]``, shaped ``[...]`` (one per token).

    From ``target_fn(batch)`` or :func:`find_target`; a ``[B, T + 1]`` target of ``[B, T, V]``
    logits is the teacher-forcing sequence, whose targets are ``tgt[:, 1:]``. With ``shift_fill``
    (a causal language model whose labels are its inputs, as Hugging Face's: the logits at ``t``
    predict the label at ``t + 1``), a ``[B, T]`` target becomes ``labels[:, 1:]`` followed by
    ``shift_fill`` (an ignored value) at the last position.
    """
    tokens = logits.numel() // logits.shape[-1]
    target = target_fn(batch) if target_fn is not None else find_target(batch)
    if shift_fill is not None and target.ndim == 2 and target.numel() == tokens:
        target = torch.cat([target[:, 1:], target.new_full((target.shape[0], 1), shift_fill)], dim=1)
    if target.numel() != tokens and target.ndim == 2 and target[:, 1:].numel() == tokens:
        target = target[:, 1:]  # teacher forcing: the labels are the targets after the first
    if target.numel() != tokens:
        raise ValueError(
            f"the targets {tuple(target.shape)} do not align with the logits {tuple(logits.shape)} "
            "(one target per token); pass `target_fn`"
        )
    return target.reshape(logits.shape[:-1])


def forward_module_name(
    module: nn.Module, name: str | None, *, role: str = "module", exclude: Collection[str] = ()
) -> str:
    """The name of the submodule whose forward computes ``module``'s logits (``""``: ``module`` itself).

    ``name`` if given (checked to exist); else ``""`` when ``module`` defines its own ``forward``;
    else, when ``module`` has exactly one child with parameters (a LightningModule whose
    ``training_step`` calls ``self.model(...)``, as Hugging Face wrappers do), that child's name;
    children named in ``exclude`` (added by a callback for the fit) do not count.

    Raises:
        ValueError: If ``name`` names no submodule, or none is given and the module has no forward
            of its own and not exactly one child with parameters.
    """
    if name:
        named_submodule(module, name, role=role, argument="forward_module")
        return name
    if _defines_forward(module):
        return ""
    children = [
        (n, c) for n, c in module.named_children() if n not in exclude and next(c.parameters(), None) is not None
    ]
    if len(children) == 1:
        return children[0][0]
    found = ", ".join(repr(n) for n, _ in children) or "none"
    raise ValueError(
        f"{type(module).__name__} defines no forward of its own and has {len(children)} submodules with parameters "
        f"({found}); pass `forward_module` naming the one whose forward its training_step calls to get the logits"
    )


def _defines_forward(module: nn.Module) -> bool:
    """Whether ``type(module).forward`` is more than torch's/Lightning's placeholder."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            placeholder = cls is nn.Module or (
                cls.__name__ == "LightningModule" and cls.__module__.startswith(("lightning.", "pytorch_lightning."))
            )
            return not placeholder
    return False


def named_submodule(module: nn.Module, name: str, *, role: str = "module", argument: str = "name") -> nn.Module:
    """``module.get_submodule(name)``, or a ValueError naming ``argument`` and the closest names.

    Raises:
        ValueError: If ``module`` has no submodule ``name``.
    """
    try:
        return module.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"the {role} has no module named {name!r} (`{argument}`){hint}") from None


def is_causal_lm(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face causal language model (its labels are its inputs, shifted inside).

    Read without importing ``transformers``: a ``config`` that is not encoder-decoder, and
    ``can_generate()`` (``GPT2LMHeadModel``, ``*ForCausalLM``; not BERT's classifiers or masked LMs).
    """
    config, can_generate = getattr(module, "config", None), getattr(module, "can_generate", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not callable(can_generate):
        return False
    return bool(can_generate())


def unwrap_loss(output: Any) -> Tensor | None:
    """The loss in what a ``training_step`` returns: the tensor itself, or the ``"loss"`` entry.

    Raises:
        TypeError: If ``output`` is neither a tensor nor a mapping whose ``"loss"`` is one.

    Examples:
        >>> unwrap_loss({"loss": torch.tensor(1.0), "logits": None})
        tensor(1.)
    """
    if output is None:
        return None
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise TypeError(f"the loss must be a tensor or a dict with 'loss', got {type(output).__name__}")
    return loss
