"""AdversarialTraining and RobustnessEvaluation: attacks on embeddings or inputs, for any LightningModule."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from llmkit._logging import WindowedMeans
from llmkit._outputs import default_logits, forward_module_name
from llmkit.adversarial import (
    AttackConfig,
    Perturbation,
    RNGReplay,
    attack,
    check_delta_grads,
    check_objective,
    check_target,
    frozen_norm_statistics,
    make_perturbation,
    quiet_logging,
    resolve_steps,
    unwrap_loss,
)
from llmkit.callbacks._composition import ADVERSARIAL, ATTACK, CLEAN, ComposingCallback, Composition, add_gradients


class AdversarialTraining(ComposingCallback):
    r"""Train any LightningModule on adversarially perturbed embeddings or inputs, with no change to its code.

    ``callbacks=[AdversarialTraining("fgm", epsilon=1.0)]`` on a Trainer: the module's own
    ``training_step`` computes the loss on every pass; the callback runs it clean, then attacks
    (see :mod:`llmkit.adversarial` for the methods), and returns

    .. math:: (1 - w)\, \mathcal{L}(x) + w\, \mathcal{L}(x + \delta^*)

    (for ``"freelb"``, the adversarial term is the mean over its ascent steps) as the loss of one
    optimizer step, under Lightning's automatic optimisation. The gradients of passes other than
    the last (the clean one; FreeLB's ascent steps) are computed in the step and join Lightning's
    backward, so each pass costs one forward and one backward: FGM about 2x a plain step, PGD-k
    and FreeLB-k about (k + 1)x.

    With other llmkit callbacks, in any order in the Trainer's list (see :mod:`llmkit.callbacks`):
    every pass runs the module's own ``training_step`` (fake-quantized under
    ``QuantizationAwareTraining``); ``KnowledgeDistillation`` wraps the mix above, its term
    computed on the clean pass (and differentiated right after it, with the clean term's).

    Every pass of a step draws the same dropout masks; BatchNorm statistics change only on passes
    that are trained on; parameters' ``.grad`` is untouched until Lightning's backward; the model
    stays in training mode. The module's ``self.log`` calls count its clean pass only (so its
    ``train_loss`` is the clean loss); other side effects of its ``training_step`` (a torchmetrics
    ``update``) happen on every pass. Under fp16 loss scaling the in-step gradients are taken of
    the scaled loss. Logs ``train_clean_loss`` and ``train_adv_loss``.

    Args:
        method: ``"fgm"``, ``"fgsm"``, ``"pgd"`` or ``"freelb"``.
        epsilon: radius of the perturbation ball, ``> 0`` (per sample; for embeddings, compare
            with the norm of a sample's embedding outputs).
        alpha: step size (default: ``1.25 epsilon`` for fgsm, ``2.5 epsilon / steps`` for pgd/freelb).
        steps: ascent steps, for ``"pgd"`` and ``"freelb"``.
        norm: ``"l2"`` or ``"linf"`` (default ``"linf"`` for fgsm, ``"l2"`` otherwise).
        target: ``"embeddings"`` (outputs of the model's ``nn.Embedding`` modules, not at padding
            positions) or ``"inputs"`` (the batch's floating-point tensors).
        adv_weight: ``w`` above, in ``(0, 1]``; 1 trains on adversarial samples only (Madry et al.).
        random_start: start the attack from a random point of the ball (default: fgsm only; it
            costs one more pass).
        embeddings: name(s) of the embedding modules to perturb (default: a Hugging Face model's
            token embeddings, else every ``nn.Embedding``).
        pad_id: token id never perturbed (default: each embedding's ``padding_idx``).
        inputs: keys or indices of the batch tensors to perturb (default: every float tensor).
        input_range: ``(low, high)`` the perturbed inputs are clamped to, e.g. ``(0.0, 1.0)`` for pixels.

    Raises:
        ValueError: If ``epsilon <= 0``, ``steps < 1``, ``adv_weight`` is outside (0, 1], the
            method, norm or target is unknown; at setup, if the model has no ``nn.Embedding``
            (``target="embeddings"``) or a named module is missing; at the first step, if the batch
            holds no floating-point tensor (``target="inputs"``).

    Examples:
        >>> import lightning.pytorch as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> trainer = L.Trainer(max_steps=2, callbacks=[AdversarialTraining("pgd", epsilon=0.1, steps=2,
        ...                     target="inputs")], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(BoringModel())
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("train_"))
        ['train_adv_loss', 'train_clean_loss']
    """

    layer = 20

    def __init__(
        self,
        method: str = "fgm",
        epsilon: float = 1.0,
        alpha: float | None = None,
        steps: int | None = None,
        norm: str | None = None,
        target: str = "embeddings",
        adv_weight: float = 0.5,
        random_start: bool | None = None,
        embeddings: str | Sequence[str] | None = None,
        pad_id: int | None = None,
        inputs: str | int | Sequence[str | int] | None = None,
        input_range: tuple[float, float] | None = None,
    ) -> None:
        self.config = AttackConfig(method, epsilon, alpha, resolve_steps(method, steps, 3), norm, random_start)
        if isinstance(adv_weight, bool) or not 0.0 < adv_weight <= 1.0:
            raise ValueError(f"`adv_weight` must be in (0, 1], got {adv_weight!r}")
        check_target(target, input_range)
        self.target, self.adv_weight = target, float(adv_weight)
        self.embeddings, self.pad_id, self.inputs, self.input_range = embeddings, pad_id, inputs, input_range
        self._perturbation: Perturbation | None = None
        self._composition: Composition | None = None
        self._log = WindowedMeans(("train_clean_loss", "train_adv_loss"))

    # -----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def state_dict(self) -> dict[str, Any]:
        c = self.config
        return {"method": c.method, "epsilon": c.epsilon, "alpha": c.step_size, "steps": c.steps, "norm": c.p,
                "adv_weight": self.adv_weight}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        now = self.state_dict()
        changed = [f"{k}={now[k]!r} (saved {v!r})" for k, v in state_dict.items() if k in now and now[k] != v]
        if changed:
            rank_zero_warn(f"AdversarialTraining resumes with other settings: {', '.join(changed)}")

    # -----------------------------------------------------------------------------------------
    # Attaching to the module

    @override
    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, composition: Composition) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AdversarialTraining needs automatic optimization: with `automatic_optimization = False` the module "
                "runs its own backward, which the callback cannot extend; use llmkit.adversarial.attack in it instead"
            )
        # After QuantizationAwareTraining's swaps (an earlier layer): the hooks land on the modules that run.
        self._perturbation = make_perturbation(
            pl_module, self.target, embeddings=self.embeddings, pad_id=self.pad_id, inputs=self.inputs,
            input_range=self.input_range,
        )
        composition.add_handle(self._perturbation)  # its hooks come off with the rest
        self._composition = composition
        composition.wrap_step(self.layer, self._training_step)

    @override
    def _detach(self, pl_module: L.LightningModule) -> None:
        self._perturbation = self._composition = None

    def _training_step(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self._perturbation is not None and self._composition is not None
        return _AdversarialStep(self, self._perturbation, self._composition, inner, args, kwargs).run()


class _AdversarialStep:
    """One optimizer step of adversarial training, in named phases.

    :meth:`clean_pass` (the clean loss, its parameter gradients and the first ascent direction),
    :meth:`random_start` (where the method starts inside the ball), :meth:`ascend` (the attack's
    steps; FreeLB trains on each), :meth:`final_pass` (the adversarial loss, left to Lightning's
    backward) and :meth:`combine` (the loss returned, carrying the in-step gradients).
    """

    def __init__(
        self, callback: AdversarialTraining, perturbation: Perturbation, composition: Composition,
        inner: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> None:
        self.config, self.w, self.log = callback.config, callback.adv_weight, callback._log
        self.perturbation, self.composition, self.inner = perturbation, composition, inner
        module = self.module = composition.module
        kwargs = dict(kwargs)
        self.batch = args[0] if args else kwargs.pop("batch")
        self.rest, self.kwargs = args[1:], kwargs
        self.rng = RNGReplay(module.device, random=self.config.starts_random)
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Under fp16 loss scaling, the gradients taken here are of the scaled loss (else they
        # underflow), and divided back as they join Lightning's (scaled) backward. The scale stays
        # a tensor on the device: no host sync.
        trainer = module._trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        self.scale: Tensor | float = 1.0
        if scaler is not None and scaler.is_enabled():
            self.scale = scaler.scale(torch.ones((), device=module.device))
        # Parameter gradients of passes before the last, weighted as in the objective.
        self.carried: list[Tensor | None] = [None] * len(self.params)
        self.delta_grads: list[Tensor | None] = []
        self.adv_terms: list[Tensor] = []

    def run(self) -> Any:
        """The step: what ``training_step`` returns to Lightning."""
        clean, first_output = self.clean_pass()
        if clean is None:  # the module skipped this batch
            return first_output
        if self.config.starts_random:
            self.random_start()
        self.ascend()
        adv, output = self.final_pass()
        return self.combine(clean, adv, output)

    # -- the passes ----------------------------------------------------------------------------

    def _pass(self, kind: str, *, fresh: bool = False) -> tuple[Tensor | None, Any]:
        """The module's own step on the current perturbation; it logs its clean pass only."""
        self.rng.replay()
        with self.perturbation.applied(self.batch, fresh=fresh) as perturbed, self.composition.pass_of(kind), (
            contextlib.nullcontext() if kind == CLEAN else quiet_logging(self.module)
        ):
            output = self.inner(perturbed, *self.rest, **self.kwargs)
        return unwrap_loss(output), output

    def _carry(self, loss: Tensor, weight: float, *, with_deltas: bool, retain: bool = False) -> None:
        """Take ``weight * loss``'s parameter gradients into :attr:`carried`, and the deltas' gradients."""
        deltas = self.perturbation.deltas if with_deltas else []
        wanted = deltas + (self.params if weight > 0 else [])
        if not wanted:
            self.delta_grads = []
            return
        # The weight scales the loss, not each gradient: the deltas' steps do not depend on their
        # gradient's scale (normalised or signs), so one multiplication serves both.
        scaled = loss * self.scale * (weight if weight > 0 else 1.0)
        grads: list[Tensor | None] = list(torch.autograd.grad(scaled, wanted, allow_unused=True, retain_graph=retain))
        self.delta_grads = check_delta_grads(grads[: len(deltas)]) if with_deltas else []
        for i, g in enumerate(grads[len(deltas):]):
            if g is not None:
                before = self.carried[i]
                self.carried[i] = g if before is None else before + g

    def clean_pass(self) -> tuple[Tensor | None, Any]:
        """The clean loss; its gradient (weight ``1 - w``) and, without a random start, the first step's.

        Not trained on (``adv_weight=1``), it changes no BatchNorm statistic. The outer layers'
        terms on the clean pass (distillation's) are evaluated here and their gradients taken
        too, for them to add: no graph of this pass outlives it.
        """
        config, w, composition = self.config, self.w, self.composition
        terms = composition.has_clean_terms
        with contextlib.ExitStack() as stack:
            if w == 1.0:
                stack.enter_context(frozen_norm_statistics(self.module))
                if config.starts_random and not terms:
                    stack.enter_context(torch.no_grad())
            clean, output = self._pass(CLEAN, fresh=True)
            if clean is None:
                return None, output
            self.perturbation.check_sites(self.batch)
            extra = composition.clean_terms() if terms else None
            if clean.requires_grad:
                self._carry(clean, 1.0 - w, with_deltas=not config.starts_random, retain=extra is not None)
            if extra is not None and extra.requires_grad:
                grads = torch.autograd.grad(extra * self.scale, self.params, allow_unused=True)
                composition.clean_term_grads = (list(grads), self.scale, self.params)
        return clean, output

    def random_start(self) -> None:
        """Start from a random point of the ball; the attack's pass there gives the first step's direction."""
        self.perturbation.random_start(self.config, self.rng.generator)
        with frozen_norm_statistics(self.module):
            loss, _ = self._pass(ATTACK)
            assert loss is not None
            self._carry(loss, 0.0, with_deltas=True)

    def ascend(self) -> None:
        """The attack's steps before the last; FreeLB trains on each, PGD's change no statistic."""
        config = self.config
        for _ in range(config.steps - 1):
            self.perturbation.step(self.delta_grads, config, config.step_size)
            if config.method == "freelb":
                loss, _ = self._pass(ADVERSARIAL)
                assert loss is not None
                self.adv_terms.append(loss.detach())
                self._carry(loss, self.w / config.steps, with_deltas=True)
            else:
                with frozen_norm_statistics(self.module):
                    loss, _ = self._pass(ATTACK)
                    assert loss is not None
                    self._carry(loss, 0.0, with_deltas=True)

    def final_pass(self) -> tuple[Tensor, Any]:
        """The last step, then the adversarial loss, whose backward is Lightning's."""
        self.perturbation.step(self.delta_grads, self.config, self.config.step_size)
        for d in self.perturbation.deltas:
            d.requires_grad_(False)
        adv, output = self._pass(ADVERSARIAL)
        assert adv is not None
        return adv, output

    def combine(self, clean: Tensor, adv: Tensor, output: Any) -> Any:
        """``(1 - w) clean + w adv`` (FreeLB: ``w`` times the mean over its steps), carrying the in-step gradients."""
        w, freelb = self.w, self.config.method == "freelb"
        adv_weight = w / self.config.steps if freelb else w
        constant = (1.0 - w) * clean.detach() + adv_weight * sum(self.adv_terms, torch.zeros_like(adv.detach()))
        total = adv_weight * adv + add_gradients(constant, self.carried, self.scale, self.params)
        adv_mean = (sum(self.adv_terms, adv.detach()) / (len(self.adv_terms) + 1)) if freelb else adv.detach()
        self.log.update(self.module, {"train_clean_loss": clean.detach(), "train_adv_loss": adv_mean})
        self.perturbation.release()
        if isinstance(output, Mapping):
            return {**output, "loss": total}
        return total


class RobustnessEvaluation(L.Callback):
    """Report the loss and token accuracy under attack in validation, despite Lightning's ``inference_mode``.

    After each validation batch (up to ``limit_batches`` per epoch), runs
    :func:`llmkit.adversarial.attack` with the module's weights fixed and logs ``val_robust_loss``
    (the module's loss at the attack's perturbation) and ``val_robust_acc`` (and ``val_clean_acc``
    on the same tokens), as epoch means weighted by samples/tokens and synced across processes.
    Lightning runs validation under ``torch.inference_mode()``, in which no gradient can be taken
    (Lightning issue #13948); the attack leaves it for its own passes and works on copies of the
    batch's tensors, so ``Trainer(inference_mode=True)`` (the default) is fine.

    Args:
        method: the attack, and ``epsilon``, ``alpha``, ``steps``, ``norm``, ``random_start``, ``target``,
            ``embeddings``, ``pad_id``, ``inputs``, ``input_range``, ``loss_fn``, ``forward_module``
            its settings, all as in :func:`llmkit.adversarial.attack` (default: PGD-10, l2, on the embeddings).
        objective: what the attack maximises, ``"margin"`` (wrong tokens; the default with
            ``accuracy``) or ``"loss"`` (the default without).
        accuracy: also log token accuracies; needs logits in the forward's output and targets in
            the batch (found as ``KnowledgeDistillation`` finds them, or ``target_fn``).
        ignore_index: target value that does not count (padding).
        logits_fn: picks the logits from the forward's output.
        target_fn: gives the targets from the batch.
        limit_batches: attack at most this many validation batches per epoch (``None``: all).
        prefix: prefix of the logged names.

    Examples:
        >>> import lightning.pytorch as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> robust = RobustnessEvaluation(epsilon=0.1, steps=2, target="inputs", accuracy=False,
        ...                               loss_fn=lambda model, batch: model(batch).sum())
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=2, callbacks=[robust],
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> trainer.fit(BoringModel())
        >>> "val_robust_loss" in trainer.callback_metrics
        True
    """

    def __init__(
        self,
        method: str = "pgd",
        epsilon: float = 1.0,
        alpha: float | None = None,
        steps: int | None = None,
        norm: str | None = None,
        random_start: bool | None = None,
        target: str = "embeddings",
        embeddings: str | Sequence[str] | None = None,
        pad_id: int | None = None,
        inputs: str | int | Sequence[str | int] | None = None,
        input_range: tuple[float, float] | None = None,
        loss_fn: Callable[[nn.Module, Any], Any] | None = None,
        forward_module: str | None = None,
        objective: str | None = None,
        accuracy: bool = True,
        ignore_index: int | None = None,
        logits_fn: Callable[[Any], Tensor] = default_logits,
        target_fn: Callable[[Any], Tensor] | None = None,
        limit_batches: int | None = None,
        prefix: str = "val_",
    ) -> None:
        steps = resolve_steps(method, steps, 10)
        AttackConfig(method, epsilon, alpha, steps, norm, random_start)  # validates now, not in validation
        check_target(target, input_range)
        objective = objective or ("margin" if accuracy else "loss")
        check_objective(objective)
        if objective == "margin" and not accuracy:
            raise ValueError("objective='margin' attacks the accuracy, which accuracy=False does not measure")
        if limit_batches is not None and (isinstance(limit_batches, bool) or limit_batches < 1):
            raise ValueError(f"`limit_batches` must be None or >= 1, got {limit_batches!r}")
        self.attack_kwargs: dict[str, Any] = dict(
            method=method, epsilon=epsilon, alpha=alpha, steps=steps, norm=norm, random_start=random_start,
            target=target, embeddings=embeddings, pad_id=pad_id, inputs=inputs, input_range=input_range,
            loss_fn=loss_fn, forward_module=forward_module, objective=objective, logits_fn=logits_fn,
            target_fn=target_fn, ignore_index=ignore_index,
        )
        self.accuracy, self.ignore_index, self.logits_fn, self.target_fn = accuracy, ignore_index, logits_fn, target_fn
        self.limit_batches, self.prefix = limit_batches, prefix
        self._forward_name: str | None = forward_module

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Settings checked now, not at the first validation after an epoch of training.
        kwargs = self.attack_kwargs
        if self.accuracy or kwargs["forward_module"]:
            # The logits come from this module's forward (found as KnowledgeDistillation finds it).
            composition = Composition.of(pl_module)  # its submodules (distillation's projections) do not count
            exclude = composition.hidden_names if composition is not None else ()
            self._forward_name = forward_module_name(
                pl_module, kwargs["forward_module"], role="module", exclude=exclude
            ) or None
        if kwargs["target"] == "embeddings":
            make_perturbation(pl_module, "embeddings", embeddings=kwargs["embeddings"]).remove()

    @override
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or (self.limit_batches is not None and batch_idx >= self.limit_batches):
            return
        result = attack(pl_module, batch, **{**self.attack_kwargs, "forward_module": self._forward_name})
        size = _batch_size(batch)
        pl_module.log(f"{self.prefix}robust_loss", result.loss, on_step=False, on_epoch=True, sync_dist=True,
                      batch_size=size)
        if not self.accuracy:
            return
        for clean in (False, True):
            correct, counted = result.accuracy(
                batch, logits_fn=self.logits_fn, target_fn=self.target_fn, ignore_index=self.ignore_index,
                clean=clean,
            )
            name = f"{self.prefix}{'clean' if clean else 'robust'}_acc"
            pl_module.log(name, correct.float() / counted.clamp_min(1), on_step=False, on_epoch=True, sync_dist=True,
                          batch_size=int(counted))


def _batch_size(batch: Any) -> int | None:
    tensors: list[Tensor] = []
    if isinstance(batch, Tensor):
        tensors = [batch]
    elif isinstance(batch, Mapping):
        tensors = [v for v in batch.values() if isinstance(v, Tensor)]
    elif isinstance(batch, tuple | list):
        tensors = [v for v in batch if isinstance(v, Tensor)]
    return int(tensors[0].shape[0]) if tensors and tensors[0].ndim else None
