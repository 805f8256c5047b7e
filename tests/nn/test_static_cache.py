"""StaticKVCache: the same logits as the dynamic KVCache and the uncached pass, and one compiled step for every length."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from llmkit.nn import (
    Decoder,
    DecoderState,
    KVCache,
    MultiHeadAttention,
    SinusoidalPositionalEncoding,
    StaticKVCache,
    padding_mask_to_allowed,
)

D, H, FF, V, LAYERS = 16, 4, 32, 40, 2
BATCH, BEAMS, SRC = 2, 3, 7
PREFIX, STEPS = 4, 12
MAX_LEN = PREFIX + STEPS


class TinyTranslatorDecoder(nn.Module):
    """The decoding half of Seq2SeqTransformer from nn parts: embedding * sqrt(D), positions, decoder, output."""

    def __init__(self, *, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.positional = SinusoidalPositionalEncoding(d_model=D, max_len=64)
        self.decoder = Decoder(num_layers=LAYERS, d_model=D, num_heads=H, dim_feedforward=FF, dropout=0.0,
                               norm_first=norm_first)
        self.output = nn.Linear(D, V)

    def forward(self, tokens: Tensor, *, state: DecoderState) -> Tensor:
        """Logits ``[B, t, V]`` of the ``t`` positions after ``state``'s."""
        x = self.positional(self.embed(tokens) * math.sqrt(D), offset=state.position)
        return self.output(self.decoder(x, state=state))

    def full(self, tokens: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` of a whole sequence, without any cache (the oracle)."""
        x = self.positional(self.embed(tokens) * math.sqrt(D))
        return self.output(self.decoder(x, memory=memory, memory_mask=mask))


def build(norm_first: bool = False, dtype: torch.dtype = torch.float32) -> TinyTranslatorDecoder:
    torch.manual_seed(0)
    return TinyTranslatorDecoder(norm_first=norm_first).to(dtype).eval()


def source(rows: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Memory ``[rows, S, D]`` and its mask, with padding in two rows."""
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(rows, SRC, D, generator=generator, dtype=dtype)
    padding = torch.zeros(rows, SRC, dtype=torch.bool)
    padding[0, 3:] = True
    padding[-1, 5:] = True
    return memory, padding_mask_to_allowed(padding)


def beam_memory() -> tuple[Tensor, Tensor]:
    memory, mask = source(BATCH)
    return memory.repeat_interleave(BEAMS, dim=0), mask.repeat_interleave(BEAMS, dim=0)


def beam_index(step: int) -> Tensor:
    """A beam-search-like reorder: every row comes from a beam of its own source, some beams twice."""
    generator = torch.Generator().manual_seed(100 + step)
    within = torch.randint(BEAMS, (BATCH * BEAMS,), generator=generator)
    return torch.arange(BATCH).repeat_interleave(BEAMS) * BEAMS + within


def prefix_tokens(rows: int) -> Tensor:
    return torch.randint(3, V, (rows, PREFIX), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------
# Same logits as the dynamic cache and the uncached pass


@pytest.mark.parametrize("norm_first", [False, True])
@torch.no_grad()
def test_static_cache_gives_the_dynamic_cache_logits_with_beam_reorders(norm_first):
    model = build(norm_first)
    memory, mask = beam_memory()
    dynamic = model.decoder.init_state(memory, mask, max_len=MAX_LEN)
    static = model.decoder.init_state(memory, mask, max_len=MAX_LEN, static=True)
    buffers = [(cache.keys, cache.values, cache.position) for cache in static.caches]
    tokens = prefix_tokens(BATCH * BEAMS)
    want, got = model(tokens, state=dynamic)[:, -1], model(tokens, state=static)[:, -1]
    for step in range(STEPS):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert static.position.item() == dynamic.position == static.length == PREFIX + step
        index = beam_index(step)
        dynamic.reorder(index)
        static.reorder(index)
        tokens = want.argmax(-1, keepdim=True)[index]
        want, got = model(tokens, state=dynamic)[:, -1], model(tokens, state=static)[:, -1]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # Every write and reorder happened in place: a compiled step keeps seeing the same tensors.
    assert all(
        keys is cache.keys and values is cache.values and position is cache.position
        for (keys, values, position), cache in zip(buffers, static.caches, strict=True)
    )


@settings(max_examples=15, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    spare=st.integers(0, 3),
    norm_first=st.booleans(),
)
@torch.no_grad()
def test_static_cache_in_chunks_equals_the_uncached_pass(chunks, spare, norm_first):
    model = build(norm_first, torch.float64)
    memory, mask = source(3, torch.float64)
    total = sum(chunks)
    tokens = torch.randint(3, V, (3, total), generator=torch.Generator().manual_seed(total))
    state = model.decoder.init_state(memory, mask, max_len=total + spare, static=True)
    got = torch.cat([model(chunk, state=state) for chunk in tokens.split(chunks, dim=1)], dim=1)
    torch.testing.assert_close(got, model.full(tokens, memory, mask), atol=1e-12, rtol=0)


@torch.no_grad()
def test_self_attention_mask_and_non_causal_mode_combine_with_the_static_cache():
    torch.manual_seed(0)
    attention = MultiHeadAttention(embed_dim=D, num_heads=H).eval()
    x = torch.randn(2, 5, D)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, 1] = False  # a key the caller masks out, e.g. a padded target position
    for is_causal in (True, False):
        dynamic, static = KVCache(max_len=8), StaticKVCache(max_len=8, batch_size=2, num_heads=H, head_dim=D // H)
        for start, end in ((0, 3), (3, 5)):
            want = attention(x[:, start:end], cache=dynamic, is_causal=is_causal, mask=keep[:, None, None, :end])
            got = attention(x[:, start:end], cache=static, is_causal=is_causal, mask=keep[:, None, None, :])
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_positional_encoding_with_a_tensor_offset_gathers_the_same_rows():
    encoding = SinusoidalPositionalEncoding(d_model=6, max_len=20)
    x = torch.randn(2, 4, 6)
    for offset in (0, 7, 16):
        got = encoding(x, offset=torch.tensor(offset))
        assert torch.equal(got, encoding(x, offset=offset))
        assert torch.equal(got, x + encoding.pe[offset : offset + 4])
    with pytest.raises(ValueError, match=r"0-dim integer tensor, got shape \(1,\) and torch.int64"):
        encoding(x, offset=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"0-dim integer tensor, got shape \(\) and torch.float32"):
        encoding(x, offset=torch.tensor(3.0))


def test_state_position_and_cache_dtype():
    model = build()
    memory, mask = source(2)
    dynamic = model.decoder.init_state(memory, mask, max_len=4)
    static = model.decoder.init_state(memory, mask, max_len=4, static=True)
    assert dynamic.position == dynamic.length == 0 and not dynamic.static
    assert static.static and static.length == 0
    assert isinstance(static.position, Tensor) and static.position.shape == () and static.position.dtype == torch.long
    assert all(cache.keys.shape == (2, H, 4, D // H) and cache.keys.dtype == torch.float32 for cache in static.caches)
    assert build(dtype=torch.float64).decoder.init_state(memory.double(), mask, max_len=4, static=True).caches[
        0
    ].keys.dtype == torch.float64
    # Under autocast the cache holds what the projections produce.
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        state = model.decoder.init_state(memory, mask, max_len=4, static=True)
        assert state.caches[0].keys.dtype == torch.bfloat16
        assert torch.isfinite(model(torch.ones(2, 2, dtype=torch.long), state=state)).all()


# ---------------------------------------------------------------------------------------------
# torch.compile: one graph, compiled once for every length


def decode_step(model: TinyTranslatorDecoder, tokens: Tensor, state: DecoderState) -> Tensor:
    return model(tokens, state=state)[:, -1]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@torch.no_grad()
def test_static_decode_step_has_no_graph_break(fresh_dynamo):
    model = build()
    memory, mask = source(2)
    state = model.decoder.init_state(memory, mask, max_len=4, static=True)
    explanation = torch._dynamo.explain(decode_step)(model, torch.ones(2, 1, dtype=torch.long), state)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def compiled_decoding(model: TinyTranslatorDecoder, step, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """An eager prefix, then STEPS one-token steps with ``step`` and beam reorders: tokens and logits."""
    state = model.decoder.init_state(memory, mask, max_len=MAX_LEN, static=True)
    logits = model(prefix_tokens(memory.shape[0]), state=state)[:, -1]
    all_tokens, all_logits = [], []
    for position in range(STEPS):
        index = beam_index(position)
        state.reorder(index)
        tokens = logits.argmax(-1, keepdim=True)[index]
        logits = step(model, tokens, state)
        all_tokens.append(tokens)
        all_logits.append(logits)
    return torch.cat(all_tokens, 1), torch.stack(all_logits, 1)


def check_compiled_step(backend: str) -> None:
    model = build()
    memory, mask = beam_memory()
    want_tokens, want_logits = compiled_decoding(model, decode_step, memory, mask)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(decode_step, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got_tokens, got_logits = compiled_decoding(model, compiled, memory, mask)
        # A new decoding (new state, other source values) reuses the same compiled step.
        other_memory = memory + 1
        again_tokens, again_logits = compiled_decoding(model, compiled, other_memory, mask)
    assert counter.frame_count == 1
    assert torch.equal(got_tokens, want_tokens)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-6, rtol=0)
    eager_tokens, eager_logits = compiled_decoding(model, decode_step, other_memory, mask)
    assert torch.equal(again_tokens, eager_tokens)
    torch.testing.assert_close(again_logits, eager_logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_compiled_static_step_never_recompiles_and_matches_eager(fresh_dynamo):
    check_compiled_step("aot_eager")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inductor's own import
@torch.no_grad()
def test_inductor_compiled_static_step_matches_eager(fresh_dynamo):
    check_compiled_step("inductor")


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("name", ["max_len", "batch_size", "num_heads", "head_dim"])
def test_static_cache_sizes_must_be_positive(name):
    sizes = {"max_len": 4, "batch_size": 2, "num_heads": 2, "head_dim": 4, name: 0}
    with pytest.raises(ValueError, match=f"`{name}` must be at least 1, got 0"):
        StaticKVCache(**sizes)


def test_static_cache_errors():
    cache = StaticKVCache(max_len=3, batch_size=2, num_heads=1, head_dim=4)
    cache.append(torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4))
    with pytest.raises(ValueError, match="the static KV cache holds 3 positions, 4 were written"):
        cache.append(torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4))
    assert cache.position.item() == 2  # the failed write changed nothing
    with pytest.raises(ValueError, match=r"keys of shape \(3, 1, 1, 4\) do not fit a static KV cache of shape \(2, 1, 3, 4\)"):
        cache.append(torch.zeros(3, 1, 1, 4), torch.zeros(3, 1, 1, 4))
    with pytest.raises(ValueError, match=r"`index` must have shape \(2,\) \(the static cache's batch\), got \(3,\)"):
        cache.reorder(torch.tensor([0, 1, 1]))
    model = build()
    memory, mask = source(2)
    with pytest.raises(ValueError, match="`max_len` must be at least 1, got 0"):
        model.decoder.init_state(memory, mask, max_len=0, static=True)
