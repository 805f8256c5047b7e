"""llmkit's LightningModules, to use as they are or to subclass."""

from llmkit.models.seq2seq import Seq2SeqTransformer

__all__ = ["Seq2SeqTransformer"]
