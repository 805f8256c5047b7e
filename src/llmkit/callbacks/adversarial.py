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
from llmkit._outputs import default_logits
from llmkit.adversarial import (
    AttackConfig,
    Perturbation,
    RNGReplay,
    attack,
    check_delta_grads,
    check_objective,
    check_target,
    frozen_norm_statistics,
    quiet_logging,
    resolve_steps,
    unwrap_loss,
)


class _AddGradients(torch.autograd.Function):
    """Returns ``value``; its backward gives each parameter a gradient already computed.

    How the gradients of passes run inside ``training_step`` (the clean pass, FreeLB's ascent
    passes) join the one backward Lightning runs on the returned loss: scaled by that backward's
    incoming gradient (loss scaling, gradient accumulation), reaching the parameters (and DDP's
    gradient hooks) through autograd like any other gradient.
    """

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: list[Tensor | None], unscale: float, *params: Tensor) -> Tensor:
        ctx.grads, ctx.unscale = grads, unscale
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Any:
        grads: list[Tensor | None] = list(ctx.grads)
        index = [i for i, g in enumerate(grads) if g is not None]
        if index:  # one multiplication per tensor, by the loss scale / accumulation factor
            present = [grads[i] for i in index]
            factor = grad_output.to(present[0].dtype) * ctx.unscale  # type: ignore[union-attr]
            for i, g in zip(index, torch._foreach_mul(present, factor), strict=True):  # type: ignore[arg-type]
                grads[i] = g
        return (None, None, None, *grads)


class AdversarialTraining(L.Callback):
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
        embeddings: names of the embedding modules to perturb (default: every ``nn.Embedding``).
        pad_id: token id never perturbed (default: each embedding's ``padding_idx``).
        inputs: keys or indices of the batch tensors to perturb (default: every float tensor).
        input_range: ``(low, high)`` the perturbed inputs are clamped to, e.g. ``(0.0, 1.0)`` for pixels.

    Raises:
        ValueError: If ``epsilon <= 0``, ``steps < 1``, ``adv_weight`` is outside (0, 1], the
            method, norm or target is unknown; at setup, if the model has no ``nn.Embedding``
            (``target="embeddings"``) or a named module is missing; at the first step, if the batch
            holds no floating-point tensor (``target="inputs"``).

    Example:
        >>> import lightning.pytorch as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> trainer = L.Trainer(max_steps=2, callbacks=[AdversarialTraining("pgd", epsilon=0.1, steps=2,
        ...                     target="inputs")], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(BoringModel())
        >>> sorted(k for k in trainer.callback_metrics if k.startswith("train_"))
        ['train_adv_loss', 'train_clean_loss']
    """

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
        embeddings: Sequence[str] | None = None,
        pad_id: int | None = None,
        inputs: Sequence[str | int] | None = None,
        input_range: tuple[float, float] | None = None,
    ) -> None:
        self.config = AttackConfig(method, epsilon, alpha, resolve_steps(method, steps, 3), norm, random_start)
        if isinstance(adv_weight, bool) or not 0.0 < adv_weight <= 1.0:
            raise ValueError(f"`adv_weight` must be in (0, 1], got {adv_weight!r}")
        check_target(target, input_range)
        self.target, self.adv_weight = target, float(adv_weight)
        self.embeddings, self.pad_id, self.inputs, self.input_range = embeddings, pad_id, inputs, input_range
        self._perturbation: Perturbation | None = None
        self._module: L.LightningModule | None = None
        self._original_training_step: Callable[..., Any] | None = None
        self._log = WindowedMeans(("train_clean_loss", "train_adv_loss"))

    # -----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AdversarialTraining needs automatic optimization: with `automatic_optimization = False` the module "
                "runs its own backward, which the callback cannot extend; use llmkit.adversarial.attack in it instead"
            )
        wrapper = getattr(vars(pl_module).get("training_step"), "__self__", None)
        if isinstance(wrapper, AdversarialTraining):
            wrapper._unwrap(pl_module)  # left wrapped by an interrupted fit
        # Wrap training_step on this instance, not the class: the module's code is unchanged.
        self._original_training_step = pl_module.training_step
        pl_module.training_step = self._training_step  # type: ignore[method-assign]
        self._module = pl_module
        if self.target == "embeddings":
            # Fails early (a model with no embedding); the hooks go on in on_fit_start, after
            # every callback's setup, since QuantizationAwareTraining may swap modules there.
            Perturbation(pl_module, self.target, embeddings=self.embeddings).remove()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._perturbation = Perturbation(
            pl_module, self.target, embeddings=self.embeddings, pad_id=self.pad_id, inputs=self.inputs,
            input_range=self.input_range,
        )

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwrap(pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # An interrupted fit does not tear down: leave the module as it was all the same.
        self._unwrap(pl_module)

    def _unwrap(self, pl_module: L.LightningModule) -> None:
        if self._perturbation is not None:
            self._perturbation.remove()
            self._perturbation = None
        if self._original_training_step is not None and "training_step" in vars(pl_module):
            delattr(pl_module, "training_step")
        self._original_training_step = None

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
    # The step

    def _training_step(self, *args: Any, **kwargs: Any) -> Any:
        original, module = self._original_training_step, self._module
        assert original is not None and module is not None
        perturbation = self._perturbation
        if perturbation is None or not _in_training_loop(module):
            # Called outside the fit's training loop: by an attack in validation, or by hand.
            return original(*args, **kwargs)
        config, w = self.config, self.adv_weight
        batch = args[0] if args else kwargs.pop("batch")
        rest = args[1:]
        rng = RNGReplay(module.device, random=config.starts_random)
        params = [p for p in module.parameters() if p.requires_grad]

        def run(*, fresh: bool = False) -> tuple[Tensor | None, Any]:
            rng.replay()
            # The module logs (and so shows) its clean pass; its other passes log nothing.
            with perturbation.applied(batch, fresh=fresh) as perturbed, (
                contextlib.nullcontext() if fresh else quiet_logging(module)
            ):
                output = original(perturbed, *rest, **kwargs)
            return unwrap_loss(output), output

        # Under fp16 loss scaling, the gradients taken here are of the scaled loss (else they
        # underflow), and divided back as they join Lightning's (scaled) backward.
        scaler = getattr(trainer.precision_plugin, "scaler", None) if (trainer := module._trainer) else None
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

        # Parameter gradients of passes before the last, weighted as in the objective.
        carried: list[Tensor | None] = [None] * len(params)

        def carry(loss: Tensor, weight: float, with_deltas: bool) -> list[Tensor | None]:
            wanted = (perturbation.deltas if with_deltas else []) + (params if weight > 0 else [])
            if not wanted:
                return []
            # The weight scales the loss, not each gradient: the deltas' steps do not depend on
            # their gradient's scale (normalised or signs), so one multiplication serves both.
            scaled = loss * (scale * weight if weight > 0 else scale)
            grads: list[Tensor | None] = list(torch.autograd.grad(scaled, wanted, allow_unused=True))
            delta_grads = check_delta_grads(grads[: len(perturbation.deltas)]) if with_deltas else []
            for i, g in enumerate(grads[len(delta_grads):]):
                if g is not None:
                    before = carried[i]
                    carried[i] = g if before is None else before + g
            return delta_grads

        # The clean pass: the clean term's gradient, and (without a random start) the first step's.
        # Not trained on (adv_weight=1), it changes no BatchNorm statistic; they are restored
        # after the backward that reads them.
        with contextlib.ExitStack() as clean_pass:
            if w == 1.0:
                clean_pass.enter_context(frozen_norm_statistics(module))
                if config.starts_random:
                    clean_pass.enter_context(torch.no_grad())
            clean, first_output = run(fresh=True)
            if clean is None:  # the module skipped this batch
                return first_output
            perturbation.check_sites(batch)
            grads = carry(clean, 1.0 - w, with_deltas=not config.starts_random)
        if config.starts_random:
            perturbation.random_start(config, rng.generator)
            with frozen_norm_statistics(module):
                loss, _ = run()
                assert loss is not None
                grads = carry(loss, 0.0, with_deltas=True)

        adv_terms: list[Tensor] = []
        freelb = config.method == "freelb"
        for _ in range(config.steps - 1):
            perturbation.step(grads, config, config.step_size)
            if freelb:  # FreeLB trains on every ascent step
                loss, _ = run()
                assert loss is not None
                adv_terms.append(loss.detach())
                grads = carry(loss, w / config.steps, with_deltas=True)
            else:  # PGD only on its last: the others are the attack's, and change no statistic
                with frozen_norm_statistics(module):
                    loss, _ = run()
                    assert loss is not None
                    grads = carry(loss, 0.0, with_deltas=True)
        perturbation.step(grads, config, config.step_size)
        for d in perturbation.deltas:
            d.requires_grad_(False)
        adv, output = run()
        assert adv is not None
        adv_weight = w / config.steps if freelb else w
        constant = (1.0 - w) * clean.detach() + adv_weight * sum(adv_terms, torch.zeros_like(adv.detach()))
        if any(g is not None for g in carried):
            injected = _AddGradients.apply(constant, carried, 1.0 / scale, *params)  # type: ignore[no-untyped-call]
            total = adv_weight * adv + injected
        else:
            total = adv_weight * adv + constant
        adv_mean = (sum(adv_terms, adv.detach()) / (len(adv_terms) + 1)) if freelb else adv.detach()
        self._log.update(module, {"train_clean_loss": clean.detach(), "train_adv_loss": adv_mean})
        perturbation.release()
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
        method, epsilon, alpha, steps, norm, random_start, target, embeddings, pad_id, inputs,
            input_range, loss_fn, forward_module: as :func:`llmkit.adversarial.attack`
            (default: PGD-10, l2, on the embeddings).
        objective: what the attack maximises, ``"margin"`` (wrong tokens; the default with
            ``accuracy``) or ``"loss"`` (the default without).
        accuracy: also log token accuracies; needs logits in the forward's output and targets in
            the batch (found as ``KnowledgeDistillation`` finds them, or ``target_fn``).
        ignore_index: target value that does not count (padding).
        logits_fn: picks the logits from the forward's output.
        target_fn: gives the targets from the batch.
        limit_batches: attack at most this many validation batches per epoch (``None``: all).
        prefix: prefix of the logged names.

    Example:
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
        embeddings: Sequence[str] | None = None,
        pad_id: int | None = None,
        inputs: Sequence[str | int] | None = None,
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

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Settings checked now, not at the first validation after an epoch of training.
        kwargs = self.attack_kwargs
        if kwargs["forward_module"]:
            pl_module.get_submodule(kwargs["forward_module"])
        if kwargs["target"] == "embeddings":
            Perturbation(pl_module, "embeddings", embeddings=kwargs["embeddings"]).remove()

    @override
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or (self.limit_batches is not None and batch_idx >= self.limit_batches):
            return
        result = attack(pl_module, batch, **self.attack_kwargs)
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


def _in_training_loop(module: L.LightningModule) -> bool:
    trainer = module._trainer
    return trainer is not None and bool(trainer.training)


def _batch_size(batch: Any) -> int | None:
    tensors: list[Tensor] = []
    if isinstance(batch, Tensor):
        tensors = [batch]
    elif isinstance(batch, Mapping):
        tensors = [v for v in batch.values() if isinstance(v, Tensor)]
    elif isinstance(batch, tuple | list):
        tensors = [v for v in batch if isinstance(v, Tensor)]
    return int(tensors[0].shape[0]) if tensors and tensors[0].ndim else None
