"""One node of a 2-node x 1-process fit; ``tests/test_multinode.py`` launches both nodes on this machine.

Each node is started as ``torchrun --nnodes 2 --nproc_per_node 1`` starts it on its own machine:
``python -m tests.multinode_fit OUT_DIR`` with ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE=2``,
``LOCAL_RANK=0`` and either ``NODE_RANK`` (Lightning's own ``LightningEnvironment``) or torchrun's
``RANK``/``GROUP_RANK``/``LOCAL_WORLD_SIZE``/``TORCHELASTIC_RUN_ID`` (``TorchElasticEnvironment``).

The node fits a small translator with knowledge distillation, QAT and adversarial training under
``Trainer(num_nodes=2, devices=1, strategy="ddp")``. The fit validates once, at its last step, on a
set that Lightning's ``DistributedSampler`` shards across the nodes; after the fit (QAT has converted
the model) ``trainer.test`` scores the same set. The node writes ``OUT_DIR/node{NODE}.json``: its
ranks as the Trainer sees them, hashes of its parameters, and per stage (``"validate"``, ``"test"``)
the synced values Lightning logged and the shard it scored (sample ids, targets, and the generated
ids and logits that the model's metrics saw), or the error ``trainer.test`` raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import AdversarialTraining, KnowledgeDistillation, QuantizationAwareTraining
from tests.callbacks.helpers import trainer, translator

NUM_NODES = 2
VOCAB = 13
PAD, BOS, EOS = 0, 1, 2
SRC_LEN, TGT_LEN = 6, 7
NUM_TRAIN, NUM_EVAL = 32, 12  # NUM_EVAL divisible by NUM_NODES: the sampler adds no duplicate
BATCH_SIZE, EVAL_BATCH_SIZE = 4, 3  # two evaluation batches per node
MAX_STEPS = 16
STAGES = ("validate", "test")


def copy_task(num: int, seed: int) -> list[dict[str, Tensor]]:
    """``num`` samples ``{"idx", "src", "tgt"}``: copy 2-5 random words, ``tgt = BOS words EOS``, padded."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for idx in range(num):
        length = int(torch.randint(2, 6, (1,), generator=generator))
        words = torch.randint(3, VOCAB, (length,), generator=generator)
        src = torch.full((SRC_LEN,), PAD)
        src[: length + 1] = torch.cat([words, torch.tensor([EOS])])
        tgt = torch.full((TGT_LEN,), PAD)
        tgt[: length + 2] = torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS])])
        samples.append({"idx": torch.tensor(idx), "src": src, "tgt": tgt})
    return samples


def parameters_hash(module: nn.Module) -> str:
    """SHA-256 of every parameter's name and float bytes, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RecordNode(L.Callback):
    """Checks the process group, hashes the parameters and records what each evaluation scored here.

    The logits are those ``forward`` returned inside the evaluation step (a forward hook), the
    predictions those ``generate`` returned to the model's metrics (the bound method is wrapped
    for the run).
    """

    def __init__(self, node: int) -> None:
        self.node = node
        self.stages: dict[str, dict[str, Any]] = {}
        self.hashes: dict[str, str] = {}
        self._logits: Tensor | None = None
        self._preds: Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert dist.is_initialized() and dist.get_world_size() == NUM_NODES, "no 2-process group"
        assert dist.get_rank() == self.node, f"process group rank {dist.get_rank()} on node {self.node}"
        self.hashes["start"] = parameters_hash(pl_module)  # after DDP broadcast node 0's weights

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.hashes["end"] = parameters_hash(pl_module)  # before QAT converts (on_fit_end)

    def _start(self, stage: str, pl_module: L.LightningModule) -> None:
        def keep_logits(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # The DDP wrapper's call (redirected to the step) returns None: only forward gives a tensor.
            if isinstance(output, Tensor):
                self._logits = output.detach()

        generate = pl_module.generate

        def keep_preds(*args: Any, **kwargs: Any) -> Tensor:
            self._preds = generate(*args, **kwargs)
            return self._preds

        self._hook = pl_module.register_forward_hook(keep_logits)
        pl_module.generate = keep_preds  # type: ignore[method-assign]
        self.stages[stage] = {"idx": [], "tgt": [], "preds": [], "logits": []}

    def _batch_end(self, stage: str, batch: dict[str, Tensor]) -> None:
        assert self._logits is not None and self._preds is not None, f"{stage}: no forward or no generate"
        record = self.stages[stage]
        for key, value in (("idx", batch["idx"]), ("tgt", batch["tgt"]), ("preds", self._preds),
                           ("logits", self._logits)):
            record[key] += value.tolist()
        self._logits = self._preds = None

    def _end(self, stage: str, pl_module: L.LightningModule) -> None:
        self._hook.remove()
        del pl_module.generate

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("validate", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end("validate", batch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end("validate", pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end("test", batch)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end("test", pl_module)


def logged(metrics: dict[str, Any], stage: str) -> dict[str, float]:
    prefix = {"validate": "val", "test": "test"}[stage]
    return {name: float(metrics[f"{prefix}_{name}"]) for name in ("ppl", "bleu", "rougeL")}


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "-1")))  # as Lightning reads it
    if node not in range(NUM_NODES):
        raise SystemExit(f"NODE_RANK or GROUP_RANK must be 0 or 1, got {node} (launch with tests/test_multinode.py)")
    torch.manual_seed(123)
    teacher = translator(d_model=64)  # the same teacher on both nodes, as if loaded from one checkpoint
    torch.manual_seed(node)  # different initial students: DDP must broadcast node 0's
    student = Seq2SeqTransformer(
        VOCAB, VOCAB, d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
        dropout=0.0, max_len=16, lr=1e-2, warmup_steps=1, val_generate_batches=NUM_EVAL,
    )
    record = RecordNode(node)
    callbacks = [
        KnowledgeDistillation(teacher, alpha=0.2, ignore_index=PAD),
        QuantizationAwareTraining(),
        AdversarialTraining("fgm", epsilon=0.1),
        record,
    ]
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    fit = trainer(
        devices=1, num_nodes=NUM_NODES, strategy=strategy, max_steps=MAX_STEPS, callbacks=callbacks,
        # One validation, at the last step (before QAT converts), over the whole sharded set.
        limit_val_batches=None, num_sanity_val_steps=0, val_check_interval=MAX_STEPS, check_val_every_n_epoch=None,
    )
    eval_data = DataLoader(copy_task(NUM_EVAL, seed=1), batch_size=EVAL_BATCH_SIZE)
    fit.fit(student, DataLoader(copy_task(NUM_TRAIN, seed=0), batch_size=BATCH_SIZE), eval_data)
    record.stages["validate"]["logged"] = logged(fit.callback_metrics, "validate")

    expected = {"node_rank": node, "global_rank": node, "local_rank": 0, "world_size": NUM_NODES, "num_nodes": NUM_NODES}
    ranks = {name: getattr(fit, name) for name in expected}
    assert ranks == expected, f"the Trainer's ranks {ranks} != {expected}"
    summary: dict[str, Any] = {
        **ranks,
        "environment": type(fit.strategy.cluster_environment).__name__,
        "linear_weights": sorted({type(m.weight).__name__ for m in student.modules() if isinstance(m, nn.Linear)}),
        "hashes": record.hashes,
    }
    try:
        (results,) = fit.test(student, eval_data, verbose=False)
        record.stages["test"]["logged"] = logged(results, "test")
    except Exception as error:  # recorded: tests/test_multinode.py reports it
        summary["test_error"] = f"{type(error).__name__}: {error}"[:500]
    summary["stages"] = record.stages
    (out / f"node{node}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
