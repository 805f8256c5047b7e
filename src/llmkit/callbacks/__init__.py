"""Callbacks that attach to any LightningModule.

- :class:`KnowledgeDistillation`: distil a frozen teacher into the module being trained.
- :class:`QuantizationAwareTraining`: fake-quantized fine-tuning with torchao, then conversion.
- :class:`AdversarialTraining`: training on adversarially perturbed embeddings or inputs.
- :class:`RobustnessEvaluation`: loss and accuracy under attack, in validation.
- :class:`GenerationEvaluation`: decode part of the validation set, score it with text metrics, log examples.

They compose in any order of ``Trainer(callbacks=[...])``, with the same result: the callbacks
that change training attach to the module together, at the first ``setup("fit")``, in a fixed
order (quantization's layer swaps first, then distillation, then adversarial training), and unwind
in reverse at ``teardown`` or on an exception, leaving the module exactly as it was (but for
``QuantizationAwareTraining``'s fake-quantized or converted layers, its purpose).

- Fake quantization applies to every pass of every step (never to the teacher).
- ``AdversarialTraining`` runs the module's own ``training_step`` for each of its passes (clean,
  attack, adversarial) and mixes their losses: ``L_adv = (1 - w) clean + w adversarial``.
- ``KnowledgeDistillation``'s term is computed on the clean pass; the loss is
  ``(1 - alpha) * L + alpha * KD(clean)`` where ``L`` is ``L_adv`` with adversarial training, the
  module's own loss without. ``train_task_loss`` is the clean pass's loss whatever else runs.
"""

from llmkit.callbacks.adversarial import AdversarialTraining, RobustnessEvaluation
from llmkit.callbacks.distillation import KnowledgeDistillation
from llmkit.callbacks.generation import GenerationEvaluation
from llmkit.callbacks.quantization import QuantizationAwareTraining

__all__ = [
    "AdversarialTraining",
    "GenerationEvaluation",
    "KnowledgeDistillation",
    "QuantizationAwareTraining",
    "RobustnessEvaluation",
]
