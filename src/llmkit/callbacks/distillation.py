"""KnowledgeDistillation: distil a frozen teacher into any LightningModule, with no change to its code."""

from __future__ import annotations

import contextlib
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from llmkit._logging import WindowedMeans
from llmkit._outputs import aligned_targets, default_logits

LOSSES = ("kl", "reverse_kl", "mse")
LAYER_LOSSES = ("mse", "cosine")
_PROJECTIONS = "kd_projections"


def distillation_loss(
    student: Tensor, teacher: Tensor, *, temperature: float, loss: str = "kl", mask: Tensor | None = None
) -> Tensor:
    """The soft-target loss between two logits tensors, per token, averaged over unmasked tokens.

    ``"kl"``: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al., 2015);
    ``"reverse_kl"``: ``T^2 * KL(student_T || teacher_T)``; ``"mse"``: the mean squared
    difference of the raw logits. The softmax is over the last axis (the vocabulary or classes),
    and every other axis is a token.

    Args:
        student: ``[..., V]`` logits.
        teacher: ``[..., V]`` logits, the same shape.
        temperature: ``T > 0``.
        loss: ``"kl"``, ``"reverse_kl"`` or ``"mse"``.
        mask: ``[...]`` bool, True for the tokens that count (``None``: all).

    Returns:
        A 0-d float32 tensor.

    Example:
        >>> s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.5, -1.0]])
        >>> round(distillation_loss(s, t, temperature=1.0).item(), 4)
        0.2149
    """
    student, teacher = student.float(), teacher.float()
    if loss == "mse":
        per_token = (student - teacher).square().mean(-1)
    else:
        log_s = F.log_softmax(student / temperature, dim=-1)
        log_t = F.log_softmax(teacher / temperature, dim=-1)
        if loss == "kl":
            per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
        else:
            per_token = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
        per_token = per_token * temperature**2
    if mask is None:
        return per_token.mean()
    mask = mask.reshape(per_token.shape)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _output_width(module: nn.Module) -> int | None:
    """The feature width a module outputs, read from its last layer that declares one."""
    for layer in reversed(list(module.modules())):
        for attribute in ("out_features", "embedding_dim", "out_channels", "embed_dim", "hidden_size"):
            value = getattr(layer, attribute, None)
            if isinstance(value, int):
                return value
        shape = getattr(layer, "normalized_shape", None)
        if isinstance(shape, tuple) and shape:
            return int(shape[-1])
    return None


def _submodule(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"the {role} has no module named {name!r}{hint}") from None


class KnowledgeDistillation(L.Callback):
    r"""Train any LightningModule to match a frozen teacher as well as its own task.

    ``callbacks=[KnowledgeDistillation(teacher)]`` on a Trainer: the student's code is unchanged.
    The callback hooks the student's forward to capture its logits and inputs, runs the teacher
    on the same inputs (no grad, eval mode, on the student's device, under the Trainer's
    precision), and turns what ``training_step`` returns (a loss, or a dict with ``"loss"``) into

    .. math:: (1 - \alpha)\, \mathcal{L}_{task} + \alpha\, T^2\, \mathrm{KL}(p^T_{teacher} \| p^T_{student})

    computed per token (every axis of the logits but the last) and averaged over the tokens whose
    target is not ``ignore_index``. Logs ``train_task_loss`` and ``train_kd_loss`` (and
    ``train_layer_loss`` with ``layers``).

    Args:
        teacher: an ``nn.Module``, a LightningModule, or the path of a Lightning checkpoint
            (loaded with ``weights_only=True`` as ``teacher_class``, by default the student's own
            class). It is never trained, never enters the student's checkpoint or optimizer, and
            under DDP each process keeps its own copy outside the DDP wrapper.
        temperature: softmax temperature ``T > 0``.
        alpha: weight of the distillation term, in [0, 1].
        loss: ``"kl"`` (forward KL, Hinton et al.), ``"reverse_kl"`` or ``"mse"`` (on logits).
        logits_fn: picks the logits from a forward's output (default: :func:`default_logits`).
        ignore_index: target value of tokens that do not count (padding). ``None``: every token
            counts.
        target_fn: gives the targets ``[...]`` from the batch, aligned with the logits' tokens.
            By default the batch's ``"labels"``/``"target"``/``"tgt"``/``"y"`` entry (or its last
            item), used as is when it has one target per token, or without its first position
            (``tgt[:, 1:]``, teacher forcing) when that one is longer.
        forward_module: the student's submodule whose forward gives the logits (``None``: the
            LightningModule's own forward); the teacher's submodule of that name runs, where it
            has one.
        layers: intermediate outputs to match, ``{student_module_name: teacher_module_name}``.
            Where widths differ, a learned linear projection maps the student's to the teacher's
            (trained by the student's optimizer; kept out of the student's checkpoint weights).
        layer_loss: ``"mse"`` or ``"cosine"`` (``1 - cosine similarity`` on the last axis).
        layer_weight: weight of the layer term, added to the loss above.
        teacher_class: the LightningModule class a teacher checkpoint is loaded as.

    Raises:
        ValueError: If ``alpha`` is outside [0, 1], ``temperature <= 0``, ``loss`` or
            ``layer_loss`` is unknown; at setup, if a named module does not exist; at the first
            step, if teacher and student logits differ in shape.
        FileNotFoundError: If ``teacher`` is a path to no file.

    Example:
        >>> import lightning.pytorch as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> teacher = BoringModel()
        >>> trainer = L.Trainer(max_steps=2, callbacks=[KnowledgeDistillation(teacher, loss="mse")],
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(BoringModel())
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("train_"))
        ['train_kd_loss', 'train_task_loss']
    """

    def __init__(
        self,
        teacher: nn.Module | str | os.PathLike[str],
        temperature: float = 2.0,
        alpha: float = 0.5,
        loss: str = "kl",
        logits_fn: Callable[[Any], Tensor] | None = None,
        ignore_index: int | None = None,
        target_fn: Callable[[Any], Tensor] | None = None,
        forward_module: str | None = None,
        layers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        layer_loss: str = "mse",
        layer_weight: float = 1.0,
        teacher_class: type[L.LightningModule] | None = None,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}")
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}")
        if layer_loss not in LAYER_LOSSES:
            raise ValueError(f"`layer_loss` must be one of {LAYER_LOSSES}, got {layer_loss!r}")
        if not layer_weight >= 0:
            raise ValueError(f"`layer_weight` must be >= 0, got {layer_weight}")
        if isinstance(teacher, str | os.PathLike):
            path = Path(teacher)
            if "://" not in str(teacher) and not path.is_file():
                raise FileNotFoundError(f"the teacher checkpoint {str(teacher)!r} does not exist")
        elif not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be an nn.Module or a checkpoint path, got {type(teacher).__name__}")
        self.teacher_source = teacher
        self.temperature, self.alpha, self.loss = float(temperature), float(alpha), loss
        self.logits_fn = logits_fn or default_logits
        self.ignore_index, self.target_fn, self.forward_module = ignore_index, target_fn, forward_module
        self.layers = dict(layers)
        self.layer_loss, self.layer_weight, self.teacher_class = layer_loss, float(layer_weight), teacher_class
        self.teacher: nn.Module | None = None if not isinstance(teacher, nn.Module) else teacher
        self._handles: list[RemovableHandle] = []
        self._student_call: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._features: dict[str, Tensor] = {}
        self._original_training_step: Callable[..., Any] | None = None
        self._original_on_load_checkpoint: Callable[[dict[str, Any]], None] | None = None
        self._log = WindowedMeans(("train_task_loss", "train_kd_loss"))
        self._layer_log = WindowedMeans(("train_layer_loss",))
        self._checked_shapes = False

    # -----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._setup(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._place_teacher(pl_module)
        self._check_projections_are_optimized(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The projections train with the student but are not part of it: keep them in this
        # callback's state, so that the student's weights load without them.
        prefix = f"{_PROJECTIONS}."
        weights = checkpoint.get("state_dict", {})
        projections = {key: weights.pop(key) for key in [k for k in weights if k.startswith(prefix)]}
        if projections:
            checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})["projections"] = projections

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # An interrupted fit does not tear down: leave the student as it was all the same.
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, original in (
            ("training_step", self._original_training_step),
            ("on_load_checkpoint", self._original_on_load_checkpoint),
        ):
            if original is not None and name in vars(pl_module):
                delattr(pl_module, name)
        self._original_training_step = self._original_on_load_checkpoint = None

    # -----------------------------------------------------------------------------------------
    # Set-up

    def _load_teacher(self, pl_module: L.LightningModule) -> nn.Module:
        if self.teacher is not None:
            return self.teacher
        cls = self.teacher_class or type(pl_module)
        source = self.teacher_source
        assert isinstance(source, str | os.PathLike)
        teacher: nn.Module = cls.load_from_checkpoint(os.fspath(source), map_location="cpu", weights_only=True)
        return teacher

    def _setup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = self._load_teacher(pl_module)
        if teacher is pl_module:
            raise ValueError("the teacher is the student itself; pass a separate module")
        teacher.eval().requires_grad_(False)
        self.teacher = trainer.precision_plugin.convert_module(teacher)
        student_target = _submodule(pl_module, self.forward_module, "student") if self.forward_module else pl_module
        self._handles.append(student_target.register_forward_hook(self._capture_student, with_kwargs=True))
        self._setup_layers(pl_module)
        # Wrap training_step on this instance (not the class): the task loss comes from the
        # student's own code and the distillation term is added to it.
        self._original_training_step = pl_module.training_step
        pl_module.training_step = self._training_step  # type: ignore[method-assign]
        self._original_on_load_checkpoint = pl_module.on_load_checkpoint
        pl_module.on_load_checkpoint = self._on_load_checkpoint  # type: ignore[method-assign]
        self._student = pl_module

    def _setup_layers(self, pl_module: L.LightningModule) -> None:
        if not self.layers:
            return
        assert self.teacher is not None
        projections = nn.ModuleDict()
        for index, (student_name, teacher_name) in enumerate(self.layers.items()):
            student_layer = _submodule(pl_module, student_name, "student")
            teacher_layer = _submodule(self.teacher, teacher_name, "teacher")
            self._handles.append(student_layer.register_forward_hook(self._capture_feature(f"s{index}")))
            self._handles.append(teacher_layer.register_forward_hook(self._capture_feature(f"t{index}")))
            # Widths read from the layers themselves; where one cannot be read (an activation),
            # the outputs must match as they are (checked at the first step).
            student_width, teacher_width = _output_width(student_layer), _output_width(teacher_layer)
            if student_width is not None and teacher_width is not None and student_width != teacher_width:
                projections[str(index)] = nn.Linear(student_width, teacher_width)
        if len(projections):
            # A child of the student, so that its optimizer, DDP and the device placement see it.
            pl_module.add_module(_PROJECTIONS, projections)

    def _place_teacher(self, pl_module: L.LightningModule) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)

    def _check_projections_are_optimized(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        projections = getattr(pl_module, _PROJECTIONS, None)
        if projections is None or not trainer.optimizers:
            return
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        optimized = {id(p) for group in groups for p in group["params"]}
        missing = [p for p in projections.parameters() if id(p) not in optimized]
        if missing:
            # configure_optimizers chose its parameters by hand: give the projections the first
            # optimizer's settings.
            optimizer = trainer.optimizers[0]
            defaults = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            optimizer.add_param_group({**defaults, "params": missing})

    def _on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert self._original_on_load_checkpoint is not None
        self._original_on_load_checkpoint(checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        checkpoint.setdefault("state_dict", {}).update(state.get("projections", {}))

    # -----------------------------------------------------------------------------------------
    # Capture

    def _capture_student(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._student_call is None and torch.is_grad_enabled():
            self._student_call = (args, kwargs, output)

    def _capture_feature(self, key: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if key not in self._features:
                self._features[key] = default_logits(output)

        return hook

    # -----------------------------------------------------------------------------------------
    # The loss

    def _training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._original_training_step is not None
        trainer = self._student._trainer
        if trainer is None or not trainer.training:
            # Called outside the fit's training loop (by an attack in validation, or by hand).
            return self._original_training_step(*args, **kwargs)
        self._student_call, self._features = None, {}
        output = self._original_training_step(*args, **kwargs)
        if output is None:  # the student skipped this batch
            return output
        task = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(task, Tensor):
            raise TypeError(
                f"KnowledgeDistillation needs training_step to return a loss tensor or a dict with 'loss', "
                f"got {type(output).__name__}"
            )
        if self._student_call is None:
            where = f"`{self.forward_module}`" if self.forward_module else "the module's own forward (`self(...)`)"
            raise RuntimeError(
                f"KnowledgeDistillation saw no call of {where} in training_step; pass `forward_module` "
                "to name the submodule that computes the logits"
            )
        student_args, student_kwargs, student_output = self._student_call
        teacher_output = self._teacher_forward(student_args, student_kwargs)
        student_logits, teacher_logits = self.logits_fn(student_output), self.logits_fn(teacher_output)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"teacher and student logits differ in shape: student {tuple(student_logits.shape)}, teacher "
                f"{tuple(teacher_logits.shape)} (different vocabularies or inputs?)"
            )
        batch = args[0] if args else kwargs.get("batch")
        mask = self._mask(batch, student_logits)
        kd = distillation_loss(
            student_logits, teacher_logits, temperature=self.temperature, loss=self.loss, mask=mask
        )
        total = (1.0 - self.alpha) * task + self.alpha * kd
        student = self._student
        if self.layers:
            layer = self._layer_term(student)
            total = total + self.layer_weight * layer
            self._layer_log.update(student, {"train_layer_loss": layer})
        self._log.update(student, {"train_task_loss": task, "train_kd_loss": kd})
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total

    def _teacher_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self.teacher is not None
        teacher = self.teacher
        if self.forward_module:
            # A teacher of another kind has no such submodule: its own forward takes the inputs.
            with contextlib.suppress(AttributeError):
                teacher = teacher.get_submodule(self.forward_module)
        with torch.no_grad():
            return teacher(*args, **kwargs)

    def _mask(self, batch: Any, logits: Tensor) -> Tensor | None:
        if self.ignore_index is None and self.target_fn is None:
            return None
        target = aligned_targets(batch, logits, self.target_fn)
        ignore = -100 if self.ignore_index is None else self.ignore_index
        return target != ignore

    def _layer_term(self, student: L.LightningModule) -> Tensor:
        projections = getattr(student, _PROJECTIONS, None)
        total = torch.zeros((), device=student.device)
        for index, (student_name, teacher_name) in enumerate(self.layers.items()):
            s, t = self._features.get(f"s{index}"), self._features.get(f"t{index}")
            if s is None or t is None:
                raise RuntimeError(f"the layer pair {student_name!r} -> {teacher_name!r} produced no output this step")
            if projections is not None and str(index) in projections:
                s = projections[str(index)](s)
            if s.shape != t.shape:
                raise ValueError(
                    f"layer outputs differ in shape: student {student_name!r} {tuple(s.shape)}, teacher "
                    f"{teacher_name!r} {tuple(t.shape)}; name layers whose widths can be read (ending in a "
                    "Linear, Embedding, LayerNorm or convolution) to get a learned projection"
                )
            s, t = s.float(), t.float()
            if self.layer_loss == "mse":
                total = total + F.mse_loss(s, t)
            else:
                total = total + (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
        return total / max(1, len(self.layers))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "alpha": self.alpha, "loss": self.loss}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in ("temperature", "alpha"):
            saved = state_dict.get(name)
            if saved is not None and not math.isclose(saved, getattr(self, name)):
                rank_zero_warn(f"KnowledgeDistillation resumes with {name}={getattr(self, name)}, saved with {saved}")

