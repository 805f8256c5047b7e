"""Callbacks that attach to any LightningModule.

- :class:`KnowledgeDistillation`: distil a frozen teacher into the module being trained.
"""

from llmkit.callbacks.distillation import KnowledgeDistillation

__all__ = ["KnowledgeDistillation"]
