"""Perturbation sites: which modules are hooked, padding, batch keys, and the errors naming them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmkit.adversarial import (
    AttackConfig,
    EmbeddingPerturbation,
    InputPerturbation,
    Perturbation,
    find_embeddings,
    make_perturbation,
)
from tests.callbacks.hf import (
    BATCH_SIZE,
    EMBEDDING_SHAPES,
    SOURCE_LEN,
    TOKEN_EMBEDDINGS,
    VOCAB,
    WIDTH,
    HFModule,
    build,
)


class Tokens(nn.Module):
    """Token and learned position embeddings (``[T, D]``: no batch axis), then a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.positions = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, *, positions: bool = True) -> torch.Tensor:
        e = self.emb(ids)
        if positions:
            e = e + self.positions(torch.arange(ids.shape[1]))
        return self.out(e)


def hooked(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_hooks]


def test_make_perturbation_builds_the_subclass_of_the_target():
    model = Tokens()
    sites = make_perturbation(model, "embeddings", embeddings=["emb"], pad_id=0)
    assert type(sites) is EmbeddingPerturbation and isinstance(sites, Perturbation)
    assert (sites.target, list(sites.modules), sites.pad_id, hooked(model)) == ("embeddings", ["emb"], 0, ["emb"])
    sites.remove()
    assert hooked(model) == []
    inputs = make_perturbation(model, "inputs", inputs="x", input_range=(0.0, 1.0))
    assert type(inputs) is InputPerturbation and (inputs.input_keys, inputs.input_range) == (["x"], (0.0, 1.0))
    with pytest.raises(TypeError, match="abstract"):
        Perturbation()  # the interface, not a site


def test_a_bare_string_is_one_name():
    model = Tokens()
    assert list(find_embeddings(model, "emb")) == ["emb"]
    assert list(find_embeddings(model)) == ["emb", "positions"]  # no HF model: every nn.Embedding
    with pytest.raises(ValueError, match=r"Tokens has no module named 'embs'; did you mean 'emb'\?"):
        find_embeddings(model, "embs")
    batch = {"x": torch.rand(2, 3), "w": torch.rand(2, 3)}
    sites = make_perturbation(model, "inputs", inputs="x")
    with sites.applied(batch, fresh=True) as perturbed:
        assert perturbed["w"] is batch["w"] and perturbed["x"] is not batch["x"]
    assert sites.site_names == ["x"] and [tuple(d.shape) for d in sites.deltas] == [(2, 3)]


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")  # training_step outside a Trainer
def test_hf_models_get_their_token_embeddings_only(hf):
    kind, module, batch = hf
    sites = make_perturbation(module, "embeddings")
    assert list(sites.modules) == TOKEN_EMBEDDINGS[kind]  # no position embedding, no attention bias
    assert sorted(hooked(module)) == sorted(TOKEN_EMBEDDINGS[kind])
    with torch.no_grad(), sites.applied(batch, fresh=True) as perturbed:
        module.training_step(perturbed, 0)
    sites.check_sites(batch)
    assert [tuple(d.shape) for d in sites.deltas] == EMBEDDING_SHAPES[kind]
    sites.remove()
    assert hooked(module) == []


def test_padding_never_moves():
    model = Tokens()
    ids = torch.tensor([[3, 4, 0], [5, 0, 0]])
    sites = make_perturbation(model, "embeddings", embeddings="emb")
    with sites.applied(ids, fresh=True) as perturbed:
        loss = model(perturbed).sum()
    grads = torch.autograd.grad(loss, sites.deltas)
    sites.step(list(grads), AttackConfig("fgm", epsilon=0.5), 0.5)
    pad = (ids == 0).unsqueeze(-1).expand(-1, -1, 4)
    assert bool((sites.deltas[0][pad] == 0).all()) and bool((sites.deltas[0][~pad] != 0).all())
    sites.random_start(AttackConfig("fgsm", epsilon=0.5))
    assert bool((sites.deltas[0][pad] == 0).all())


def test_sites_without_a_shared_batch_axis_are_named():
    model = Tokens()
    sites = make_perturbation(model, "embeddings")
    with sites.applied(None, fresh=True):
        model(torch.ones(4, 5, dtype=torch.long))
    match = (r"different first \(batch\) axes: \[\(4, 5, 4\), \(5, 4\)\], from 'emb', 'positions'; budgets are "
             r"per sample, so name the token embeddings with `embeddings=\['emb'\]`")
    with pytest.raises(ValueError, match=match):
        sites.check_sites(None)


def test_hf_position_embeddings_named_by_hand_are_named_in_the_error():
    # BERT's position embedding is [1, T, D] (BART's is expanded to [B, T, D] in transformers 5).
    module = HFModule(build("bert"))
    names = ["model.bert.embeddings.word_embeddings", "model.bert.embeddings.position_embeddings"]
    sites = make_perturbation(module, "embeddings", embeddings=names)
    with torch.no_grad(), sites.applied(None, fresh=True):
        module.model(input_ids=torch.randint(3, VOCAB, (BATCH_SIZE, SOURCE_LEN)))
    assert [tuple(d.shape) for d in sites.deltas] == [(BATCH_SIZE, SOURCE_LEN, WIDTH), (1, SOURCE_LEN, WIDTH)]
    match = (r"from 'model.bert.embeddings.word_embeddings', 'model.bert.embeddings.position_embeddings'; .*"
             r"`embeddings=\['model.bert.embeddings.word_embeddings'\]`")
    with pytest.raises(ValueError, match=match):
        sites.check_sites(None)


def test_inputs_without_a_shared_batch_axis_are_named():
    sites = make_perturbation(nn.Identity(), "inputs", inputs=["x", "w"])
    batch = {"x": torch.rand(4, 3), "w": torch.rand(3)}
    with sites.applied(batch, fresh=True):
        pass
    with pytest.raises(ValueError, match=r"\[\(4, 3\), \(3,\)\], from 'x', 'w'; .*`inputs=\[\.\.\.\]`"):
        sites.check_sites(batch)


def test_a_pass_must_perturb_the_sites_of_the_fresh_pass():
    model = Tokens()
    sites = make_perturbation(model, "embeddings")
    with sites.applied(None, fresh=True):
        model(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"the embeddings site 0 \('emb'\) has shape \(2, 4, 4\) on this pass"), \
            sites.applied(None):
        model(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"perturbed 1 embeddings sites, the clean pass 2"), sites.applied(None):
        model(torch.ones(2, 3, dtype=torch.long), positions=False)


@pytest.mark.parametrize(
    ("target", "kwargs", "batch", "error", "match"),
    [
        ("inputs", dict(inputs="z"), {"x": torch.rand(2, 3)}, ValueError, r"the batch has no input 'z' to perturb"),
        ("inputs", dict(inputs=["y"]), {"y": torch.ones(2, dtype=torch.long)}, TypeError,
         r"the batch's 'y' is not a floating-point tensor"),
        ("inputs", dict(inputs="x"), torch.rand(2, 3), ValueError,
         r"the batch is one tensor; `inputs` must be None \(or \[0\]\), got \['x'\]"),
    ],
)
def test_bad_inputs(target, kwargs, batch, error, match):
    sites = make_perturbation(nn.Identity(), target, **kwargs)
    with pytest.raises(error, match=match), sites.applied(batch, fresh=True):
        pass


def test_nothing_to_perturb():
    sites = make_perturbation(nn.Identity(), "inputs")
    with sites.applied(torch.ones(2, dtype=torch.long), fresh=True):
        pass
    with pytest.raises(ValueError, match=r"target='inputs' found no floating-point tensor .* of type Tensor"):
        sites.check_sites(torch.ones(2, dtype=torch.long))
    embeddings = make_perturbation(Tokens(), "embeddings")
    with embeddings.applied(None, fresh=True):
        pass
    with pytest.raises(RuntimeError, match=r"no embedding ran in this pass"):
        embeddings.check_sites(None)
    with pytest.raises(ValueError, match=r"Linear has no nn\.Embedding to perturb; use target='inputs'"):
        make_perturbation(nn.Linear(2, 2), "embeddings")
    with pytest.raises(ValueError, match=r"unknown adversarial target 'weights'"):
        make_perturbation(nn.Linear(2, 2), "weights")


def test_input_range_bounds_steps():
    sites = make_perturbation(nn.Identity(), "inputs", input_range=(0.0, 1.0))
    x = torch.tensor([[0.9, 0.1]])
    with sites.applied(x, fresh=True):
        pass
    sites.step([torch.tensor([[1.0, -1.0]])], AttackConfig("fgsm", epsilon=0.5, norm="linf"), 0.5)
    torch.testing.assert_close(sites.deltas[0], torch.tensor([[0.1, -0.1]]))
