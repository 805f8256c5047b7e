"""Gradients through quantized linear layers: a straight-through estimate for the attack's passes.

A torchao-converted linear layer (``Int8DynamicActivationIntxWeightConfig``: int8 dynamic
activations, int4/int8 weights) gives its input no gradient: the activation quantizer rounds.
An attack needs one, so while :func:`straight_through_quantized` is active each such layer
returns ``out + (surrogate - surrogate.detach())`` with ``surrogate = F.linear(x,
weight.dequantize(), bias)``: the value is the quantized layer's, exactly; the gradient that of
the float layer with the dequantized weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


def is_quantized_weight(weight: Any) -> bool:
    """Whether ``weight`` is a tensor subclass that dequantizes (a torchao quantized tensor).

    Examples:
        >>> import torch
        >>> is_quantized_weight(torch.zeros(2, 2))
        False
    """
    return isinstance(weight, Tensor) and hasattr(weight, "__tensor_flatten__") and callable(
        getattr(weight, "dequantize", None)
    )


def quantized_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` whose weight is a quantized tensor subclass."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and is_quantized_weight(m.weight)]


def _straight_through(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor) or not x.requires_grad or not isinstance(output, Tensor):
        return None  # no gradient wanted (a no_grad pass): the quantized value as it is
    weight = module.weight.dequantize().to(x.dtype)  # type: ignore[operator]
    bias = module.bias.to(x.dtype) if isinstance(module.bias, Tensor) else None
    surrogate = F.linear(x, weight, bias).to(output.dtype)
    return output.detach() + (surrogate - surrogate.detach())  # value: exactly `output`


@contextlib.contextmanager
def straight_through_quantized(model: nn.Module) -> Iterator[list[nn.Linear]]:
    """Within the block, ``model``'s quantized linear layers pass gradients to their inputs.

    Yields the layers concerned (none for a float model: the block then changes nothing).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> with straight_through_quantized(model) as layers:
        ...     layers
        []
    """
    layers = quantized_linears(model)
    handles = [layer.register_forward_hook(_straight_through, with_kwargs=True) for layer in layers]
    try:
        yield layers
    finally:
        for handle in handles:
            handle.remove()
