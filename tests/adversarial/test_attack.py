"""attack(): Hugging Face models with default arguments, quantized models, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmkit.adversarial import attack, straight_through_quantized
from tests.callbacks.hf import EMBEDDING_SHAPES

# ---------------------------------------------------------------------------------------------
# Hugging Face models, defaults only


def hf_loss_with_deltas(kind, model, batch, deltas):
    """The oracle: HF's own ``inputs_embeds`` API, fed the token embeddings plus the attack's deltas."""
    embed, mask = model.get_input_embeddings(), batch["attention_mask"]
    if kind == "bert":
        return model(inputs_embeds=embed(batch["input_ids"]) + deltas[0], attention_mask=mask,
                     labels=batch["labels"]).loss
    if kind == "t5":
        decoder_ids = model._shift_right(batch["labels"])
    else:
        from transformers.models.bart.modeling_bart import shift_tokens_right

        decoder_ids = shift_tokens_right(batch["labels"], model.config.pad_token_id, model.config.decoder_start_token_id)
    return model(
        inputs_embeds=embed(batch["input_ids"]) + deltas[0],
        attention_mask=mask,
        decoder_inputs_embeds=embed(decoder_ids) + deltas[1],
        labels=batch["labels"],
    ).loss


def test_hf_models_are_attacked_on_their_token_embeddings_with_defaults(hf):
    kind, module, batch = hf
    flags = [p.requires_grad for p in module.parameters()]
    result = attack(module, batch, steps=3)
    assert [tuple(d.shape) for d in result.perturbation] == EMBEDDING_SHAPES[kind]
    assert float(result.loss) > float(result.clean_loss)
    norms = torch.stack([d.flatten(1).pow(2).sum(1) for d in result.perturbation]).sum(0).sqrt()
    assert float(norms.max()) <= 1.0 + 1e-5
    with torch.no_grad():
        torch.testing.assert_close(result.clean_loss, hf_loss_with_deltas(kind, module.model, batch, [0.0, 0.0]))
        expected = hf_loss_with_deltas(kind, module.model, batch, result.perturbation)
    torch.testing.assert_close(result.loss, expected, atol=1e-5, rtol=1e-5)
    assert all(not m._forward_hooks for m in module.modules())
    assert [p.requires_grad for p in module.parameters()] == flags


# ---------------------------------------------------------------------------------------------
# Quantized models (torchao): a straight-through estimate of the quantized layers' gradient

torchao = pytest.importorskip("torchao")


def quantize(model: nn.Module, weight_dtype: torch.dtype) -> nn.Module:
    """torchao's QAT flow by hand: prepare, then convert to int8 dynamic activations, int4/int8 weights."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig

    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=PerGroup(32))
    quantize_(model, QATConfig(base, step="prepare"))
    quantize_(model, QATConfig(base, step="convert"))
    return model


def tagger(hidden: bool) -> nn.Module:
    """Token tagger ``[B, T] -> [B, T, 4]``; widths of 32 so that every linear layer quantizes in groups of 32."""
    layers = [nn.Embedding(16, 32)] + ([nn.Linear(32, 32), nn.ReLU()] if hidden else []) + [nn.Linear(32, 4)]
    return nn.Sequential(*layers)


def tagging_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, tags = batch
    return F.cross_entropy(model(ids).flatten(0, 1), tags.flatten())


def tagging_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 16, (3, 5), generator=generator), torch.randint(0, 4, (3, 5), generator=generator)


INT4: torch.dtype = getattr(torch, "int4")  # noqa: B009


@pytest.mark.parametrize("weight_dtype", [INT4, torch.int8], ids=["8da4w", "8da8w"])
def test_fgm_on_a_quantized_model_equals_the_hand_computation(weight_dtype):
    torch.manual_seed(0)
    model = quantize(tagger(hidden=False), weight_dtype)
    embedding, linear = model[0], model[1]
    assert type(linear.weight).__name__ == "IntxUnpackedToInt8Tensor"
    ids, tags = batch = tagging_batch()
    result = attack(model, batch, method="fgm", epsilon=0.7, loss_fn=tagging_loss)

    # By hand: d(CE)/d(logits) = (softmax(q) - onehot) / N at the quantized logits q; through the
    # dequantized weight W, g = dlogits @ W; FGM: delta = eps * g / ||g|| per sample.
    with torch.no_grad():
        e = embedding(ids)
        q = model(ids)
        dlogits = (q.softmax(-1) - F.one_hot(tags, 4).float()) / tags.numel()
        g = dlogits @ linear.weight.dequantize()
        delta = 0.7 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
        expected = F.cross_entropy(linear(e + delta).flatten(0, 1), tags.flatten())
    assert torch.equal(result.clean_loss, F.cross_entropy(q.flatten(0, 1), tags.flatten()))  # the quantized value
    torch.testing.assert_close(result.perturbation[0], delta, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.loss, expected, atol=1e-6, rtol=1e-5)
    assert float(result.loss) > float(result.clean_loss)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("weight_dtype", [INT4, torch.int8], ids=["8da4w", "8da8w"])
def test_pgd_raises_the_loss_of_a_quantized_model(weight_dtype):
    torch.manual_seed(0)
    model = quantize(tagger(hidden=True), weight_dtype)
    result = attack(model, tagging_batch(), method="pgd", epsilon=4.0, steps=4, loss_fn=tagging_loss)
    assert float(result.loss) > float(result.clean_loss) + 0.1


def test_the_straight_through_hooks_keep_the_quantized_values_and_leave():
    torch.manual_seed(0)
    model = quantize(tagger(hidden=True), torch.int8)
    x = torch.randn(3, 5, 32, requires_grad=True)
    with torch.no_grad():
        plain = model[1:](x)
    assert torch.autograd.grad(model[1:](x).sum(), x, allow_unused=True) == (None,)  # why the hooks are needed
    with straight_through_quantized(model) as layers:
        assert [model[1], model[3]] == layers
        out = model[1:](x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out.detach(), plain) and grad.abs().sum() > 0
    assert all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Errors


def test_a_loss_that_does_not_depend_on_the_perturbation_names_plausible_causes():
    model = tagger(hidden=False)

    def detached(m, batch):
        with torch.no_grad():
            e = m[0](batch[0])
        return F.cross_entropy(m[1](e).flatten(0, 1), batch[1].flatten())

    def through_argmax(m, batch):
        nearest = m[0](batch[0]).argmax(-1) % 16  # an integer: the gradient stops here
        return F.cross_entropy(m[1](m[0].weight[nearest]).flatten(0, 1), batch[1].flatten())

    match = r"no gradient reaches it\). Plausible causes: .*torch\.no_grad\(\).*frozen.*integer-only ops"
    for loss_fn in (detached, through_argmax):
        with pytest.raises(RuntimeError, match=match):
            attack(model, tagging_batch(), method="fgm", loss_fn=loss_fn)
    assert all(not m._forward_hooks for m in model.modules())


def test_named_embeddings_as_one_string():
    class TwoTables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words, self.unused, self.out = nn.Embedding(16, 8), nn.Embedding(3, 8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.out(self.words(ids))

    model = TwoTables()
    result = attack(model, tagging_batch(), method="fgm", embeddings="words", loss_fn=tagging_loss)
    assert [tuple(d.shape) for d in result.perturbation] == [(3, 5, 8)]
    with pytest.raises(ValueError, match=r"TwoTables has no module named 'emb'; did you mean 'words'\?"):
        attack(model, tagging_batch(), embeddings="emb", loss_fn=tagging_loss)
