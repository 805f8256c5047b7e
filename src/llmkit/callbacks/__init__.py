"""Callbacks that attach to any LightningModule.

- :class:`KnowledgeDistillation`: distil a frozen teacher into the module being trained.
- :class:`QuantizationAwareTraining`: fake-quantized fine-tuning with torchao, then conversion.
"""

from llmkit.callbacks.distillation import KnowledgeDistillation
from llmkit.callbacks.quantization import QuantizationAwareTraining

__all__ = ["KnowledgeDistillation", "QuantizationAwareTraining"]
