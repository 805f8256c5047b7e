"""QuantizationAwareTraining: torchao's QAT (prepare -> fake-quantized training -> convert) as a Callback.

How the converted model travels (every mechanism is one of torch's public module hooks, so the
user's module keeps its own methods and pickles with ``torch.save(model)``):

- each converted layer has a ``load_state_dict`` pre-hook (:class:`_QuantizeOnLoad`) that quantizes
  float weights as conversion does: checkpoints saved during training load into the converted model;
- each converted layer has a ``state_dict`` post-hook (:class:`_SaveQuantized`) that writes its quantized
  weights as tensors that unpickle through :func:`_restore_quantized` (registered with
  ``torch.serialization.add_safe_globals``) instead of ``torch._utils._rebuild_wrapper_subclass``,
  which refuses the callable ``map_location`` that Lightning's loaders pass, and that marks the layer
  ``assign_to_params_buffers`` in the state dict's metadata: a fresh float model loading it takes the
  quantized weights as they are (``Model.load_from_checkpoint``, the main process after
  ``strategy="ddp_spawn"``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.compile import to_uncompiled
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from llmkit._compile import forget_compiled_graphs
from llmkit.adversarial.quantized import is_quantized_weight
from llmkit.callbacks._composition import ComposingCallback, Composition

_INT4: torch.dtype = getattr(torch, "int4")  # noqa: B009 (missing from torch's type stubs)
_SCHEMES: dict[str, tuple[str | None, torch.dtype]] = {
    # name: (activations, weight dtype)
    "8da4w": ("int8-dynamic", _INT4),
    "8da8w": ("int8-dynamic", torch.int8),
    "4w": (None, _INT4),
    "8w": (None, torch.int8),
}
SCHEMES = tuple(_SCHEMES)


def _granularity(group_size: int | None) -> Any:
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerGroup(group_size) if group_size is not None else PerAxis(0)


def _base_config(scheme: str, group_size: int | None) -> Any:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    activation, weight_dtype = _SCHEMES[scheme]
    if activation is None:
        return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=_granularity(group_size))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=_granularity(group_size))


def _embedding_config(weight_dtype: torch.dtype, group_size: int | None) -> Any:
    from torchao.quantization import IntxWeightOnlyConfig

    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=_granularity(group_size))


def _config_group_size(config: Any) -> int | None:
    """The weights' group size a torchao config asks for (``None``: per channel, per tensor or unknown)."""
    granularity = getattr(config, "weight_granularity", None) or getattr(config, "granularity", None)
    group_size = getattr(granularity, "group_size", None)
    return group_size if isinstance(group_size, int) else None


def _fake_quantized_linears(module: nn.Module) -> list[nn.Module]:
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return [m for m in module.modules() if isinstance(m, FakeQuantizedLinear | FakeQuantizedEmbedding)]


def _converted_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, layer) for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear | nn.Embedding) and is_quantized_weight(layer.weight)
    ]


def _quantize_weight(layer: nn.Module, weight: Tensor, config: Any) -> Tensor:
    """``weight`` (float, shaped as ``layer.weight``) quantized with ``config`` as QAT's convert step does."""
    from torchao.quantization import quantize_

    scratch: nn.Module
    if isinstance(layer, nn.Embedding):
        scratch = nn.Embedding(layer.num_embeddings, layer.embedding_dim, dtype=weight.dtype, device=weight.device)
    else:
        scratch = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    scratch.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    quantize_(scratch, config, filter_fn=lambda *_: True)
    return scratch.weight


# ---------------------------------------------------------------------------------------------
# Serialization of converted layers


def _restore_quantized(
    cls: type, tensors: dict[str, Tensor], attributes: Any, size: tuple[int, ...], stride: tuple[int, ...]
) -> Tensor:
    """Rebuild a torchao tensor from its plain inner tensors (what :class:`_PortableQuantized` pickles to)."""
    from torchao.utils import TorchAOBaseTensor

    if not (isinstance(cls, type) and issubclass(cls, TorchAOBaseTensor)):
        raise TypeError(f"expected a torchao tensor class, got {cls!r}")
    restored: Tensor = cls.__tensor_unflatten__(tensors, attributes, size, stride)  # type: ignore[attr-defined]
    return restored


# Checkpoints of converted models name it; loading them with `weights_only=True` (the default) needs it allowed.
torch.serialization.add_safe_globals([_restore_quantized])


class _PortableQuantized:
    """Mixin for a torchao tensor that pickles as ``_restore_quantized(class, inner tensors, ...)``.

    torch pickles wrapper subclasses through ``_rebuild_wrapper_subclass``, which refuses a callable
    ``map_location`` (Lightning's loaders always pass one); the inner tensors are plain and load anywhere.
    """

    _base: type

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        names, attributes = self.__tensor_flatten__()  # type: ignore[attr-defined]
        tensors = {name: getattr(self, name) for name in names}
        return _restore_quantized, (self._base, tensors, attributes, tuple(self.size()), self.stride())  # type: ignore[attr-defined]


_PORTABLE_CLASSES: dict[type, type] = {}


def _portable(tensor: Tensor) -> Tensor:
    """The same quantized tensor (sharing its inner tensors), as a :class:`_PortableQuantized`."""
    base = type(tensor)
    portable = _PORTABLE_CLASSES.get(base)
    if portable is None:
        portable = type(f"Portable{base.__name__}", (_PortableQuantized, base), {"_base": base})
        _PORTABLE_CLASSES[base] = portable
    names, attributes = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    tensors = {name: getattr(tensor, name) for name in names}
    restored: Tensor = portable.__tensor_unflatten__(tensors, attributes, tensor.size(), tensor.stride())  # type: ignore[attr-defined]
    return restored


def _plain_quantized(tensor: Tensor) -> Tensor:
    """A :class:`_PortableQuantized` back as torchao's own class (torchao's ``copy_`` wants equal types)."""
    if not isinstance(tensor, _PortableQuantized):
        return tensor
    names, attributes = tensor.__tensor_flatten__()
    return _restore_quantized(tensor._base, {name: getattr(tensor, name) for name in names}, attributes,
                              tuple(tensor.size()), tensor.stride())


class _SaveQuantized:
    """``state_dict`` post-hook of a converted layer: portable quantized weights, loaded by assignment."""

    def __call__(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
    ) -> None:
        for name, param in module.named_parameters(recurse=False):
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or not is_quantized_weight(value):
                continue
            if value is not param and not isinstance(value, _PortableQuantized):  # keep_vars=True keeps the Parameter
                state_dict[prefix + name] = _portable(value)
            # A float layer (a fresh model: `load_from_checkpoint`, the main process after ddp_spawn)
            # cannot copy a quantized tensor into its float Parameter; it takes it as it is.
            local_metadata["assign_to_params_buffers"] = True


class _QuantizeOnLoad:
    """``load_state_dict`` pre-hook of a converted layer: float weights are quantized with ``config`` first.

    Args:
        config: the torchao base config the layer was converted with.
    """

    def __init__(self, config: Any) -> None:
        self.config = config

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "weight"
        value = state_dict.get(key)
        if not isinstance(value, Tensor):
            return
        if is_quantized_weight(value):
            state_dict[key] = _plain_quantized(value)
        elif value.shape == module.weight.shape:  # a wrong shape is left to load_state_dict's own message
            state_dict[key] = _quantize_weight(module, value, self.config)


def _has_load_hooks(layer: nn.Module) -> bool:
    return any(isinstance(hook, _SaveQuantized) for hook in layer._state_dict_hooks.values())


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


class QuantizationAwareTraining(ComposingCallback):
    """Fine-tune any LightningModule with fake quantization (torchao QAT), then convert it.

    At ``setup`` (before the strategy wraps the model, so DDP/FSDP see the prepared model and a
    resumed checkpoint loads into it) every selected ``nn.Linear`` is prepared with
    ``quantize_(module, QATConfig(base, step="prepare"))``: its forward fake-quantizes weights
    (and, for the ``8da*`` schemes, activations) while gradients flow as usual. Fake quantization
    stays off until ``start_step`` optimizer steps have run. At the end of ``fit`` (or with
    :meth:`convert`) the layers are converted to real quantized weights: the model is smaller,
    still runs ``forward``, and ``Trainer.validate/test/predict`` run on it.

    The converted model loads and saves through torch's public module hooks (nothing of the
    user's module is replaced, and ``torch.save(model)`` pickles it):

    - ``Trainer.validate/test/predict(ckpt_path=...)`` of a checkpoint saved during training
      (float weights) quantizes them as conversion does, embeddings included;
    - its ``state_dict`` holds the quantized weights in a form that loads through Lightning's
      loaders and with ``torch.load(..., weights_only=True)`` (in a process that imported
      ``llmkit.callbacks``), and that a fresh float model takes as it is: ``Model.load_from_checkpoint``
      of a checkpoint written after conversion is the converted model, with its outputs;
    - with ``strategy="ddp_spawn"`` the main process's model comes back converted.

    A converted model cannot be fine-tuned again: ``fit`` with this callback stops at ``setup``.

    Args:
        scheme: ``"8da4w"`` (int8 dynamic activations, int4 grouped weights: the default),
            ``"8da8w"``, ``"4w"`` or ``"8w"`` (weight-only), or any torchao base config (passed
            to ``QATConfig`` as is).
        group_size: with a named scheme, weights share one scale per ``group_size`` input features
            (``None``: one per output channel). A torchao config carries its own granularity and
            this argument is not used. A layer whose input width the group size does not divide is
            skipped; per-channel and per-tensor configs select every ``nn.Linear``.
        start_step: optimizer steps of plain training before fake quantization starts (as
            torchtune's ``fake_quant_after_n_steps``).
        convert_on_fit_end: convert when ``fit`` ends.
        quantize_embeddings: also quantize the weights of ``nn.Embedding`` layers (weight-only,
            with the scheme's weight dtype and group size), when the scheme is named.
        filter_fn: ``(module, name) -> bool``: which linear layers to quantize (default: every
            ``nn.Linear`` the scheme supports; those skipped are listed once in a warning).

    Raises:
        TypeError: If ``group_size`` is not an int or None.
        ValueError: If ``scheme`` is unknown (the valid names are listed), ``group_size < 1``,
            ``start_step < 0``; at setup, if no layer is left to quantize or the model is already
            converted.

    Examples:
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
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise TypeError(
                f"`group_size` must be a positive int or None (one scale per output channel), "
                f"got {group_size!r} of type {type(group_size).__name__}"
            )
        if group_size is not None and group_size < 1:
            raise ValueError(f"`group_size` must be at least 1 (or None: per channel), got {group_size}")
        if start_step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {start_step}")
        if quantize_embeddings and not isinstance(scheme, str):
            raise ValueError("`quantize_embeddings=True` needs a scheme given by name, to pick the embeddings' dtype")
        self.scheme, self.group_size, self.start_step = scheme, group_size, int(start_step)
        self.convert_on_fit_end, self.filter_fn = convert_on_fit_end, filter_fn
        self.base_config = _base_config(scheme, group_size) if isinstance(scheme, str) else scheme
        self.embedding_config = (
            _embedding_config(_SCHEMES[scheme][1], group_size) if quantize_embeddings and isinstance(scheme, str)
            else None
        )
        self.embedding_names: list[str] = []
        self.prepared_names: list[str] = []
        self.converted = False
        self._fake_quant_enabled: bool | None = None

    @property
    def _weight_group_size(self) -> int | None:
        # One source of truth: the config's granularity (a named scheme's config is built from `group_size`).
        return _config_group_size(self.base_config)

    # -----------------------------------------------------------------------------------------
    # Lightning hooks

    layer = 0  # swaps layers: before every other callback attaches its hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)  # the composition calls _attach, in layer order
        else:
            # A model converted elsewhere (a checkpoint, the main process after ddp_spawn) gets the
            # hooks through which `ckpt_path=...` float weights load into it.
            self._attach_hooks(pl_module)

    @override
    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, composition: Composition) -> None:
        self._setup_fit(trainer, pl_module)

    def _setup_fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prepare ``pl_module`` for fake-quantized training (unless it already is: a resumed fit)."""
        if not _fake_quantized_linears(pl_module):
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
        group = self._weight_group_size
        # nn.MultiheadAttention hands its projections' weights to a functional kernel that never
        # calls Linear.forward: fake quantization would not apply, conversion would break it.
        attention = [name for name, layer in module.named_modules() if isinstance(layer, nn.MultiheadAttention)]
        for name, layer in module.named_modules():
            if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
                skipped.append(f"{name} (Hugging Face Conv1D, not an nn.Linear)")  # GPT-2's projections
            if not isinstance(layer, nn.Linear):
                continue
            if self.filter_fn is not None and not self.filter_fn(layer, name):
                continue
            if any(name.startswith(f"{parent}.") for parent in attention):
                skipped.append(f"{name} (inside nn.MultiheadAttention)")
            elif group is not None and layer.in_features % group:
                skipped.append(f"{name} (in_features {layer.in_features})")
            else:
                chosen.append(name)
        return chosen, skipped

    def prepare(self, module: nn.Module) -> None:
        """Swap the selected linear layers for fake-quantized ones, in place (same weights).

        Raises:
            ValueError: If ``module`` is already converted, or no layer is selected.
        """
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        converted = [name for name, _ in _converted_layers(module)]
        if converted:
            raise ValueError(
                f"{type(module).__name__} is already converted (quantized weights in {', '.join(converted[:4])}"
                f"{', ...' if len(converted) > 4 else ''}): quantization-aware training needs float weights; "
                "fit the float model (or a checkpoint saved during training) instead"
            )
        chosen, skipped = self._selected(module)
        group = self._weight_group_size
        if not chosen:
            raise ValueError(
                f"nothing to quantize in {type(module).__name__}: no nn.Linear layer is selected"
                + (f"; group_size={group} divides the input width of none of {skipped}" if skipped else "")
            )
        if skipped:
            rank_zero_warn(
                f"QuantizationAwareTraining leaves {len(skipped)} linear layer(s) in float (group_size="
                f"{group} does not divide their input width, nn.MultiheadAttention uses their weights "
                f"directly, or they are not nn.Linear modules): {', '.join(skipped)}"
            )
        names = set(chosen)
        quantize_(module, QATConfig(self.base_config, step="prepare"), filter_fn=lambda _, name: name in names)
        self.prepared_names = chosen
        if self.embedding_config is not None:
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
        """Replace the fake-quantized layers with quantized weights, in place; returns ``module``.

        A float module (trained elsewhere) is prepared first; an already converted one only gets
        the load/save hooks described in the class docstring. The ``extra_repr`` that torchao's
        ``quantize_`` sets on each layer (a bound ``functools.partial``, which pickle refuses) is
        removed, so that ``torch.save(module)`` works; the layers print as their class does.
        """
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig
        from torchao.quantization.qat.embedding import FakeQuantizedEmbedding
        from torchao.quantization.qat.linear import FakeQuantizedLinear

        if not _fake_quantized_linears(module):
            if _converted_layers(module):
                self._attach_hooks(module)
                self.converted = True
                return module
            self.prepare(module)
        self._fake_quant_enabled = None
        self._set_fake_quant(module, True)
        quantize_(
            module, QATConfig(self.base_config, step="convert"),
            filter_fn=lambda layer, _: isinstance(layer, FakeQuantizedLinear),
        )
        if self.embedding_config is not None:
            quantize_(
                module, QATConfig(self.embedding_config, step="convert"),
                filter_fn=lambda layer, _: isinstance(layer, FakeQuantizedEmbedding),
            )
        for _, layer in _converted_layers(module):
            # torchao sets `extra_repr` on each layer it quantizes, a bound `functools.partial` that
            # pickle refuses (so `torch.save(model)` would fail): the layer keeps its class's own.
            if isinstance(vars(layer).get("extra_repr"), types.MethodType):
                del layer.extra_repr
        self._attach_hooks(module)
        if isinstance(module, L.LightningModule) and module._compiler_ctx is not None:
            # Compiled by `trainer.fit(torch.compile(model))`: the converted model runs eagerly, as
            # torch cannot move a module whose quantized weights a compiled graph has run on.
            to_uncompiled(module)
        forget_compiled_graphs()
        self.converted = True
        return module

    def _attach_hooks(self, module: nn.Module) -> None:
        """Give each converted layer of ``module`` its (picklable) load and save hooks, once.

        The quantized weights are also listed in ``module._ddp_params_and_buffers_to_ignore``
        (torch's own DDP mechanism, which Lightning's DDP strategies read): they are equal on every
        process already, and torchao's quantized tensors cannot be broadcast, which Lightning does
        when ``validate``/``test`` start under ``strategy="ddp"``.
        """
        converted = _converted_layers(module)
        if converted:
            ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
            ignored.update(f"{name}.weight" if name else "weight" for name, _ in converted)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(  # type: ignore[no-untyped-call]
                module, sorted(ignored)
            )
        for _, layer in converted:
            config = self.embedding_config if isinstance(layer, nn.Embedding) else self.base_config
            if config is None or _has_load_hooks(layer):
                continue
            layer.register_load_state_dict_pre_hook(_QuantizeOnLoad(config))  # type: ignore[no-untyped-call]
            layer.register_state_dict_post_hook(_SaveQuantized())  # type: ignore[no-untyped-call]

    def quantize_float_weights(self, module: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Quantize, in ``state_dict``, the float weights of the layers that are quantized in ``module``.

        What the converted layers' load hooks do for ``module.load_state_dict``, for a state dict
        loaded by other means; each weight is quantized as conversion does. Returns ``state_dict``.
        """
        for name, layer in _converted_layers(module):
            config = self.embedding_config if isinstance(layer, nn.Embedding) else self.base_config
            if config is not None:
                _QuantizeOnLoad(config)(layer, state_dict, f"{name}." if name else "")
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
