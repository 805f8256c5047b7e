"""CausalLMTransformer's behaviour against plain oracles (the parity with nanoGPT, GPT-2 and HF's rotary
embeddings is in ``test_causal_lm_parity.py``).

- generation: the KV cache (dynamic and static) against full forward passes for every positional
  encoding and activation; greedy search against a plain loop of ``argmax(model(prompt + generated))``
  (with the processors applied by hand over prompt + generated), beam search against the reference beam
  search of ``tests/test_generation.py``; the layout of the output (new tokens only, padding after EOS,
  ``min_new_tokens``, no ``pad_id``);
- bad input: each error with its message;
- training: the loss against cross-entropy written out over the kept tokens; a short fit, whose logged
  perplexities equal a float64 plain loop over the loaders; the schedule against nanoGPT's ``get_lr``
  through the optimizer a Trainer drives; the weight-decay groups;
- checkpoints: ``test(ckpt_path=...)``, save -> resume against an uninterrupted fit, ``load_from_checkpoint``;
- two processes (``ddp_spawn``, gloo): the synced perplexity against the plain loop over the whole val set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from llmkit import CausalLMTransformer
from llmkit.generation import NoRepeatNGram, RepetitionPenalty
from llmkit.models.causal_lm import warmup_cosine_schedule
from tests.accelerator import accelerator_for
from tests.test_generation import reference_beam_search

V = 24
PAD = 0
IGNORE = -100
TINY = {"d_model": 16, "num_heads": 2, "num_layers": 2, "dim_feedforward": 32, "dropout": 0.0, "max_len": 24}
POSITIONALS = ("rope", "learned", "sinusoidal")
ACTIVATIONS = ("gelu", "relu", "swiglu")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
]


def tiny(seed: int = 0, *, scale: float | None = None, **kwargs) -> CausalLMTransformer:
    """A tiny model; with ``scale``, every weight matrix redrawn from ``N(0, scale)`` (peaked, varied outputs)."""
    torch.manual_seed(seed)
    model = CausalLMTransformer(V, **{**TINY, **kwargs})
    if scale is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, scale)
    return model


def prompts(batch_size: int = 4, length: int = 5, seed: int = 1) -> Tensor:
    """Random prompts over the ids 2 .. V - 1 (no padding)."""
    return torch.randint(2, V, (batch_size, length), generator=torch.Generator().manual_seed(seed))


def generation_model(seed: int = 3, **kwargs) -> CausalLMTransformer:
    """A float64 random model (``pad_id=0``) whose ``eos_id`` is a token its greedy search produces.

    Row 0 of :func:`prompts` then ends by its 5th new token, so rows end at different steps and
    the cache keeps decoding finished rows.
    """
    probe = tiny(seed, scale=0.5, pad_id=PAD, **kwargs).double().eval()
    eos = int(probe.generate(prompts(), max_new_tokens=12)[0, 4])
    return tiny(seed, scale=0.5, pad_id=PAD, eos_id=eos, **kwargs).double().eval()


def strip(out: Tensor, eos_id: int | None) -> list[list[int]]:
    """Each row up to and including its first EOS."""
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in out.tolist()]


def check_layout(out: Tensor, model: CausalLMTransformer, rows: int, max_new_tokens: int) -> None:
    """``[rows, L]`` LongTensor, ``L`` the longest row's length (``<= max_new_tokens``); after EOS only
    padding (``pad_id``, else ``eos_id``); ``pad_id`` never generated."""
    eos, pad = model.hparams.eos_id, model.hparams.pad_id
    fill = pad if pad is not None else eos
    assert out.dtype == torch.long and out.shape[0] == rows and 1 <= out.shape[1] <= max_new_tokens
    stripped = strip(out, eos)
    assert out.shape[1] == max(len(row) for row in stripped)
    for row, body in zip(out.tolist(), stripped, strict=True):
        assert set(row[len(body) :]) <= {fill}, row
        if pad is not None and pad != eos:
            assert pad not in body, row


@torch.no_grad()
def plain_greedy(model: CausalLMTransformer, prompt: Tensor, max_new_tokens: int, *, min_new_tokens: int = 0,
                 processors: tuple = ()) -> list[list[int]]:
    """Greedy decoding by full forward passes over prompt + generated, one row at a time, in float64.

    ``pad_id`` is never chosen, nor EOS before ``min_new_tokens``; ``processors`` see prompt + generated.
    """
    eos, pad = model.hparams.eos_id, model.hparams.pad_id
    out = []
    for row in prompt:
        tokens, new = row.tolist(), []
        for index in range(max_new_tokens):
            logits = model(torch.tensor([tokens]))[0, -1].double()
            if pad is not None and pad != eos:
                logits[pad] = -math.inf
            if eos is not None and index < min_new_tokens:
                logits[eos] = -math.inf
            for processor in processors:
                logits = processor(torch.tensor([tokens]), logits[None])[0]
            new.append(int(logits.argmax()))
            tokens.append(new[-1])
            if new[-1] == eos:
                break
        out.append(new)
    return out


def prompt_log_probs(model: CausalLMTransformer, prompt: Tensor):
    """``log_probs(b, generated)`` for the reference beam search: full forward passes over prompt + generated."""
    cache: dict[tuple[int, tuple[int, ...]], Tensor] = {}
    pad = model.hparams.pad_id

    @torch.no_grad()
    def log_probs(b: int, generated: list[int]) -> Tensor:
        key = (b, tuple(generated))
        if key not in cache:
            logits = model(torch.tensor([[*prompt[b].tolist(), *generated]]))[0, -1]
            scores = torch.log_softmax(logits.float(), dim=-1)
            cache[key] = scores.index_fill(0, torch.tensor([pad]), -math.inf) if pad is not None else scores
        return cache[key]

    return log_probs


CACHES = ({"use_cache": False}, {"use_cache": True}, {"cache_implementation": "static"})


def same_with_every_cache(model: CausalLMTransformer, prompt: Tensor, **kwargs) -> Tensor:
    """``generate`` without a cache, with a dynamic and with a static one: the same tokens (seeded alike)."""
    outs = [model.generate(prompt, generator=torch.Generator().manual_seed(5), **cache, **kwargs) for cache in CACHES]
    for cache, out in zip(CACHES[1:], outs[1:], strict=True):
        assert torch.equal(out, outs[0]), (cache, kwargs)
    return outs[0]


# ---------------------------------------------------------------------------------------------
# 1. Generation


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("positional", POSITIONALS)
def test_generation_with_and_without_cache_equals_full_forward_passes(positional, activation):
    model = generation_model(positional=positional, activation=activation)
    eos = model.hparams.eos_id
    prompt, max_new = prompts(), 12

    greedy = same_with_every_cache(model, prompt, max_new_tokens=max_new)
    check_layout(greedy, model, 4, max_new)
    assert strip(greedy, eos) == plain_greedy(model, prompt, max_new)
    assert len(strip(greedy, eos)[0]) <= 5  # not vacuous: row 0 ends at EOS, and is padded after it

    beam = same_with_every_cache(model, prompt, max_new_tokens=max_new, num_beams=3, num_return_sequences=2)
    check_layout(beam, model, 8, max_new)
    want = reference_beam_search(prompt_log_probs(model, prompt), batch_size=4, num_beams=3,
                                 max_new_tokens=max_new, eos_id=eos, pad_id=PAD)
    assert strip(beam, eos)[::2] == want  # the best of each prompt's n-best list
    assert all(a != b for a, b in zip(strip(beam, eos)[::2], strip(beam, eos)[1::2], strict=True))

    sampled = same_with_every_cache(model, prompt, max_new_tokens=max_new, do_sample=True, temperature=0.8,
                                    top_k=10, top_p=0.9, num_return_sequences=2)
    check_layout(sampled, model, 8, max_new)
    assert not torch.equal(sampled[::2], sampled[1::2])  # two samples of each prompt, drawn apart

    processors = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    constrained = same_with_every_cache(model, prompt, max_new_tokens=max_new, **processors)
    oracle = plain_greedy(model, prompt, max_new, processors=(RepetitionPenalty(1.5), NoRepeatNGram(2)))
    assert strip(constrained, eos) == oracle
    for row, body in zip(prompt.tolist(), strip(constrained, eos), strict=True):
        bigrams = list(zip(row + body, (row + body)[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))  # no bigram repeats, the prompt's included
    same_with_every_cache(model, prompt, max_new_tokens=max_new, num_beams=3, **processors)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = generation_model()
    prompt = prompts()
    run = lambda seed: model.generate(prompt, do_sample=True, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert any(not torch.equal(run(1), run(seed)) for seed in (2, 3, 4))
    assert torch.equal(model.generate(prompt, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(1)),
                       model.generate(prompt))


def test_repetition_penalty_sees_the_prompt():
    """A prompt token the model would pick first is penalised at the very first step, as in Hugging Face."""
    model = generation_model(seed=4)
    penalty = RepetitionPenalty(3.0)
    # Prompts whose unpenalised first token is in the prompt, and is no longer the argmax once penalised.
    with torch.no_grad():
        candidates = prompts(batch_size=64, seed=9)
        logits = model(candidates)[:, -1]
        logits[:, PAD] = -math.inf  # never generated
        first = logits.argmax(dim=-1)
        penalised = penalty(candidates, logits).argmax(dim=-1)
    chosen = ((candidates == first[:, None]).any(dim=1) & (penalised != first)).nonzero().flatten()[:3]
    assert len(chosen) == 3
    prompt = candidates[chosen]
    out = same_with_every_cache(model, prompt, max_new_tokens=10, repetition_penalty=3.0)
    assert strip(out, model.hparams.eos_id) == plain_greedy(model, prompt, 10, processors=(penalty,))
    assert torch.equal(out[:, 0], penalised[chosen])
    assert not torch.equal(out[:, 0], model.generate(prompt, max_new_tokens=1)[:, 0])


def test_min_new_tokens():
    model = generation_model()
    prompt = prompts()
    eos = model.hparams.eos_id
    free = strip(model.generate(prompt, max_new_tokens=12), eos)
    min_new = min(len(row) for row in free) + 1  # forbids at least one EOS greedy search takes
    greedy = same_with_every_cache(model, prompt, max_new_tokens=12, min_new_tokens=min_new)
    assert strip(greedy, eos) == plain_greedy(model, prompt, 12, min_new_tokens=min_new)
    beam = same_with_every_cache(model, prompt, max_new_tokens=12, min_new_tokens=min_new, num_beams=3)
    for out in (greedy, beam):
        check_layout(out, model, 4, 12)
        assert all(eos not in row[:min_new] for row in out.tolist())
    # EOS forbidden everywhere: every row is max_new_tokens long.
    assert (model.generate(prompt, max_new_tokens=6, min_new_tokens=6) != eos).all()
    assert model.generate(prompt, max_new_tokens=6, min_new_tokens=6).shape == (4, 6)


def pad_loving(eos_id: int | None) -> CausalLMTransformer:
    """A model whose most likely next token is ``pad_id`` everywhere, by far; the other tokens still vary."""
    model = tiny(5, scale=0.5, pad_id=PAD, eos_id=eos_id).double().eval()
    with torch.no_grad():
        direction = torch.zeros(TINY["d_model"], dtype=torch.float64)
        direction[0] = 1.0
        model.decoder.norm.weight.mul_(0.1)
        model.decoder.norm.bias.copy_(direction)
        model.embed.weight[PAD] = 10.0 * direction  # tied: the output row of PAD
    return model


@pytest.mark.parametrize("eos_id", [None, 1])
def test_pad_id_is_never_generated(eos_id):
    model = pad_loving(eos_id)
    prompt = prompts()
    with torch.no_grad():
        assert (model(prompt).argmax(dim=-1) == PAD).all()  # what the model would pick
    for kwargs in ({}, {"num_beams": 3}, {"do_sample": True}):
        out = same_with_every_cache(model, prompt, max_new_tokens=10, **kwargs)
        check_layout(out, model, 4, 10)
        if eos_id is None:  # no EOS: every row runs to max_new_tokens, and none of it is padding
            assert out.shape == (4, 10) and not (out == PAD).any()
    if eos_id is None:
        assert strip(model.generate(prompt, max_new_tokens=10), None) == plain_greedy(model, prompt, 10)


def test_no_eos_rows_run_to_max_new_tokens_and_padding_falls_back_to_eos():
    model = tiny(3, scale=0.5).double().eval()  # pad_id=None, eos_id=None
    prompt = prompts()
    out = same_with_every_cache(model, prompt, max_new_tokens=9)
    assert out.shape == (4, 9)
    assert out.tolist() == plain_greedy(model, prompt, 9)
    assert model.generate(prompt, num_beams=3, num_return_sequences=3, max_new_tokens=9).shape == (12, 9)
    # Without pad_id, rows are padded after EOS with eos_id.
    eos = int(out[0, 3])
    ended = tiny(3, scale=0.5, eos_id=eos).double().eval()
    out = ended.generate(prompt, max_new_tokens=9)
    check_layout(out, ended, 4, 9)
    assert strip(out, eos) == plain_greedy(ended, prompt, 9)
    assert out.shape[1] > len(strip(out, eos)[0])  # row 0 was padded, with EOS


def test_generation_lengths_and_defaults():
    prompt = prompts(length=5)
    model = tiny(3, scale=0.5, max_new_tokens=3)
    assert model.generate(prompt).shape == (4, 3)  # hparams.max_new_tokens is the default
    unlimited = tiny(3, scale=0.5)
    assert unlimited.generate(prompt).shape == (4, TINY["max_len"] - 5)  # up to max_len
    assert unlimited.generate(prompts(length=23)).shape == (4, 1)
    assert unlimited.generate(prompt, max_new_tokens=19).shape == (4, 19)


def test_generate_restores_training_mode_needs_no_grad_and_predict_step():
    model = tiny(6, scale=0.5, dropout=0.3)
    prompt = prompts()
    model.train()
    first = model.generate(prompt, max_new_tokens=8)
    assert model.training and not first.requires_grad
    assert torch.equal(model.generate(prompt, max_new_tokens=8), first)  # no dropout while generating
    model.eval()
    assert torch.equal(model.predict_step(prompt, 0), model.generate(prompt))
    assert torch.equal(model.predict_step({"input_ids": prompt}, 0), model.generate(prompt))


@pytest.mark.slow
def test_compiled_generation_equals_eager():
    """``compile=True`` (inductor over a static cache) gives the eager tokens; float32, where inductor is at home."""
    model = generation_model(num_layers=1).float()
    prompt = prompts()
    compiled = model.generate(prompt, max_new_tokens=8, compile=True)
    assert torch.equal(compiled, model.generate(prompt, max_new_tokens=8))
    check_layout(compiled, model, 4, 8)


# ---------------------------------------------------------------------------------------------
# 2. Bad input


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"positional": "alibi"}, r"`positional` must be one of \('rope', 'learned', 'sinusoidal'\), got 'alibi'"),
    ({"activation": "tanh"}, r"`activation` must be one of \('relu', 'gelu', 'swiglu'\), got 'tanh'"),
    ({"d_model": 18, "num_heads": 4}, r"`d_model` \(18\) must be divisible by `num_heads` \(4\)"),
    ({"d_model": 18, "num_heads": 2}, r"rotary positions need an even head width, got d_model / num_heads = 9"),
    ({"pad_id": V}, r"`pad_id` must be None or a token id in \[0, 23\], got 24"),
    ({"pad_id": -1}, r"`pad_id` must be None or a token id in \[0, 23\], got -1"),
    ({"eos_id": V}, r"`eos_id` must be None or a token id in \[0, 23\], got 24"),
    ({"eos_id": -2}, r"`eos_id` must be None or a token id in \[0, 23\], got -2"),
    ({"max_len": 0}, r"`max_len` must be at least 1, got 0"),
    ({"num_layers": 0}, r"`num_layers` must be at least 1, got 0"),
    ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\), got 1.0"),
    ({"label_smoothing": -0.1}, r"`label_smoothing` must be in \[0, 1\), got -0.1"),
    ({"min_lr_ratio": 1.5}, r"`min_lr_ratio` must be in \[0, 1\], got 1.5"),
    ({"warmup_steps": 10, "decay_steps": 5}, r"`decay_steps` None or >= warmup_steps, got 10 and 5"),
    ({"max_new_tokens": 24}, r"`max_new_tokens` must be in \[1, max_len - 1 = 23\], got 24"),
    ({"max_new_tokens": 0}, r"`max_new_tokens` must be in \[1, max_len - 1 = 23\], got 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMTransformer(V, **{**TINY, **kwargs})


def test_odd_head_width_is_fine_without_rotary_positions():
    model = CausalLMTransformer(V, **{**TINY, "d_model": 18, "num_heads": 2, "positional": "learned"})
    assert model(prompts()).shape == (4, 5, V)


@pytest.mark.parametrize("bad", [V, -1])
def test_ids_outside_the_vocabulary(bad):
    model = tiny()
    ids = prompts()
    ids[1, 2] = bad
    low, high = (bad, r"\d+") if bad < 0 else (r"\d+", bad)
    vocabulary = rf"holds token ids in \[{low}, {high}\], outside the vocabulary \[0, 23\]"
    with pytest.raises(ValueError, match=f"`ids` {vocabulary}"):
        model(ids)
    with pytest.raises(ValueError, match=f"`prompt_ids` {vocabulary}"):
        model.generate(ids)
    with pytest.raises(ValueError, match=f"`input_ids` {vocabulary}"):
        model.training_step(ids, 0)
    with pytest.raises(ValueError, match=f"`input_ids` {vocabulary}"):
        model.validation_step({"input_ids": ids}, 0)
    last = prompts()
    last[0, -1] = bad  # the last column is only a label, and still checked
    with pytest.raises(ValueError, match=f"`input_ids` {vocabulary}"):
        model.training_step(last, 0)


@pytest.mark.parametrize("bad", [V, -5])
def test_labels_outside_the_vocabulary(bad):
    model = tiny()
    ids = prompts()
    labels = ids.clone()
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=r"`labels`.*outside the vocabulary"):
        model.training_step({"input_ids": ids, "labels": labels}, 0)


def test_bad_prompts_and_lengths():
    model = tiny()
    with pytest.raises(ValueError, match=r"`prompt_ids` has length 25, longer than max_len=24"):
        model.generate(prompts(length=25))
    with pytest.raises(ValueError, match=r"`prompt_ids` must hold 1 to max_len - 1 = 23 tokens per row, got 24"):
        model.generate(prompts(length=24))
    with pytest.raises(ValueError, match=r"`prompt_ids` must hold 1 to max_len - 1 = 23 tokens per row, got 0"):
        model.generate(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="`max_new_tokens` must be at least 1, got 0"):
        model.generate(prompts(), max_new_tokens=0)
    with pytest.raises(ValueError, match="`max_new_tokens` must be at least 1, got -3"):
        model.generate(prompts(), max_new_tokens=-3, num_beams=2)
    with pytest.raises(ValueError, match="a prompt of 5 tokens and max_new_tokens=20 exceed max_len=24"):
        model.generate(prompts(), max_new_tokens=20)
    with pytest.raises(ValueError, match=r"`ids` has length 25, longer than max_len=24"):
        model(prompts(length=25))
    with pytest.raises(ValueError, match=r"`input_ids` has length 26, longer than max_len=25"):
        model.training_step(prompts(length=26), 0)  # max_len + 1 tokens train: the last is only a label
    assert model.training_step(prompts(length=25), 0).shape == ()
    with pytest.raises(ValueError, match=r"a training sequence needs at least 2 tokens, got shape \(4, 1\)"):
        model.training_step(prompts(length=1), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_ids(dtype):
    model = tiny()
    ids = prompts().to(dtype)
    with pytest.raises(TypeError, match=f"`ids` must be an integer tensor of token ids, got {dtype}"):
        model(ids)
    with pytest.raises(TypeError, match=f"`prompt_ids` must be an integer tensor of token ids, got {dtype}"):
        model.generate(ids)
    with pytest.raises(TypeError, match=f"`input_ids` must be an integer tensor of token ids, got {dtype}"):
        model.training_step({"input_ids": ids}, 0)


def test_one_dimensional_ids():
    model = tiny()
    with pytest.raises(ValueError, match=r"`ids` must have shape \[batch, length\], got \(5,\)"):
        model(prompts()[0])
    with pytest.raises(ValueError, match=r"`prompt_ids` must have shape \[batch, length\], got \(5,\)"):
        model.generate(prompts()[0])
    with pytest.raises(ValueError, match=r"`input_ids` must have shape \[batch, length\], got \(5,\)"):
        model.training_step(prompts()[0], 0)


def test_bad_batches():
    model = tiny()
    ids = prompts(length=10)
    with pytest.raises(ValueError, match=r"a batch mapping needs the key 'input_ids', got \['ids', 'labels'\]"):
        model.training_step({"ids": ids, "labels": ids}, 0)
    with pytest.raises(TypeError, match=r"a batch must be a LongTensor \[B, T\] or a mapping with 'input_ids', "
                                        r"got tuple"):
        model.training_step((ids, ids), 0)
    with pytest.raises(TypeError, match="got list"):
        model.validation_step([ids], 0)
    with pytest.raises(ValueError, match=r"`labels` has shape \(4, 9\), `input_ids` \(4, 10\)"):
        model.training_step({"input_ids": ids, "labels": ids[:, :-1]}, 0)
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(4, 9\), `input_ids` \(4, 10\)"):
        model.training_step({"input_ids": ids, "attention_mask": torch.ones(4, 9, dtype=torch.long)}, 0)
    left_padded = torch.ones(4, 10, dtype=torch.long)
    left_padded[2, :3] = 0
    with pytest.raises(ValueError, match=r"`attention_mask` must put the padding at the end of each row"):
        model.training_step({"input_ids": ids, "attention_mask": left_padded}, 0)


def test_bad_cache_options():
    model = tiny()
    with pytest.raises(ValueError, match="`cache_implementation` must be 'dynamic' or 'static', got 'paged'"):
        model.generate(prompts(), cache_implementation="paged")
    with pytest.raises(ValueError, match=r"a static cache or `compile=True` needs `use_cache=True`"):
        model.generate(prompts(), cache_implementation="static", use_cache=False)
    with pytest.raises(ValueError, match=r"a static cache or `compile=True` needs `use_cache=True`"):
        model.generate(prompts(), compile=True, use_cache=False)


class Blocks(L.LightningDataModule):
    """A data module of ``block_size + 1``-token sequences (a block and its next tokens), as PythonDocsDataModule."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader([pattern(0, 2, self.block_size + 1)], batch_size=None)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**{
        # Several processes (ddp_spawn, gloo) on CPU; one on the tests' accelerator.
        "accelerator": accelerator_for(kwargs.get("devices", 1)), "devices": 1, "logger": False,
        "enable_progress_bar": False, "enable_checkpointing": False, "enable_model_summary": False,
        "num_sanity_val_steps": 0, **kwargs,
    })


def test_block_size_larger_than_max_len_fails_in_setup():
    model = tiny()
    with pytest.raises(ValueError, match=r"the data module's block_size \(25\) is larger than the model's "
                                         r"max_len \(24\)"):
        trainer(max_steps=1).fit(model, datamodule=Blocks(TINY["max_len"] + 1))
    fit = trainer(max_steps=1)
    fit.fit(model, datamodule=Blocks(TINY["max_len"]))  # max_len itself fits
    assert fit.global_step == 1


# ---------------------------------------------------------------------------------------------
# 3. The loss


def pattern(seed: int, batch_size: int, length: int) -> Tensor:
    """Rows counting up from a random start by a random stride (1-3), modulo V: learnable from the last two tokens."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (batch_size, 1), generator=generator)
    stride = torch.randint(1, 4, (batch_size, 1), generator=generator)
    return (start + stride * torch.arange(length)) % V


@torch.no_grad()
def plain_nll(model: CausalLMTransformer, batch: Tensor | dict[str, Tensor]) -> tuple[float, int]:
    """``(sum of -log p(next token), count)`` in float64, one row at a time over its unpadded tokens.

    A position counts when its next token is a label: ``labels`` not -100 when given, else inside
    ``attention_mask`` and not ``pad_id``.
    """
    reference = CausalLMTransformer(**model.hparams).double().eval()
    reference.load_state_dict(model.state_dict())
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    labels = batch.get("labels")
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())  # right padding: the row's tokens are its first `length`
        inputs = ids[b, : length - 1] if labels is None else ids[b, :-1]
        log_p = torch.log_softmax(reference(inputs[None])[0], dim=-1)
        for t in range(inputs.shape[0]):
            target = int(ids[b, t + 1]) if labels is None else int(labels[b, t + 1])
            if target == IGNORE or (labels is None and target == model.hparams.pad_id):
                continue
            total -= float(log_p[t, target])
            count += 1
    return total, count


def plain_loss(model: CausalLMTransformer, batch: Tensor | dict[str, Tensor]) -> float:
    total, count = plain_nll(model, batch)
    return total / count


def test_loss_is_next_token_cross_entropy():
    model = tiny(7, scale=0.3)
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(8))
    loss = model.training_step(ids, 0)
    assert loss.shape == () and loss.requires_grad
    with torch.no_grad():
        logits = model(ids)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=0)
    assert math.isclose(loss.item(), plain_loss(model, ids), rel_tol=1e-5)
    assert model.training_step({"input_ids": ids}, 0).item() == loss.item()
    # max_len + 1 tokens: positions 0 .. max_len - 1 predict tokens 1 .. max_len.
    long = torch.randint(0, V, (2, TINY["max_len"] + 1), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = model(long[:, :-1])
    torch.testing.assert_close(model.training_step(long, 0),
                               F.cross_entropy(logits.reshape(-1, V), long[:, 1:].reshape(-1)), atol=1e-6, rtol=0)


def test_loss_with_label_smoothing():
    model = tiny(7, scale=0.3, label_smoothing=0.2)
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids)[:, :-1].double(), dim=-1)
    want = (0.8 * -log_p.gather(-1, ids[:, 1:, None]).squeeze(-1) - 0.2 * log_p.mean(dim=-1)).mean()
    assert math.isclose(model.training_step(ids, 0).item(), float(want), rel_tol=1e-5)


def padded_batch(pad_value: int) -> tuple[Tensor, Tensor]:
    """``(ids [3, 10], attention_mask)``: rows of 10, 7 and 4 tokens, right-padded with ``pad_value``."""
    ids = torch.randint(1, V, (3, 10), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    for row, length in enumerate((10, 7, 4)):
        ids[row, length:] = pad_value
        mask[row, length:] = 0
    return ids, mask


def test_loss_over_labels_attention_mask_and_pad_id():
    model = tiny(11, scale=0.3)
    ids, mask = padded_batch(pad_value=5)  # not pad_id: only the mask marks the padding

    labels = ids.clone()
    labels[0, :4] = IGNORE
    labels[1, 6:] = IGNORE
    loss = model.training_step({"input_ids": ids, "labels": labels}, 0)
    assert math.isclose(loss.item(), plain_loss(model, {"input_ids": ids, "labels": labels}), rel_tol=1e-5)

    masked = model.training_step({"input_ids": ids, "attention_mask": mask}, 0)
    unpadded = plain_loss(model, {"input_ids": ids, "attention_mask": mask})  # rows run alone, unpadded
    assert math.isclose(masked.item(), unpadded, rel_tol=1e-5)
    assert not math.isclose(masked.item(), model.training_step(ids, 0).item(), rel_tol=1e-3)  # the mask matters
    # Labels that are -100 on the padding (a collator's): the same loss.
    collated = ids.masked_fill(mask == 0, IGNORE)
    torch.testing.assert_close(
        model.training_step({"input_ids": ids, "attention_mask": mask, "labels": collated}, 0), masked
    )
    # Given labels decide (Hugging Face's convention): padded positions with labels count.
    both = model.training_step({"input_ids": ids, "attention_mask": mask, "labels": ids}, 0)
    assert math.isclose(both.item(), model.training_step(ids, 0).item(), rel_tol=1e-6)

    # pad_id positions are not labels, without a mask.
    with_pad = tiny(11, scale=0.3, pad_id=PAD)
    pad_ids, pad_mask = padded_batch(pad_value=PAD)
    loss = with_pad.training_step(pad_ids, 0)
    assert math.isclose(loss.item(), plain_loss(with_pad, {"input_ids": pad_ids, "attention_mask": pad_mask}),
                        rel_tol=1e-5)
    torch.testing.assert_close(with_pad.training_step({"input_ids": pad_ids, "attention_mask": pad_mask}, 0), loss)


# ---------------------------------------------------------------------------------------------
# 4. A short fit, its logged metrics and checkpoints


def lm_model(**kwargs) -> CausalLMTransformer:
    torch.manual_seed(0)
    return CausalLMTransformer(V, **{**TINY, "d_model": 32, "dim_feedforward": 64, "lr": 1e-2, "warmup_steps": 5,
                                     **kwargs})


def eval_batches(seed: int) -> list[dict[str, Tensor]]:
    """Three batches of 4, 4 and 2 rows with different numbers of labels (-100 on some), so that a
    perplexity weighted by tokens differs from one weighted by batches."""
    out = []
    for index, size in enumerate((4, 4, 2)):
        ids = pattern(seed + index, size, 17)
        labels = ids.clone()
        labels[: size // 2, 4 + 4 * index :] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """60 steps on the counting pattern (10 batches an epoch, validation after each), checkpoints in a folder."""
    directory = tmp_path_factory.mktemp("causal_lm")
    model = lm_model()
    train = DataLoader([pattern(seed, 8, 17) for seed in range(10)], batch_size=None)
    val = DataLoader(eval_batches(100), batch_size=None)
    test = DataLoader(eval_batches(200), batch_size=None)
    record = RecordLosses()
    fit = trainer(max_steps=60, enable_checkpointing=True, callbacks=[record, ModelCheckpoint(directory)])
    fit.fit(model, train, val)
    logged = {key: float(value) for key, value in fit.callback_metrics.items()}
    return {"trainer": fit, "model": model, "val": val, "test": test, "losses": record.losses, "logged": logged,
            "directory": directory}


def ppl_oracle(model: CausalLMTransformer, loader) -> float:
    """``exp`` of the token-weighted mean cross-entropy over ``loader``, by the float64 plain loop."""
    sums = [plain_nll(model, batch) for batch in loader]
    return math.exp(sum(total for total, _ in sums) / sum(count for _, count in sums))


def test_fit_lowers_the_loss_and_logs_metrics_equal_to_the_oracles(fitted):
    fit, model, logged, losses = fitted["trainer"], fitted["model"], fitted["logged"], fitted["losses"]
    assert fit.global_step == 60 and len(losses) == 60
    assert losses[0] > 0.9 * math.log(V) and losses[-1] < 0.4 * losses[0], (losses[0], losses[-1])
    assert {"train_loss", "val_loss", "val_ppl"} <= set(logged)
    assert logged["train_loss"] == losses[-1]
    val = list(fitted["val"])
    assert math.isclose(logged["val_ppl"], ppl_oracle(model, val), rel_tol=1e-4)
    # val_loss: each batch's mean, weighted by batch size (Lightning's epoch mean of `self.log`).
    val_loss = sum(plain_loss(model, batch) * len(batch["input_ids"]) for batch in val) / 10
    assert math.isclose(logged["val_loss"], val_loss, rel_tol=1e-4)
    # Not vacuous: the token-weighted perplexity is not exp(val_loss).
    assert abs(math.log(logged["val_ppl"]) - logged["val_loss"]) > 1e-3


def test_test_with_ckpt_path(fitted):
    fit, model = fitted["trainer"], fitted["model"]
    (path,) = Path(fitted["directory"]).glob("*.ckpt")
    results = fit.test(model, fitted["test"], ckpt_path=str(path), verbose=False)
    assert {"test_loss", "test_ppl"} <= set(results[0])
    loaded = CausalLMTransformer.load_from_checkpoint(path)
    assert math.isclose(results[0]["test_ppl"], ppl_oracle(loaded, list(fitted["test"])), rel_tol=1e-4)


def test_load_from_checkpoint_round_trip(fitted, tmp_path):
    fit, model = fitted["trainer"], fitted["model"]
    path = tmp_path / "lm.ckpt"
    fit.save_checkpoint(path)
    loaded = CausalLMTransformer.load_from_checkpoint(path).eval()
    model.eval()
    assert dict(loaded.hparams) == dict(model.hparams)
    assert loaded.output.weight is loaded.embed.weight
    ids = pattern(300, 3, 20)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(loaded.generate(ids[:, :6], max_new_tokens=8), model.generate(ids[:, :6], max_new_tokens=8))


class EpochBatches(Sampler[int]):
    """One batch an epoch, batch ``epoch % n``: each step a new batch, in the same order after a resume.

    (Lightning restarts a plain loader from its first batch on resume; it sets this sampler's epoch.)
    """

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[int]:
        yield self.epoch % self.n


class RecordBatches(RecordLosses):
    def __init__(self) -> None:
        super().__init__()
        self.first_tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first_tokens.append(int(batch[0, 0]))


def test_save_and_resume_equals_an_uninterrupted_fit(tmp_path):
    """4 steps, saved, resumed to 8: the losses and weights of an 8-step fit (AdamW's moments, the schedule)."""
    data = [pattern(seed, 4, 17) for seed in range(3)]

    def run(max_steps: int, ckpt_path: Path | None = None) -> tuple[CausalLMTransformer, L.Trainer, RecordBatches]:
        model = lm_model(decay_steps=8, warmup_steps=2)  # no dropout: the global random state is not saved
        record = RecordBatches()
        fit = trainer(max_steps=max_steps, callbacks=[record])
        fit.fit(model, DataLoader(data, batch_size=None, sampler=EpochBatches(len(data))), ckpt_path=ckpt_path)
        return model, fit, record

    uninterrupted, _, whole = run(8)
    _, first, head = run(4)
    first.save_checkpoint(tmp_path / "step4.ckpt")
    resumed, fit, tail = run(8, ckpt_path=tmp_path / "step4.ckpt")
    assert fit.global_step == 8
    assert head.first_tokens + tail.first_tokens == whole.first_tokens  # the same batches in the same order
    assert len(set(whole.first_tokens[:3])) == 3
    assert head.losses == pytest.approx(whole.losses[:4], rel=1e-6)
    assert tail.losses == pytest.approx(whole.losses[4:], rel=1e-6)
    for (name, want), got in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# 5. The optimizer: nanoGPT's schedule, weight-decay groups


def nanogpt_lr(it: int, *, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """nanoGPT's ``get_lr`` (train.py), as written there."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    decay_ratio = (it - warmup) / (decay - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (lr - min_lr)


@pytest.mark.parametrize(("warmup", "decay", "ratio"), [(0, 10, 0.1), (3, 10, 0.1), (10, 50, 0.0), (1, 2, 0.5)])
def test_schedule_equals_nanogpt(warmup, decay, ratio):
    for step in range(decay + 6):
        want = nanogpt_lr(step, lr=6e-4, min_lr=6e-4 * ratio, warmup=warmup, decay=decay)
        assert math.isclose(6e-4 * warmup_cosine_schedule(step, warmup, decay, ratio), want, rel_tol=1e-12), step
    # No decay: 1 after warm-up, for good.
    assert [warmup_cosine_schedule(s, 2, None, 0.1) for s in range(5)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]


class RecordLR(L.Callback):
    """The learning rate of every parameter group at each step (what that step's update uses)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize(("decay_steps", "limits", "decay", "steps"), [
    (10, {"max_steps": 16}, 10, 16),  # past decay_steps: the floor
    (None, {"max_epochs": 3}, 12, 12),  # None: the trainer's estimate, 3 epochs of 4 batches
])
def test_optimizer_follows_nanogpt_schedule_in_a_fit(decay_steps, limits, decay, steps):
    model = lm_model(lr=1e-3, warmup_steps=3, decay_steps=decay_steps, min_lr_ratio=0.1, d_model=16,
                     dim_feedforward=32, num_layers=1)
    record = RecordLR()
    fit = trainer(callbacks=[record], **limits)
    fit.fit(model, DataLoader([pattern(seed, 2, 9) for seed in range(4)], batch_size=None))
    assert len(record.lrs) == steps
    for step, lrs in enumerate(record.lrs):
        want = nanogpt_lr(step, lr=1e-3, min_lr=1e-4, warmup=3, decay=decay)
        assert lrs == pytest.approx([want, want], rel=1e-12), step


def test_weight_decay_groups():
    for tie_output in (True, False):
        model = tiny(tie_output=tie_output, positional="learned", weight_decay=0.05)
        optimizer = model.configure_optimizers()["optimizer"]
        decayed, plain = optimizer.param_groups
        assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
        names = {id(p): name for name, p in model.named_parameters()}
        decayed_names = {names[id(p)] for p in decayed["params"]}
        plain_names = {names[id(p)] for p in plain["params"]}
        # Every parameter once, the tied weight included (named_parameters lists it once).
        assert len(decayed["params"]) + len(plain["params"]) == len(names) == len(decayed_names | plain_names)
        assert decayed_names.isdisjoint(plain_names)
        want_plain = {name for name in names.values() if name.endswith(".bias") or "norm" in name}
        assert plain_names == want_plain
        assert {"embed.weight", "position_embed.weight", "decoder.layers.0.self_attn.qkv_proj.weight",
                "decoder.layers.1.feed_forward.linear2.weight"} <= decayed_names
        assert ("output.weight" in decayed_names) == (not tie_output)
        if tie_output:
            assert model.output.weight is model.embed.weight


# ---------------------------------------------------------------------------------------------
# 6. Two processes


class RecordRank(L.Callback):
    """Each rank saves its logged validation metrics, its step and its weights after each validation."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val_")}
        record = {"metrics": metrics, "step": trainer.global_step, "state": pl_module.state_dict()}
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def ddp_val_set() -> list[dict[str, Tensor]]:
    """8 sequences; the even ones (rank 0's shard under DistributedSampler) keep far fewer labels."""
    out = []
    for index in range(8):
        ids = pattern(400 + index, 1, 17)[0]
        labels = ids.clone()
        if index % 2 == 0:
            labels[5:] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.slow
def test_ddp_spawn_two_processes(tmp_path, ddp_spawn):
    model = lm_model(d_model=16, dim_feedforward=32)
    train = DataLoader([pattern(seed, 1, 17)[0] for seed in range(8)], batch_size=2)
    val_set = ddp_val_set()
    val = DataLoader(val_set, batch_size=2)
    fit = trainer(devices=2, strategy=ddp_spawn, max_steps=4, callbacks=[RecordRank(str(tmp_path))])
    fit.fit(model, train, val)  # 2 batches a rank an epoch: validation after steps 2 and 4
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], tensor), name  # DDP keeps the replicas equal
    final = lm_model(d_model=16, dim_feedforward=32)
    final.load_state_dict(ranks[0]["state"])
    # Each rank validated 4 of the 8 sequences; the synced perplexity is that of all 8, token-weighted.
    whole = ppl_oracle(final, [{key: value[None] for key, value in item.items()} for item in val_set])
    assert math.isclose(ranks[0]["metrics"]["val_ppl"], whole, rel_tol=1e-4)
    shards = [ppl_oracle(final, [{k: v[None] for k, v in item.items()} for item in val_set[r::2]]) for r in range(2)]
    assert abs(math.sqrt(shards[0] * shards[1]) - whole) > 1e-3 * whole  # a mean of the shards' would differ
    assert math.isclose(float(fit.callback_metrics["val_ppl"]), whole, rel_tol=1e-4)
