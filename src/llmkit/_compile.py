"""What llmkit does about ``torch.compile`` when it changes a module's hooks or layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

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
