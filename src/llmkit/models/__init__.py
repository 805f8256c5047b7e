"""llmkit's LightningModules, to use as they are or to subclass."""

from llmkit.models.causal_lm import CausalLMTransformer
from llmkit.models.seq2seq import Seq2SeqTransformer
from llmkit.models.vae import VAE

__all__ = ["VAE", "CausalLMTransformer", "Seq2SeqTransformer"]
