"""The common base of the model-based metrics: holding a local model and running it in chunks."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from llmkit.metrics._state import Float64Sums
from llmkit.metrics.model_based._loading import (
    Head,
    LocalModel,
    ModelSource,
    Tokenizer,
    check_model_arg,
    checkpoint_dir,
    load_checkpoint,
    read_config,
    resolve_module,
)


def positive_int(value: object, name: str) -> int:
    """``value``, checked to be a positive int.

    Raises:
        TypeError: If it is not an int.
        ValueError: If it is not positive.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be at least 1, got {value}")
    return value


def unit_interval(value: object, name: str) -> float:
    """``value``, checked to be a number in [0, 1].

    Raises:
        TypeError: If it is not a number.
        ValueError: If it is outside [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return float(value)


def text_batch(texts: object, name: str) -> list[str]:
    """``texts`` as a list of strings.

    Raises:
        TypeError: If it is a single string or not a sequence of strings.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"`{name}` must be a sequence of strings, got {type(texts).__name__}")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"`{name}` must be a sequence of strings, got an item of type {type(text).__name__}")
    return list(texts)


def same_length(first: Sequence[Any], second: Sequence[Any], names: str) -> None:
    """Raise unless the two batches have the same length.

    Raises:
        ValueError: If they differ.
    """
    if len(first) != len(second):
        raise ValueError(f"{names} must have the same length, got {len(first)} and {len(second)}")


def prepare_source(model: ModelSource, tokenizer: Tokenizer | None) -> tuple[Any, Path | None]:
    """The config to check labels against before any weights load, and the checked directory.

    Raises:
        TypeError: If ``model`` is neither a module nor a path.
        ValueError: If a path is not a checkpoint directory.
    """
    check_model_arg(model)
    if isinstance(model, nn.Module):
        resolve_module(model, tokenizer)  # checks the tokenizer now, at construction
        return getattr(model, "config", None), None
    directory = checkpoint_dir(model)
    return read_config(directory), directory


def load_source(
    model: ModelSource, tokenizer: Tokenizer | None, config: Any, directory: Path | None, head: Head
) -> LocalModel:
    """The ``LocalModel`` of a module, or of the directory ``prepare_source`` checked (weights load here)."""
    if directory is None:
        return resolve_module(cast(nn.Module, model), tokenizer)
    return load_checkpoint(directory, config, head, tokenizer)


class ModelMetric(Float64Sums):
    """A metric that scores text with a local model, batched, on its own device.

    The model is held as a plain attribute (not a submodule), so it is not in the metric's
    ``state_dict`` and ``Module.to``/``.cuda()`` do not move it: each ``update`` moves it to the
    metric's device when it is elsewhere (its dtype is left as given). ``update`` tokenizes and
    runs the model ``batch_size`` texts at a time, in eval mode (restored after) and under
    ``torch.inference_mode()``; the texts of an update are batched by length (as bert-score
    does), which saves padding and changes results only by float rounding.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, local: LocalModel, *, batch_size: int, max_length: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.max_length = None if max_length is None else positive_int(max_length, "max_length")
        self._local = local

    @property
    def model(self) -> nn.Module:
        """The scoring model (not a submodule of the metric)."""
        return self._local.module

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer callable."""
        return self._local.tokenizer

    def _chunks(self, num: int) -> Iterator[slice]:
        for start in range(0, num, self.batch_size):
            yield slice(start, min(start + self.batch_size, num))

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Item indices in batches of ``batch_size``, by increasing length: less padding in each batch."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def _in_order(self, parts: list[Tensor], batches: list[list[int]]) -> Tensor:
        """The per-item values of ``batches`` (computed under inference mode) back in item order."""
        if not parts:
            return torch.zeros(0, device=self.device)
        values = torch.cat(parts).clone()  # out of inference mode: an ordinary tensor, fit for states
        order = torch.tensor([index for batch in batches for index in batch], device=values.device)
        out = torch.empty_like(values)
        out[order] = values
        return out

    def _tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None, **extra: Any) -> dict[str, Tensor]:
        """``tokenizer(texts[, text_pair=pairs], padding=True, truncation=True, ...)`` on the metric's device."""
        kwargs: dict[str, Any] = {
            "padding": True,
            "truncation": True,
            "max_length": self.max_length,
            "return_tensors": "pt",
            **extra,
        }
        if pairs is not None:
            kwargs["text_pair"] = list(pairs)
        encoded = self._local.tokenizer(list(texts), **kwargs)
        return {key: value.to(self.device) for key, value in encoded.items() if isinstance(value, Tensor)}

    @contextmanager
    def _running(self) -> Iterator[nn.Module]:
        """The model on the metric's device, in eval mode, under ``torch.inference_mode()``."""
        module = self._local.module
        first = next(itertools.chain(module.parameters(), module.buffers()), None)
        if first is not None and first.device != self.device:
            module.to(self.device)
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode():
                yield module
        finally:
            module.train(was_training)
