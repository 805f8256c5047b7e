"""CausalLMTransformer against reference implementations, with the same weights.

- nanoGPT's ``GPT`` (``benchmarks/nanogpt.py``, a straight copy of its ``model.py``): logits at every
  position, the next-token loss and its gradients, greedy continuations (its sampling loop at
  ``top_k=1``), the parameter count and the initialisation's statistics;
- Hugging Face ``GPT2LMHeadModel`` (tiny config, random weights, no download): logits, and its cached
  greedy ``generate``;
- Hugging Face LLaMA's rotary embeddings (``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``) against
  ``RotaryEmbedding`` at offsets 0 and k, and a plain re-implementation of the whole rope + SwiGLU
  forward pass on them;
- incremental decoding (dynamic and static KV cache) against the full forward pass, per positional.

Every model's parameters are perturbed away from their initial values first (layer norms away from
1 and 0, biases away from 0), so that a parameter copied to the wrong place cannot go unnoticed.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from llmkit import CausalLMTransformer
from llmkit.models.causal_lm import _incremental_step
from llmkit.nn import RotaryEmbedding

pytestmark = [pytest.mark.usefixtures("one_thread")]

V, D, HEADS, LAYERS, FF, MAX_LEN = 64, 32, 4, 2, 128, 32
ATOL = 1e-5


def load_nanogpt() -> ModuleType:
    """``benchmarks/nanogpt.py``, loaded by path (``benchmarks/`` is not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "nanogpt.py"
    spec = importlib.util.spec_from_file_location("llmkit_benchmarks_nanogpt", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


nanogpt = load_nanogpt()


def gpt2_names(num_layers: int) -> dict[str, str]:
    """Our parameter names -> GPT-2's (nanoGPT's and Hugging Face's ``GPT2LMHeadModel`` share them).

    The output projection is tied to the embedding in all three, so it has no entry of its own.
    """
    names = {
        "embed.weight": "transformer.wte.weight",
        "position_embed.weight": "transformer.wpe.weight",
        "decoder.norm.weight": "transformer.ln_f.weight",
        "decoder.norm.bias": "transformer.ln_f.bias",
    }
    for i in range(num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for mine, gpt2 in [
            ("norm1", "ln_1"),
            ("self_attn.qkv_proj", "attn.c_attn"),  # [3D, D]: q, k, v in this order in both
            ("self_attn.out_proj", "attn.c_proj"),
            ("norm2", "ln_2"),
            ("feed_forward.linear1", "mlp.c_fc"),
            ("feed_forward.linear2", "mlp.c_proj"),
        ]:
            for kind in ("weight", "bias"):
                names[f"{ours}{mine}.{kind}"] = f"{theirs}{gpt2}.{kind}"
    return names


#: Hugging Face's GPT-2 keeps these weights as ``Conv1D`` ``[in, out]``: transposed from ``nn.Linear``'s.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def copy_gpt2_weights(model: CausalLMTransformer, reference: nn.Module, *, conv1d: bool) -> None:
    """Copy a GPT-2-named model's weights (nanoGPT's, or Hugging Face's with ``conv1d=True``) into ``model``."""
    names = gpt2_names(model.hparams.num_layers)
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert set(ours) == set(names), "the mapping must cover every parameter of ours"
    with torch.no_grad():
        for mine, gpt2 in names.items():
            source = theirs[gpt2]
            ours[mine].copy_(source.t() if conv1d and gpt2.endswith(CONV1D) else source)


def perturb_(module: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add noise to every parameter (each once, tied ones included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def ids(batch: int, length: int, seed: int = 0, vocab: int = V) -> Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def ours_learned(**kwargs) -> CausalLMTransformer:
    """GPT-2's layout: learned positions, GELU, ``4 * d_model`` feed-forward."""
    settings = {
        "d_model": D, "num_heads": HEADS, "num_layers": LAYERS, "dim_feedforward": FF, "dropout": 0.0,
        "activation": "gelu", "positional": "learned", "max_len": MAX_LEN, **kwargs,
    }
    return CausalLMTransformer(V, **settings).eval()


# ---------------------------------------------------------------------------------------------
# 1. nanoGPT


@pytest.fixture(scope="module")
def nanogpt_pair() -> tuple[nn.Module, CausalLMTransformer]:
    torch.manual_seed(0)
    gpt = nanogpt.GPT(
        nanogpt.GPTConfig(block_size=MAX_LEN, vocab_size=V, n_layer=LAYERS, n_head=HEADS, n_embd=D, dropout=0.0,
                          bias=True)
    ).eval()
    perturb_(gpt, seed=1)
    model = ours_learned()
    copy_gpt2_weights(model, gpt, conv1d=False)
    return gpt, model


@pytest.mark.parametrize("length", [1, 7, MAX_LEN])
def test_logits_equal_nanogpt(nanogpt_pair, length):
    gpt, model = nanogpt_pair
    x = ids(3, length, seed=length)
    with torch.no_grad():
        want, _ = gpt(x, x)  # with targets nanoGPT returns the logits of every position
        got = model(x)
    assert got.shape == want.shape == (3, length, V)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert want.std() > 0.1  # not vacuous: the logits are far from uniform


def test_loss_and_gradients_equal_nanogpt(nanogpt_pair):
    gpt, model = nanogpt_pair
    batch = ids(4, MAX_LEN + 1, seed=3)  # ours feeds positions 0 .. T-2 and predicts 1 .. T-1
    gpt.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    _, want = gpt(batch[:, :-1], batch[:, 1:].contiguous())  # nanoGPT views its targets
    _, _, got = model._shared_step(batch)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    want.backward()
    got.backward()
    theirs = dict(gpt.named_parameters())
    for mine, gpt2 in gpt2_names(LAYERS).items():
        # The tied embedding's gradient sums the input and output uses in both.
        torch.testing.assert_close(model.get_parameter(mine).grad, theirs[gpt2].grad, atol=ATOL, rtol=0, msg=mine)
    assert model.embed.weight.grad.abs().max() > 1e-3


def test_greedy_continuations_equal_nanogpt(nanogpt_pair):
    gpt, model = nanogpt_pair
    prompt = ids(3, 5, seed=4)
    # nanoGPT's sampling loop (the whole sequence every step, no cache) at top_k=1 is greedy search.
    want = gpt.generate(prompt, max_new_tokens=12, top_k=1)[:, 5:]
    assert torch.equal(model.generate(prompt, max_new_tokens=12), want)


def test_initialisation_follows_gpt2_and_nanogpt():
    """GPT-2's init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 * layers)), zero biases, unit norms."""
    d, layers, vocab, max_len = 256, 2, 512, 64
    torch.manual_seed(0)
    gpt = nanogpt.GPT(nanogpt.GPTConfig(block_size=max_len, vocab_size=vocab, n_layer=layers, n_head=4, n_embd=d,
                                        bias=True))
    model = CausalLMTransformer(vocab, d_model=d, num_heads=4, num_layers=layers, dim_feedforward=4 * d,
                                positional="learned", max_len=max_len)
    assert model.output.weight is model.embed.weight  # one Parameter, not a copy
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in gpt.parameters())
    theirs = dict(gpt.named_parameters())
    residual = 0.02 / math.sqrt(2 * layers)
    for mine, gpt2 in gpt2_names(layers).items():
        ours, reference = model.get_parameter(mine).detach(), theirs[gpt2].detach()
        if ours.dim() == 1:  # biases zero, norms' weights one: exactly, as nanoGPT's
            assert torch.equal(ours, reference), mine
            continue
        std = residual if mine.endswith(("out_proj.weight", "linear2.weight")) else 0.02
        # at least 16,384 draws per tensor: the sample std is within ~0.6% of the true one (1 sigma)
        assert abs(ours.std().item() / std - 1) < 0.04, mine
        assert abs(ours.std().item() / reference.std().item() - 1) < 0.06, mine
        assert abs(ours.mean().item()) < 0.1 * std, mine


def test_untied_output_is_its_own_parameter():
    model = ours_learned(tie_output=False)
    assert model.output.weight is not model.embed.weight
    assert not torch.equal(model.output.weight, model.embed.weight)


# ---------------------------------------------------------------------------------------------
# 2. Hugging Face GPT-2


def hf_gpt2_pair(dtype: torch.dtype = torch.float32) -> tuple[GPT2LMHeadModel, CausalLMTransformer]:
    config = GPT2Config(
        vocab_size=V, n_positions=MAX_LEN, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=FF,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()
    assert hf.lm_head.weight is hf.transformer.wte.weight
    perturb_(hf, seed=2)
    model = ours_learned()
    copy_gpt2_weights(model, hf, conv1d=True)
    return hf.to(dtype), model.to(dtype)


def test_logits_equal_hf_gpt2():
    hf, model = hf_gpt2_pair()
    for length in (1, 9, MAX_LEN):
        x = ids(2, length, seed=10 + length)
        with torch.no_grad():
            want = hf(input_ids=x).logits
            got = model(x)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_greedy_generation_equals_hf_gpt2_cached_generate():
    hf, model = hf_gpt2_pair(torch.float64)  # float64: no near-tie can flip an argmax between the two
    prompt = ids(3, 6, seed=5)
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                       pad_token_id=0)[:, 6:]
    assert torch.equal(model.generate(prompt, max_new_tokens=10), want)
    assert len(set(want.flatten().tolist())) > 3  # not vacuous: not one token repeated


# ---------------------------------------------------------------------------------------------
# 3. Rotary embeddings: Hugging Face LLaMA's


def llama_cos_sin(x: Tensor, *, heads: int, max_len: int, base: float, start: int) -> tuple[Tensor, Tensor]:
    """HF LLaMA's ``cos, sin`` ``[B, T, Dh]`` for positions ``start .. start + T - 1`` of ``x`` ``[B, H, T, Dh]``."""
    batch, _, length, head_dim = x.shape
    config = LlamaConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, max_position_embeddings=max_len,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )
    position_ids = torch.arange(start, start + length).expand(batch, -1)
    return LlamaRotaryEmbedding(config=config)(x, position_ids)


@pytest.mark.parametrize("offset", [0, 19])
def test_rotary_equals_hf_llama(offset):
    batch, heads, length, head_dim, max_len = 2, 3, 13, 16, 40
    generator = torch.Generator().manual_seed(offset)
    q, k = (torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(2))
    rotary = RotaryEmbedding(head_dim=head_dim, max_len=max_len, base=10000.0)
    cos, sin = llama_cos_sin(q, heads=heads, max_len=max_len, base=10000.0, start=offset)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rotary(q, offset=offset), rotary(k, offset=offset)
    torch.testing.assert_close(got_q, want_q, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_k, want_k, atol=ATOL, rtol=0)
    # A static cache's 0-dim tensor position rotates as the int does.
    assert torch.equal(rotary(q, offset=torch.tensor(offset)), got_q)


def reference_rope_swiglu_logits(model: CausalLMTransformer, x: Tensor) -> Tensor:
    """The rope + SwiGLU model's forward pass written out: HF's rotary, softmax attention by hand."""
    hp = model.hparams
    d, heads = hp.d_model, hp.num_heads
    batch, length = x.shape
    h = model.embed.weight[x]
    q_shape = (batch, length, heads, d // heads)
    cos, sin = llama_cos_sin(h.view(*q_shape).transpose(1, 2), heads=heads, max_len=hp.max_len, base=hp.rope_base,
                             start=0)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for layer in model.decoder.layers:
        a = F.layer_norm(h, (d,), layer.norm1.weight, layer.norm1.bias, 1e-5)
        qkv = F.linear(a, layer.self_attn.qkv_proj.weight, layer.self_attn.qkv_proj.bias)
        q, k, v = (t.reshape(q_shape).transpose(1, 2) for t in qkv.split(d, dim=-1))  # (B, H, T, Dh)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).masked_fill(~causal, float("-inf"))
        a = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, d)
        h = h + F.linear(a, layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias)
        f = F.layer_norm(h, (d,), layer.norm2.weight, layer.norm2.bias, 1e-5)
        gate, up = F.linear(f, layer.feed_forward.linear1.weight, layer.feed_forward.linear1.bias).chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, layer.feed_forward.linear2.weight, layer.feed_forward.linear2.bias)
    h = F.layer_norm(h, (d,), model.decoder.norm.weight, model.decoder.norm.bias, 1e-5)
    return F.linear(h, model.embed.weight)  # tied output


def test_rope_swiglu_forward_equals_plain_reimplementation():
    torch.manual_seed(0)
    model = CausalLMTransformer(V, d_model=D, num_heads=HEADS, num_layers=LAYERS, dim_feedforward=48, dropout=0.0,
                                activation="swiglu", positional="rope", max_len=MAX_LEN).eval()
    perturb_(model, seed=6)
    for length in (1, 11, MAX_LEN):
        x = ids(2, length, seed=20 + length)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference_rope_swiglu_logits(model, x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# 4. Incremental decoding


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("positional", ["rope", "learned", "sinusoidal"])
def test_incremental_decoding_equals_the_full_pass(positional, static):
    torch.manual_seed(0)
    model = CausalLMTransformer(V, d_model=D, num_heads=HEADS, num_layers=LAYERS, dim_feedforward=64, dropout=0.0,
                                positional=positional, max_len=MAX_LEN).eval()
    perturb_(model, seed=7)
    x, prompt = ids(3, 14, seed=8), 5
    with torch.no_grad():
        full = model(x)
        state = model.decoder.init_state(batch_size=3, max_len=x.shape[1], static=static)
        steps = [_incremental_step(model, x[:, :prompt], state)]  # the prompt at once, then one token a step
        steps += [_incremental_step(model, x[:, t : t + 1], state) for t in range(prompt, x.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, prompt - 1 :], atol=ATOL, rtol=0)
