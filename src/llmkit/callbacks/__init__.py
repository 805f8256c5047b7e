"""Callbacks that attach to any LightningModule.

- :class:`KnowledgeDistillation`: distil a frozen teacher into the module being trained.
- :class:`QuantizationAwareTraining`: fake-quantized fine-tuning with torchao, then conversion.
- :class:`AdversarialTraining`: training on adversarially perturbed embeddings or inputs.
- :class:`RobustnessEvaluation`: loss and accuracy under attack, in validation.
"""

from llmkit.callbacks.adversarial import AdversarialTraining, RobustnessEvaluation
from llmkit.callbacks.distillation import KnowledgeDistillation
from llmkit.callbacks.quantization import QuantizationAwareTraining

__all__ = ["AdversarialTraining", "KnowledgeDistillation", "QuantizationAwareTraining", "RobustnessEvaluation"]
