"""KnowledgeDistillation against a plain training loop and closed forms.

- the loss, step by step, equals a plain PyTorch loop that computes Hinton's loss by hand;
- per-token KL masked at padding on a Seq2SeqTransformer (not ``batchmean`` over the batch);
- modules llmkit never saw (Lightning's demo ``LightningTransformer``), dict outputs, ``logits_fn``;
- intermediate layers with a learned projection, trained by the student's optimizer;
- the teacher never trains, never enters the checkpoint or the optimizer; loads from a path;
- save -> resume continues with the same losses; two processes (``ddp_spawn``); bf16-mixed;
- bad input: each a clear error.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from llmkit import Seq2SeqTransformer
from llmkit.callbacks import KnowledgeDistillation
from llmkit.callbacks.distillation import distillation_loss
from tests.callbacks.helpers import RecordLosses, seq2seq_batch, trainer, translator


class Classifier(L.LightningModule):
    """A plain classifier: its training_step calls its forward and returns a loss."""

    def __init__(self, width: int = 16, classes: int = 5, lr: float = 0.1, dict_output: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return {"loss": loss, "extra": loss.detach()} if self.hparams.dict_output else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def classification_data(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    y = torch.randint(0, 5, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def hinton(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher_T || student_T) * T^2 per row, by the textbook formula."""
    p_t = torch.softmax(teacher / temperature, dim=-1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(student / temperature, dim=-1))).sum(-1) * temperature**2


# ---------------------------------------------------------------------------------------------
# 1. The loss against a plain loop


@pytest.mark.parametrize(("temperature", "alpha"), [(2.0, 0.5), (4.0, 0.9), (1.0, 0.0)])
def test_losses_equal_a_plain_training_loop(temperature, alpha):
    torch.manual_seed(0)
    student, teacher = Classifier(width=8), Classifier(width=32)
    plain_student, plain_teacher = copy.deepcopy(student.net), copy.deepcopy(teacher.net)
    record = RecordLosses()
    kd = KnowledgeDistillation(teacher, temperature=temperature, alpha=alpha)
    trainer(max_epochs=2, callbacks=[kd, record]).fit(student, classification_data())

    optimizer = torch.optim.SGD(plain_student.parameters(), lr=0.1)
    expected = []
    for _ in range(2):
        for x, y in classification_data():
            logits = plain_student(x)
            with torch.no_grad():
                soft = plain_teacher(x)
            loss = (1 - alpha) * F.cross_entropy(logits, y) + alpha * hinton(logits, soft, temperature).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            expected.append(loss.item())
    assert record.losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for ours, theirs in zip(student.net.parameters(), plain_student.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "mse"])
def test_distillation_loss_closed_forms(loss):
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
    mask = torch.rand(3, 4) > 0.3
    got = distillation_loss(s, t, temperature=3.0, loss=loss, mask=mask)
    if loss == "kl":
        per_token = hinton(s, t, 3.0)
    elif loss == "reverse_kl":
        per_token = hinton(t, s, 3.0)
    else:
        per_token = (s - t).square().mean(-1)
    torch.testing.assert_close(got, per_token[mask].mean())


def test_kl_is_per_token_not_batchmean():
    """A batch of one long sequence and of one short one weigh every token the same."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = torch.tensor([[True] * 6, [True, False, False, False, False, False]])
    got = distillation_loss(s, t, temperature=1.0, mask=mask)
    per_token = hinton(s, t, 1.0)
    torch.testing.assert_close(got, per_token[mask].sum() / 7)
    batchmean = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    assert not torch.isclose(got, batchmean)


# ---------------------------------------------------------------------------------------------
# 2. Seq2SeqTransformer: per-token KL, padding masked


def translators(vocab: int = 13) -> tuple[Seq2SeqTransformer, Seq2SeqTransformer]:
    torch.manual_seed(0)
    return translator(16, vocab), translator(32, vocab)


def test_seq2seq_student_masks_padding_per_token():
    student, teacher = translators()
    batch = seq2seq_batch()
    with torch.no_grad():
        s = student(batch["src"], batch["tgt"][:, :-1])
        t = teacher(batch["src"], batch["tgt"][:, :-1])
        task = student._loss(s, batch["tgt"][:, 1:])
    mask = batch["tgt"][:, 1:] != 0
    expected = 0.3 * task + 0.7 * hinton(s, t, 2.0)[mask].mean()
    record = RecordLosses()
    kd = KnowledgeDistillation(teacher, alpha=0.7, ignore_index=0)
    trainer(max_steps=1, callbacks=[kd, record]).fit(student, DataLoader([batch], batch_size=None))
    assert record.losses == pytest.approx([expected.item()], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. Modules llmkit never saw


def test_lightning_demo_transformer_with_local_data():
    torch.manual_seed(0)
    vocab = 50
    student, teacher = LightningTransformer(vocab_size=vocab), LightningTransformer(vocab_size=vocab)
    student.prepare_data = lambda: None  # its own would download WikiText-2; the data here is local
    tokens = torch.randint(0, vocab, (8, 2, 12))
    data = DataLoader(list(zip(tokens[:, 0], tokens[:, 1], strict=True)), batch_size=4)
    record = RecordLosses()
    kd = KnowledgeDistillation(teacher, temperature=1.0, alpha=0.5)
    fit = trainer(max_steps=2, callbacks=[kd, record])
    fit.fit(student, data)
    assert len(record.losses) == 2 and all(math.isfinite(v) for v in record.losses)
    assert {"train_task_loss", "train_kd_loss"} <= set(fit.callback_metrics)
    # Its forward returns log-probabilities [B*T, V]: the KL of two log-softmaxed tensors is the
    # KL of the distributions they hold.
    assert float(fit.callback_metrics["train_kd_loss"]) > 0


def test_dict_output_and_logits_fn():
    torch.manual_seed(0)

    class TupleOut(Classifier):
        def forward(self, x):
            return {"scores": self.net(x), "hidden": x}

        def training_step(self, batch, batch_idx):
            x, y = batch
            return {"loss": F.cross_entropy(self(x)["scores"], y)}

    student, teacher = TupleOut(width=8), TupleOut(width=32)
    kd = KnowledgeDistillation(teacher, logits_fn=lambda out: out["scores"])
    record = RecordLosses()
    trainer(max_steps=3, callbacks=[kd, record]).fit(student, classification_data())
    assert len(record.losses) == 3


# ---------------------------------------------------------------------------------------------
# 4. The teacher stays out of training


def test_teacher_is_frozen_in_eval_mode_and_out_of_checkpoint_and_optimizer(tmp_path):
    torch.manual_seed(0)
    student, teacher = Classifier(width=8), Classifier(width=32)
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit = trainer(max_steps=4, callbacks=[KnowledgeDistillation(teacher), checkpoint], enable_checkpointing=True)
    fit.fit(student, classification_data())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key])
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters()}
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(student.state_dict())
    Classifier.load_from_checkpoint(tmp_path / "last.ckpt")  # loads strictly, without the callback


def test_teacher_from_a_checkpoint_path_as_the_students_class(tmp_path):
    torch.manual_seed(0)
    teacher = Classifier(width=32)
    fit = trainer(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    fit.fit(teacher, classification_data())
    path = tmp_path / "teacher.ckpt"
    fit.save_checkpoint(path)
    kd = KnowledgeDistillation(str(path))
    record = RecordLosses()
    trainer(max_steps=2, callbacks=[kd, record]).fit(Classifier(width=8), classification_data())
    assert isinstance(kd.teacher, Classifier) and kd.teacher.hparams.width == 32
    torch.testing.assert_close(kd.teacher.net[0].weight, teacher.net[0].weight)


# ---------------------------------------------------------------------------------------------
# 5. Intermediate layers


def test_intermediate_layers_with_a_learned_projection(tmp_path):
    torch.manual_seed(0)
    student, teacher = Classifier(width=8), Classifier(width=32)
    kd = KnowledgeDistillation(teacher, layers={"net.0": "net.0"}, layer_loss="mse", layer_weight=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    record = RecordLosses()
    fit = trainer(max_steps=4, callbacks=[kd, checkpoint, record], enable_checkpointing=True)
    fit.fit(student, classification_data())
    projection = kd.projections["0"]
    assert (projection.in_features, projection.out_features) == (8, 32)
    assert not hasattr(student, "kd_projections")  # a child of the student during fit only
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in projection.parameters()} <= optimized
    assert "train_layer_loss" in fit.callback_metrics
    # The projection trains, and stays out of the student's weights in the checkpoint.
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not any(key.startswith("kd_projections") for key in saved["state_dict"])
    stored = next(v for k, v in saved["callbacks"].items() if "KnowledgeDistillation" in k)["projections"]
    torch.testing.assert_close(stored["0.weight"], projection.weight)
    fresh = Classifier(width=8)
    fresh.load_state_dict(student.state_dict())  # strictly: the distilled student loads on its own


class ExpectLayerLoss(L.Callback):
    """Before each step, the loss by hand: Hinton's plus the MSE of the projected student layer."""

    def __init__(self, teacher: Classifier) -> None:
        self.teacher, self.expected, self.got = teacher, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            layer = F.mse_loss(pl_module.kd_projections["0"](pl_module.net[0](x)), self.teacher.net[0](x))
            logits, soft = pl_module(x), self.teacher(x)
            loss = 0.5 * F.cross_entropy(logits, y) + 0.5 * hinton(logits, soft, 2.0).mean() + 0.5 * layer
        self.expected.append(loss.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.got.append(float(outputs["loss"]))


def test_intermediate_layer_loss_equals_its_closed_form():
    torch.manual_seed(0)
    student, teacher = Classifier(width=8), Classifier(width=32)
    expect = ExpectLayerLoss(teacher)
    kd = KnowledgeDistillation(teacher, layers={"net.0": "net.0"}, layer_weight=0.5)
    trainer(max_steps=3, callbacks=[kd, expect]).fit(student, classification_data())
    assert expect.got == pytest.approx(expect.expected, rel=1e-5)


def test_cosine_layer_loss_on_equal_widths_needs_no_projection():
    torch.manual_seed(0)
    student, teacher = Classifier(width=16), Classifier(width=16)
    kd = KnowledgeDistillation(teacher, layers=[("net.1", "net.1")], layer_loss="cosine")
    trainer(max_steps=2, callbacks=[kd]).fit(student, classification_data())
    assert not hasattr(student, "kd_projections")


# ---------------------------------------------------------------------------------------------
# 6. Resume, DDP, precision


def test_resume_continues_with_the_same_losses(tmp_path):
    """One batch per epoch, so the resumed run sees exactly the batches the uninterrupted one did."""

    def run(max_epochs: int, ckpt_path: str | None = None, checkpoint_dir: Path | None = None) -> list[float]:
        torch.manual_seed(0)
        student, teacher = Classifier(width=8), Classifier(width=32)
        record = RecordLosses()
        callbacks = [KnowledgeDistillation(teacher, layers={"net.0": "net.0"}), record]
        if checkpoint_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1))
        fit = trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None)
        fit.fit(student, classification_data(n=16), ckpt_path=ckpt_path)
        return record.losses

    uninterrupted = run(6)
    first = run(3, checkpoint_dir=tmp_path)
    (mid,) = sorted(tmp_path.glob("epoch=2*.ckpt"))
    resumed = run(6, ckpt_path=str(mid))
    assert first == pytest.approx(uninterrupted[:3], rel=1e-6)
    assert resumed == pytest.approx(uninterrupted[3:], rel=1e-6)


class RecordRanks(L.Callback):
    def __init__(self, out_dir: str, teacher: nn.Module) -> None:
        self.out_dir, self.teacher = out_dir, teacher

    def on_train_end(self, trainer, pl_module):
        kd = next(c for c in trainer.callbacks if isinstance(c, KnowledgeDistillation))
        record = {
            "checksum": sum(float(p.double().sum()) for p in pl_module.parameters()),
            "teacher_checksum": sum(float(p.double().sum()) for p in kd.teacher.parameters()),
            "wrapped": type(trainer.strategy.model).__name__,
            "teacher_outside": all(kd.teacher is not m for m in trainer.strategy.model.modules()),
            "metrics": sorted(k for k in trainer.callback_metrics if k.startswith("train_")),
        }
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_spawn_two_processes(tmp_path, ddp_spawn):
    torch.manual_seed(0)
    student, teacher = Classifier(width=8), Classifier(width=32)
    teacher_checksum = sum(float(p.detach().double().sum()) for p in teacher.parameters())
    kd = KnowledgeDistillation(teacher, layers={"net.0": "net.0"})
    fit = trainer(devices=2, strategy=ddp_spawn, max_steps=3, callbacks=[kd, RecordRanks(str(tmp_path), teacher)])
    fit.fit(student, classification_data())
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the projection is synced with the student
    assert ranks[0]["teacher_checksum"] == ranks[1]["teacher_checksum"] == pytest.approx(teacher_checksum)
    assert ranks[0]["wrapped"] == "DistributedDataParallel" and ranks[0]["teacher_outside"]
    assert ranks[0]["metrics"] == ["train_kd_loss", "train_layer_loss", "train_task_loss"]


def test_bf16_mixed_runs_the_teacher_under_autocast():
    student, teacher = translators()
    dtypes = []
    teacher.output.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    kd = KnowledgeDistillation(teacher, ignore_index=0)
    trainer(max_steps=2, precision="bf16-mixed", callbacks=[kd]).fit(
        student, DataLoader([seq2seq_batch()] * 2, batch_size=None)
    )
    assert dtypes == [torch.bfloat16, torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# 7. Bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 1.5}, ValueError, "`alpha` must be in \\[0, 1\\], got 1.5"),
        ({"alpha": -0.1}, ValueError, "`alpha` must be in \\[0, 1\\], got -0.1"),
        ({"temperature": 0.0}, ValueError, "`temperature` must be a finite number > 0, got 0.0"),
        ({"temperature": float("inf")}, ValueError, "`temperature` must be a finite number > 0, got inf"),
        ({"temperature": float("nan")}, ValueError, "`temperature` must be a finite number > 0, got nan"),
        ({"alpha": float("nan")}, ValueError, "`alpha` must be in \\[0, 1\\], got nan"),
        ({"layer_weight": float("inf")}, ValueError, "`layer_weight` must be a finite number >= 0, got inf"),
        ({"layers": "net.0"}, TypeError, "`layers` must map student module names to teacher module names"),
        ({"loss": "js"}, ValueError, "`loss` must be one of \\('kl', 'reverse_kl', 'mse'\\), got 'js'"),
        ({"layer_loss": "l1"}, ValueError, "`layer_loss` must be one of \\('mse', 'cosine'\\), got 'l1'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        KnowledgeDistillation(Classifier(), **kwargs)


def test_missing_checkpoint_and_wrong_teacher_type(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the teacher checkpoint '.*nope\.ckpt' does not exist"):
        KnowledgeDistillation(str(tmp_path / "nope.ckpt"))
    with pytest.raises(TypeError, match=r"`teacher` must be an nn\.Module or a checkpoint path, got int"):
        KnowledgeDistillation(3)


def test_unknown_module_name_suggests_close_ones():
    kd = KnowledgeDistillation(Classifier(), layers={"net.00": "net.0"})
    with pytest.raises(ValueError, match=r"the student has no module named 'net\.00' \(`layers`\); did you mean 'net\.0'"):
        trainer(max_steps=1, callbacks=[kd]).fit(Classifier(), classification_data())


def test_different_vocabularies_fail_at_the_first_step_naming_both_shapes():
    student, _ = translators(vocab=13)
    _, teacher = translators(vocab=17)
    kd = KnowledgeDistillation(teacher, ignore_index=0)
    with pytest.raises(ValueError, match="student \\(3, 4, 13\\), teacher \\(3, 4, 17\\)"):
        trainer(max_steps=1, callbacks=[kd]).fit(student, DataLoader([seq2seq_batch()], batch_size=None))


def test_training_step_that_never_calls_forward():
    class Detour(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    kd = KnowledgeDistillation(Classifier())
    with pytest.raises(RuntimeError, match="saw no call of the module's own forward"):
        trainer(max_steps=1, callbacks=[kd]).fit(Detour(), classification_data())
    # Naming the submodule that computes the logits works.
    record = RecordLosses()
    trainer(max_steps=1, callbacks=[KnowledgeDistillation(Classifier(), forward_module="net"), record]).fit(
        Detour(), classification_data()
    )
    assert len(record.losses) == 1


# ---------------------------------------------------------------------------------------------
# 7. Numerics and widths


def test_minus_infinity_teacher_logits_give_the_finite_kl_of_kl_div():
    """A masked vocabulary (-inf logits): the correct KL is finite, as F.kl_div(log_softmax(s/T), softmax(t/T))."""
    torch.manual_seed(0)
    student = torch.randn(4, 6, 7, requires_grad=True)
    teacher = torch.randn(4, 6, 7)
    teacher[..., 5:] = float("-inf")  # two classes the teacher never gives mass
    loss = distillation_loss(student, teacher, temperature=2.0)
    oracle = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="none").sum(-1).mean() * 4
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, oracle)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # Reverse KL where both put no mass on a class (-inf in both) is finite too.
    both = student.detach().clone()
    both[..., 6:] = float("-inf")
    teacher[..., 6:] = float("-inf")
    teacher[..., 5] = 0.0
    reverse = distillation_loss(both, teacher, temperature=1.0, loss="reverse_kl")
    expected = F.kl_div(F.log_softmax(teacher[..., :6], -1), F.softmax(both[..., :6], -1), reduction="none")
    torch.testing.assert_close(reverse, expected.sum(-1).mean())


class WeightOnlyRMSNorm(nn.Module):
    """A norm that keeps no ``normalized_shape`` (Hugging Face's LlamaRMSNorm style)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("norm", [nn.RMSNorm, WeightOnlyRMSNorm, lambda width: nn.LayerNorm(width)])
def test_widths_are_read_through_a_final_norm(norm):
    torch.manual_seed(0)
    student, teacher = Classifier(width=8), Classifier(width=32)
    student.net.insert(1, norm(8))
    teacher.net.insert(1, norm(32))
    kd = KnowledgeDistillation(teacher, layers={"net.0": "net.0", "net.1": "net.1"})
    trainer(max_steps=2, callbacks=[kd]).fit(student, classification_data())
    assert sorted(kd.projections) == ["0", "1"]
    assert [(p.in_features, p.out_features) for p in kd.projections.values()] == [(8, 32), (8, 32)]


class TwoModels(L.LightningModule):
    """No forward of its own and two children: which one gives the logits is not for us to guess."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.head = nn.Linear(8, 8), nn.Linear(8, 5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.encoder(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_an_ambiguous_forward_module_fails_at_setup_naming_the_argument():
    record = RecordLosses()
    kd = KnowledgeDistillation(TwoModels())
    with pytest.raises(ValueError, match=r"TwoModels defines no forward of its own and has 2 submodules with "
                                         r"parameters \('encoder', 'head'\); pass `forward_module`"):
        trainer(max_steps=1, callbacks=[kd, record]).fit(TwoModels(), classification_data())
    assert record.losses == []  # before any step
    record = RecordLosses()
    trainer(max_steps=1, callbacks=[KnowledgeDistillation(TwoModels(), forward_module="head"), record]).fit(
        TwoModels(), classification_data()
    )
    assert len(record.losses) == 1
