"""Inference-time attacks: :func:`attack` measures a model's loss and outputs under attack, weights fixed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from llmkit._outputs import (
    IGNORE_INDEX,
    aligned_targets,
    default_logits,
    forward_module_name,
    is_causal_lm,
    unwrap_loss,
)
from llmkit.adversarial.isolation import RNGReplay, frozen_norm_statistics, quiet_logging
from llmkit.adversarial.quantized import straight_through_quantized
from llmkit.adversarial.settings import AttackConfig, check_objective, resolve_steps
from llmkit.adversarial.sites import Perturbation, make_perturbation


@dataclass
class AttackResult:
    """What :func:`attack` found.

    Attributes:
        loss: the loss at the final perturbation (0-d, detached).
        clean_loss: the loss without perturbation (0-d, detached).
        output: the model's forward output at the final perturbation (detached), or ``None``
            where the loss did not call the forward.
        clean_output: the forward output without perturbation (detached), or ``None``.
        perturbation: the final ``delta`` of each perturbed site, in call order (masked).
        shifted: whether the outputs are a causal language model's, whose targets are its
            labels shifted by one (as a Hugging Face causal LM's loss shifts them).
    """

    loss: Tensor
    clean_loss: Tensor
    output: Any
    clean_output: Any
    perturbation: list[Tensor]
    shifted: bool = False

    def accuracy(
        self,
        batch: Any,
        *,
        logits_fn: Callable[[Any], Tensor] = default_logits,
        target_fn: Callable[[Any], Tensor] | None = None,
        ignore_index: int | None = None,
        clean: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``(correct, counted)`` tokens of the arg-max of the logits against the batch's targets.

        Targets are found as :class:`llmkit.callbacks.KnowledgeDistillation` finds them
        (``labels``/``label``/``targets``/``target``/``tgt``/``y`` or the last item; ``tgt[:, 1:]`` for teacher forcing;
        shifted by one for a causal LM); those equal to ``ignore_index`` (``None``: -100) do not count.
        """
        output = self.clean_output if clean else self.output
        if output is None:
            raise RuntimeError("the attacked loss did not call the model's forward, so no outputs were captured")
        logits = logits_fn(output)
        ignore = IGNORE_INDEX if ignore_index is None else ignore_index
        target = aligned_targets(batch, logits, target_fn, shift_fill=ignore if self.shifted else None)
        keep = target != ignore
        correct = ((logits.argmax(-1) == target) & keep).sum()
        return correct, keep.sum()


@dataclass
class _Objective:
    """One pass of an attack: the objective, the loss and the forward's output at the current ``delta``."""

    model: nn.Module
    batch: Any
    perturbation: Perturbation
    loss_fn: Callable[[nn.Module, Any], Any]
    rng: RNGReplay
    outputs: list[Any]
    objective: str
    logits_fn: Callable[[Any], Tensor]
    target_fn: Callable[[Any], Tensor] | None
    ignore_index: int | None
    shifted: bool

    def __call__(self, *, fresh: bool = False) -> tuple[Tensor, Tensor, Any]:
        self.rng.replay()  # every pass draws the same dropout masks
        self.outputs.clear()
        with self.perturbation.applied(self.batch, fresh=fresh) as perturbed:
            loss = unwrap_loss(self.loss_fn(self.model, perturbed))
        if loss is None:
            raise ValueError("the loss function returned None for this batch")
        output = self.outputs[0] if self.outputs else None
        if self.objective == "loss":
            return loss, loss, output
        if output is None:
            raise RuntimeError("objective='margin' needs the logits, but the loss did not call the forward")
        logits = self.logits_fn(output)
        ignore = IGNORE_INDEX if self.ignore_index is None else self.ignore_index
        target = aligned_targets(self.batch, logits, self.target_fn, shift_fill=ignore if self.shifted else None)
        return margin_loss(logits, target, ignore), loss, output


def attack(
    model: nn.Module,
    batch: Any,
    *,
    method: str = "pgd",
    epsilon: float = 1.0,
    alpha: float | None = None,
    steps: int | None = None,
    norm: str | None = None,
    random_start: bool | None = None,
    target: str = "embeddings",
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
    embeddings: str | Sequence[str] | None = None,
    pad_id: int | None = None,
    inputs: str | int | Sequence[str | int] | None = None,
    input_range: tuple[float, float] | None = None,
    forward_module: str | None = None,
    objective: str = "loss",
    logits_fn: Callable[[Any], Tensor] = default_logits,
    target_fn: Callable[[Any], Tensor] | None = None,
    ignore_index: int | None = None,
) -> AttackResult:
    """Attack ``model`` on ``batch`` with its weights fixed: the loss and outputs at the attack's final ``delta``.

    Works inside ``torch.inference_mode`` (Lightning's validation): the attack leaves it for its
    own passes, on a copy of the batch's tensors. The model's mode (train/eval) is used as it is;
    its parameters' ``requires_grad`` flags and ``.grad`` are as before, BatchNorm statistics
    unchanged, ``self.log`` silenced while the loss runs.

    Quantized models (torchao-converted, e.g. by ``QuantizationAwareTraining``): a quantized
    linear layer gives its input no gradient (its dynamic activation quantizer rounds), so during
    the attack's passes each ``nn.Linear`` with a quantized weight gets a straight-through
    estimate: its output keeps the quantized value, its gradient is that of the float layer with
    the dequantized weight (see :mod:`llmkit.adversarial.quantized`). The hooks are removed after.

    Args:
        model: any module; a LightningModule's ``training_step(batch, 0)`` is the default loss.
        batch: the batch, as the loss takes it.
        method: ``"fgm"``, ``"fgsm"``, ``"pgd"`` or ``"freelb"`` (see :class:`AttackConfig`).
        epsilon: radius of the perturbation ball, finite and ``> 0``.
        alpha: step size (``None``: the method's default).
        steps: ascent steps (``None``: 10 for ``pgd``/``freelb``, 1 for ``fgm``/``fgsm``).
        norm: ``"l2"`` or ``"linf"`` (``None``: linf for fgsm, else l2).
        random_start: start from a random point of the ball (``None``: fgsm only).
        target: ``"embeddings"`` or ``"inputs"``.
        embeddings: name(s) of the embedding modules to perturb (``None``: a Hugging Face model's
            token embeddings, else every ``nn.Embedding``; see :func:`find_embeddings`).
        pad_id: token id never perturbed (``None``: each embedding's ``padding_idx``).
        inputs: key(s) or indices of the batch tensors to perturb (``None``: every float tensor).
        input_range: ``(low, high)`` that perturbed inputs are clamped to.
        loss_fn: ``loss_fn(model, batch)`` returns the loss (or a dict with ``"loss"``) to maximise.
        forward_module: the submodule whose forward output is returned (``None``: the model's
            own forward where it defines one, else its one child with parameters, as a Hugging
            Face wrapper's ``self.model``).
        objective: what the attack maximises: ``"loss"``, the loss itself; or ``"margin"``, the
            number of wrong tokens, through :func:`margin_loss` of the forward's logits and the
            batch's targets (found as :meth:`AttackResult.accuracy` finds them). A loss-maximising
            attack can pour its budget into a few tokens; the margin attack is the one to measure
            robust accuracy with.
        logits_fn: picks the logits from the forward's output (``objective="margin"``).
        target_fn: gives the targets from the batch (``objective="margin"``; default: found).
        ignore_index: target value that does not count, e.g. padding (``objective="margin"``;
            ``None``: -100, Hugging Face's ignored label).

    Returns:
        :class:`AttackResult`: ``loss``/``clean_loss`` 0-d, ``output``/``clean_output`` as the
        forward returns them (e.g. logits ``[B, T, V]``), ``perturbation`` one ``delta`` per site
        (e.g. ``[B, S, D]`` and ``[B, T, D]`` for a translator's two embeddings).

    Raises:
        ValueError: For a bad setting (see :class:`AttackConfig`), or sites that do not share a
            batch axis (the message names the modules).
        RuntimeError: If the loss does not depend on the perturbation.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(24, 2))
        >>> batch = (torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([0, 1]))
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> result = attack(model, batch, method="pgd", epsilon=0.5, steps=5, loss_fn=loss)
        >>> bool(result.loss >= result.clean_loss)
        True
        >>> [tuple(d.shape) for d in result.perturbation]
        [(2, 3, 8)]
        >>> bool(result.perturbation[0].flatten(1).norm(dim=1).max() <= 0.5 + 1e-6)
        True
    """
    config = AttackConfig(method, epsilon, alpha, resolve_steps(method, steps, 10), norm, random_start)
    check_objective(objective)
    loss_fn = loss_fn or _default_loss(model)
    try:
        probe = model.get_submodule(forward_module_name(model, forward_module))
    except ValueError:
        if forward_module or objective == "margin":
            raise  # the outputs are needed: say which module to name
        probe = model  # a loss of the caller's own: the outputs are a bonus
    shifted = is_causal_lm(probe)
    perturbation = make_perturbation(model, target, embeddings=embeddings, pad_id=pad_id, inputs=inputs,
                                     input_range=input_range)
    outputs: list[Any] = []
    handle = probe.register_forward_hook(lambda module, args, output: outputs.append(output))
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(frozen_norm_statistics(model))
            stack.enter_context(quiet_logging(model))
            stack.enter_context(straight_through_quantized(model))
            # Weights fixed: no parameter gradient is computed, none is left behind.
            for p in params:
                p.requires_grad_(False)
            stack.callback(_require_grad, params)
            batch = apply_to_collection(batch, Tensor, lambda t: t.clone() if t.is_inference() else t)
            rng = RNGReplay(_device_of(model), random=config.starts_random)
            run = _Objective(model, batch, perturbation, loss_fn, rng, outputs, objective, logits_fn, target_fn,
                             ignore_index, shifted)
            # The clean pass (without a random start, it gives the first step's gradient too).
            if config.starts_random:
                with torch.no_grad():
                    _, clean_loss, clean_output = run(fresh=True)
                perturbation.check_sites(batch)
                perturbation.random_start(config, rng.generator)
                goal, _, _ = run()
            else:
                goal, clean_loss, clean_output = run(fresh=True)
                perturbation.check_sites(batch)
            # The ascent; the last pass only measures.
            for index in range(config.steps):
                perturbation.step(_delta_grads(goal, perturbation.deltas), config, config.step_size)
                with torch.no_grad() if index == config.steps - 1 else contextlib.nullcontext():
                    goal, loss, output = run()
    finally:
        handle.remove()
        perturbation.remove()
    final = [(d if m is None else d * m).detach() for d, m in zip(perturbation.deltas, perturbation.masks, strict=True)]
    return AttackResult(loss.detach(), clean_loss.detach(), _detach(output), _detach(clean_output), final, shifted)


def margin_loss(logits: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor:
    """Mean over tokens of ``-max(z_y - max_{j != y} z_j, 0)``: maximised, it makes tokens wrong.

    Carlini and Wagner's margin, clamped at zero: a token already predicted wrong adds no
    gradient, so an attack's budget moves on to the tokens still right.

    Args:
        logits: ``[..., V]``.
        target: ``[...]`` class ids.
        ignore_index: target value that does not count (``None``: every position counts).

    Returns:
        A 0-d tensor, ``<= 0``; ``0`` when every counted token is wrong.

    Examples:
        >>> margin_loss(torch.tensor([[3.0, 1.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        tensor(-1.)
    """
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = target.masked_fill(~keep, 0).unsqueeze(-1)
    true = logits.gather(-1, safe).squeeze(-1)
    other = logits.scatter(-1, safe, float("-inf")).amax(-1)
    margins = (true - other).clamp(min=0).masked_fill(~keep, 0.0)
    return -margins.sum() / keep.sum().clamp_min(1)


_NO_GRADIENT = (
    "the loss does not depend on the perturbation (no gradient reaches it). Plausible causes: the loss runs the "
    "model under torch.no_grad() or detaches the perturbed tensors; the embeddings perturbed are not the ones "
    "the loss uses (frozen, precomputed or cached embeddings); or an operation between them and the loss has no "
    "gradient (integer-only ops: argmax, rounding, quantized kernels other than torchao's linear layers)"
)


def check_delta_grads(grads: list[Tensor | None]) -> list[Tensor | None]:
    """``grads``, unless none of them reached its ``delta`` (then the attack could not move).

    Raises:
        RuntimeError: If every gradient is ``None``, with the plausible causes.

    Examples:
        >>> len(check_delta_grads([None, torch.zeros(2, 3)]))
        2
    """
    if grads and all(g is None for g in grads):
        raise RuntimeError(_NO_GRADIENT)
    return grads


def _delta_grads(loss: Tensor, deltas: list[Tensor]) -> list[Tensor | None]:
    if not loss.requires_grad:
        raise RuntimeError(_NO_GRADIENT)
    return check_delta_grads(list(torch.autograd.grad(loss, deltas, allow_unused=True)))


def _default_loss(model: nn.Module) -> Callable[[nn.Module, Any], Any]:
    if not callable(getattr(model, "training_step", None)):
        raise TypeError(f"{type(model).__name__} has no training_step: pass `loss_fn(model, batch) -> loss`")

    def loss_fn(module: nn.Module, batch: Any) -> Any:
        return module.training_step(batch, 0)  # type: ignore[operator]

    return loss_fn


def _require_grad(params: list[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)


def _detach(output: Any) -> Any:
    return apply_to_collection(output, Tensor, Tensor.detach)


def _device_of(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return param.device if param is not None else None
