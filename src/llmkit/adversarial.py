"""Adversarial perturbations of embeddings or inputs: FGM, FGSM, PGD and FreeLB.

The engine behind :class:`llmkit.callbacks.AdversarialTraining` and
:class:`llmkit.callbacks.RobustnessEvaluation`, and :func:`attack`, which measures a model's loss
and outputs under attack with its weights fixed.

A perturbation ``delta`` lives either on the outputs of the model's ``nn.Embedding`` modules
(``target="embeddings"``, token models; positions holding the padding id are never perturbed) or
on the floating-point tensors of the batch (``target="inputs"``, continuous models; clamped to
``input_range``). Norms are taken per sample (axis 0 of every perturbed tensor, all of a sample's
tensors together): ``"l2"`` bounds ``||delta||_2 <= epsilon``, ``"linf"`` bounds
``|delta_i| <= epsilon``.

Methods, with the gradient ``g`` of the loss with respect to ``delta``:

- ``"fgm"`` (Miyato et al., 2017): ``delta = epsilon * g / ||g||`` (l2) or ``epsilon * sign(g)`` (linf).
- ``"fgsm"`` (Wong et al., 2020, "Fast is better than free"): a random start in the epsilon ball,
  then one step of size ``alpha`` (default ``1.25 * epsilon``), projected back onto the ball.
- ``"pgd"`` (Madry et al., 2018): ``steps`` steps of size ``alpha`` (default
  ``2.5 * epsilon / steps``), each projected onto the ball.
- ``"freelb"`` (Zhu et al., 2020): PGD's ascent, with every ascent step's loss also trained on
  (its parameter gradients averaged), so the attack's backward passes are not wasted.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from llmkit._outputs import aligned_targets, default_logits

METHODS = ("fgm", "fgsm", "pgd", "freelb")
OBJECTIVES = ("loss", "margin")
NORMS = ("l2", "linf")
TARGETS = ("embeddings", "inputs")
_TINY = 1e-12


@dataclass(frozen=True)
class AttackConfig:
    """What to attack with; validated on creation (see the module docstring for the methods).

    Args:
        method: ``"fgm"``, ``"fgsm"``, ``"pgd"`` or ``"freelb"``.
        epsilon: radius of the perturbation ball, ``> 0``.
        alpha: step size (``None``: the method's default; unused by ``"fgm"``).
        steps: ascent steps, ``>= 1``, for ``"pgd"``/``"freelb"`` (``"fgm"``/``"fgsm"`` take 1).
        norm: ``"l2"`` or ``"linf"`` (``None``: ``"linf"`` for ``"fgsm"``, else ``"l2"``).
        random_start: start from a random point of the ball instead of zero (``None``: only
            ``"fgsm"`` does, as its paper requires; a random start costs one more forward and
            backward pass, since the clean pass can no longer give the first step's gradient).
    """

    method: str = "fgm"
    epsilon: float = 1.0
    alpha: float | None = None
    steps: int = 1
    norm: str | None = None
    random_start: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            hint = difflib.get_close_matches(str(self.method), METHODS, n=1)
            raise ValueError(
                f"unknown adversarial method {self.method!r}; choose one of {METHODS}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, int | float) or not self.epsilon > 0:
            raise ValueError(f"`epsilon` must be a number > 0, got {self.epsilon!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not self.alpha > 0):
            raise ValueError(f"`alpha` must be > 0, got {self.alpha!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"`steps` must be an integer >= 1, got {self.steps!r}")
        if self.method in ("fgm", "fgsm") and self.steps != 1:
            raise ValueError(f"{self.method!r} takes one step; got steps={self.steps} (use 'pgd' for several)")
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")

    @property
    def p(self) -> str:
        """The norm in use."""
        return self.norm or ("linf" if self.method == "fgsm" else "l2")

    @property
    def step_size(self) -> float:
        """The step size in use."""
        if self.method == "fgm":
            return float(self.epsilon)
        if self.alpha is not None:
            return float(self.alpha)
        if self.method == "fgsm":
            return 1.25 * self.epsilon
        return 2.5 * self.epsilon / self.steps

    @property
    def starts_random(self) -> bool:
        """Whether the attack starts from a random point of the ball."""
        return self.method == "fgsm" if self.random_start is None else bool(self.random_start)


def resolve_steps(method: str, steps: int | None, default: int) -> int:
    """``steps``, or where ``None``: 1 for the one-step methods (fgm, fgsm), else ``default``."""
    if steps is not None:
        return steps
    return 1 if method in ("fgm", "fgsm") else default


def check_target(target: str, input_range: tuple[float, float] | None = None) -> None:
    """Raise ``ValueError`` for an unknown ``target`` or an empty ``input_range``."""
    if target not in TARGETS:
        raise ValueError(f"unknown adversarial target {target!r}; choose one of {TARGETS}")
    if input_range is not None and not (len(input_range) == 2 and input_range[0] < input_range[1]):
        raise ValueError(f"`input_range` must be (low, high) with low < high, got {input_range!r}")


def check_objective(objective: str) -> None:
    """Raise ``ValueError`` for an unknown attack objective."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown attack objective {objective!r}; choose one of {OBJECTIVES}")


# ---------------------------------------------------------------------------------------------
# Where the perturbation goes


class Perturbation:
    """Adds ``delta`` to a model's embedding outputs or a batch's float tensors during an attack.

    ``target="embeddings"`` registers a forward hook on each embedding that is inactive outside an
    attack pass. Each pass records the perturbed tensors in call order (an embedding shared by
    encoder and decoder, or called twice, is two sites), creating zero ``delta``s on the first
    pass. Call :meth:`remove` to take the hooks off.

    Args:
        model: the module whose embeddings are perturbed (``target="embeddings"``).
        target: ``"embeddings"`` or ``"inputs"``.
        embeddings: names of the ``nn.Embedding`` submodules to perturb (``None``: all of them).
        pad_id: token id never perturbed (``None``: each embedding's ``padding_idx``).
        inputs: keys or indices of the batch's tensors to perturb (``None``: every floating-point
            tensor of the batch).
        input_range: ``(low, high)`` that perturbed inputs are clamped to (``None``: unbounded).
    """

    def __init__(
        self,
        model: nn.Module,
        target: str = "embeddings",
        *,
        embeddings: Sequence[str] | None = None,
        pad_id: int | None = None,
        inputs: Sequence[str | int] | None = None,
        input_range: tuple[float, float] | None = None,
    ) -> None:
        check_target(target, input_range)
        self.target, self.pad_id, self.input_keys, self.input_range = target, pad_id, inputs, input_range
        self.deltas: list[Tensor] = []
        self.masks: list[Tensor | None] = []
        self.bases: list[Tensor] = []
        self._active = False
        self._calls = 0
        self._handles: list[RemovableHandle] = []
        if target == "embeddings":
            for module in _embeddings(model, embeddings):
                self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def applied(self, batch: Any, *, fresh: bool = False) -> Iterator[Any]:
        """Within the block, the model's embeddings (or the yielded batch) carry the current ``delta``s.

        ``fresh=True`` starts from zero ``delta``s that require grad, recording the sites.
        """
        if fresh:
            self.deltas, self.masks, self.bases = [], [], []
        self._fresh, self._calls, self._active = fresh, 0, True
        try:
            yield self._perturb_batch(batch) if self.target == "inputs" else batch
        finally:
            self._active = False
        if self._calls != len(self.deltas):
            raise RuntimeError(
                f"the adversarial pass perturbed {self._calls} {self.target} sites, the clean pass {len(self.deltas)}; "
                "the model must embed the same inputs on every pass"
            )

    def check_sites(self, batch: Any) -> None:
        """After a fresh pass whose loss was not skipped: it perturbed something, one sample per row.

        Raises:
            RuntimeError: If no embedding ran (the loss does not go through the embeddings).
            ValueError: If ``target="inputs"`` found no floating-point tensor in ``batch``, or the
                perturbed tensors disagree on their first (batch) axis, as a learned position
                embedding ``[1, T, D]`` or ``[T, D]`` does beside token embeddings ``[B, T, D]``.
        """
        if not self.deltas:
            if self.target == "embeddings":
                raise RuntimeError("no embedding ran in this pass: the loss does not go through the embeddings")
            raise ValueError(self._no_float_input(batch))
        sizes = [tuple(d.shape) for d in self.deltas]
        if len({size[0] if size else None for size in sizes}) != 1 or not all(sizes):
            raise ValueError(
                f"the perturbed {self.target} have different first (batch) axes: {sizes}; budgets are per sample, so "
                + ("name the token embeddings with `embeddings=[...]` (position embeddings have no batch axis)"
                   if self.target == "embeddings" else "name the per-sample inputs with `inputs=[...]`")
            )

    def release(self) -> None:
        """Drop the last attack's tensors (between steps)."""
        self.deltas, self.masks, self.bases = [], [], []

    # -- embeddings --------------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
        if not self._active:
            return None
        ids = args[0] if args else kwargs.get("input")
        return self._site(output, self._pad_mask(module, ids, output))

    def _pad_mask(self, module: nn.Module, ids: Any, output: Tensor) -> Tensor | None:
        pad = self.pad_id if self.pad_id is not None else getattr(module, "padding_idx", None)
        if pad is None or not isinstance(ids, Tensor) or ids.shape != output.shape[:-1]:
            return None
        return (ids != pad).unsqueeze(-1).to(output.dtype)

    # -- inputs ------------------------------------------------------------------------------

    def _perturb_batch(self, batch: Any) -> Any:
        if isinstance(batch, Tensor):
            if not batch.is_floating_point():
                return batch  # nothing to perturb: check_sites says so
            if self.input_keys not in (None, [0], (0,)):
                raise ValueError(f"the batch is one tensor; `inputs` must be None (or [0]), got {self.input_keys!r}")
            return self._input_site(batch)
        if self.input_keys is None:
            return apply_to_collection(batch, Tensor, lambda t: self._input_site(t) if t.is_floating_point() else t)
        perturbed: Any = dict(batch) if isinstance(batch, Mapping) else list(batch)
        fields = getattr(batch, "_fields", ())
        for key in self.input_keys:
            if isinstance(key, str) and key in fields:
                key = fields.index(key)  # a named tuple's field
            try:
                value = perturbed[key]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"the batch has no input {key!r} to perturb") from None
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"the batch's {key!r} is not a floating-point tensor, so it cannot be perturbed")
            perturbed[key] = self._input_site(value)
        if isinstance(batch, Mapping):
            return perturbed if type(batch) is dict else _rebuild_mapping(batch, perturbed)
        if isinstance(batch, list):
            return perturbed
        return type(batch)(*perturbed) if hasattr(batch, "_fields") else type(batch)(perturbed)

    def _input_site(self, tensor: Tensor) -> Tensor:
        out = self._site(tensor, None)
        if self.input_range is not None:
            out = out.clamp(*self.input_range)
        return out

    def _no_float_input(self, batch: Any) -> str:
        return (
            f"target='inputs' found no floating-point tensor to perturb in a batch of type {type(batch).__name__}; "
            "token ids call for target='embeddings'"
        )

    # -- shared ------------------------------------------------------------------------------

    def _site(self, base: Tensor, mask: Tensor | None) -> Tensor:
        index = self._calls
        self._calls += 1
        if self._fresh:
            self.deltas.append(torch.zeros_like(base, requires_grad=True))
            self.masks.append(mask)
            self.bases.append(base.detach())
        elif index >= len(self.deltas) or self.deltas[index].shape != base.shape:
            raise RuntimeError(
                f"the {self.target} site {index} has shape {tuple(base.shape)} on this pass, unlike the clean pass; "
                "the model must embed the same inputs on every pass"
            )
        delta, mask = self.deltas[index], self.masks[index]
        if mask is not None:
            delta = delta * mask
        return base + delta.to(base.dtype)

    # -- steps on the ball -------------------------------------------------------------------

    def random_start(self, config: AttackConfig, generator: torch.Generator | None = None) -> None:
        """Set ``delta`` to a random point of the epsilon ball (masked at padding).

        linf: uniform in the cube; l2: a random direction at a radius uniform in ``[0, epsilon]``.
        """
        eps = config.epsilon
        with torch.no_grad():
            draws = [
                (2 * torch.rand(d.shape, generator=generator, device=d.device, dtype=d.dtype) - 1) * eps
                for d in self.deltas
            ]
            draws = self._masked(draws)
            if config.p == "l2":
                # A random direction, at a radius uniform in [0, epsilon].
                norms = _sample_norms(draws)
                radius = eps * torch.rand(norms.shape, generator=generator, device=norms.device)
                draws = [d * _expand(radius / norms.clamp_min(_TINY), d) for d in draws]
            self._set(draws)

    def step(self, grads: Sequence[Tensor | None], config: AttackConfig, size: float) -> None:
        """``delta <- project(delta + size * direction(grads))`` onto the ball (and the input range)."""
        with torch.no_grad():
            pairs = zip(self.deltas, grads, strict=True)
            g = [torch.zeros_like(d) if gr is None else gr.to(d.dtype) for d, gr in pairs]
            g = self._masked(g)
            if config.p == "l2":
                norms = _sample_norms(g).clamp_min(_TINY)
                moved = [d + size * gr / _expand(norms, gr) for d, gr in zip(self.deltas, g, strict=True)]
                norms = _sample_norms(moved)
                factor = (config.epsilon / norms.clamp_min(_TINY)).clamp(max=1.0)
                moved = [m * _expand(factor, m) for m in moved]
            else:
                eps = config.epsilon
                moved = [(d + size * gr.sign()).clamp(-eps, eps) for d, gr in zip(self.deltas, g, strict=True)]
            if self.target == "inputs" and self.input_range is not None:
                low, high = self.input_range
                moved = [(b + m).clamp(low, high) - b for b, m in zip(self.bases, moved, strict=True)]
            self._set(moved)

    def _masked(self, tensors: list[Tensor]) -> list[Tensor]:
        return [t if m is None else t * m for t, m in zip(tensors, self.masks, strict=True)]

    def _set(self, values: list[Tensor]) -> None:
        self.deltas = [v.detach().requires_grad_(True) for v in values]


def _rebuild_mapping(batch: Mapping[Any, Any], values: dict[Any, Any]) -> Any:
    try:
        return type(batch)(values)  # type: ignore[call-arg]
    except TypeError:
        return values


def _sample_norms(tensors: Sequence[Tensor]) -> Tensor:
    """The l2 norm of each sample (axis 0) over all ``tensors`` (checked to share axis 0)."""
    return torch.stack([t.float().pow(2).flatten(1).sum(1) for t in tensors]).sum(0).sqrt()


def _expand(per_sample: Tensor, like: Tensor) -> Tensor:
    return per_sample.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _embeddings(model: nn.Module, names: Sequence[str] | None) -> list[nn.Module]:
    if names is None:
        found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no nn.Embedding to perturb; use target='inputs' for continuous inputs, "
                "or name the embedding modules"
            )
        # One hook per module, even when it is reachable under two names (shared embeddings).
        return list(dict.fromkeys(found))
    modules = dict(model.named_modules())
    chosen = []
    for name in names:
        if name not in modules:
            embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
            hint = difflib.get_close_matches(name, embeddings, n=1, cutoff=0.3) or embeddings[:1]
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"{type(model).__name__} has no module named {name!r}{suggestion}")
        chosen.append(modules[name])
    return list(dict.fromkeys(chosen))


# ---------------------------------------------------------------------------------------------
# Keeping the model as it was


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics are as before the block, whatever passes ran in it."""
    saved = [
        (m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for key, value in buffers.items():
                    getattr(module, key).copy_(value)


class RNGReplay:
    """Replays the random number generator's state from its creation before each pass.

    So that every pass of one attack draws the same dropout masks: the perturbation is the only
    difference between them. The attack's own draws (a random start) come from :attr:`generator`,
    seeded from the global generator at creation, so that replaying does not repeat them from
    step to step.
    """

    def __init__(self, device: torch.device | None, *, random: bool = False) -> None:
        device = device or torch.device("cpu")
        self.generator: torch.Generator | None = None
        if random:
            self.generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,))))
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None

    def replay(self) -> None:
        """Restore the state captured at creation."""
        torch.set_rng_state(self.cpu)
        if self.device is not None and self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@contextlib.contextmanager
def quiet_logging(model: nn.Module) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing in the block (a training_step called to score an attack)."""
    names = [n for n in ("log", "log_dict") if hasattr(model, n)]
    for name in names:
        setattr(model, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name in names:
            delattr(model, name)


def unwrap_loss(output: Any) -> Tensor | None:
    """The loss in what a ``training_step`` returns: the tensor itself, or the ``"loss"`` entry."""
    if output is None:
        return None
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise TypeError(f"the loss must be a tensor or a dict with 'loss', got {type(output).__name__}")
    return loss


# ---------------------------------------------------------------------------------------------
# Inference-time attacks


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
    """

    loss: Tensor
    clean_loss: Tensor
    output: Any
    clean_output: Any
    perturbation: list[Tensor]

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
        (``labels``/``target``/``tgt``/``y`` or the last item; ``tgt[:, 1:]`` for teacher forcing).
        """
        output = self.clean_output if clean else self.output
        if output is None:
            raise RuntimeError("the attacked loss did not call the model's forward, so no outputs were captured")
        logits = logits_fn(output)
        target = aligned_targets(batch, logits, target_fn)
        keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
        correct = ((logits.argmax(-1) == target) & keep).sum()
        return correct, keep.sum()


def _default_loss(model: nn.Module) -> Callable[[nn.Module, Any], Any]:
    if not callable(getattr(model, "training_step", None)):
        raise TypeError(f"{type(model).__name__} has no training_step: pass `loss_fn(model, batch) -> loss`")

    def loss_fn(module: nn.Module, batch: Any) -> Any:
        return module.training_step(batch, 0)  # type: ignore[operator]

    return loss_fn


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
    embeddings: Sequence[str] | None = None,
    pad_id: int | None = None,
    inputs: Sequence[str | int] | None = None,
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

    Args:
        model: any module; a LightningModule's ``training_step(batch, 0)`` is the default loss.
        batch: the batch, as the loss takes it.
        method: ``"fgm"``, ``"fgsm"``, ``"pgd"`` or ``"freelb"`` (see :class:`AttackConfig`).
        epsilon: radius of the perturbation ball, ``> 0``.
        alpha: step size (``None``: the method's default).
        steps: ascent steps (``None``: 10 for ``pgd``/``freelb``, 1 for ``fgm``/``fgsm``).
        norm: ``"l2"`` or ``"linf"`` (``None``: linf for fgsm, else l2).
        random_start: start from a random point of the ball (``None``: fgsm only).
        target: ``"embeddings"`` or ``"inputs"``.
        embeddings: names of the embedding modules to perturb (``None``: every ``nn.Embedding``).
        pad_id: token id never perturbed (``None``: each embedding's ``padding_idx``).
        inputs: keys or indices of the batch tensors to perturb (``None``: every float tensor).
        input_range: ``(low, high)`` that perturbed inputs are clamped to.
        loss_fn: ``loss_fn(model, batch)`` returns the loss (or a dict with ``"loss"``) to maximise.
        forward_module: the submodule whose forward output is returned (``None``: the model's).
        objective: what the attack maximises: ``"loss"``, the loss itself; or ``"margin"``, the
            number of wrong tokens, through :func:`margin_loss` of the forward's logits and the
            batch's targets (found as :meth:`AttackResult.accuracy` finds them). A loss-maximising
            attack can pour its budget into a few tokens; the margin attack is the one to measure
            robust accuracy with.
        logits_fn: picks the logits from the forward's output (``objective="margin"``).
        target_fn: gives the targets from the batch (``objective="margin"``; default: found).
        ignore_index: target value that does not count, e.g. padding (``objective="margin"``).

    Returns:
        :class:`AttackResult`: ``loss``/``clean_loss`` 0-d, ``output``/``clean_output`` as the
        forward returns them (e.g. logits ``[B, T, V]``), ``perturbation`` one ``delta`` per site
        (e.g. ``[B, S, D]`` and ``[B, T, D]`` for a translator's two embeddings).

    Example:
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
    probe = model.get_submodule(forward_module) if forward_module else model
    perturbation = Perturbation(model, target, embeddings=embeddings, pad_id=pad_id, inputs=inputs,
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
            # Weights fixed: no parameter gradient is computed, none is left behind.
            for p in params:
                p.requires_grad_(False)
            stack.callback(_require_grad, params)
            batch = apply_to_collection(batch, Tensor, lambda t: t.clone() if t.is_inference() else t)
            rng = RNGReplay(_device_of(model), random=config.starts_random)

            def run(fresh: bool = False) -> tuple[Tensor, Tensor, Any]:
                """(the objective, the loss, the forward's output) at the current ``delta``."""
                rng.replay()
                outputs.clear()
                with perturbation.applied(batch, fresh=fresh) as perturbed:
                    loss = unwrap_loss(loss_fn(model, perturbed))
                if loss is None:
                    raise ValueError("the loss function returned None for this batch")
                output = outputs[0] if outputs else None
                if objective == "loss":
                    return loss, loss, output
                if output is None:
                    raise RuntimeError("objective='margin' needs the logits, but the loss did not call the forward")
                logits = logits_fn(output)
                return margin_loss(logits, aligned_targets(batch, logits, target_fn), ignore_index), loss, output

            if config.starts_random:
                with torch.no_grad():
                    _, clean_loss, clean_output = run(fresh=True)
                perturbation.check_sites(batch)
                perturbation.random_start(config, rng.generator)
                goal, _, _ = run()
            else:
                goal, clean_loss, clean_output = run(fresh=True)
                perturbation.check_sites(batch)
            for index in range(config.steps):
                grads = _delta_grads(goal, perturbation.deltas)
                perturbation.step(grads, config, config.step_size)
                with torch.no_grad() if index == config.steps - 1 else contextlib.nullcontext():
                    goal, loss, output = run()
    finally:
        handle.remove()
        perturbation.remove()
    final = [(d if m is None else d * m).detach() for d, m in zip(perturbation.deltas, perturbation.masks, strict=True)]
    return AttackResult(loss.detach(), clean_loss.detach(), _detach(output), _detach(clean_output), final)


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
    """
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = target.masked_fill(~keep, 0).unsqueeze(-1)
    true = logits.gather(-1, safe).squeeze(-1)
    other = logits.scatter(-1, safe, float("-inf")).amax(-1)
    margins = (true - other).clamp(min=0).masked_fill(~keep, 0.0)
    return -margins.sum() / keep.sum().clamp_min(1)


def _require_grad(params: list[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)


_NO_GRADIENT = (
    "the loss does not depend on the perturbation (no gradient reaches it): does the loss run the perturbed "
    "model, with its embeddings outside torch.no_grad()?"
)


def _delta_grads(loss: Tensor, deltas: list[Tensor]) -> list[Tensor | None]:
    if not loss.requires_grad:
        raise RuntimeError(_NO_GRADIENT)
    return check_delta_grads(list(torch.autograd.grad(loss, deltas, allow_unused=True)))


def check_delta_grads(grads: list[Tensor | None]) -> list[Tensor | None]:
    """``grads``, unless none of them reached its ``delta`` (then the attack could not move)."""
    if grads and all(g is None for g in grads):
        raise RuntimeError(_NO_GRADIENT)
    return grads


def _detach(output: Any) -> Any:
    return apply_to_collection(output, Tensor, Tensor.detach)


def _device_of(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return param.device if param is not None else None
