"""Adversarial perturbations of embeddings or inputs: FGM, FGSM, PGD and FreeLB.

The engine behind :class:`llmkit.callbacks.AdversarialTraining` and
:class:`llmkit.callbacks.RobustnessEvaluation`, and :func:`attack`, which measures a model's loss
and outputs under attack with its weights fixed.

A perturbation ``delta`` lives either on the outputs of the model's embedding modules
(``target="embeddings"``, token models; positions holding the padding id are never perturbed;
for a Hugging Face model, its token embeddings only) or on the floating-point tensors of the
batch (``target="inputs"``, continuous models; clamped to ``input_range``). Norms are taken per
sample (axis 0 of every perturbed tensor, all of a sample's tensors together): ``"l2"`` bounds
``||delta||_2 <= epsilon``, ``"linf"`` bounds ``|delta_i| <= epsilon``.

Methods, with the gradient ``g`` of the loss with respect to ``delta``:

- ``"fgm"`` (Miyato et al., 2017): ``delta = epsilon * g / ||g||`` (l2) or ``epsilon * sign(g)`` (linf).
- ``"fgsm"`` (Wong et al., 2020, "Fast is better than free"): a random start in the epsilon ball,
  then one step of size ``alpha`` (default ``1.25 * epsilon``), projected back onto the ball.
- ``"pgd"`` (Madry et al., 2018): ``steps`` steps of size ``alpha`` (default
  ``2.5 * epsilon / steps``), each projected onto the ball.
- ``"freelb"`` (Zhu et al., 2020): PGD's ascent, with every ascent step's loss also trained on
  (its parameter gradients averaged), so the attack's backward passes are not wasted.

The parts: :mod:`~llmkit.adversarial.settings` (:class:`AttackConfig`),
:mod:`~llmkit.adversarial.geometry` (the ball), :mod:`~llmkit.adversarial.sites` (where
``delta`` goes), :mod:`~llmkit.adversarial.isolation` (passes that leave the model as it was),
:mod:`~llmkit.adversarial.quantized` (gradients through quantized layers) and
:mod:`~llmkit.adversarial.attacks` (:func:`attack`).
"""

from llmkit._outputs import unwrap_loss
from llmkit.adversarial.attacks import AttackResult, attack, check_delta_grads, margin_loss
from llmkit.adversarial.isolation import RNGReplay, frozen_norm_statistics, quiet_logging
from llmkit.adversarial.quantized import straight_through_quantized
from llmkit.adversarial.settings import (
    METHODS,
    NORMS,
    OBJECTIVES,
    TARGETS,
    AttackConfig,
    check_objective,
    check_target,
    resolve_steps,
)
from llmkit.adversarial.sites import (
    EmbeddingPerturbation,
    InputPerturbation,
    Perturbation,
    find_embeddings,
    make_perturbation,
)

__all__ = [
    "METHODS",
    "NORMS",
    "OBJECTIVES",
    "TARGETS",
    "AttackConfig",
    "AttackResult",
    "EmbeddingPerturbation",
    "InputPerturbation",
    "Perturbation",
    "RNGReplay",
    "attack",
    "check_delta_grads",
    "check_objective",
    "check_target",
    "find_embeddings",
    "frozen_norm_statistics",
    "make_perturbation",
    "margin_loss",
    "quiet_logging",
    "resolve_steps",
    "straight_through_quantized",
    "unwrap_loss",
]
