"""AdversarialTraining, RobustnessEvaluation and ``llmkit.adversarial.attack``.

Oracles:
- FGM, PGD and FreeLB training steps equal the textbook loops written by hand in plain PyTorch
  (manual backward passes, ``.grad`` read off the perturbation), weights compared after several
  optimizer steps;
- the attack stays in its ball (l2 and linf), never touches padding, clamps inputs to their range,
  raises the loss, and leaves weights, ``.grad``, ``requires_grad`` and BatchNorm statistics as they were;
- RobustnessEvaluation's logged figures equal :func:`attack` called by hand on the same batches;
- composition with KnowledgeDistillation and QuantizationAwareTraining, Seq2SeqTransformer, VAE,
  Lightning's demo ``LightningTransformer``; save -> resume; two DDP processes; bf16-mixed;
- bad input: each a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from llmkit import VAE
from llmkit.adversarial import attack, margin_loss
from llmkit.callbacks import (
    AdversarialTraining,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    RobustnessEvaluation,
)
from tests.callbacks.helpers import RecordLosses, seq2seq_batch, trainer, translator

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 6


class TokenClassifier(L.LightningModule):
    """Mean of the non-padding token embeddings -> MLP -> classes; SGD."""

    def __init__(self, vocab: int = 12, classes: int = 3, lr: float = 0.5, batch_norm: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, DIM, padding_idx=0)
        self.norm = nn.BatchNorm1d(DIM) if batch_norm else nn.Identity()
        self.head = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, classes))
        self.lr = lr

    def from_embeddings(self, e: Tensor, ids: Tensor) -> Tensor:
        mask = (ids != 0).unsqueeze(-1).to(e.dtype)
        return self.head(self.norm((e * mask).sum(1) / mask.sum(1)))

    def forward(self, ids: Tensor) -> Tensor:
        return self.from_embeddings(self.emb(ids), ids)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        loss = F.cross_entropy(self(ids), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.log("val_loss", F.cross_entropy(self(ids), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def token_batches(n: int = 3, size: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, 12, (size, 5), generator=g)
        ids[1, 3:] = 0  # padding
        ids[2, 4:] = 0
        batches.append((ids, torch.randint(0, 3, (size,), generator=g)))
    return batches


def loader(batches) -> DataLoader:
    return DataLoader(batches, batch_size=None)


# ---------------------------------------------------------------------------------------------
# 1. The training step equals the textbook loops


def _direction(g: Tensor, norm: str) -> Tensor:
    if norm == "l2":
        return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return g.sign()


def _project(d: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "l2":
        return d * (eps / d.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1)
    return d.clamp(-eps, eps)


def textbook_fit(model: TokenClassifier, batches, method: str, eps: float, alpha: float, steps: int, w: float,
                 norm: str) -> list[float]:
    """Miyato's FGM, Madry's PGD and Zhu's FreeLB with manual backward passes, as papers' code does."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr)
    losses = []
    for ids, y in batches:
        mask = (ids != 0).unsqueeze(-1).float()

        def loss_at(delta: Tensor, ids=ids, y=y, mask=mask) -> Tensor:
            return F.cross_entropy(model.from_embeddings(model.emb(ids) + delta * mask, ids), y)

        opt.zero_grad()
        delta = torch.zeros(*ids.shape, DIM, requires_grad=True)
        clean = loss_at(delta)
        ((1 - w) * clean).backward()
        g = delta.grad
        total = (1 - w) * clean.item()
        if method == "fgm":
            delta = _project(eps * _direction(g, norm), eps, norm)
            adv = loss_at(delta)
            (w * adv).backward()
            total += w * adv.item()
        elif method == "pgd":
            for _ in range(steps - 1):
                delta = _project(delta.detach() + alpha * _direction(g, norm), eps, norm).requires_grad_(True)
                (g,) = torch.autograd.grad(loss_at(delta), delta)
            delta = _project(delta.detach() + alpha * _direction(g, norm), eps, norm)
            adv = loss_at(delta)
            (w * adv).backward()
            total += w * adv.item()
        else:  # freelb: every ascent step's loss accumulates into .grad
            for _ in range(steps):
                delta = _project(delta.detach() + alpha * _direction(g, norm), eps, norm).requires_grad_(True)
                adv = loss_at(delta)
                (w / steps * adv).backward()
                g = delta.grad
                total += w / steps * adv.item()
        opt.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize(
    ("method", "norm", "steps", "w"),
    [("fgm", "l2", 1, 0.5), ("fgm", "linf", 1, 0.3), ("pgd", "l2", 3, 0.5), ("pgd", "linf", 2, 0.7),
     ("freelb", "l2", 3, 0.5)],
)
def test_training_equals_the_textbook_loop(method, norm, steps, w):
    torch.manual_seed(0)
    model = TokenClassifier()
    oracle = TokenClassifier()
    oracle.load_state_dict(model.state_dict())
    batches = token_batches()
    eps, alpha = 0.8, 0.5
    callback = AdversarialTraining(method, epsilon=eps, alpha=alpha, steps=steps, norm=norm, adv_weight=w)
    record = RecordLosses()
    trainer(max_epochs=1, callbacks=[callback, record]).fit(model, loader(batches))
    expected = textbook_fit(oracle, batches, method, eps, alpha, steps, w, norm)
    assert record.losses == pytest.approx(expected, rel=1e-5)
    for (name, got), want in zip(model.state_dict().items(), oracle.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)


class SharedGradients(TokenClassifier):
    """Parameters whose gradients autograd hands out shared (a + b) or expanded (a sum's)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
        self.gate = nn.Parameter(torch.ones(4, 4))

    def from_embeddings(self, e: Tensor, ids: Tensor) -> Tensor:
        return super().from_embeddings(e, ids) + (self.a + self.b) + 1e-3 * self.gate.sum()


def test_shared_and_expanded_gradients_equal_the_textbook_loop():
    torch.manual_seed(0)
    model, oracle = SharedGradients(), SharedGradients()
    oracle.load_state_dict(model.state_dict())
    batches = token_batches()
    trainer(max_epochs=1, callbacks=[AdversarialTraining("freelb", epsilon=0.8, alpha=0.5, steps=2)]).fit(
        model, loader(batches)
    )
    textbook_fit(oracle, batches, "freelb", 0.8, 0.5, 2, 0.5, "l2")
    for key, value in oracle.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_the_module_logs_its_clean_pass_only():
    fit = trainer(max_steps=2, log_every_n_steps=1, callbacks=[AdversarialTraining("pgd", epsilon=0.5, steps=2)])
    fit.fit(TokenClassifier(), loader(token_batches(2)))
    metrics = fit.callback_metrics
    assert float(metrics["train_loss"]) == pytest.approx(float(metrics["train_clean_loss"]))


def test_skipped_batches_and_interrupted_fits():
    class SkipFirst(TokenClassifier):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 0 else super().training_step(batch, batch_idx)

    class Outputs(L.Callback):
        def __init__(self) -> None:
            self.outputs = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.outputs.append(outputs)

    record = Outputs()
    with pytest.warns(UserWarning, match="`training_step` returned `None`"):
        trainer(max_epochs=1, callbacks=[AdversarialTraining("fgm", epsilon=0.5), record]).fit(
            SkipFirst(), loader(token_batches(3))
        )
    assert not record.outputs[0] and all(torch.isfinite(out["loss"]) for out in record.outputs[1:])

    class Interrupt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise RuntimeError("interrupted")

    model = TokenClassifier()
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer(max_steps=3, callbacks=[AdversarialTraining("fgm", epsilon=0.5), Interrupt()]).fit(
            model, loader(token_batches(3))
        )
    assert "training_step" not in vars(model) and not model.emb._forward_hooks


def test_logs_clean_and_adversarial_losses_and_restores_the_module():
    model = TokenClassifier()
    fit = trainer(max_epochs=1, callbacks=[AdversarialTraining("fgm", epsilon=0.5)], log_every_n_steps=1)
    fit.fit(model, loader(token_batches()))
    metrics = fit.callback_metrics
    assert float(metrics["train_adv_loss"]) >= float(metrics["train_clean_loss"])
    assert "training_step" not in vars(model)  # unwrapped after fit
    assert not model.emb._forward_hooks


def test_passes_share_dropout_masks_and_leave_grads_and_batch_norm_to_training_passes():
    """The clean pass and the attack see the same dropout; PGD's inner passes change no statistic."""

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.stats = pl_module.norm.running_mean.clone()
            for p in pl_module.parameters():
                p.grad = torch.full_like(p, 7.0)

        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            # Before Lightning zeroes .grad for its backward: the attack left it alone.
            self.grads_untouched = all(bool((p.grad == 7.0).all()) for p in pl_module.parameters())

    torch.manual_seed(0)
    model = TokenClassifier(batch_norm=True)
    recorder = Recorder()
    steps = []

    def counting_step(batch, batch_idx, original=model.training_step):
        steps.append(model.norm.running_mean.clone())
        return original(batch, batch_idx)

    model.training_step = counting_step
    fit = trainer(max_steps=1, callbacks=[AdversarialTraining("pgd", epsilon=0.5, steps=3, adv_weight=0.5), recorder])
    fit.fit(model, loader(token_batches(1)))
    assert len(steps) == 4  # clean + 2 inner + final
    # The inner passes' updates were undone: the final pass starts from the clean pass's statistics.
    torch.testing.assert_close(steps[1], steps[2])
    torch.testing.assert_close(steps[1], steps[3])
    assert not torch.equal(steps[0], steps[1])
    assert recorder.grads_untouched


# ---------------------------------------------------------------------------------------------
# 2. The inference-time attack


@pytest.mark.parametrize(("method", "norm"), [("pgd", "l2"), ("pgd", "linf"), ("fgsm", "linf"), ("fgm", "l2")])
def test_attack_stays_in_the_ball_skips_padding_and_fixes_weights(method, norm):
    torch.manual_seed(0)
    model = TokenClassifier().eval()
    ids, y = token_batches(1)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    result = attack(model, (ids, y), method=method, norm=norm, epsilon=0.3, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    (delta,) = result.perturbation
    assert delta.shape == (*ids.shape, DIM)
    if norm == "l2":
        assert float(delta.flatten(1).norm(dim=1).max()) <= 0.3 + 1e-6
    else:
        assert float(delta.abs().max()) <= 0.3 + 1e-6
    assert float(delta[ids == 0].abs().max()) == 0.0
    assert float(result.loss) > float(result.clean_loss)
    # The loss reported is the loss at that perturbation.
    with torch.no_grad():
        again = F.cross_entropy(model.from_embeddings(model.emb(ids) + delta, ids), y)
    assert float(result.loss) == pytest.approx(float(again), rel=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.requires_grad and bool((p.grad == 1).all()) for p in model.parameters())
    assert not model.emb._forward_hooks


def test_margin_loss_closed_form():
    logits = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 1.5, 0.0]]])
    target = torch.tensor([[0, 1, 2]])
    # margins: 3 - 1 = 2 (right), 2 - 5 < 0 (wrong: 0), position 3 ignored
    assert float(margin_loss(logits, target, ignore_index=2)) == pytest.approx(-2.0 / 2)
    assert float(margin_loss(logits, target)) == pytest.approx(-2.0 / 3)


def test_the_margin_attack_flips_more_tokens_than_the_loss_attack():
    torch.manual_seed(0)
    model = translator()
    trainer(max_steps=30).fit(model, loader([seq2seq_batch()] * 30))
    model.eval()
    results = {
        objective: attack(model, seq2seq_batch(), epsilon=2.0, steps=10, objective=objective, ignore_index=0)
        for objective in ("loss", "margin")
    }
    correct = {k: int(r.accuracy(seq2seq_batch(), ignore_index=0)[0]) for k, r in results.items()}
    clean = int(results["loss"].accuracy(seq2seq_batch(), ignore_index=0, clean=True)[0])
    assert correct["margin"] <= correct["loss"] <= clean


def test_attack_inside_inference_mode_on_inference_tensors():
    torch.manual_seed(0)
    model = translator().eval()
    with torch.inference_mode():
        batch = {k: v.clone() for k, v in seq2seq_batch().items()}
        result = attack(model, batch, epsilon=1.0, steps=2)
    assert batch["src"].is_inference()
    assert float(result.loss) > float(result.clean_loss)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_finds_a_stronger_attack_than_fgm():
    torch.manual_seed(0)
    model = TokenClassifier().eval()
    batch = token_batches(1, size=16)[0]

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    fgm = attack(model, batch, method="fgm", epsilon=0.5, loss_fn=loss)
    pgd = attack(model, batch, method="pgd", epsilon=0.5, steps=10, loss_fn=loss)
    assert float(pgd.loss) >= float(fgm.loss) > float(fgm.clean_loss)


def test_attack_on_inputs_clamps_to_the_range_and_keeps_batch_norm_statistics():
    torch.manual_seed(0)
    model = VAE(input_shape=(16,), latent_dim=2, hidden_dims=(8,))
    model.train()
    x = torch.rand(6, 16)
    model(x)  # any module state set up
    result = attack(model, (x,), method="pgd", epsilon=0.5, steps=3, target="inputs", input_range=(0.0, 1.0),
                    norm="linf")
    (delta,) = result.perturbation
    assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0
    assert float(delta.abs().max()) <= 0.5 + 1e-6
    assert float(result.loss) > float(result.clean_loss)


def test_robustness_evaluation_in_validation_equals_attack_by_hand():
    """Under Lightning's inference_mode; the logged figures equal attack() on the same batches."""
    torch.manual_seed(0)
    model = translator()
    batches = [seq2seq_batch()] * 2
    robust = RobustnessEvaluation(epsilon=1.0, steps=3, ignore_index=0)
    fit = trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=2, num_sanity_val_steps=0,
                  callbacks=[robust])
    fit.fit(model, loader(batches), loader(batches))
    assert fit.validate_loop.inference_mode if hasattr(fit.validate_loop, "inference_mode") else True
    model.eval()
    by_hand = attack(model, seq2seq_batch(), epsilon=1.0, steps=3, objective="margin", ignore_index=0)
    correct, counted = by_hand.accuracy(seq2seq_batch(), ignore_index=0)
    clean_correct, _ = by_hand.accuracy(seq2seq_batch(), ignore_index=0, clean=True)
    metrics = fit.callback_metrics
    assert float(metrics["val_robust_loss"]) == pytest.approx(float(by_hand.loss), rel=1e-5)
    assert float(metrics["val_robust_acc"]) == pytest.approx(float(correct / counted), rel=1e-6)
    assert float(metrics["val_clean_acc"]) == pytest.approx(float(clean_correct / counted), rel=1e-6)
    assert "train_loss" not in [k for k in metrics if k.startswith("val")]


# ---------------------------------------------------------------------------------------------
# 3. Any module, with the other callbacks


def test_seq2seq_with_distillation_and_qat_on_one_trainer():
    torch.manual_seed(0)
    teacher, student = translator(d_model=64), translator(d_model=32)
    callbacks = [
        KnowledgeDistillation(teacher, ignore_index=0, temperature=1.0),
        QuantizationAwareTraining(scheme="8da4w", group_size=32),
        AdversarialTraining("fgm", epsilon=1.0),
        RecordLosses(),
    ]
    fit = trainer(max_steps=3, log_every_n_steps=1, callbacks=callbacks)
    fit.fit(student, loader([seq2seq_batch()] * 3))
    assert {"train_kd_loss", "train_task_loss", "train_clean_loss", "train_adv_loss"} <= set(fit.callback_metrics)
    assert all(torch.isfinite(torch.tensor(callbacks[-1].losses)))
    # QAT converted the student at fit end, after adversarial training through its fake-quantized layers.
    assert type(student.src_embed).__name__ == "Embedding"
    assert "Linear" in type(student.output).__name__
    with torch.no_grad():
        assert student(seq2seq_batch()["src"], seq2seq_batch()["tgt"][:, :-1]).shape == (3, 4, 13)


def test_lightning_transformer_demo_with_local_data():
    torch.manual_seed(0)
    model = LightningTransformer(vocab_size=20)
    model.prepare_data = lambda: None  # its own would download WikiText-2; the data here is local
    tokens = torch.randint(0, 20, (8, 6))
    data = DataLoader(list(zip(tokens, torch.roll(tokens, -1, dims=1), strict=True)), batch_size=4)
    callback = AdversarialTraining("freelb", epsilon=0.5, steps=2)
    fit = trainer(max_steps=2, log_every_n_steps=1, callbacks=[callback])
    fit.fit(model, data)
    assert float(fit.callback_metrics["train_adv_loss"]) > 0


def test_vae_with_fgsm_on_inputs():
    torch.manual_seed(0)
    model = VAE(input_shape=(16,), latent_dim=2, hidden_dims=(8,))
    data = DataLoader(TensorDataset(torch.rand(16, 16)), batch_size=8)
    callback = AdversarialTraining("fgsm", epsilon=0.05, target="inputs", input_range=(0.0, 1.0))
    fit = trainer(max_steps=2, log_every_n_steps=1, callbacks=[callback])
    fit.fit(model, data)
    assert float(fit.callback_metrics["train_adv_loss"]) > 0


def test_vae_with_qat_and_adversarial_inputs():
    torch.manual_seed(0)
    model = VAE(input_shape=(64,), latent_dim=4, hidden_dims=(32,))
    data = DataLoader(TensorDataset(torch.rand(16, 64)), batch_size=8)
    callbacks = [QuantizationAwareTraining(scheme="4w", group_size=32),
                 AdversarialTraining("pgd", epsilon=0.1, steps=2, target="inputs", input_range=(0.0, 1.0))]
    fit = trainer(max_steps=2, log_every_n_steps=1, callbacks=callbacks)
    with pytest.warns(UserWarning, match="leaves 1 linear layer"):  # the 4-wide latent input
        fit.fit(model, data)
    assert torch.isfinite(fit.callback_metrics["train_adv_loss"])
    assert model(torch.rand(2, 64)) is not None  # converted, still runs


def test_bf16_mixed_precision():
    torch.manual_seed(0)
    fit = trainer(max_steps=2, precision="bf16-mixed", log_every_n_steps=1,
                  callbacks=[AdversarialTraining("pgd", epsilon=1.0, steps=2)])
    fit.fit(translator(), loader([seq2seq_batch()] * 2))
    assert torch.isfinite(fit.callback_metrics["train_adv_loss"])


# ---------------------------------------------------------------------------------------------
# 4. Resume and two processes


def test_resume_continues_with_the_same_losses(tmp_path):
    """One batch per epoch, so the resumed run sees exactly the batches the uninterrupted one did."""

    def run(max_epochs: int, ckpt_path: str | None = None, checkpoint_dir: Path | None = None) -> list[float]:
        torch.manual_seed(0)
        record = RecordLosses()
        callbacks = [AdversarialTraining("pgd", epsilon=0.5, steps=2), record]
        if checkpoint_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1))
        fit = trainer(max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None)
        fit.fit(TokenClassifier(), loader(token_batches(1)), ckpt_path=ckpt_path)
        return record.losses

    uninterrupted = run(6)
    first = run(3, checkpoint_dir=tmp_path)
    (mid,) = sorted(tmp_path.glob("epoch=2*.ckpt"))
    resumed = run(6, ckpt_path=str(mid))
    assert first == pytest.approx(uninterrupted[:3], rel=1e-6)
    assert resumed == pytest.approx(uninterrupted[3:], rel=1e-6)


def test_resume_with_other_settings_warns(tmp_path):
    fit = trainer(max_epochs=1, callbacks=[AdversarialTraining("fgm", epsilon=0.5)])
    fit.fit(TokenClassifier(), loader(token_batches(1)))
    fit.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.warns(UserWarning, match="epsilon=0.25"):
        trainer(max_epochs=2, callbacks=[AdversarialTraining("fgm", epsilon=0.25)]).fit(
            TokenClassifier(), loader(token_batches(1)), ckpt_path=tmp_path / "a.ckpt"
        )


class RecordRank(L.Callback):
    """Writes the batches this process trained on and its final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.batches: list[list[list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([batch[0].tolist(), batch[1].tolist()])

    def on_train_end(self, trainer, pl_module):
        record = {
            "batches": self.batches,
            "weights": {k: v.tolist() for k, v in pl_module.state_dict().items()},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")},
        }
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_spawn_two_processes_equal_one_process_on_the_whole_batch(tmp_path, ddp_spawn):
    torch.manual_seed(0)
    model = TokenClassifier()
    oracle = TokenClassifier()
    oracle.load_state_dict(model.state_dict())
    dataset = [(ids, y) for batch in token_batches(2, size=8) for ids, y in zip(*batch, strict=True)]
    robust = RobustnessEvaluation(epsilon=0.8, steps=2)
    fit = trainer(devices=2, strategy=ddp_spawn, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
                  callbacks=[AdversarialTraining("fgm", epsilon=0.8), robust, RecordRank(str(tmp_path))])
    fit.fit(model, DataLoader(dataset, batch_size=4), DataLoader(dataset, batch_size=4))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # synced across the processes
    assert 0.0 <= ranks[0]["metrics"]["val_robust_acc"] <= ranks[0]["metrics"]["val_clean_acc"] <= 1.0
    # One process on each step's 8 samples (both ranks' 4): DDP averages the ranks' gradients, the
    # gradient of the mean loss over the 8, since each sample's perturbation is its own.
    steps = [
        (torch.tensor(ranks[0]["batches"][i][0] + ranks[1]["batches"][i][0]),
         torch.tensor(ranks[0]["batches"][i][1] + ranks[1]["batches"][i][1]))
        for i in range(2)
    ]
    textbook_fit(oracle, steps, "fgm", 0.8, 0.8, 1, 0.5, "l2")
    for key, value in oracle.state_dict().items():
        torch.testing.assert_close(torch.tensor(ranks[0]["weights"][key]), value, atol=1e-6, rtol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------
# 5. Bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epsilon=0.0), "`epsilon` must be a number > 0"),
        (dict(epsilon=-1.0), "`epsilon` must be a number > 0"),
        (dict(method="pgd", steps=0), "`steps` must be an integer >= 1"),
        (dict(method="fgm", steps=3), "'fgm' takes one step"),
        (dict(method="pdg"), "unknown adversarial method 'pdg'.*did you mean 'pgd'"),
        (dict(norm="l1"), "unknown norm 'l1'"),
        (dict(target="weights"), "unknown adversarial target 'weights'"),
        (dict(adv_weight=0.0), r"`adv_weight` must be in \(0, 1\]"),
        (dict(alpha=-0.1), "`alpha` must be > 0"),
        (dict(input_range=(1.0, 0.0)), "`input_range` must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialTraining(**kwargs)


def test_bad_arguments_of_evaluation_and_attack():
    with pytest.raises(ValueError, match="`epsilon` must be"):
        RobustnessEvaluation(epsilon=0)
    with pytest.raises(ValueError, match="`limit_batches`"):
        RobustnessEvaluation(limit_batches=0)
    with pytest.raises(ValueError, match="unknown attack objective 'error'"):
        RobustnessEvaluation(objective="error")
    with pytest.raises(ValueError, match="accuracy=False does not measure"):
        RobustnessEvaluation(objective="margin", accuracy=False)
    with pytest.raises(ValueError, match="unknown attack objective 'error'"):
        attack(TokenClassifier(), token_batches(1)[0], objective="error")
    with pytest.raises(TypeError, match="no training_step: pass `loss_fn"):
        attack(nn.Embedding(3, 2), torch.tensor([[1]]))


def test_a_model_with_no_embedding():
    model = VAE(input_shape=(16,), latent_dim=2, hidden_dims=(8,))
    data = DataLoader(TensorDataset(torch.rand(8, 16)), batch_size=8)
    with pytest.raises(ValueError, match=r"VAE has no nn\.Embedding to perturb; use target='inputs'"):
        trainer(max_steps=1, callbacks=[AdversarialTraining("fgm")]).fit(model, data)
    with pytest.raises(ValueError, match=r"no module named 'emb'; did you mean '(src|tgt)_embed'"):
        trainer(max_steps=1, callbacks=[AdversarialTraining("fgm", embeddings=["emb"])]).fit(
            translator(), loader([seq2seq_batch()])
        )


def test_manual_optimization_is_refused():
    model = TokenClassifier()
    model.automatic_optimization = False
    with pytest.raises(ValueError, match="AdversarialTraining needs automatic optimization"):
        trainer(max_steps=1, callbacks=[AdversarialTraining("fgm")]).fit(model, loader(token_batches(1)))


def test_gradient_accumulation_equals_the_textbook_loop_on_the_merged_batch():
    """Two batches of 4 accumulated equal one textbook step on their 8 samples (per-sample deltas)."""
    torch.manual_seed(0)
    model, oracle = TokenClassifier(), TokenClassifier()
    oracle.load_state_dict(model.state_dict())
    halves = token_batches(2)
    trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[AdversarialTraining("pgd", epsilon=0.8, alpha=0.8, steps=2)]).fit(
        model, loader(halves)
    )
    merged = (torch.cat([halves[0][0], halves[1][0]]), torch.cat([halves[0][1], halves[1][1]]))
    textbook_fit(oracle, [merged], "pgd", 0.8, 0.8, 2, 0.5, "l2")
    for key, value in oracle.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)


class LearnedPositions(TokenClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(5, DIM)

    def forward(self, ids: Tensor) -> Tensor:
        return self.from_embeddings(self.emb(ids) + self.positions(torch.arange(ids.shape[1])), ids)


def test_position_embeddings_without_a_batch_axis_are_named_out():
    fit = trainer(max_steps=1, callbacks=[AdversarialTraining("fgm")])
    with pytest.raises(ValueError, match=r"different first \(batch\) axes: \[\(4, 5, 6\), \(5, 6\)\].*embeddings="):
        fit.fit(LearnedPositions(), loader(token_batches(1)))
    record = RecordLosses()
    trainer(max_steps=1, callbacks=[AdversarialTraining("fgm", embeddings=["emb"]), record]).fit(
        LearnedPositions(), loader(token_batches(1))
    )
    assert len(record.losses) == 1


def test_an_attack_that_cannot_move_is_an_error():
    class Frozen(TokenClassifier):
        def forward(self, ids):
            with torch.no_grad():
                e = self.emb(ids)
            return self.from_embeddings(e.detach(), ids)

    with pytest.raises(RuntimeError, match="no gradient reaches it"):
        trainer(max_steps=1, callbacks=[AdversarialTraining("fgm")]).fit(Frozen(), loader(token_batches(1)))


def test_robustness_evaluation_checks_its_settings_before_training():
    fit = trainer(max_steps=1, callbacks=[RobustnessEvaluation(forward_module="decoder")])
    with pytest.raises(ValueError, match=r"no module named 'decoder' \(`forward_module`\)"):
        fit.fit(TokenClassifier(), loader(token_batches(1)))


def test_inputs_of_a_named_tuple_batch():
    from collections import namedtuple

    Pair = namedtuple("Pair", ["x", "y"])

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch.x).squeeze(-1), batch.y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    batches = [Pair(torch.rand(4, 4), torch.rand(4)) for _ in range(2)]
    fit = trainer(max_steps=2, log_every_n_steps=1,
                  callbacks=[AdversarialTraining("fgsm", epsilon=0.1, target="inputs", inputs=["x"])])
    fit.fit(Regressor(), DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    assert float(fit.callback_metrics["train_adv_loss"]) >= 0


def test_no_float_tensor_for_target_inputs():
    with pytest.raises(ValueError, match=r"target='inputs' found no floating-point tensor.*target='embeddings'"):
        trainer(max_steps=1, callbacks=[AdversarialTraining("fgm", target="inputs")]).fit(
            TokenClassifier(), loader(token_batches(1))
        )
