"""How llmkit's callbacks change a user's module together: one stack, a fixed order, exact unwinding.

Every callback that changes training (:class:`ComposingCallback`) attaches through one
:class:`Composition` per module. At the first ``setup("fit")`` of any of them, the composition
attaches *all* of the Trainer's composing callbacks, sorted by their :attr:`~ComposingCallback.layer`
(not by their place in ``Trainer(callbacks=[...])``), so a fit does not depend on the list's order:

- layer 0, modules swapped (``QuantizationAwareTraining`` prepares its fake-quantized layers), so
  that every hook attached after it lands on the modules that will run; fake quantization then
  applies on every pass of every step;
- layer 10, ``KnowledgeDistillation``: the outermost wrapper of ``training_step``. Its term is
  computed on the *clean* pass; the loss it returns is ``(1 - alpha) * inner + alpha * kd``, where
  ``inner`` is whatever the layers below return;
- layer 20, ``AdversarialTraining``: runs the module's own ``training_step`` for each of its passes
  (clean, attack, adversarial) and combines their losses.

A layer that runs several passes (adversarial training) frees each pass's graph within the step;
an outer layer's term on the clean pass (distillation's) is therefore a *clean term*: registered
with :meth:`Composition.add_clean_term`, evaluated by the inner layer right after its clean pass,
its parameter gradients taken there and handed back (:attr:`Composition.clean_term_grads`) to
join Lightning's backward through :func:`add_gradients`. No graph outlives its pass, so later
passes may update BatchNorm statistics in place.

What a callback may change goes through the composition, which records it and undoes it in reverse
order at ``teardown`` or on an exception: one ``training_step`` attribute on the instance (the
wrappers, nested in layer order), forward and state-dict hooks, and submodules that train with the
module (kept out of its ``state_dict`` and checkpoints; the callback that owns them saves them in
its own state). After ``fit`` the module is exactly what it was before, except for what
``QuantizationAwareTraining`` does on purpose: its fake-quantized (or, after conversion,
quantized) layers stay.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from llmkit._compile import forget_compiled_graphs, several_backwards

CLEAN, ATTACK, ADVERSARIAL = "clean", "attack", "adversarial"
_ABSENT = object()

#: ``wrapper(inner, *args, **kwargs)``: one layer of ``training_step``; ``inner`` runs the layers below.
StepWrapper = Callable[..., Any]

class _Removable(Protocol):
    def remove(self) -> None: ...


_COMPOSITIONS: weakref.WeakKeyDictionary[nn.Module, Composition] = weakref.WeakKeyDictionary()


class ComposingCallback(L.Callback):
    """Base of the callbacks that change training; they attach and detach through a :class:`Composition`.

    Subclasses set :attr:`layer` and implement :meth:`_attach` (and, where they keep anything
    beyond what the composition records, :meth:`_detach`).
    """

    #: Where the callback sits in the stack: lower attaches first and wraps ``training_step`` outside.
    layer: ClassVar[int] = 50

    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, composition: Composition) -> None:
        """Change ``pl_module`` for this fit, through ``composition``."""

    def _detach(self, pl_module: L.LightningModule) -> None:
        """Forget what :meth:`_attach` kept; the composition undoes what it recorded."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            Composition.attach(trainer, pl_module, self)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            Composition.detach(pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # An interrupted fit does not tear down: leave the module as it was all the same.
        Composition.detach(pl_module)


class Composition:
    """The changes llmkit's callbacks made to one module during one fit, undone in reverse order.

    Callbacks reach it in :meth:`ComposingCallback._attach`; the current pass of a step
    (:attr:`pass_kind`) and what the module's own ``training_step`` returned on the clean pass
    (:attr:`clean_output`) are how the layers see each other.
    """

    def __init__(self, module: L.LightningModule, trainer: L.Trainer) -> None:
        # Weak, so that the registry (keyed weakly by the module) never keeps a module alive.
        self._module: weakref.ReferenceType[L.LightningModule] = weakref.ref(module)
        self.trainer: weakref.ReferenceType[L.Trainer] | None = weakref.ref(trainer)
        self.callbacks: list[ComposingCallback] = []
        #: ``"clean"``, ``"attack"`` or ``"adversarial"``: what the current call of the module's step is.
        self.pass_kind = CLEAN
        #: What the module's own ``training_step`` returned on this step's clean pass.
        self.clean_output: Any = None
        #: ``(gradients, scale, parameters)`` of the clean terms, where an inner layer took them within
        #: the step: one gradient (or ``None``) per parameter, of ``scale`` times the terms' sum.
        self.clean_term_grads: tuple[list[Tensor | None], Tensor | float, list[nn.Parameter]] | None = None
        self._clean_terms: list[Callable[[], Tensor | None]] = []
        self._wrappers: list[tuple[int, StepWrapper]] = []
        self._undo: list[Callable[[], None]] = []
        self._hidden: dict[str, nn.Module] = {}
        self._step: Callable[..., Any] | None = None

    # -----------------------------------------------------------------------------------------
    # Attaching and detaching a fit's callbacks

    @classmethod
    def attach(cls, trainer: L.Trainer, module: L.LightningModule, caller: ComposingCallback) -> Composition:
        """Attach every composing callback of ``trainer`` to ``module``, once per fit, in layer order."""
        existing = _COMPOSITIONS.get(module)
        if existing is not None:
            if existing.trainer is not None and existing.trainer() is trainer:
                return existing
            existing.undo()  # left attached by a fit that did not end (another Trainer's)
        composition = cls(module, trainer)
        _COMPOSITIONS[module] = composition
        callbacks = [c for c in trainer.callbacks if isinstance(c, ComposingCallback)]  # type: ignore[attr-defined]
        if caller not in callbacks:
            callbacks.append(caller)
        composition.callbacks = sorted(callbacks, key=lambda c: c.layer)  # stable: ties keep the list's order
        try:
            for callback in composition.callbacks:
                callback._attach(trainer, module, composition)
            composition._install_step()
        except BaseException:
            composition.undo()
            raise
        forget_compiled_graphs()  # hooks and layers changed: a compiled model must trace them
        return composition

    @classmethod
    def detach(cls, module: L.LightningModule) -> None:
        """Undo everything attached to ``module`` (nothing if nothing is)."""
        composition = _COMPOSITIONS.get(module)
        if composition is not None:
            composition.undo()

    @classmethod
    def of(cls, module: nn.Module) -> Composition | None:
        """The composition attached to ``module``, if any."""
        return _COMPOSITIONS.get(module)

    @property
    def module(self) -> L.LightningModule:
        """The module the callbacks are attached to."""
        module = self._module()
        if module is None:
            raise RuntimeError("the module of this composition no longer exists")
        return module

    @property
    def hidden_names(self) -> tuple[str, ...]:
        """Names of the submodules added for this fit (:meth:`add_submodule`)."""
        return tuple(self._hidden)

    def __getstate__(self) -> dict[str, Any]:
        # A module pickled or deep-copied mid-fit (torch.save, weight averaging) carries its wrappers;
        # weak references do not pickle: the copy belongs to no Trainer and holds its module strongly.
        state = dict(vars(self))
        state["_module"], state["trainer"] = self.module, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        module = state.pop("_module")
        vars(self).update(state)
        self._module = lambda: module  # type: ignore[assignment]

    def undo(self) -> None:
        """Detach the callbacks and undo every recorded change, last first."""
        module = self.module
        if _COMPOSITIONS.get(module) is self:
            del _COMPOSITIONS[module]
        errors: list[BaseException] = []
        for callback in reversed(self.callbacks):
            try:
                callback._detach(module)
            except Exception as error:  # keep unwinding; report the first failure after
                errors.append(error)
        while self._undo:
            self._undo.pop()()
        forget_compiled_graphs()  # no compiled graph may call a removed hook
        self.callbacks = []
        if errors:
            raise errors[0]

    # -----------------------------------------------------------------------------------------
    # What callbacks may change

    def wrap_step(self, layer: int, wrapper: StepWrapper) -> None:
        """Add a layer around the module's ``training_step`` (lower ``layer``: further outside)."""
        self._wrappers.append((layer, wrapper))

    def add_handle(self, handle: RemovableHandle | _Removable) -> None:
        """Remove ``handle`` (a hook's, or anything with ``remove()``: perturbation sites) when undone."""
        self._undo.append(handle.remove)

    def add_submodule(self, name: str, submodule: nn.Module) -> None:
        """Make ``submodule`` a child of the module for this fit (optimizer, DDP, device moves see it).

        It is kept out of the module's ``state_dict()`` (so checkpoints hold the user's weights
        only, and load into a fresh instance), tolerated as missing when a checkpoint is loaded,
        and removed when the composition is undone.

        Raises:
            ValueError: If the module already has an attribute ``name``.
        """
        module = self.module
        if hasattr(module, name):
            raise ValueError(f"{type(module).__name__} already has an attribute {name!r}")
        module.add_module(name, submodule)
        self._undo.append(functools.partial(_remove_submodule, module, name))
        if not self._hidden:
            drop, allow = functools.partial(_drop_hidden, self._hidden), functools.partial(_allow_hidden, self._hidden)
            self.add_handle(module.register_state_dict_post_hook(drop))  # type: ignore[no-untyped-call]
            self.add_handle(module.register_load_state_dict_post_hook(allow))  # type: ignore[no-untyped-call]
        self._hidden[name] = submodule

    def add_clean_term(self, term: Callable[[], Tensor | None]) -> None:
        """Register an outer layer's term on the clean pass (a 0-d tensor, already weighted, or ``None``).

        A layer that frees the clean pass's graph within the step calls :meth:`clean_terms` right
        after that pass; otherwise the outer layer computes its term after the layers below return.
        """
        self._clean_terms.append(term)

    @property
    def has_clean_terms(self) -> bool:
        """Whether an outer layer computes a term on the clean pass."""
        return bool(self._clean_terms)

    def clean_terms(self) -> Tensor | None:
        """The sum of the registered clean terms, evaluated now (``None`` if there is none)."""
        values = [value for term in self._clean_terms if (value := term()) is not None]
        return torch.stack(values).sum() if values else None

    @contextlib.contextmanager
    def pass_of(self, kind: str) -> Iterator[None]:
        """The calls of the module's step in the block are ``kind`` passes (``"attack"``, ...)."""
        before, self.pass_kind = self.pass_kind, kind
        try:
            yield
        finally:
            self.pass_kind = before

    # -----------------------------------------------------------------------------------------
    # The training_step attribute

    def _install_step(self) -> None:
        if not self._wrappers:
            return
        module = self.module
        before = vars(module).get("training_step", _ABSENT)
        original = module.training_step
        step: Callable[..., Any] = functools.partial(self._record, original)
        for _, wrapper in sorted(self._wrappers, key=lambda item: -item[0]):  # innermost first
            step = functools.partial(wrapper, step)
        self._step = step
        module.training_step = functools.partial(self._training_step, original)  # type: ignore[method-assign]
        self._undo.append(functools.partial(_restore_attribute, module, "training_step", before))

    def _training_step(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        trainer = self.module._trainer
        if self._step is None or trainer is None or not trainer.training:
            # Called outside the fit's training loop: by an attack in validation, or by hand.
            return original(*args, **kwargs)
        self.pass_kind, self.clean_output, self.clean_term_grads = CLEAN, None, None
        try:
            with several_backwards():  # a compiled module's passes may be differentiated twice
                return self._step(*args, **kwargs)
        finally:
            # Nothing of this step outlives it (the clean loss, the clean terms' gradients).
            self.clean_output = self.clean_term_grads = None

    def _record(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        if self.pass_kind == CLEAN and self.clean_output is None:
            self.clean_output = output
        return output


def _remove_submodule(module: nn.Module, name: str) -> None:
    module._modules.pop(name, None)


def _restore_attribute(module: nn.Module, name: str, before: Any) -> None:
    if before is _ABSENT:
        vars(module).pop(name, None)
    else:
        setattr(module, name, before)


def _drop_hidden(hidden: dict[str, nn.Module], module: nn.Module, state_dict: dict[str, Any], prefix: str,
                 local_metadata: Any) -> None:
    for key in [k for k in state_dict if k[len(prefix):].split(".", 1)[0] in hidden and k.startswith(prefix)]:
        del state_dict[key]


def _allow_hidden(hidden: dict[str, nn.Module], module: nn.Module, incompatible: Any) -> None:
    # Keys are relative to the module load_state_dict was called on (this one, or a parent).
    missing = incompatible.missing_keys
    missing[:] = [k for k in missing if not any(f".{name}." in f".{k}" for name in hidden)]


class _AddGradients(torch.autograd.Function):
    """Returns ``value``; its backward gives each parameter a gradient already computed."""

    @staticmethod
    def forward(
        ctx: Any, value: Tensor, grads: list[Tensor | None], unscale: Tensor | float, *params: Tensor
    ) -> Tensor:
        ctx.grads, ctx.unscale = grads, unscale
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Any:
        grads: list[Tensor | None] = list(ctx.grads)
        ctx.grads = None  # nothing of the step's gradients outlives this backward
        index = [i for i, g in enumerate(grads) if g is not None]
        if index:  # one multiplication per tensor, by the loss scale / accumulation factor
            present = [grads[i] for i in index]
            factor = grad_output.to(present[0].dtype) * ctx.unscale  # type: ignore[union-attr]
            for i, g in zip(index, torch._foreach_mul(present, factor), strict=True):  # type: ignore[arg-type]
                grads[i] = g
        return (None, None, None, *grads)


def add_gradients(
    value: Tensor, grads: list[Tensor | None], scale: Tensor | float, params: list[nn.Parameter]
) -> Tensor:
    """``value`` (detached); its backward adds ``grads / scale`` to ``params``, times its incoming gradient.

    How gradients computed inside ``training_step`` (of passes whose graphs are freed there) join
    the one backward Lightning runs on the returned loss: scaled by that backward's incoming
    gradient (loss scaling, gradient accumulation, the weights of outer layers), reaching the
    parameters (and DDP's gradient hooks) through autograd like any other gradient.

    Args:
        value: the 0-d value the gradients belong to.
        grads: one gradient (or ``None``) per parameter, of ``scale * value``.
        scale: what the gradients were taken at (a loss scale), divided back here.
        params: the parameters, in the order of ``grads``.
    """
    if not any(g is not None for g in grads):
        return value.detach()
    unscale = 1.0 / scale
    added: Tensor = _AddGradients.apply(value.detach(), grads, unscale, *params)  # type: ignore[no-untyped-call]
    return added
