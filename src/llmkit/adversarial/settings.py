"""What an attack does: :class:`AttackConfig`, the one place its settings are validated and defaulted."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from llmkit._checks import is_number

METHODS = ("fgm", "fgsm", "pgd", "freelb")
"""The attacks: one gradient step scaled to the ball (FGM), its sign (FGSM), ``steps`` projected steps (PGD), FreeLB."""
OBJECTIVES = ("loss", "margin")
"""What an attack maximises: the module's loss, or the margin of the best wrong token (wrong tokens)."""
NORMS = ("l2", "linf")
"""The perturbation's ball, per sample."""
TARGETS = ("embeddings", "inputs")
"""Where the perturbation is added: the outputs of the embedding layers, or the batch's float tensors."""


@dataclass(frozen=True)
class AttackConfig:
    """What to attack with; validated on creation (see :mod:`llmkit.adversarial` for the methods).

    Args:
        method: ``"fgm"``, ``"fgsm"``, ``"pgd"`` or ``"freelb"``.
        epsilon: radius of the perturbation ball, finite and ``> 0``.
        alpha: step size, finite and ``> 0`` (``None``: the method's default; unused by ``"fgm"``).
        steps: ascent steps, ``>= 1``, for ``"pgd"``/``"freelb"`` (``"fgm"``/``"fgsm"`` take 1).
        norm: ``"l2"`` or ``"linf"`` (``None``: ``"linf"`` for ``"fgsm"``, else ``"l2"``).
        random_start: start from a random point of the ball instead of zero (``None``: only
            ``"fgsm"`` does, as its paper requires; a random start costs one more forward and
            backward pass, since the clean pass can no longer give the first step's gradient).

    Raises:
        ValueError: If a setting is unknown or out of range (the message names the value).

    Examples:
        >>> config = AttackConfig("pgd", epsilon=0.5, steps=5)
        >>> config.p, config.step_size, config.starts_random
        ('l2', 0.25, False)
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
        # Not `> 0` alone: inf passes it, and an infinite ball turns the weights into NaN.
        if not is_number(self.epsilon) or not math.isfinite(self.epsilon) or not self.epsilon > 0:
            raise ValueError(f"`epsilon` must be a number > 0 and finite, got {self.epsilon!r}")
        if self.alpha is not None and (
            not is_number(self.alpha) or not math.isfinite(self.alpha) or not self.alpha > 0
        ):
            raise ValueError(f"`alpha` must be > 0 and finite (or None), got {self.alpha!r}")
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
    """``steps``, or where ``None``: 1 for the one-step methods (fgm, fgsm), else ``default``.

    Examples:
        >>> resolve_steps("fgm", None, 10), resolve_steps("pgd", None, 10), resolve_steps("pgd", 3, 10)
        (1, 10, 3)
    """
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
