"""llmkit.nn against torch.nn.Transformer with copied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmkit.nn import Decoder, Encoder, KVCache, MultiHeadAttention, SinusoidalPositionalEncoding
from llmkit.nn.attention import padding_mask_to_allowed

D, H, FF, LAYERS = 16, 4, 32, 2


def copy_attention(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        if ours.cross:
            ours.q_proj.weight.copy_(ref.in_proj_weight[:D])
            ours.q_proj.bias.copy_(ref.in_proj_bias[:D])
            ours.kv_proj.weight.copy_(ref.in_proj_weight[D:])
            ours.kv_proj.bias.copy_(ref.in_proj_bias[D:])
        else:
            ours.qkv_proj.weight.copy_(ref.in_proj_weight)
            ours.qkv_proj.bias.copy_(ref.in_proj_bias)
        ours.out_proj.load_state_dict(ref.out_proj.state_dict())


def copy_transformer(encoder: Encoder, decoder: Decoder, ref: nn.Transformer) -> None:
    for ours, theirs in zip(encoder.layers, ref.encoder.layers, strict=True):
        copy_attention(ours.self_attn, theirs.self_attn)
        ours.feed_forward.linear1.load_state_dict(theirs.linear1.state_dict())
        ours.feed_forward.linear2.load_state_dict(theirs.linear2.state_dict())
        ours.norm1.load_state_dict(theirs.norm1.state_dict())
        ours.norm2.load_state_dict(theirs.norm2.state_dict())
    for ours, theirs in zip(decoder.layers, ref.decoder.layers, strict=True):
        copy_attention(ours.self_attn, theirs.self_attn)
        copy_attention(ours.cross_attn, theirs.multihead_attn)
        ours.feed_forward.linear1.load_state_dict(theirs.linear1.state_dict())
        ours.feed_forward.linear2.load_state_dict(theirs.linear2.state_dict())
        for name in ("norm1", "norm2", "norm3"):
            getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())
    if encoder.norm is not None:
        encoder.norm.load_state_dict(ref.encoder.norm.state_dict())
        decoder.norm.load_state_dict(ref.decoder.norm.state_dict())


def build(norm_first: bool, dtype: torch.dtype = torch.float32) -> tuple[Encoder, Decoder, nn.Transformer]:
    torch.manual_seed(0)
    ref = nn.Transformer(
        d_model=D, nhead=H, num_encoder_layers=LAYERS, num_decoder_layers=LAYERS, dim_feedforward=FF,
        dropout=0.0, batch_first=True, norm_first=norm_first,
    )
    if not norm_first:
        # nn.Transformer always ends both stacks with a LayerNorm; the paper's post-LN model
        # (and llmkit's) has none after the last post-LN layer.
        ref.encoder.norm = nn.Identity()
        ref.decoder.norm = nn.Identity()
    kwargs = {"d_model": D, "num_heads": H, "dim_feedforward": FF, "dropout": 0.0, "norm_first": norm_first}
    encoder, decoder = Encoder(num_layers=LAYERS, **kwargs), Decoder(num_layers=LAYERS, **kwargs)
    copy_transformer(encoder, decoder, ref)
    # Train mode with dropout 0: the same maths, and no fast path (which zeroes padded outputs).
    return encoder.to(dtype).train(), decoder.to(dtype).train(), ref.to(dtype).train()


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True])
def test_same_outputs_as_torch_transformer(norm_first):
    encoder, decoder, ref = build(norm_first)
    generator = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(4, 7, D, generator=generator), torch.randn(4, 5, D, generator=generator)
    src_pad = torch.zeros(4, 7, dtype=torch.bool)
    src_pad[1, 4:] = True
    src_pad[3, 2:] = True
    tgt_pad = torch.zeros(4, 5, dtype=torch.bool)
    tgt_pad[2, 3:] = True  # right padding, as llmkit's batches have it
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: not allowed, as nn.Transformer reads it
    with torch.no_grad():
        want_memory = ref.encoder(src, src_key_padding_mask=src_pad)
        want = ref.decoder(
            tgt, want_memory, tgt_mask=causal, tgt_is_causal=True,
            tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad,
        )
        mask = padding_mask_to_allowed(src_pad)
        memory = encoder(src, mask=mask)
        got = decoder(tgt, memory=memory, memory_mask=mask)
    real_src, real_tgt = ~src_pad, ~tgt_pad
    torch.testing.assert_close(memory[real_src], want_memory[real_src], atol=1e-5, rtol=0)
    # Right padding: the causal mask alone keeps real positions from the padded ones.
    torch.testing.assert_close(got[real_tgt], want[real_tgt], atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True])
def test_incremental_decoding_with_cache_equals_full_pass(norm_first):
    encoder, decoder, _ = build(norm_first, torch.float64)
    generator = torch.Generator().manual_seed(2)
    src = torch.randn(3, 6, D, generator=generator, dtype=torch.float64)
    tgt = torch.randn(3, 5, D, generator=generator, dtype=torch.float64)
    src_pad = torch.zeros(3, 6, dtype=torch.bool)
    src_pad[0, 3:] = True
    mask = padding_mask_to_allowed(src_pad)
    with torch.no_grad():
        memory = encoder(src, mask=mask)
        full = decoder(tgt, memory=memory, memory_mask=mask)
        state = decoder.init_state(memory, mask, max_len=5)
        steps = [decoder(tgt[:, t : t + 1], state=state) for t in range(5)]
        # Two positions, then three at once: the causal mask accounts for the cached ones.
        state = decoder.init_state(memory, mask, max_len=5)
        chunks = [decoder(tgt[:, :2], state=state), decoder(tgt[:, 2:], state=state)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-12, rtol=0)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    ours, cross = MultiHeadAttention(embed_dim=D, num_heads=H), MultiHeadAttention(embed_dim=D, num_heads=H, cross=True)
    copy_attention(ours, ref)
    copy_attention(cross, ref)
    x, memory = torch.randn(2, 5, D), torch.randn(2, 8, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-6, rtol=0)
        # Cross-attention: queries from the decoder side, keys and values from the memory.
        torch.testing.assert_close(cross(x, memory=memory), ref(x, memory, memory, need_weights=False)[0], atol=1e-6, rtol=0)


def test_fully_padded_rows_give_no_nan():
    encoder, decoder, _ = build(False)
    src_pad = torch.zeros(2, 4, dtype=torch.bool)
    src_pad[1] = True
    mask = padding_mask_to_allowed(src_pad)
    memory = encoder(torch.randn(2, 4, D), mask=mask)
    out = decoder(torch.randn(2, 3, D), memory=memory, memory_mask=mask)
    assert torch.isfinite(memory).all() and torch.isfinite(out).all()


def test_positional_encoding_closed_form():
    encoding = SinusoidalPositionalEncoding(d_model=6, max_len=50)
    pos, i = 37, torch.arange(3)
    angle = pos / torch.pow(10000.0, 2 * i / 6)
    want = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1).reshape(-1)
    torch.testing.assert_close(encoding(torch.zeros(1, 40, 6))[0, pos], want, atol=1e-6, rtol=0)
    assert torch.equal(encoding(torch.zeros(1, 3, 6), offset=pos)[0, 0], encoding.pe[pos])
    assert "pe" not in encoding.state_dict() and not list(encoding.parameters())


def test_cache_overflow_and_bad_heads():
    cache = KVCache(max_len=2)
    cache.append(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="holds 2 positions, 3 were written"):
        cache.append(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"`embed_dim` \(10\) must be divisible by `num_heads` \(4\)"):
        MultiHeadAttention(embed_dim=10, num_heads=4)
    with pytest.raises(ValueError, match=r"`activation` must be one of \('relu', 'gelu', 'swiglu'\), got 'tanh'"):
        Encoder(num_layers=1, d_model=8, num_heads=2, dim_feedforward=8, activation="tanh")
