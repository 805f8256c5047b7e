"""Run by ``torchrun --nproc_per_node 2``: a fit with every callback under ``strategy="ddp"``.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/callbacks/ddp_fit.py OUT_DIR``;
each rank writes ``OUT_DIR/rank{r}.json`` with its losses and the converted model's logits.
"""

from __future__ import annotations

import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from llmkit.callbacks import AdversarialTraining, KnowledgeDistillation, QuantizationAwareTraining
from tests.callbacks.helpers import RecordLosses, seq2seq_batch, trainer, translator


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student, teacher = translator(d_model=32), translator(d_model=64)
    callbacks = [
        AdversarialTraining("pgd", epsilon=0.5, steps=2),
        QuantizationAwareTraining(),
        KnowledgeDistillation(teacher, ignore_index=0),
    ]
    record = RecordLosses()
    fit = trainer(max_steps=2, devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
                  callbacks=[*callbacks, record])
    fit.fit(student, DataLoader([seq2seq_batch()] * 4, batch_size=None))
    batch = seq2seq_batch()
    with torch.no_grad():
        logits = student(batch["src"], batch["tgt"][:, :-1])
    converted = type(student.output.weight).__name__
    (out / f"rank{fit.global_rank}.json").write_text(
        json.dumps({"losses": record.losses, "logits": logits.flatten()[:32].tolist(), "weight": converted})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
