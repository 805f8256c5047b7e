"""What llmkit does about ``torch.compile`` when it changes a module's hooks or layers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
import torch._functorch.config
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_F = TypeVar("_F", bound=Callable[..., Any])


def forget_compiled_graphs() -> None:
    """Drop every graph ``torch.compile`` has made in this process, so the next call traces afresh.

    Dynamo does not guard compiled graphs on forward hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``
    is True by default), and with inlined modules a graph traced for one instance of a class serves
    every other: a graph traced before a hook was added (on this module or another instance) would
    keep running without it, and one traced with a hook would keep calling it after its removal. The
    callbacks and attacks that add or remove hooks or swap layers call this at those moments (a fit's
    start and end, an attack's); a compiled model then recompiles once, with what it now holds. Costs
    nothing when nothing was compiled.
    """
    torch._dynamo.reset()


def eager(fn: _F) -> _F:
    """``torch.compiler.disable``, typed: ``fn`` runs eagerly, a graph break, even inside a compiled caller.

    For what a graph cannot hold: Lightning's ``self.log``, metric updates, generation, hooks that
    create leaf tensors.
    """
    return cast(_F, torch.compiler.disable(fn))  # type: ignore[no-untyped-call]


def several_backwards() -> contextlib.AbstractContextManager[Any]:
    """A context in which graphs compiled by inductor allow several backward passes over one forward.

    A composed step may take gradients of one pass twice (adversarial training's clean loss, then
    distillation's term on the same pass, ``retain_graph=True``). Inductor donates the saved
    activations' buffers to the backward by default, which then refuses ``retain_graph``; graphs
    compiled inside this context keep them (``torch._functorch.config.donated_buffer``: memory, not
    results).
    """
    return torch._functorch.config.patch(donated_buffer=False)


def compiles(module: nn.Module, requested: bool) -> bool:
    """Whether ``module``'s compiled passes should run: ``requested``, and no weight is a tensor subclass.

    Quantized weights (torchao's, after ``QuantizationAwareTraining`` converts a model) are tensor
    subclasses; once a compiled graph has run on them, torch can no longer move the module
    (``module.cpu()``, which Lightning calls when a run ends, fails to swap them). A converted
    model therefore runs eagerly.
    """
    return requested and not any(is_traceable_wrapper_subclass(p) for p in module.parameters())
