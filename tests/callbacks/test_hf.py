"""The callbacks on a user's own LightningModule around a Hugging Face model, with default arguments.

The module (``tests.callbacks.hf.HFModule``) is what users write: ``training_step`` returns
``self.model(**batch).loss``, there is no ``forward``, padding is labelled ``-100``. For T5, BART,
a BERT classifier and GPT-2, each callback with no extra argument:

- fits a few steps with finite losses and logs what it documents;
- KnowledgeDistillation's term equals Hinton's loss by hand on the HF models' ``.logits``,
  averaged over the tokens HF's own loss counts (labels not ``-100``, shifted for GPT-2);
- the attack perturbs the token embeddings only (not T5's relative attention bias, not BART's,
  BERT's or GPT-2's position embeddings, not BERT's token types), one ``[B, T, d]`` per call;
- RobustnessEvaluation's clean accuracy counts the tokens HF's loss counts;
- QuantizationAwareTraining quantizes every projection of the transformer blocks;
- all four together.

The control, ``test_fixture_trains_with_a_plain_trainer``, shows the fixtures train without them.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.adversarial import attack
from llmkit.callbacks import (
    AdversarialTraining,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    RobustnessEvaluation,
)
from tests.accelerator import ACCELERATOR
from tests.callbacks import hf
from tests.callbacks.helpers import RecordLosses

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # GPT-2's Conv1D projections stay in float, named in QAT's warning (asserted where it matters).
    pytest.mark.filterwarnings("ignore:QuantizationAwareTraining leaves .*Conv1D"),
]

kinds = pytest.mark.parametrize("kind", hf.KINDS)
STEPS = 3  # one epoch of hf.make's training loader, so that validation runs at its end


def fit(
    module: L.LightningModule, train, val, callbacks: list[L.Callback], max_steps: int = STEPS
) -> tuple[L.Trainer, list[float]]:
    """Fit quietly on the tests' accelerator; returns the trainer and the loss of every step (after the callbacks)."""
    record = RecordLosses()
    trainer = L.Trainer(
        accelerator=ACCELERATOR, devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, callbacks=[*callbacks, record],
    )
    trainer.fit(module, train, val)
    return trainer, record.losses


def assert_finite_steps(losses: list[float], steps: int = STEPS) -> None:
    assert len(losses) == steps, f"{len(losses)} training steps ran, expected {steps}"
    assert all(math.isfinite(loss) for loss in losses), losses


def assert_logged(trainer: L.Trainer, names: list[str]) -> None:
    metrics = trainer.callback_metrics
    missing = [name for name in names if name not in metrics]
    assert not missing, f"not logged: {missing}; logged: {sorted(metrics)}"
    for name in names:
        assert torch.isfinite(metrics[name]).all(), (name, metrics[name])


def scored(kind: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits [N, V], labels [N])`` of the tokens HF's own loss scores (labels not -100).

    A causal LM's logits at position ``i`` predict ``labels[i + 1]`` (HF shifts inside its loss).
    """
    if kind == "gpt2":
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = labels != hf.IGNORE
    return logits[keep], labels[keep]


def projections(module: nn.Module) -> list[str]:
    """Names of the weight matrices of the transformer blocks: ``nn.Linear`` and HF's ``Conv1D`` (GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, layer in module.named_modules() if isinstance(layer, nn.Linear | Conv1D)]


# ---------------------------------------------------------------------------------------------
# The fixtures alone


@kinds
def test_fixture_trains_with_a_plain_trainer(kind):
    module, train, val = hf.make(kind)
    before = copy.deepcopy(module.model.state_dict())
    trainer, losses = fit(module, train, val, [])
    assert_finite_steps(losses)
    assert_logged(trainer, ["train_loss", "val_loss"])
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no weight changed in training"


# ---------------------------------------------------------------------------------------------
# KnowledgeDistillation


@kinds
def test_knowledge_distillation_defaults(kind):
    student, train, val = hf.make(kind)
    teacher = hf.fresh_copy(student, seed=1)
    teacher_weights = copy.deepcopy(teacher.state_dict())
    trainer, losses = fit(student, train, val, [KnowledgeDistillation(teacher)])
    assert_finite_steps(losses)
    assert_logged(trainer, ["train_task_loss", "train_kd_loss", "val_loss"])
    assert all(torch.equal(v, teacher_weights[k]) for k, v in teacher.state_dict().items()), "the teacher trained"


@kinds
def test_distillation_term_equals_hinton_by_hand(kind):
    student, train, val = hf.make(kind)
    teacher = hf.fresh_copy(student, seed=1)
    batch = next(iter(train))
    temperature, alpha = 2.0, 0.5  # KnowledgeDistillation's defaults
    # The first step's forward runs on the initial weights: recompute it on copies.
    with torch.no_grad():
        s_out = copy.deepcopy(student.model).train()(**batch)
        t_out = copy.deepcopy(teacher.model).eval()(**batch)
    s, _ = scored(kind, s_out.logits, batch["labels"])
    t, _ = scored(kind, t_out.logits, batch["labels"])
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="none").sum(-1)
    expected_kd = (kl * temperature**2).mean()
    expected_total = (1 - alpha) * s_out.loss + alpha * expected_kd

    trainer, losses = fit(student, train, val, [KnowledgeDistillation(teacher)], max_steps=1)
    assert_finite_steps(losses, 1)
    assert_logged(trainer, ["train_task_loss", "train_kd_loss"])
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train_task_loss"], s_out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["train_kd_loss"], expected_kd, rtol=1e-5, atol=1e-6)
    assert losses[0] == pytest.approx(float(expected_total), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# QuantizationAwareTraining


@kinds
def test_quantization_aware_training_defaults(kind):
    module, train, val = hf.make(kind)
    batch = next(iter(val))
    trainer, losses = fit(module, train, val, [QuantizationAwareTraining()])
    assert_finite_steps(losses)
    assert_logged(trainer, ["val_loss"])
    quantized = [n for n, p in module.named_parameters() if hasattr(p, "__tensor_flatten__")]
    assert quantized, "no weight was converted at the end of fit"
    with torch.no_grad():
        loss = module.model.eval()(**batch).loss
    assert torch.isfinite(loss), "the converted model gives no finite loss"


@kinds
def test_quantization_aware_training_quantizes_every_projection(kind):
    module, train, val = hf.make(kind)
    names = projections(module)
    if kind == "gpt2":
        # GPT-2's block projections are HF Conv1D modules, not nn.Linear: torchao quantizes
        # nn.Linear only, so they stay in float, named in the warning; its lm_head is quantized.
        with pytest.warns(UserWarning, match=r"h\.0\.attn\.c_attn \(Hugging Face Conv1D, not an nn\.Linear\)"):
            fit(module, train, val, [QuantizationAwareTraining()])
        names = [n for n in names if isinstance(module.get_submodule(n), nn.Linear)]
        assert names == ["model.lm_head"]
    else:
        fit(module, train, val, [QuantizationAwareTraining()])
    # Every width is 32 or 64, so the default int4 group-32 scheme applies to all of them.
    left_float = [n for n in names if not hasattr(module.get_submodule(n).weight, "__tensor_flatten__")]
    assert not left_float, f"left in float by QuantizationAwareTraining(): {left_float}"


# ---------------------------------------------------------------------------------------------
# AdversarialTraining, attack, RobustnessEvaluation


@kinds
def test_adversarial_training_defaults(kind):
    module, train, val = hf.make(kind)
    trainer, losses = fit(module, train, val, [AdversarialTraining()])
    assert_finite_steps(losses)
    assert_logged(trainer, ["train_clean_loss", "train_adv_loss", "val_loss"])


def token_sites(kind: str, batch: dict[str, Tensor]) -> list[tuple[int, ...]]:
    """The shapes of the token embeddings' outputs, in call order: encoder (and decoder) inputs."""
    b, s = batch["input_ids"].shape
    if kind in hf.SEQ2SEQ:
        return [(b, s, hf.WIDTH), (b, batch["labels"].shape[1], hf.WIDTH)]
    return [(b, s, hf.WIDTH)]


@kinds
def test_attack_perturbs_only_the_token_embeddings(kind):
    module, train, _ = hf.make(kind)
    batch = next(iter(train))
    result = attack(module, batch)
    assert [tuple(d.shape) for d in result.perturbation] == token_sites(kind, batch)
    assert torch.isfinite(result.loss) and result.loss >= result.clean_loss


@kinds
def test_robustness_evaluation_defaults(kind):
    module, train, val = hf.make(kind)
    trainer, losses = fit(module, train, val, [RobustnessEvaluation()])
    assert_finite_steps(losses)
    assert_logged(trainer, ["val_loss", "val_robust_loss", "val_robust_acc", "val_clean_acc"])
    metrics = trainer.callback_metrics
    assert all(0.0 <= float(metrics[name]) <= 1.0 for name in ("val_robust_acc", "val_clean_acc"))


@kinds
def test_robustness_clean_accuracy_counts_the_tokens_hf_scores(kind):
    module, train, val = hf.make(kind)
    trainer, _ = fit(module, train, val, [RobustnessEvaluation()])
    batch = next(iter(val))
    with torch.no_grad():
        logits = module.model.eval()(**batch).logits
    predicted, labels = scored(kind, logits, batch["labels"])
    expected = (predicted.argmax(-1) == labels).float().mean()
    assert_logged(trainer, ["val_clean_acc"])
    torch.testing.assert_close(trainer.callback_metrics["val_clean_acc"], expected)


# ---------------------------------------------------------------------------------------------
# All together


@kinds
def test_all_callbacks_together(kind):
    module, train, val = hf.make(kind)
    callbacks = [
        QuantizationAwareTraining(), KnowledgeDistillation(hf.fresh_copy(module, seed=1)), AdversarialTraining(),
        RobustnessEvaluation(),
    ]
    trainer, losses = fit(module, train, val, callbacks)
    assert_finite_steps(losses)
    assert_logged(trainer, [
        "train_task_loss", "train_kd_loss", "train_clean_loss", "train_adv_loss", "val_loss", "val_robust_loss",
        "val_robust_acc", "val_clean_acc",
    ])
