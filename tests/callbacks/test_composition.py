"""llmkit's callbacks together: any list order gives the same fit, and the module is left as it was.

Oracles: the fit with the callbacks in one order (every permutation gives the same losses to
1e-6); an uninterrupted fit (for save -> resume); the module's own attributes, hooks, submodules
and state-dict keys before the fit (after it, and after an exception in it); a closed form for
the composed loss (KD's term on the clean pass around AdversarialTraining's mix).

The order, module-as-before, ``test(ckpt_path)`` and save -> resume tests run on each
:class:`Case`: a Seq2SeqTransformer with chosen settings, a CausalLMTransformer with every
callback's defaults (and, for save -> resume, T5 in a user's LightningModule).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llmkit import VAE
from llmkit.adversarial import quiet_logging
from llmkit.callbacks import (
    AdversarialTraining,
    GenerationEvaluation,
    KnowledgeDistillation,
    QuantizationAwareTraining,
    RobustnessEvaluation,
)
from llmkit.callbacks._composition import ComposingCallback, Composition
from llmkit.metrics import BLEUScore
from tests.callbacks.helpers import (
    RecordLosses,
    language_model,
    lm_batch,
    seq2seq_batch,
    snapshot,
    trainer,
    translator,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("kd", "qat", "adv")


def seq2seq_data(n: int = 1) -> DataLoader:
    return DataLoader([seq2seq_batch()] * n, batch_size=None)


def seq2seq_callbacks(teacher: nn.Module) -> dict[str, L.Callback]:
    return {
        # A Linear among the matched layers: QAT swaps it, wherever QAT stands in the list.
        "kd": KnowledgeDistillation(teacher, ignore_index=0, layers={
            "encoder.layers.0": "encoder.layers.0",
            "decoder.layers.0.feed_forward.linear1": "decoder.layers.0.feed_forward.linear1",
        }),
        "qat": QuantizationAwareTraining(convert_on_fit_end=False),
        "adv": AdversarialTraining("pgd", epsilon=0.5, steps=2),
    }


class Case(NamedTuple):
    """A fresh, seeded student with llmkit's three callbacks by name, and its data (one batch per epoch).

    ``evaluation``: validation callbacks run beside them, which log ``scores`` (each in [0, 1]).
    """

    module: L.LightningModule
    callbacks: dict[str, L.Callback]
    data: DataLoader
    evaluation: tuple[L.Callback, ...] = ()
    scores: tuple[str, ...] = ()


def seq2seq_case() -> Case:
    torch.manual_seed(0)
    student, teacher = translator(d_model=32), translator(d_model=64)
    evaluation = (
        GenerationEvaluation({"bleu": BLEUScore(ignore_index=0)}, num_batches=1, ignore_ids=(2,),
                             prefix="gen_"),  # the translator logs its own val_bleu
        RobustnessEvaluation(epsilon=0.5, steps=2, ignore_index=0),
    )
    return Case(student, seq2seq_callbacks(teacher), seq2seq_data(), evaluation, ("gen_bleu", "val_robust_acc"))


def causal_lm_case() -> Case:
    """A CausalLMTransformer (rotary positions) with every callback's defaults: KD from a twice wider LM, 8da4w, FGM."""
    torch.manual_seed(0)
    student, teacher = language_model(32), language_model(64)
    callbacks = {"kd": KnowledgeDistillation(teacher), "qat": QuantizationAwareTraining(), "adv": AdversarialTraining()}
    # A batch of ids is its own labels (shifted by one): the accuracy's targets are named.
    robust = RobustnessEvaluation(epsilon=0.5, steps=2, target_fn=lambda ids: ids)
    return Case(student, callbacks, DataLoader([lm_batch()], batch_size=None), (robust,), ("val_robust_acc",))


def t5_case() -> Case:
    hf = pytest.importorskip("tests.callbacks.hf")
    torch.manual_seed(0)
    module = hf.make("t5")[0]
    callbacks = {"kd": KnowledgeDistillation(hf.fresh_copy(module)), "qat": QuantizationAwareTraining(),
                 "adv": AdversarialTraining("pgd", steps=2)}
    return Case(module, callbacks, hf.loader("t5", batches=1))


CASES = [pytest.param(seq2seq_case, id="seq2seq"), pytest.param(causal_lm_case, id="causal_lm")]


def run_case(case: Callable[[], Case], order: tuple[str, ...], steps: int = 3) -> tuple[list[float], nn.Module]:
    student, callbacks, data, *_ = case()
    record = RecordLosses()
    trainer(max_steps=steps, callbacks=[*(callbacks[name] for name in order), record]).fit(student, data)
    return record.losses, student


# ---------------------------------------------------------------------------------------------
# 1. Any order, the same fit


@pytest.mark.parametrize("case", CASES)
def test_every_order_of_the_three_callbacks_gives_the_same_losses(case):
    reference, _ = run_case(case, NAMES)
    assert len(reference) == 3 and all(torch.isfinite(torch.tensor(reference)))
    for order in itertools.permutations(NAMES):
        losses, _ = run_case(case, order)
        assert losses == pytest.approx(reference, rel=1e-6, abs=1e-7), order


def test_composed_loss_is_distillation_on_the_clean_pass_around_the_adversarial_mix():
    """(1 - alpha) * ((1 - w) clean + w adv) + alpha * KD(clean logits): checked by hand on step one."""
    torch.manual_seed(0)
    student, teacher = translator(d_model=32), translator(d_model=64)
    batch = seq2seq_batch()
    alpha, w, eps = 0.3, 0.5, 0.5
    with torch.no_grad():
        # FGM by hand on the clean pass's embeddings (one site per embedding call: src, tgt).
        expected_student = translator(d_model=32)
        expected_student.load_state_dict(student.state_dict())
    deltas: list[torch.Tensor] = []

    def add_delta(module, args, output):
        delta = torch.zeros_like(output, requires_grad=True)
        deltas.append(delta)
        mask = (args[0] != 0).unsqueeze(-1).to(output.dtype)
        return output + delta * mask

    handles = [m.register_forward_hook(add_delta) for m in (expected_student.src_embed, expected_student.tgt_embed)]
    with quiet_logging(expected_student):
        clean = expected_student.training_step(batch, 0)
    grads = torch.autograd.grad(clean, deltas)
    norm = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt().clamp_min(1e-12)
    handles_values = [eps * g / norm.reshape(-1, 1, 1) for g in grads]
    for h in handles:
        h.remove()
    sites = iter(handles_values)
    handles = [
        m.register_forward_hook(lambda mod, args, out: out + next(sites) * (args[0] != 0).unsqueeze(-1).to(out.dtype))
        for m in (expected_student.src_embed, expected_student.tgt_embed)
    ]
    with quiet_logging(expected_student):
        adv = expected_student.training_step(batch, 0)
    for h in handles:
        h.remove()
    s_logits = expected_student(batch["src"], batch["tgt"][:, :-1])
    t_logits = teacher(batch["src"], batch["tgt"][:, :-1])
    mask = batch["tgt"][:, 1:] != 0
    kl = F.kl_div(F.log_softmax(s_logits / 2, -1), F.softmax(t_logits / 2, -1), reduction="none").sum(-1) * 4
    kd = kl[mask].mean()
    expected = float(((1 - alpha) * ((1 - w) * clean + w * adv) + alpha * kd).detach())

    for order in ((0, 1), (1, 0)):
        torch.manual_seed(0)
        model = translator(d_model=32)
        model.load_state_dict(student.state_dict())
        callbacks = [KnowledgeDistillation(teacher, alpha=alpha, ignore_index=0), AdversarialTraining("fgm", epsilon=eps)]
        record = RecordLosses()
        fit = trainer(max_steps=1, callbacks=[callbacks[order[0]], callbacks[order[1]], record])
        fit.fit(model, seq2seq_data())
        assert record.losses[0] == pytest.approx(expected, rel=1e-5)
        # The logged task loss is the clean pass's, whatever else runs.
        assert float(fit.callback_metrics["train_task_loss"]) == pytest.approx(clean.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. The module as it was


@pytest.mark.parametrize("case", CASES)
def test_the_module_is_as_before_after_fit_and_after_an_exception(case):
    for order in itertools.permutations(("kd", "adv")):
        student, callbacks, data, evaluation, scores = case()
        before = snapshot(student)
        fit = trainer(max_steps=2, callbacks=[*evaluation, *(callbacks[n] for n in order)], limit_val_batches=1)
        fit.fit(student, data, data)
        assert snapshot(student) == before, order
        assert scores and all(0.0 <= float(fit.callback_metrics[name]) <= 1.0 for name in scores)
        case().module.load_state_dict(student.state_dict())  # strictly

    class Boom(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            raise RuntimeError("boom")

    student, callbacks, data, *_ = case()
    before = snapshot(student)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=2, callbacks=[callbacks["adv"], callbacks["kd"], Boom()]).fit(student, data)
    assert snapshot(student) == before
    assert Composition.of(student) is None


@pytest.mark.parametrize("case", CASES)
def test_quantization_changes_only_its_layers(case):
    """QAT's prepare (and convert) swaps layers (its documented change); nothing else of the others is left."""
    _, prepared_alone = run_case(case, ("qat",))
    for order in (("adv", "qat", "kd"), ("kd", "adv", "qat")):
        _, student = run_case(case, order)
        assert snapshot(student) == snapshot(prepared_alone), order


class Nothing(ComposingCallback):
    """Wraps training_step and adds nothing: the mechanism's own cost and behaviour."""

    def _attach(self, trainer, pl_module, composition):
        composition.wrap_step(self.layer, lambda inner, *args, **kwargs: inner(*args, **kwargs))


def test_a_wrapper_that_adds_nothing_changes_nothing():
    def run(callbacks):
        torch.manual_seed(0)
        model, record = translator(d_model=32), RecordLosses()
        trainer(max_steps=3, callbacks=[*callbacks, record]).fit(model, seq2seq_data())
        return record.losses, model

    plain, _ = run([])
    wrapped, model = run([Nothing()])
    assert wrapped == plain
    assert "training_step" not in vars(model)


def test_an_instance_training_step_of_the_users_is_restored():
    torch.manual_seed(0)
    model = translator(d_model=32)
    own = model.training_step
    model.training_step = own  # the user's own instance attribute
    trainer(max_steps=1, callbacks=[Nothing()]).fit(model, seq2seq_data())
    assert vars(model)["training_step"] is own


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints: test(ckpt_path), save -> resume


@pytest.mark.parametrize("case", CASES)
def test_test_with_ckpt_path_last_after_a_composed_fit(case, tmp_path):
    student, callbacks, data, *_ = case()
    callbacks["qat"] = QuantizationAwareTraining()  # converts at the end of fit
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit = trainer(max_steps=2, callbacks=[*callbacks.values(), checkpoint], enable_checkpointing=True)
    fit.fit(student, data)
    results = fit.test(student, data, ckpt_path="last", verbose=False)
    assert results and all(torch.isfinite(torch.tensor(v)) for v in results[0].values())


@pytest.mark.parametrize("case", [*CASES, pytest.param(t5_case, id="t5")])
def test_save_and_resume_equals_an_uninterrupted_fit(case, tmp_path):
    """One batch per epoch, so the resumed run sees exactly the batches the uninterrupted one did."""

    def run(order, max_epochs, ckpt_path=None, directory=None):
        module, callbacks, data, *_ = case()
        record = RecordLosses()
        extra = [ModelCheckpoint(dirpath=directory, save_top_k=-1, every_n_epochs=1)] if directory else []
        fit = trainer(max_epochs=max_epochs, callbacks=[*(callbacks[n] for n in order), record, *extra],
                      enable_checkpointing=bool(directory))
        fit.fit(module, data, ckpt_path=ckpt_path)
        return record.losses

    uninterrupted = run(NAMES, 4)
    run(NAMES, 2, directory=tmp_path)
    (path,) = tmp_path.glob("epoch=1*.ckpt")
    resumed = run(("adv", "kd", "qat"), 4, ckpt_path=str(path))
    assert resumed == pytest.approx(uninterrupted[2:], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. The VAE (inputs perturbed), DDP


def vae_data() -> DataLoader:
    x = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x), batch_size=8)


def run_vae(order: tuple[str, ...]) -> list[float]:
    torch.manual_seed(0)
    student = VAE(input_shape=(64,), latent_dim=32, hidden_dims=(32,))
    teacher = VAE(input_shape=(64,), latent_dim=32, hidden_dims=(64,))
    callbacks = {
        "kd": KnowledgeDistillation(teacher, loss="mse"),
        "qat": QuantizationAwareTraining(convert_on_fit_end=False),
        "adv": AdversarialTraining("fgsm", epsilon=0.05, target="inputs", input_range=(0.0, 1.0)),
    }
    record = RecordLosses()
    trainer(max_steps=2, callbacks=[*(callbacks[n] for n in order), record]).fit(student, vae_data())
    return record.losses


def test_vae_with_every_order_on_its_inputs():
    reference = run_vae(NAMES)
    for order in itertools.permutations(NAMES):
        assert run_vae(order) == pytest.approx(reference, rel=1e-6), order


@pytest.mark.slow
def test_ddp_spawn_two_processes_with_every_callback(ddp_spawn):
    torch.manual_seed(0)
    student, teacher = translator(d_model=32), translator(d_model=64)
    callbacks = seq2seq_callbacks(teacher)
    callbacks["qat"] = QuantizationAwareTraining()
    robust = RobustnessEvaluation(epsilon=0.5, steps=2, ignore_index=0)
    fit = trainer(max_steps=2, devices=2, strategy=ddp_spawn, callbacks=[*callbacks.values(), robust],
                  limit_val_batches=1)
    fit.fit(student, seq2seq_data(2), seq2seq_data(2))
    assert "val_robust_acc" in fit.callback_metrics


# ---------------------------------------------------------------------------------------------
# 5. Hugging Face models wrapped in a user's LightningModule, every callback with its defaults


def run_hf(kind: str, order: tuple[str, ...], steps: int = 2, **fit_kwargs) -> tuple[list[float], L.LightningModule]:
    hf = pytest.importorskip("tests.callbacks.hf")
    torch.manual_seed(0)
    module, train, _ = hf.make(kind)
    callbacks = {
        "kd": KnowledgeDistillation(hf.fresh_copy(module)),
        "qat": QuantizationAwareTraining(convert_on_fit_end=False),
        "adv": AdversarialTraining(),
    }
    record = RecordLosses()
    trainer(max_steps=steps, callbacks=[*(callbacks[n] for n in order), record], **fit_kwargs).fit(module, train)
    return record.losses, module


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_hugging_face_models_with_every_order(kind):
    reference, _ = run_hf(kind, NAMES)
    assert all(torch.isfinite(torch.tensor(reference)))
    for order in itertools.permutations(NAMES):
        losses, _ = run_hf(kind, order)
        assert losses == pytest.approx(reference, rel=1e-6, abs=1e-7), order


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_hugging_face_module_as_before_then_test_with_ckpt_path(kind, tmp_path):
    hf = pytest.importorskip("tests.callbacks.hf")
    torch.manual_seed(0)
    module, train, val = hf.make(kind)
    before = snapshot(module)
    robust = RobustnessEvaluation(epsilon=0.5, steps=2)
    callbacks = [AdversarialTraining(), KnowledgeDistillation(hf.fresh_copy(module)), robust]
    if kind == "t5":  # a generating model: decode and score in validation beside the others
        callbacks.insert(1, GenerationEvaluation(
            {"bleu": BLEUScore(ignore_index=hf.PAD)}, num_batches=1, ignore_ids=(hf.PAD, 1),
            generate_fn=lambda m, b: m.model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                      max_new_tokens=6),
        ))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit = trainer(max_epochs=1, limit_train_batches=2, callbacks=[*callbacks, checkpoint], enable_checkpointing=True,
                  limit_val_batches=1)
    fit.fit(module, train, val)
    assert snapshot(module) == before
    assert {"val_robust_acc", "val_clean_acc", "train_kd_loss", "train_adv_loss"} <= set(fit.callback_metrics)
    assert (kind == "t5") == ("val_bleu" in fit.callback_metrics)
    fit.validate(module, val, ckpt_path="last", verbose=False)
    # Now quantized: the attack in validation still measures (straight-through gradients).
    qat = QuantizationAwareTraining()
    trainer(max_steps=1, callbacks=[qat]).fit(module, train)
    results = trainer(callbacks=[robust], limit_val_batches=1).validate(module, val, verbose=False)
    assert math.isfinite(results[0]["val_robust_acc"])


def test_robustness_evaluation_needs_a_forward_module_it_can_find():
    from tests.callbacks.test_distillation import TwoModels, classification_data

    record = RecordLosses()
    with pytest.raises(ValueError, match=r"pass `forward_module` naming the one whose forward"):
        trainer(max_steps=1, callbacks=[RobustnessEvaluation(target="inputs"), record]).fit(
            TwoModels(), classification_data()
        )
    assert record.losses == []  # at setup, before any step


@pytest.mark.slow
def test_ddp_two_processes_launched_as_torchrun_does(tmp_path):
    """``strategy="ddp"`` (not spawn): each rank is its own process, as under torchrun or SLURM."""
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "tests" / "callbacks" / "ddp_fit.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weight"] == ranks[1]["weight"] == "IntxUnpackedToInt8Tensor"  # converted on both
    assert ranks[0]["logits"] == pytest.approx(ranks[1]["logits"], abs=1e-6)  # the same model on both
    assert len(ranks[0]["losses"]) == 2 and all(math.isfinite(x) for x in ranks[0]["losses"])


# ---------------------------------------------------------------------------------------------
# 6. The composed step against a textbook loop (BatchNorm included)


def test_distillation_around_fgm_equals_the_textbook_loop_with_batch_norm():
    """Weights after 3 SGD steps of KD + FGM equal a hand-written loop.

    Per step: the clean pass (delta = 0) gives the FGM direction; the adversarial pass runs at
    ``eps * g / ||g||``; the gradient is that of ``(1 - a)((1 - w) clean + w adv) + a KD(clean)``.
    BatchNorm's running statistics are updated by both passes (both are trained on), in place, as
    a plain loop updates them.
    """
    from tests.callbacks.test_adversarial import TokenClassifier, loader, token_batches

    alpha, w, eps, temperature = 0.4, 0.5, 0.3, 2.0
    batches = token_batches(3)
    torch.manual_seed(0)
    student, teacher = TokenClassifier(batch_norm=True), TokenClassifier(batch_norm=True).eval()
    plain = TokenClassifier(batch_norm=True)
    plain.load_state_dict(student.state_dict())
    for order in ((0, 1), (1, 0)):
        model = TokenClassifier(batch_norm=True)
        model.load_state_dict(student.state_dict())
        callbacks = [KnowledgeDistillation(teacher, alpha=alpha, temperature=temperature),
                     AdversarialTraining("fgm", epsilon=eps, adv_weight=w)]
        trainer(max_steps=3, callbacks=[callbacks[i] for i in order]).fit(model, loader(batches))
        if order == (0, 1):
            first = model
        else:
            for (name, a), b in zip(first.state_dict().items(), model.state_dict().values(), strict=True):
                torch.testing.assert_close(a, b, msg=name)

    optimizer = torch.optim.SGD(plain.parameters(), lr=plain.lr)
    params = list(plain.parameters())
    for ids, y in batches:
        mask = (ids != 0).unsqueeze(-1).float()
        delta = torch.zeros(*ids.shape, 6, requires_grad=True)
        logits = plain.from_embeddings(plain.emb(ids) + delta * mask, ids)
        clean = F.cross_entropy(logits, y)
        (g,) = torch.autograd.grad(clean, delta, retain_graph=True)
        g = g * mask
        with torch.no_grad():
            soft = teacher(ids)
        kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(soft / temperature, -1),
                      reduction="none").sum(-1).mean() * temperature**2
        first_grads = torch.autograd.grad((1 - alpha) * (1 - w) * clean + alpha * kd, params)
        step = eps * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1)
        adv = F.cross_entropy(plain.from_embeddings(plain.emb(ids) + step * mask, ids), y)
        last_grads = torch.autograd.grad((1 - alpha) * w * adv, params)
        optimizer.zero_grad()
        for p, g1, g2 in zip(params, first_grads, last_grads, strict=True):
            p.grad = g1 + g2
        optimizer.step()
    for (name, a), b in zip(plain.state_dict().items(), first.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name, rtol=1e-5, atol=1e-6)


def test_the_module_pickles_and_deep_copies_in_the_middle_of_a_fit():
    """Weight-averaging callbacks deep-copy the module mid-fit; users torch.save it."""
    import copy
    import io

    class CopyMidFit(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.copy = copy.deepcopy(pl_module)
            buffer = io.BytesIO()
            torch.save(pl_module, buffer)
            buffer.seek(0)
            self.loaded = torch.load(buffer, weights_only=False)

    torch.manual_seed(0)
    student, teacher = translator(d_model=32), translator(d_model=64)
    callbacks = seq2seq_callbacks(teacher)
    spy = CopyMidFit()
    trainer(max_steps=1, callbacks=[*callbacks.values(), spy]).fit(student, seq2seq_data())
    batch = seq2seq_batch()
    with torch.no_grad():
        expected = student(batch["src"], batch["tgt"][:, :-1])
        for other in (spy.copy, spy.loaded):
            torch.testing.assert_close(other(batch["src"], batch["tgt"][:, :-1]), expected)
