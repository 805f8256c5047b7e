"""State helpers shared by llmkit's metrics."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor
from torchmetrics import Metric


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has not: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


class Float64Sums(Metric):
    """Keep the states named in ``float64_states`` float64 and only follow the device.

    torchmetrics guards its states against ``.half()``/``.float()``/``.double()`` but not
    against ``Module.to(dtype)``, which Lightning's ``precision="16-true"``/``"bf16-true"`` call
    on the whole LightningModule: a float16 running sum overflows to inf within a few
    thousand tokens, and a bfloat16 one keeps three significant digits.
    """

    float64_states: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> Metric:
        this = cast(Metric, super()._apply(fn, exclude_state=(*exclude_state, *self.float64_states)))
        device = fn(torch.zeros(1, device=self.device)).device
        dtype = sum_dtype(device)
        for name in self.float64_states:
            default = this._defaults[name]
            assert isinstance(default, Tensor)  # the states named here are tensors
            this._defaults[name] = default.to(device=device, dtype=dtype)
            setattr(this, name, getattr(this, name).to(device=device, dtype=dtype))
        return this


def add_update_config_state(metric: Metric, **config: object) -> None:
    """Give ``metric`` a constant state that tells apart what its ``update`` would count differently.

    torchmetrics' ``MetricCollection`` merges metrics into one compute group when their states
    are equal after the first update, and from then on updates only one of them. Two metrics
    whose updates differ (another tokenizer, lowercase, ignore_index, ...) must never merge,
    even when a first batch happens to count the same; two that differ only in how they
    compute (a smoothing method) may, and share the work.
    """
    fingerprint = zlib.crc32(repr(sorted(config.items())).encode())
    metric.add_state("update_config", default=torch.tensor(fingerprint), dist_reduce_fx="max")
