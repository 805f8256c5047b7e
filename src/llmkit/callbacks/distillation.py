"""KnowledgeDistillation: distil a frozen teacher into any LightningModule, with no change to its code."""

from __future__ import annotations

import contextlib
import functools
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
from typing_extensions import override

from llmkit._checks import is_number
from llmkit._logging import WindowedMeans
from llmkit._outputs import (
    IGNORE_INDEX,
    aligned_targets,
    default_logits,
    forward_module_name,
    is_causal_lm,
    named_submodule,
    unwrap_loss,
)
from llmkit.callbacks._composition import CLEAN, ComposingCallback, Composition, add_gradients

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

    Examples:
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
        per_token = _kl(log_t, log_s) if loss == "kl" else _kl(log_s, log_t)
        per_token = per_token * temperature**2
    if mask is None:
        return per_token.mean()
    mask = mask.reshape(per_token.shape)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` over the last axis, from log-probabilities, with ``0 log 0 = 0``.

    Classes that ``p`` gives no mass (``-inf`` logits: a masked vocabulary) add nothing, as in
    ``F.kl_div(log_q, p)``; masking both logs there first keeps ``0 * -inf`` out of the values
    and the gradients.
    """
    p = log_p.exp()
    void = p == 0
    return (p * (log_p.masked_fill(void, 0.0) - log_q.masked_fill(void, 0.0))).sum(-1)


def _output_width(module: nn.Module) -> int | None:
    """The feature width a module outputs, read from its last layer that declares one."""
    for layer in reversed(list(module.modules())):
        for attribute in ("out_features", "embedding_dim", "out_channels", "embed_dim", "hidden_size"):
            value = getattr(layer, attribute, None)
            if isinstance(value, int):
                return value
        shape = getattr(layer, "normalized_shape", None)
        if isinstance(shape, int):
            return shape
        if isinstance(shape, tuple | list | torch.Size) and shape:
            return int(shape[-1])
        weight = getattr(layer, "weight", None)
        if type(layer).__name__.endswith("Norm") and isinstance(weight, Tensor) and weight.ndim == 1:
            return int(weight.shape[0])  # a norm that keeps no normalized_shape (e.g. HF's RMSNorm)
    return None


class KnowledgeDistillation(ComposingCallback):
    r"""Train any LightningModule to match a frozen teacher as well as its own task.

    ``callbacks=[KnowledgeDistillation(teacher)]`` on a Trainer: the student's code is unchanged.
    The callback hooks the student's forward to capture its logits and inputs, runs the teacher
    on the same inputs (no grad, eval mode, on the student's device, under the Trainer's
    precision), and turns what ``training_step`` returns (a loss, or a dict with ``"loss"``) into

    .. math:: (1 - \alpha)\, \mathcal{L}_{task} + \alpha\, T^2\, \mathrm{KL}(p^T_{teacher} \| p^T_{student})

    computed per token (every axis of the logits but the last) and averaged over the tokens whose
    target is not ``ignore_index``. Logs ``train_task_loss`` and ``train_kd_loss`` (and
    ``train_layer_loss`` with ``layers``), the clean pass's values whatever else runs.

    With other llmkit callbacks, in any order in the Trainer's list (see
    :mod:`llmkit.callbacks`): the distillation term is computed on the clean pass (the student's
    logits and the teacher's on the batch as it came), and the loss is ``(1 - alpha)`` times what
    the rest returns (with ``AdversarialTraining``, its mix of clean and adversarial losses) plus
    ``alpha`` times that term; under ``QuantizationAwareTraining`` the student is fake-quantized,
    the teacher never is.

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
            counts but those labelled -100 (Hugging Face's and PyTorch's ignored label).
        target_fn: gives the targets ``[...]`` from the batch, aligned with the logits' tokens.
            By default the batch's ``"labels"``/``"label"``/``"targets"``/``"target"``/``"tgt"``/``"y"``
            entry (or its last item), used as is when it has one target per token, or without its first position
            (``tgt[:, 1:]``, teacher forcing) when that one is longer.
        forward_module: the student's submodule whose forward gives the logits (``None``: the
            LightningModule's own forward where it defines one, else its only child with
            parameters, e.g. ``self.model`` of a Hugging Face wrapper); the teacher's submodule of
            that name runs, where it has one.
        layers: intermediate outputs to match, ``{student_module_name: teacher_module_name}``.
            Where widths differ, a learned linear projection maps the student's to the teacher's
            (:attr:`projections`: trained by the student's optimizer and synced by DDP as a child
            of the student during ``fit`` only; saved in this callback's state, never in the
            student's weights).
        layer_loss: ``"mse"`` or ``"cosine"`` (``1 - cosine similarity`` on the last axis).
        layer_weight: weight of the layer term, added to the loss above.
        teacher_class: the LightningModule class a teacher checkpoint is loaded as.

    Raises:
        ValueError: If ``alpha`` is outside [0, 1], ``temperature`` is not a finite number
            ``> 0``, ``loss`` or ``layer_loss`` is unknown; at setup, if a named module does not
            exist or the module defines no forward and ``forward_module`` cannot be found; at the
            first step, if teacher and student logits differ in shape.
        FileNotFoundError: If ``teacher`` is a path to no file.

    Examples:
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

    layer = 10

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
        if not is_number(alpha) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
        if not is_number(temperature) or not 0 < temperature < math.inf:
            raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}")
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}")
        if layer_loss not in LAYER_LOSSES:
            raise ValueError(f"`layer_loss` must be one of {LAYER_LOSSES}, got {layer_loss!r}")
        if not is_number(layer_weight) or not 0 <= layer_weight < math.inf:
            raise ValueError(f"`layer_weight` must be a finite number >= 0, got {layer_weight!r}")
        if isinstance(layers, str) or (isinstance(layers, Mapping) and not all(isinstance(k, str) for k in layers)):
            raise TypeError(f"`layers` must map student module names to teacher module names, got {layers!r}")
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
        #: The learned projections of ``layers`` whose widths differ (``None`` before the first fit).
        self.projections: nn.ModuleDict | None = None
        self._saved_projections: dict[str, Tensor] | None = None
        self._composition: Composition | None = None
        self._forward_name = ""
        self._causal = False
        self._student_call: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._features: dict[str, Tensor] = {}
        self._batch: Any = None
        self._term: tuple[Tensor, Tensor, Tensor | None] | None = None  # (weighted sum, kd, layer term)
        self._log = WindowedMeans(("train_task_loss", "train_kd_loss"))
        self._layer_log = WindowedMeans(("train_layer_loss",))

    # -----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)
        self._check_projections_are_optimized(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"temperature": self.temperature, "alpha": self.alpha, "loss": self.loss}
        if self.projections is not None and len(self.projections):
            state["projections"] = {k: v.detach().clone() for k, v in self.projections.state_dict().items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in ("temperature", "alpha"):
            saved = state_dict.get(name)
            if saved is not None and not math.isclose(saved, getattr(self, name)):
                rank_zero_warn(f"KnowledgeDistillation resumes with {name}={getattr(self, name)}, saved with {saved}")
        # Checkpoints written before the callbacks composed named them as the student's children
        # ("kd_projections.0.weight").
        prefix = f"{_PROJECTIONS}."
        saved_projections = {k.removeprefix(prefix): v for k, v in state_dict.get("projections", {}).items()}
        if not saved_projections:
            return
        if self.projections is not None:
            self.projections.load_state_dict(saved_projections)
        else:
            self._saved_projections = saved_projections  # loaded when the projections are made

    # -----------------------------------------------------------------------------------------
    # Attaching to the student

    @override
    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, composition: Composition) -> None:
        teacher = self._load_teacher(pl_module)
        if teacher is pl_module:
            raise ValueError("the teacher is the student itself; pass a separate module")
        teacher.eval().requires_grad_(False)
        self.teacher = trainer.precision_plugin.convert_module(teacher)
        self._forward_name = forward_module_name(pl_module, self.forward_module, role="student")
        student = pl_module.get_submodule(self._forward_name)
        self._causal = is_causal_lm(student)
        composition.add_handle(student.register_forward_hook(self._capture_student, with_kwargs=True))
        self._attach_layers(pl_module, composition)
        # A layer below that frees the clean pass's graph (adversarial training) evaluates the
        # term right after that pass, and takes its gradients there.
        composition.add_clean_term(self._clean_term)
        composition.wrap_step(self.layer, self._training_step)
        self._composition = composition

    @override
    def _detach(self, pl_module: L.LightningModule) -> None:
        self._composition, self._student_call, self._features, self._term = None, None, {}, None

    def _load_teacher(self, pl_module: L.LightningModule) -> nn.Module:
        if self.teacher is not None:
            return self.teacher
        cls = self.teacher_class or type(pl_module)
        source = self.teacher_source
        assert isinstance(source, str | os.PathLike)
        teacher: nn.Module = cls.load_from_checkpoint(os.fspath(source), map_location="cpu", weights_only=True)
        return teacher

    def _attach_layers(self, pl_module: L.LightningModule, composition: Composition) -> None:
        if not self.layers:
            return
        assert self.teacher is not None
        projections = nn.ModuleDict()
        for index, (student_name, teacher_name) in enumerate(self.layers.items()):
            student_layer = named_submodule(pl_module, student_name, role="student", argument="layers")
            teacher_layer = named_submodule(self.teacher, teacher_name, role="teacher", argument="layers")
            for layer, key in ((student_layer, f"s{index}"), (teacher_layer, f"t{index}")):
                composition.add_handle(layer.register_forward_hook(functools.partial(self._capture_feature, key)))
            # Widths read from the layers themselves; where one cannot be read (an activation),
            # the outputs must match as they are (checked at the first step).
            student_width, teacher_width = _output_width(student_layer), _output_width(teacher_layer)
            if student_width is not None and teacher_width is not None and student_width != teacher_width:
                projections[str(index)] = nn.Linear(student_width, teacher_width)
        if self.projections is None:
            self.projections = projections
            if self._saved_projections is not None:
                self.projections.load_state_dict(self._saved_projections)
                self._saved_projections = None
        if len(self.projections):
            # A child of the student for this fit: its optimizer, DDP and device moves see it.
            composition.add_submodule(_PROJECTIONS, self.projections.to(pl_module.device))

    def _check_projections_are_optimized(self, trainer: L.Trainer) -> None:
        if self.projections is None or not len(self.projections) or not trainer.optimizers:
            return
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        optimized = {id(p) for group in groups for p in group["params"]}
        missing = [p for p in self.projections.parameters() if id(p) not in optimized]
        if missing:
            # configure_optimizers chose its parameters by hand: give the projections the first
            # optimizer's settings.
            rank_zero_warn(
                "KnowledgeDistillation adds its layer projections to the first optimizer as a new parameter group "
                "with its current settings: a learning-rate scheduler made before does not schedule them; return "
                "`self.parameters()` from configure_optimizers to train them like the rest"
            )
            optimizer = trainer.optimizers[0]
            defaults = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            optimizer.add_param_group({**defaults, "params": missing})

    # -----------------------------------------------------------------------------------------
    # Capture (on the clean pass only)

    def _clean_pass(self) -> bool:
        # Inside this callback's own training step only: nothing is held from validation or by hand.
        return self._batch is not None and self._composition is not None and self._composition.pass_kind == CLEAN

    def _capture_student(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._student_call is None and self._clean_pass():
            self._student_call = (args, kwargs, output)

    def _capture_feature(self, key: str, module: nn.Module, args: Any, output: Any) -> None:
        if key not in self._features and self._batch is not None and (key.startswith("t") or self._clean_pass()):
            self._features[key] = default_logits(output)

    # -----------------------------------------------------------------------------------------
    # The loss

    def _training_step(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        composition = self._composition
        assert composition is not None
        self._student_call, self._features, self._term = None, {}, None
        self._batch = args[0] if args else kwargs.get("batch")
        try:
            output = inner(*args, **kwargs)
            if output is None:  # the student skipped this batch
                return output
            rest, task = unwrap_loss(output), unwrap_loss(composition.clean_output)
            assert rest is not None and task is not None
            term, kd, layer = self._term or self._evaluate_term()
            if composition.clean_term_grads is not None:
                # The layer below took the term's gradients after its clean pass (and freed its graph).
                grads, scale, params = composition.clean_term_grads
                term = add_gradients(term, grads, scale, params)
            total = (1.0 - self.alpha) * rest + term
            student = composition.module
            if layer is not None:
                self._layer_log.update(student, {"train_layer_loss": layer})
            self._log.update(student, {"train_task_loss": task, "train_kd_loss": kd})
        finally:
            self._student_call, self._features, self._term, self._batch = None, {}, None, None
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total

    def _clean_term(self) -> Tensor:
        """``alpha * KD (+ layer_weight * layer term)`` on the clean pass just run (a clean term)."""
        self._term = self._evaluate_term()
        return self._term[0]

    def _evaluate_term(self) -> tuple[Tensor, Tensor, Tensor | None]:
        if self._student_call is None:
            where = f"`{self._forward_name}`" if self._forward_name else "the module's own forward (`self(...)`)"
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
        mask = self._mask(self._batch, student_logits)
        kd = distillation_loss(
            student_logits, teacher_logits, temperature=self.temperature, loss=self.loss, mask=mask
        )
        term = self.alpha * kd
        layer = None
        if self.layers:
            assert self._composition is not None
            layer = self._layer_term(self._composition.module)
            term = term + self.layer_weight * layer
        return term, kd, layer

    def _teacher_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self.teacher is not None
        teacher = self.teacher
        if self._forward_name:
            # A teacher of another kind has no such submodule: its own forward takes the inputs.
            with contextlib.suppress(AttributeError):
                teacher = teacher.get_submodule(self._forward_name)
        with torch.no_grad():
            return teacher(*args, **kwargs)

    def _mask(self, batch: Any, logits: Tensor) -> Tensor | None:
        ignore = IGNORE_INDEX if self.ignore_index is None else self.ignore_index
        shift = ignore if self._causal else None
        if self.ignore_index is None and self.target_fn is None:
            try:
                target = aligned_targets(batch, logits, shift_fill=shift)
            except ValueError:
                return None  # no targets to read: every token counts
        else:
            target = aligned_targets(batch, logits, self.target_fn, shift_fill=shift)
        return target != ignore

    def _layer_term(self, student: L.LightningModule) -> Tensor:
        projections = self.projections
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
