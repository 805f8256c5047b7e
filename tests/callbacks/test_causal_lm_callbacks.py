"""KnowledgeDistillation, QuantizationAwareTraining and AdversarialTraining with their defaults on CausalLMTransformer.

Oracles:
- distillation from a twice wider LM: each step's loss and the weights after equal a plain loop
  (the module's own AdamW and schedule) of Hinton's ``(1 - alpha) CE + alpha T^2 KL`` written by hand;
- QAT 8da4w: the fake-quantized losses equal torchao's ``QATConfig(..., "prepare")`` applied by hand
  to a copy and trained by the same plain loop, the converted logits equal its ``"convert"``; the
  converted weights are int4 and take <= 0.35x their fp32 bytes; ``generate`` equals greedy by hand;
- FGM: the losses and weights equal Miyato's FGM written by hand, the embedding outputs perturbed
  by ``epsilon * g / ||g||`` (``g`` of the clean loss, one l2 norm per sample over all perturbed sites).

The composition of the three (any order, the module as before, save -> resume) is in
``test_composition.py`` (its ``causal_lm`` case).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchao.quantization import quantize_
from torchao.quantization.qat import QATConfig

from llmkit import CausalLMTransformer
from llmkit.adversarial.sites import find_embeddings
from llmkit.callbacks import AdversarialTraining, KnowledgeDistillation, QuantizationAwareTraining
from llmkit.callbacks.quantization import quantized_weight_bytes
from tests.callbacks.helpers import RecordLosses, language_model, lm_batch, snapshot, trainer
from tests.callbacks.test_distillation import hinton
from tests.callbacks.test_quantization import base

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
IGNORE = -100


def batches(form: str = "ids") -> list[Tensor | dict[str, Tensor]]:
    """:data:`STEPS` batches of ids ``[4, 17]``; ``"labels"``: as mappings whose labels end in -100 (padding)."""
    out: list[Tensor | dict[str, Tensor]] = []
    for seed in range(STEPS):
        ids = lm_batch(seed)
        if form == "ids":
            out.append(ids)
        else:
            labels = ids.clone()
            labels[1, 12:] = IGNORE
            labels[2, 5:] = IGNORE
            out.append({"input_ids": ids, "labels": labels})
    return out


def loader(data: list) -> DataLoader:
    return DataLoader(data, batch_size=None)


def split(batch: Tensor | dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(inputs [B, T-1], targets [B, T-1])``: position t predicts token t + 1 (-100 where nothing is)."""
    ids, labels = (batch, batch) if isinstance(batch, Tensor) else (batch["input_ids"], batch["labels"])
    return ids[:, :-1], labels[:, 1:]


def plain_fit(model: CausalLMTransformer, data: list, loss_fn: Callable[[CausalLMTransformer, Tensor, Tensor], Tensor]
              ) -> list[float]:
    """A plain training loop with the module's own optimizer and per-step schedule; ``loss_fn(model, inputs, targets)``."""
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    losses = []
    for batch in data:
        loss = loss_fn(model, *split(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross-entropy over the labelled positions, by the book."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def assert_same_weights(got: nn.Module, want: nn.Module) -> None:
    # Adam divides each gradient by its own root mean square: rounding in a near-zero gradient (a
    # key's bias, which softmax ignores) moves a weight by ~1e-6. A wrong gradient moves it by ~lr (3e-3).
    for (name, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# 1. Knowledge distillation from a wider LM


@pytest.mark.parametrize(("positional", "form"), [("rope", "ids"), ("learned", "labels")])
def test_distillation_with_defaults_equals_the_textbook_loop(positional, form):
    """Batches of ids (every next token counts), or mappings whose -100 labels count in neither term."""
    torch.manual_seed(0)
    student, teacher = language_model(32, positional=positional), language_model(64, positional=positional)
    plain, plain_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    before = snapshot(student)
    record = RecordLosses()
    data = batches(form)
    trainer(max_steps=STEPS, callbacks=[KnowledgeDistillation(teacher), record]).fit(student, loader(data))

    temperature, alpha = 2.0, 0.5  # the defaults

    def hinton_loss(model: CausalLMTransformer, inputs: Tensor, targets: Tensor) -> Tensor:
        logits = model(inputs)
        with torch.no_grad():
            soft = plain_teacher(inputs)
        kd = hinton(logits, soft, temperature)[targets != IGNORE].mean()
        return (1 - alpha) * cross_entropy(logits, targets) + alpha * kd

    expected = plain_fit(plain, data, hinton_loss)
    assert record.losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert_same_weights(student, plain)
    assert snapshot(student) == before  # no hook, wrapper or submodule left on the student


# ---------------------------------------------------------------------------------------------
# 2. Quantization-aware training, 8da4w


def test_qat_with_defaults_equals_torchaos_flow_by_hand_and_the_converted_lm_generates():
    torch.manual_seed(0)
    model = language_model(32)
    by_hand = copy.deepcopy(model)
    linears = [name for name, layer in model.named_modules() if isinstance(layer, nn.Linear)]
    record = RecordLosses()
    qat = QuantizationAwareTraining()
    data = batches()
    trainer(max_steps=STEPS, callbacks=[qat, record]).fit(model, loader(data))

    # Every projection is selected, the output (tied to the embedding) among them.
    assert qat.prepared_names == linears and "output" in linears and qat.converted
    quantize_(by_hand, QATConfig(base(), step="prepare"), filter_fn=lambda _, name: name in linears)
    assert by_hand.output.weight is by_hand.embed.weight  # prepare keeps the tie: both train as one
    expected = plain_fit(by_hand, data, lambda m, inputs, targets: cross_entropy(m(inputs), targets))
    assert record.losses == pytest.approx(expected, rel=1e-6)
    quantize_(by_hand, QATConfig(base(), step="convert"))
    ids = lm_batch(seed=7)
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(logits, by_hand(ids))
    assert logits.shape == (4, 17, 64) and torch.isfinite(logits).all()

    # int4 values (one per int8 byte) with per-group scales; at most 0.35x the fp32 bytes.
    for name in linears:
        weight = model.get_submodule(name).weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor" and weight.target_dtype == torch.int4, name
        assert int(weight.qdata.min()) >= -8 and int(weight.qdata.max()) <= 7, name
    stored, fp32 = quantized_weight_bytes(model)
    assert stored <= 0.35 * fp32

    # The tie ends at conversion (as it is now): the lookup keeps the float table, the output
    # projection an int4 copy of it; both are in the state dict, which a fresh float LM loads.
    assert type(model.embed.weight).__name__ == "Parameter" and model.output.weight is not model.embed.weight
    torch.testing.assert_close(model.embed.weight, by_hand.embed.weight)
    fresh = language_model(32)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), logits)

    # Generation on the converted model (KV cache) equals greedy decoding by hand.
    prompt, new = ids[:, :5], 6
    tokens = prompt
    with torch.no_grad():
        for _ in range(new):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(prompt, max_new_tokens=new), tokens[:, 5:])


# ---------------------------------------------------------------------------------------------
# 3. Adversarial training, FGM


@pytest.mark.parametrize(("positional", "found"), [
    ("rope", ["embed"]), ("sinusoidal", ["embed"]), ("learned", ["embed", "position_embed"]),
])
def test_the_default_sites_are_the_lms_embeddings(positional, found):
    """Rotary and sinusoidal positions are no nn.Embedding; learned ones are found beside the tokens."""
    assert list(find_embeddings(language_model(positional=positional))) == found


def fgm_loss(sites: list[str], epsilon: float = 1.0, adv_weight: float = 0.5
             ) -> Callable[[CausalLMTransformer, Tensor, Tensor], Tensor]:
    """``(1 - w) L(x) + w L(x + eps g / ||g||)``: the LM's forward by hand, ``delta`` added to each site's output.

    ``sites``: ``"embed"`` (the token embeddings) and ``"position_embed"`` (learned positions, one
    ``[B, T, D]`` delta per sample as for the tokens). ``g``: the clean loss's gradient at
    ``delta = 0``, its l2 norm taken per sample over all sites together.
    """

    def loss(model: CausalLMTransformer, inputs: Tensor, targets: Tensor) -> Tensor:
        def loss_at(deltas: dict[str, Tensor]) -> Tensor:
            x = model.embed(inputs) + deltas.get("embed", 0.0)
            if model.position_embed is not None:
                x = x + model.position_embed(torch.arange(inputs.shape[1])) + deltas.get("position_embed", 0.0)
            return cross_entropy(model.output(model.decoder(x)), targets)

        zeros = {site: torch.zeros(*inputs.shape, model.hparams.d_model, requires_grad=True) for site in sites}
        clean = loss_at(zeros)
        grads = torch.autograd.grad(clean, list(zeros.values()), retain_graph=True)
        norm = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt().clamp_min(1e-12)
        steps = {site: epsilon * g / norm.reshape(-1, 1, 1) for site, g in zip(sites, grads, strict=True)}
        return (1 - adv_weight) * clean + adv_weight * loss_at(steps)

    return loss


@pytest.mark.parametrize(("positional", "kwargs", "sites"), [
    ("rope", {}, ["embed"]),
    ("learned", {"embeddings": "embed"}, ["embed"]),  # the token embeddings named, as the error below advises
    ("learned", {}, ["embed", "position_embed"]),  # defaults: both embeddings, each with its batch axis
])
def test_fgm_with_defaults_equals_the_textbook_loop(positional, kwargs, sites):
    torch.manual_seed(0)
    model = language_model(32, positional=positional)
    plain = copy.deepcopy(model)
    before = snapshot(model)
    record = RecordLosses()
    data = batches()
    trainer(max_steps=STEPS, callbacks=[AdversarialTraining(**kwargs), record]).fit(model, loader(data))
    expected = plain_fit(plain, data, fgm_loss(sites))
    assert record.losses == pytest.approx(expected, rel=1e-5)
    assert_same_weights(model, plain)
    assert snapshot(model) == before
