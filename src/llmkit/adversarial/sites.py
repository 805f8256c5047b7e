"""Where a perturbation goes: one small class per kind of site, behind one interface.

:class:`EmbeddingPerturbation` adds ``delta`` to the outputs of a model's embedding modules
(through forward hooks); :class:`InputPerturbation` to the floating-point tensors of the batch.
Each pass of an attack runs inside :meth:`Perturbation.applied` and records its sites in call
order (an embedding called twice, or shared by encoder and decoder, is two sites); the first,
``fresh`` pass creates zero ``delta``s, the later ones must perturb the same sites.
"""

from __future__ import annotations

import abc
import contextlib
import difflib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from llmkit._compile import eager, forget_compiled_graphs
from llmkit.adversarial import geometry
from llmkit.adversarial.settings import AttackConfig, check_target


class Perturbation(abc.ABC):
    """Adds ``delta`` to some tensors of an attacked pass; the abstract interface the attacks use.

    Subclasses say how a pass reaches its sites (:meth:`_prepare`), and what to say when there
    are none or they disagree on the batch axis; :func:`make_perturbation` builds the one for a
    ``target``.

    Attributes:
        deltas: one ``delta`` per site, in call order, ``[B, ...]`` each (as the site's tensor).
        masks: one mask per site (0 where the site never moves, e.g. padding) or ``None``.
        bases: the sites' unperturbed tensors of the fresh pass (detached).
        site_names: what each site is (a module's name, a batch key), for error messages.
        target: ``"embeddings"`` or ``"inputs"``.
    """

    target: ClassVar[str]

    def __init__(self) -> None:
        self.deltas: list[Tensor] = []
        self.masks: list[Tensor | None] = []
        self.bases: list[Tensor] = []
        self.site_names: list[str] = []
        self._active = False
        self._fresh = False
        self._calls = 0

    @contextlib.contextmanager
    def applied(self, batch: Any, *, fresh: bool = False) -> Iterator[Any]:
        """Within the block, the sites carry the current ``delta``s; yields the batch to run.

        ``fresh=True`` starts from zero ``delta``s that require grad, recording the sites.

        Raises:
            RuntimeError: If the pass perturbed other sites than the fresh pass did.
        """
        if fresh:
            self.release()
        self._fresh, self._calls, self._active = fresh, 0, True
        try:
            yield self._prepare(batch)
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
            raise self._no_sites(batch)
        sizes = [tuple(d.shape) for d in self.deltas]
        if len({size[0] if size else None for size in sizes}) != 1 or not all(sizes):
            names = ", ".join(repr(name) for name in dict.fromkeys(self.site_names))
            raise ValueError(
                f"the perturbed {self.target} have different first (batch) axes: {sizes}, from {names}; "
                f"budgets are per sample, so {self._batch_axis_hint()}"
            )

    def release(self) -> None:
        """Drop the last attack's tensors (between steps)."""
        self.deltas, self.masks, self.bases, self.site_names = [], [], [], []

    def remove(self) -> None:  # noqa: B027 (most sites hold no hook: nothing to take off)
        """Take any hooks off the model."""

    def random_start(self, config: AttackConfig, generator: torch.Generator | None = None) -> None:
        """Set ``delta`` to a random point of the epsilon ball (masked; see :func:`geometry.random_start`)."""
        start = geometry.random_start(self.deltas, epsilon=config.epsilon, norm=config.p, masks=self.masks,
                                      generator=generator)
        self._set(start)

    def step(self, grads: Sequence[Tensor | None], config: AttackConfig, size: float) -> None:
        """``delta <- project(delta + size * direction(grads))`` onto the ball (and the site's own bounds)."""
        moved = geometry.ascent_step(self.deltas, grads, size=size, epsilon=config.epsilon, norm=config.p,
                                     masks=self.masks)
        self._set(self._constrain(moved))

    # -- for the subclasses --------------------------------------------------------------------

    @abc.abstractmethod
    def _prepare(self, batch: Any) -> Any:
        """The batch that the pass runs on."""

    @abc.abstractmethod
    def _no_sites(self, batch: Any) -> Exception:
        """The error for a fresh pass that perturbed nothing."""

    @abc.abstractmethod
    def _batch_axis_hint(self) -> str:
        """How to choose sites that share a batch axis."""

    def _constrain(self, deltas: list[Tensor]) -> list[Tensor]:
        """The site's own bounds on ``delta``, beyond the ball's."""
        return deltas

    def _site(self, base: Tensor, mask: Tensor | None, name: str) -> Tensor:
        """``base + delta`` of the next site (created, zero, on a fresh pass)."""
        index = self._calls
        self._calls += 1
        if self._fresh:
            self.deltas.append(torch.zeros_like(base, requires_grad=True))
            self.masks.append(mask)
            self.bases.append(base.detach())
            self.site_names.append(name)
        elif index >= len(self.deltas) or self.deltas[index].shape != base.shape:
            raise RuntimeError(
                f"the {self.target} site {index} ({name!r}) has shape {tuple(base.shape)} on this pass, unlike the "
                "clean pass; the model must embed the same inputs on every pass"
            )
        delta, mask = self.deltas[index], self.masks[index]
        if mask is not None:
            delta = delta * mask
        return base + delta.to(base.dtype)

    def _set(self, values: list[Tensor]) -> None:
        self.deltas = [v.detach().requires_grad_(True) for v in values]


class EmbeddingPerturbation(Perturbation):
    """Perturbs the outputs of a model's embedding modules; positions holding ``pad_id`` never move.

    Forward hooks, inactive outside :meth:`applied`, stay on the modules until :meth:`remove`.

    Args:
        model: the module whose embeddings are perturbed.
        embeddings: names of the submodules to perturb, or one name (``None``: see
            :func:`find_embeddings`).
        pad_id: token id never perturbed (``None``: each embedding's ``padding_idx``, or the
            ``pad_token_id`` of the Hugging Face model's config for embeddings without one, as T5's).

    Attributes:
        modules: the hooked modules by name.
    """

    target = "embeddings"

    def __init__(self, model: nn.Module, *, embeddings: str | Sequence[str] | None = None,
                 pad_id: int | None = None) -> None:
        super().__init__()
        self.pad_id, self._config_pad = pad_id, _config_pad_id(model)
        self.modules = find_embeddings(model, embeddings)
        self._names = {module: name for name, module in self.modules.items()}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._hook, with_kwargs=True) for module in self.modules.values()
        ]
        forget_compiled_graphs()  # a compiled model must call the new hooks

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        if self._handles:
            forget_compiled_graphs()  # and no compiled graph may call them after
        self._handles.clear()

    # Eager even inside a compiled model (a graph break at each embedding): the hook creates the
    # perturbations as leaf tensors that the attack differentiates to, which a graph cannot hold.
    @eager
    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
        if not self._active:
            return None
        ids = args[0] if args else kwargs.get("input")
        return self._site(output, self._pad_mask(module, ids, output), self._names[module])

    def _pad_mask(self, module: nn.Module, ids: Any, output: Tensor) -> Tensor | None:
        pad = self.pad_id
        if pad is None:
            pad = getattr(module, "padding_idx", None)
            pad = self._config_pad if pad is None else pad
        if pad is None or not isinstance(ids, Tensor) or ids.shape != output.shape[:-1]:
            return None
        return (ids != pad).unsqueeze(-1).to(output.dtype)

    def _prepare(self, batch: Any) -> Any:
        return batch  # the hooks do the work

    def _no_sites(self, batch: Any) -> Exception:
        return RuntimeError("no embedding ran in this pass: the loss does not go through the embeddings")

    def _batch_axis_hint(self) -> str:
        # The token embeddings are likely the sites of most axes ([B, T, D] beside [T, D]) that
        # share the first such site's batch size.
        rank = max(d.ndim for d in self.deltas)
        first = next(d.shape[0] for d in self.deltas if d.ndim == rank)
        sites = zip(self.site_names, self.deltas, strict=True)
        tokens = [name for name, d in sites if d.ndim == rank and d.shape[0] == first]
        return (
            f"name the token embeddings with `embeddings={list(dict.fromkeys(tokens))!r}` "
            "(position embeddings and attention biases have no batch axis)"
        )


class InputPerturbation(Perturbation):
    """Perturbs the batch's floating-point tensors, clamped to ``input_range``.

    Args:
        inputs: keys or indices of the batch's tensors to perturb, or one key (``None``: every
            floating-point tensor of the batch).
        input_range: ``(low, high)`` that perturbed inputs are clamped to (``None``: unbounded).

    Raises:
        ValueError: If ``input_range`` is not ``(low, high)`` with ``low < high``.
    """

    target = "inputs"

    def __init__(self, *, inputs: str | int | Sequence[str | int] | None = None,
                 input_range: tuple[float, float] | None = None) -> None:
        check_target(self.target, input_range)
        super().__init__()
        self.input_keys: list[str | int] | None = [inputs] if isinstance(inputs, str | int) else (
            None if inputs is None else list(inputs))
        self.input_range = input_range

    def _prepare(self, batch: Any) -> Any:
        if isinstance(batch, Tensor):
            if not batch.is_floating_point():
                return batch  # nothing to perturb: check_sites says so
            if self.input_keys not in (None, [0]):
                raise ValueError(f"the batch is one tensor; `inputs` must be None (or [0]), got {self.input_keys!r}")
            return self._input_site(batch, "batch")
        if self.input_keys is None:
            count = itertools.count()

            def site(t: Tensor) -> Tensor:
                return self._input_site(t, f"float tensor #{next(count)}") if t.is_floating_point() else t

            return apply_to_collection(batch, Tensor, site)
        perturbed: Any = dict(batch) if isinstance(batch, Mapping) else list(batch)
        fields = getattr(batch, "_fields", ())
        for name in self.input_keys:
            key = fields.index(name) if isinstance(name, str) and name in fields else name  # a named tuple's field
            try:
                value = perturbed[key]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"the batch has no input {name!r} to perturb") from None
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"the batch's {name!r} is not a floating-point tensor, so it cannot be perturbed")
            perturbed[key] = self._input_site(value, str(name))
        if isinstance(batch, Mapping):
            return perturbed if type(batch) is dict else _rebuild_mapping(batch, perturbed)
        if isinstance(batch, list):
            return perturbed
        return type(batch)(*perturbed) if hasattr(batch, "_fields") else type(batch)(perturbed)

    def _input_site(self, tensor: Tensor, name: str) -> Tensor:
        out = self._site(tensor, None, name)
        if self.input_range is not None:
            out = out.clamp(*self.input_range)
        return out

    def _constrain(self, deltas: list[Tensor]) -> list[Tensor]:
        if self.input_range is None:
            return deltas
        return geometry.clamp_to_range(self.bases, deltas, *self.input_range)

    def _no_sites(self, batch: Any) -> Exception:
        return ValueError(
            f"target='inputs' found no floating-point tensor to perturb in a batch of type {type(batch).__name__}; "
            "token ids call for target='embeddings'"
        )

    def _batch_axis_hint(self) -> str:
        return "name the per-sample inputs with `inputs=[...]`"


def make_perturbation(
    model: nn.Module,
    target: str = "embeddings",
    *,
    embeddings: str | Sequence[str] | None = None,
    pad_id: int | None = None,
    inputs: str | int | Sequence[str | int] | None = None,
    input_range: tuple[float, float] | None = None,
) -> Perturbation:
    """The perturbation of ``target``: of ``model``'s embeddings, or of the batch's inputs.

    Args:
        model: the attacked module (its embeddings get hooks for ``target="embeddings"``).
        target: ``"embeddings"`` or ``"inputs"``.
        embeddings: as :class:`EmbeddingPerturbation` (``target="embeddings"``).
        pad_id: as :class:`EmbeddingPerturbation`.
        inputs: as :class:`InputPerturbation` (``target="inputs"``).
        input_range: as :class:`InputPerturbation`.

    Raises:
        ValueError: For an unknown ``target``, a bad ``input_range``, or embeddings not found.

    Examples:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> sites = make_perturbation(model, "embeddings", pad_id=0)
        >>> type(sites).__name__, list(sites.modules)
        ('EmbeddingPerturbation', ['0'])
        >>> sites.remove()
    """
    check_target(target, input_range)
    if target == "embeddings":
        return EmbeddingPerturbation(model, embeddings=embeddings, pad_id=pad_id)
    return InputPerturbation(inputs=inputs, input_range=input_range)


def find_embeddings(model: nn.Module, names: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The embedding modules to perturb, by name.

    ``names`` given (one name or several): those submodules. ``None``: where the model holds a
    Hugging Face model (a submodule with ``get_input_embeddings()``), its token embedding and
    every ``nn.Embedding`` sharing its ``weight`` (T5's encoder and decoder ``embed_tokens``),
    but no position embedding or attention bias; otherwise every ``nn.Embedding``. A module
    reachable under two names appears once.

    Raises:
        ValueError: If a name is not a submodule (with the closest embedding's name), or
            ``names=None`` finds no embedding.

    Examples:
        >>> model = nn.ModuleDict({"tokens": nn.Embedding(10, 4), "positions": nn.Embedding(5, 4)})
        >>> list(find_embeddings(model)), list(find_embeddings(model, "tokens"))
        (['tokens', 'positions'], ['tokens'])
    """
    modules = dict(model.named_modules())
    if names is None:
        chosen = _token_embeddings(model)
        if chosen is None:
            chosen = [m for m in modules.values() if isinstance(m, nn.Embedding)]
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no nn.Embedding to perturb; use target='inputs' for continuous inputs, "
                "or name the embedding modules"
            )
        return {name: module for name, module in modules.items() if any(module is c for c in chosen)}
    found: dict[str, nn.Module] = {}
    for name in [names] if isinstance(names, str) else names:
        if name not in modules:
            embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
            hint = difflib.get_close_matches(name, embeddings, n=1, cutoff=0.3) or embeddings[:1]
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"{type(model).__name__} has no module named {name!r}{suggestion}")
        if all(modules[name] is not m for m in found.values()):
            found[name] = modules[name]
    return found


def _token_embeddings(model: nn.Module) -> list[nn.Module] | None:
    """The token embeddings of the Hugging Face models in ``model`` (``None``: it holds none)."""
    tokens: list[nn.Module] = []
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            found = getter()
        except (NotImplementedError, AttributeError):  # a base class without embeddings
            continue
        if isinstance(found, nn.Module):
            tokens.append(found)
    if not tokens:
        return None
    # Tied copies (T5's encoder/decoder embed_tokens share `shared.weight`) are the same table.
    weights = [w for m in tokens if isinstance(w := getattr(m, "weight", None), Tensor)]
    tied = [m for m in model.modules() if isinstance(m, nn.Embedding) and any(m.weight is w for w in weights)]
    return tokens + tied


def _config_pad_id(model: nn.Module) -> int | None:
    """The ``pad_token_id`` of the (first) Hugging Face model in ``model``, if it has one."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if callable(getattr(module, "get_input_embeddings", None)) and config is not None:
            pad = getattr(config, "pad_token_id", None)
            return pad if isinstance(pad, int) else None
    return None


def _rebuild_mapping(batch: Mapping[Any, Any], values: dict[Any, Any]) -> Any:
    try:
        return type(batch)(values)  # type: ignore[call-arg]
    except TypeError:
        return values
