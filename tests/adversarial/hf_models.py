"""Tiny Hugging Face models in a user's LightningModule (random weights from configs, nothing downloaded).

The fixture ``hf`` of ``conftest.py`` gives each of them with a batch.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, BATCH, SOURCE, TARGET = 64, 16, 2, 5, 4


class HFModule(L.LightningModule):
    """The user's module: ``training_step`` returns the HF model's loss; no ``forward``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


def t5() -> nn.Module:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
    ))


def bart() -> nn.Module:
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=WIDTH, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, decoder_start_token_id=2,
    ))


def bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    ))


BUILDERS = {"t5": t5, "bart": bart, "bert": bert}
# The token embeddings that defaults must pick, and the sites they give (encoder, then decoder).
TOKEN_EMBEDDINGS = {
    "t5": ["model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens"],
    "bart": ["model.model.shared", "model.model.encoder.embed_tokens", "model.model.decoder.embed_tokens"],
    "bert": ["model.bert.embeddings.word_embeddings"],
}
SITE_SHAPES = {
    "t5": [(BATCH, SOURCE, WIDTH), (BATCH, TARGET, WIDTH)],
    "bart": [(BATCH, SOURCE, WIDTH), (BATCH, TARGET, WIDTH)],
    "bert": [(BATCH, SOURCE, WIDTH)],
}


def hf_batch(kind: str) -> dict[str, torch.Tensor]:
    """A seeded batch of ids with no padding (labels per token for seq2seq, per sample for BERT)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, SOURCE), generator=generator)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 2])}
    return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (BATCH, TARGET), generator=generator)}

