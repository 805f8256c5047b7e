"""QuantizationAwareTraining: torchao's QAT (prepare -> fake-quantized training -> convert) as a Callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

_INT4: torch.dtype = getattr(torch, "int4")  # noqa: B009 (missing from torch's type stubs)
_SCHEMES: dict[str, tuple[str | None, torch.dtype]] = {
    # name: (activations, weight dtype)
    "8da4w": ("int8-dynamic", _INT4),
    "8da8w": ("int8-dynamic", torch.int8),
    "4w": (None, _INT4),
    "8w": (None, torch.int8),
}
SCHEMES = tuple(_SCHEMES)


def _base_config(scheme: str, group_size: int | None) -> Any:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    activation, weight_dtype = _SCHEMES[scheme]
    granularity = PerGroup(group_size) if group_size is not None else PerAxis(0)
    if activation is None:
        return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity)


def _fake_quantized_linears(module: nn.Module) -> list[nn.Module]:
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return [m for m in module.modules() if isinstance(m, FakeQuantizedLinear | FakeQuantizedEmbedding)]


def _embedding_config(weight_dtype: torch.dtype, group_size: int | None) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    granularity = PerGroup(group_size) if group_size is not None else PerAxis(0)
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity)


def quantized_weight_bytes(module: nn.Module) -> tuple[int, int]:
    """``(bytes, fp32_bytes)`` of the weights of ``module``'s linear layers.

    The first counts them as stored now (a quantized tensor from its own parts: int values,
    scales, zero points), the second as float32.
    """
    stored = fp32 = 0
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if not isinstance(layer, nn.Linear) or weight is None:
            continue
        fp32 += weight.numel() * 4
        flatten = getattr(weight, "__tensor_flatten__", None)
        if flatten is not None:
            names, _ = flatten()
            stored += sum(getattr(weight, name).numel() * getattr(weight, name).element_size() for name in names)
        else:
            stored += weight.numel() * weight.element_size()
    return stored, fp32


class QuantizationAwareTraining(L.Callback):
    """Fine-tune any LightningModule with fake quantization (torchao QAT), then convert it.

    At ``setup`` (before the strategy wraps the model, so DDP/FSDP see the prepared model and a
    resumed checkpoint loads into it) every selected ``nn.Linear`` is prepared with
    ``quantize_(module, QATConfig(base, step="prepare"))``: its forward fake-quantizes weights
    (and, for the ``8da*`` schemes, activations) while gradients flow as usual. Fake quantization
    stays off until ``start_step`` optimizer steps have run. At the end of ``fit`` (or with
    :meth:`convert`) the layers are converted to real quantized weights: the model is smaller,
    still runs ``forward``, and ``Trainer.validate/test/predict`` run on it.

    Args:
        scheme: ``"8da4w"`` (int8 dynamic activations, int4 grouped weights: the default),
            ``"8da8w"``, ``"4w"`` or ``"8w"`` (weight-only), or any torchao base config (passed
            to ``QATConfig`` as is).
        group_size: weights share one scale per ``group_size`` input features (``None``: one
            per output channel). A layer whose input width it does not divide is skipped.
        start_step: optimizer steps of plain training before fake quantization starts (as
            torchtune's ``fake_quant_after_n_steps``).
        convert_on_fit_end: convert when ``fit`` ends.
        quantize_embeddings: also quantize the weights of ``nn.Embedding`` layers (weight-only,
            with the scheme's weight dtype and group size), when the scheme is named.
        filter_fn: ``(module, name) -> bool``: which linear layers to quantize (default: every
            ``nn.Linear`` the scheme supports; those skipped are listed once in a warning).

    Raises:
        ValueError: If ``scheme`` is unknown (the valid names are listed), ``group_size < 1``,
            ``start_step < 0``; at setup, if no layer is left to quantize.

    Example:
        >>> import lightning.pytorch as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> qat = QuantizationAwareTraining(scheme="8da8w", group_size=None)
        >>> trainer = L.Trainer(max_steps=2, callbacks=[qat], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> model = BoringModel()
        >>> trainer.fit(model)
        >>> type(model.layer.weight).__name__
        'IntxUnpackedToInt8Tensor'
    """

    def __init__(
        self,
        scheme: str | Any = "8da4w",
        group_size: int | None = 32,
        start_step: int = 0,
        convert_on_fit_end: bool = True,
        quantize_embeddings: bool = False,
        filter_fn: Callable[[nn.Module, str], bool] | None = None,
    ) -> None:
        if isinstance(scheme, str) and scheme not in _SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"`group_size` must be at least 1 (or None: per channel), got {group_size}")
        if start_step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {start_step}")
        self.scheme, self.group_size, self.start_step = scheme, group_size, int(start_step)
        self.convert_on_fit_end, self.filter_fn = convert_on_fit_end, filter_fn
        if quantize_embeddings and not isinstance(scheme, str):
            raise ValueError("`quantize_embeddings=True` needs a scheme given by name, to pick the embeddings' dtype")
        self.base_config = _base_config(scheme, group_size) if isinstance(scheme, str) else scheme
        self.embedding_config = (
            _embedding_config(_SCHEMES[scheme][1], group_size) if quantize_embeddings and isinstance(scheme, str)
            else None
        )
        self.embedding_names: list[str] = []
        self.prepared_names: list[str] = []
        self.converted = False
        self._fake_quant_enabled: bool | None = None

    # -----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.converted and not _fake_quantized_linears(pl_module):
            self.prepare(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set_fake_quant(pl_module, trainer.global_step >= self.start_step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.convert_on_fit_end:
            self.convert(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "prepared_names": list(self.prepared_names), "converted": self.converted}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("prepared_names")
        if saved is not None and self.prepared_names and saved != self.prepared_names:
            rank_zero_warn("QuantizationAwareTraining resumes with other layers prepared than the checkpoint's")

    # -----------------------------------------------------------------------------------------
    # Prepare and convert

    def _selected(self, module: nn.Module) -> tuple[list[str], list[str]]:
        chosen, skipped = [], []
        # nn.MultiheadAttention hands its projections' weights to a functional kernel that never
        # calls Linear.forward: fake quantization would not apply, conversion would break it.
        attention = [name for name, layer in module.named_modules() if isinstance(layer, nn.MultiheadAttention)]
        for name, layer in module.named_modules():
            if not isinstance(layer, nn.Linear):
                continue
            if self.filter_fn is not None and not self.filter_fn(layer, name):
                continue
            if any(name.startswith(f"{parent}.") for parent in attention):
                skipped.append(f"{name} (inside nn.MultiheadAttention)")
            elif self.group_size is not None and layer.in_features % self.group_size:
                skipped.append(f"{name} (in_features {layer.in_features})")
            else:
                chosen.append(name)
        return chosen, skipped

    def prepare(self, module: nn.Module) -> None:
        """Swap the selected linear layers for fake-quantized ones, in place (same weights)."""
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        chosen, skipped = self._selected(module)
        if not chosen:
            raise ValueError(
                f"nothing to quantize in {type(module).__name__}: no nn.Linear layer is selected"
                + (f"; group_size={self.group_size} divides the input width of none of {skipped}" if skipped else "")
            )
        if skipped:
            rank_zero_warn(
                f"QuantizationAwareTraining leaves {len(skipped)} linear layer(s) in float (group_size="
                f"{self.group_size} does not divide their input width, or nn.MultiheadAttention uses "
                f"their weights directly): {', '.join(skipped)}"
            )
        names = set(chosen)
        quantize_(module, QATConfig(self.base_config, step="prepare"), filter_fn=lambda _, name: name in names)
        self.prepared_names = chosen
        if self.embedding_config is not None:
            group = self.group_size
            embeddings = {
                name for name, layer in module.named_modules()
                if isinstance(layer, nn.Embedding) and (group is None or layer.embedding_dim % group == 0)
                and (self.filter_fn is None or self.filter_fn(layer, name))
            }
            quantize_(module, QATConfig(self.embedding_config, step="prepare"),
                      filter_fn=lambda layer, name: name in embeddings)
            self.embedding_names = sorted(embeddings)
        self._fake_quant_enabled = None

    def convert(self, module: nn.Module) -> nn.Module:
        """Replace the fake-quantized layers with quantized weights, in place; returns ``module``."""
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig
        from torchao.quantization.qat.linear import FakeQuantizedLinear

        if self.converted and not _fake_quantized_linears(module):
            return module
        if not _fake_quantized_linears(module):
            # A module that trained elsewhere (another process, a checkpoint): prepare it first.
            self.prepare(module)
        self._fake_quant_enabled = None
        self._set_fake_quant(module, True)
        quantize_(
            module, QATConfig(self.base_config, step="convert"),
            filter_fn=lambda layer, _: isinstance(layer, FakeQuantizedLinear),
        )
        if self.embedding_config is not None:
            from torchao.quantization.qat.embedding import FakeQuantizedEmbedding

            quantize_(
                module, QATConfig(self.embedding_config, step="convert"),
                filter_fn=lambda layer, _: isinstance(layer, FakeQuantizedEmbedding),
            )
        self.converted = True
        if isinstance(module, L.LightningModule) and "on_load_checkpoint" not in vars(module):
            # Checkpoints saved while training hold float weights; Trainer.validate/test/predict
            # (ckpt_path=...) load them into the converted module through this hook.
            original = module.on_load_checkpoint

            def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
                original(checkpoint)
                self.quantize_float_weights(module, checkpoint.get("state_dict", {}))

            module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        return module

    def quantize_float_weights(self, module: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Quantize, in ``state_dict``, the float weights of the layers that are quantized in ``module``.

        So that a checkpoint saved during (fake-quantized) training loads into the converted
        module; each weight is quantized as conversion does. Returns ``state_dict``.
        """
        from torchao.quantization import quantize_

        for name, layer in module.named_modules():
            weight = getattr(layer, "weight", None)
            key = f"{name}.weight" if name else "weight"
            incoming = state_dict.get(key)
            if (
                not isinstance(layer, nn.Linear)
                or not hasattr(weight, "__tensor_flatten__")
                or not isinstance(incoming, torch.Tensor)
                or hasattr(incoming, "__tensor_flatten__")
            ):
                continue
            scratch = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=incoming.dtype)
            scratch.weight = nn.Parameter(incoming.detach().clone(), requires_grad=False)
            quantize_(scratch, self.base_config)
            state_dict[key] = scratch.weight
        return state_dict

    def _set_fake_quant(self, module: nn.Module, enabled: bool) -> None:
        if enabled == self._fake_quant_enabled:
            return
        for layer in _fake_quantized_linears(module):
            for name in ("activation_fake_quantizer", "weight_fake_quantizer"):
                quantizer = getattr(layer, name, None)
                if quantizer is not None:
                    quantizer.enabled = enabled
        self._fake_quant_enabled = enabled
