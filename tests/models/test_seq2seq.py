"""Seq2SeqTransformer against its oracles.

- the forward pass against ``torch.nn.Transformer`` with the model's weights copied in, plus the
  paper's embedding scaling, a closed-form sinusoidal table and the tied output projection;
- the loss against label-smoothed cross-entropy written out by hand;
- generation against a manual greedy loop and the reference beam search of
  ``tests/test_generation.py`` over full (uncached) forward passes;
- the logged metrics against perplexity, sacrebleu and rouge-score computed here;
- one and two processes (``ddp_spawn``) of Lightning.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu import corpus_bleu
from torch import Tensor, nn

from llmkit import Seq2SeqTransformer
from llmkit.data import NumberWordsDataModule
from tests.accelerator import accelerator_for
from tests.test_generation import reference_beam_search

PAD, BOS, EOS = 0, 1, 2
SRC_VOCAB, TGT_VOCAB = 13, 11
TINY = {"d_model": 16, "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 2, "dim_feedforward": 32,
        "max_len": 12}

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
]



def tiny(**kwargs) -> Seq2SeqTransformer:
    torch.manual_seed(kwargs.pop("seed", 0))
    return Seq2SeqTransformer(SRC_VOCAB, TGT_VOCAB, **{**TINY, "dropout": 0.0, **kwargs})


def random_batch(batch_size: int = 4, src_len: int = 7, tgt_len: int = 6, seed: int = 0,
                 src_vocab: int = SRC_VOCAB, tgt_vocab: int = TGT_VOCAB) -> tuple[Tensor, Tensor]:
    """``src`` ``[B, S]`` (words, EOS, padding) and ``tgt`` ``[B, T]`` (BOS, words, EOS, padding), lengths varying."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.full((batch_size, src_len), PAD)
    tgt = torch.full((batch_size, tgt_len), PAD)
    for row in range(batch_size):
        n = src_len - 1 if row == 0 else int(torch.randint(1, src_len, (1,), generator=generator))
        src[row, :n] = torch.randint(3, src_vocab, (n,), generator=generator)
        src[row, n] = EOS
        m = tgt_len - 2 if row == 1 else int(torch.randint(0, tgt_len - 1, (1,), generator=generator))
        tgt[row, 0] = BOS
        tgt[row, 1 : m + 1] = torch.randint(3, tgt_vocab, (m,), generator=generator)
        tgt[row, m + 1] = EOS
    return src, tgt


# ---------------------------------------------------------------------------------------------
# 1. The forward pass against torch.nn.Transformer


def copy_attention(ours, theirs: nn.MultiheadAttention) -> None:
    if ours.cross:
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
    else:
        theirs.in_proj_weight.copy_(ours.qkv_proj.weight)
        theirs.in_proj_bias.copy_(ours.qkv_proj.bias)
    theirs.out_proj.load_state_dict(ours.out_proj.state_dict())


@torch.no_grad()
def reference_transformer(model: Seq2SeqTransformer) -> nn.Transformer:
    """A ``torch.nn.Transformer`` holding the model's encoder and decoder weights."""
    hp = model.hparams
    ref = nn.Transformer(
        d_model=hp.d_model, nhead=hp.num_heads, num_encoder_layers=hp.num_encoder_layers,
        num_decoder_layers=hp.num_decoder_layers, dim_feedforward=hp.dim_feedforward, dropout=0.0,
        activation=hp.activation, batch_first=True, norm_first=hp.norm_first,
    )
    for ours, theirs in zip(model.encoder.layers, ref.encoder.layers, strict=True):
        copy_attention(ours.self_attn, theirs.self_attn)
        theirs.linear1.load_state_dict(ours.feed_forward.linear1.state_dict())
        theirs.linear2.load_state_dict(ours.feed_forward.linear2.state_dict())
        theirs.norm1.load_state_dict(ours.norm1.state_dict())
        theirs.norm2.load_state_dict(ours.norm2.state_dict())
    for ours, theirs in zip(model.decoder.layers, ref.decoder.layers, strict=True):
        copy_attention(ours.self_attn, theirs.self_attn)
        copy_attention(ours.cross_attn, theirs.multihead_attn)
        theirs.linear1.load_state_dict(ours.feed_forward.linear1.state_dict())
        theirs.linear2.load_state_dict(ours.feed_forward.linear2.state_dict())
        for name in ("norm1", "norm2", "norm3"):
            getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())
    if hp.norm_first:
        ref.encoder.norm.load_state_dict(model.encoder.norm.state_dict())
        ref.decoder.norm.load_state_dict(model.decoder.norm.state_dict())
    else:
        # nn.Transformer ends both stacks with a LayerNorm; the paper's post-LN model has none.
        ref.encoder.norm = nn.Identity()
        ref.decoder.norm = nn.Identity()
    # Train mode with dropout 0: the same maths, without the fast path (which zeroes padded outputs).
    return ref.train()


def sinusoids(length: int, d_model: int) -> Tensor:
    """``PE[pos, 2i] = sin(pos / 10000^(2i/d))``, ``PE[pos, 2i+1] = cos(...)``, in float64."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    angle = position / torch.pow(10000.0, torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    return torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(length, d_model)


@torch.no_grad()
def reference_logits(model: Seq2SeqTransformer, src: Tensor, tgt_in: Tensor) -> Tensor:
    d_model = model.hparams.d_model
    ref = reference_transformer(model)
    src_x = model.src_embed.weight[src] * math.sqrt(d_model) + sinusoids(src.shape[1], d_model).float()
    tgt_x = model.tgt_embed.weight[tgt_in] * math.sqrt(d_model) + sinusoids(tgt_in.shape[1], d_model).float()
    causal = torch.ones(tgt_in.shape[1], tgt_in.shape[1], dtype=torch.bool).triu(1)  # True: not allowed
    hidden = ref(
        src_x, tgt_x, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src == PAD,
        tgt_key_padding_mask=tgt_in == PAD, memory_key_padding_mask=src == PAD,
    )
    return hidden @ model.tgt_embed.weight.T  # the tied output projection


@pytest.mark.parametrize(("norm_first", "activation", "layers"), [
    (False, "relu", (2, 2)), (True, "relu", (2, 2)), (False, "gelu", (1, 2)), (True, "gelu", (2, 1)),
])
def test_forward_equals_torch_transformer(norm_first, activation, layers):
    model = tiny(norm_first=norm_first, activation=activation, num_encoder_layers=layers[0],
                 num_decoder_layers=layers[1], seed=3)
    src, tgt = random_batch(batch_size=5, src_len=8, tgt_len=7, seed=4)
    tgt_in = tgt[:, :-1]
    assert (src == PAD).any() and (tgt_in == PAD).any()  # padding on both sides
    with torch.no_grad():
        got = model(src, tgt_in)
    want = reference_logits(model, src, tgt_in)
    real = tgt_in != PAD
    assert got.shape == (5, 6, TGT_VOCAB)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    # The comparison is not vacuous: logits vary with the source.
    assert (got[0] - got[1]).abs().max() > 1e-2


def test_source_padding_is_masked():
    """Appending padding to a source (or the target) leaves the logits of the real positions unchanged."""
    model = tiny(seed=5)
    src, tgt = random_batch(seed=6)
    tgt_in = tgt[:, :-1]
    with torch.no_grad():
        base = model(src, tgt_in)
        padded = model(F.pad(src, (0, 3), value=PAD), F.pad(tgt_in, (0, 2), value=PAD))
    torch.testing.assert_close(padded[:, : tgt_in.shape[1]], base, atol=1e-5, rtol=0)


def test_encode_decode_halves_equal_forward():
    model = tiny(seed=7)
    src, tgt = random_batch(seed=8)
    with torch.no_grad():
        memory = model.encode(src)
        halves = model.decode(tgt[:, :-1], memory, memory_mask=model.memory_mask(src))
        assert memory.shape == (4, 7, 16)
        assert torch.equal(halves, model(src, tgt[:, :-1]))


# ---------------------------------------------------------------------------------------------
# 2. Weight tying


def test_output_tied_to_target_embedding():
    tied, untied = tiny(), tiny(tie_output=False)
    assert tied.output.weight is tied.tgt_embed.weight
    assert untied.output.weight is not untied.tgt_embed.weight
    assert tied.src_embed is not tied.tgt_embed
    # One Parameter, counted once.
    names = [name for name, _ in tied.named_parameters()]
    assert "tgt_embed.weight" in names and "output.weight" not in names
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == TGT_VOCAB * 16


def test_share_embeddings():
    model = Seq2SeqTransformer(TGT_VOCAB, TGT_VOCAB, share_embeddings=True, **TINY)
    assert model.src_embed is model.tgt_embed
    assert model.output.weight is model.src_embed.weight
    # The padding row starts at zero.
    assert torch.equal(model.tgt_embed.weight[PAD], torch.zeros(16))
    optimizer = model.configure_optimizers()["optimizer"]
    in_groups = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(list(model.parameters()))


def _grads(model: Seq2SeqTransformer, src: Tensor, tgt: Tensor) -> dict[str, Tensor]:
    model.zero_grad()
    model.training_step((src, tgt), 0).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["state_dict", "load_from_checkpoint"])
def test_tying_survives_a_round_trip(tmp_path, how):
    model = tiny(seed=9)
    with torch.no_grad():  # make the weights differ from a fresh model's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if how == "state_dict":
        loaded = tiny(seed=123)
        loaded.load_state_dict(model.state_dict())
    else:
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                    "pytorch-lightning_version": L.__version__}, path)
        loaded = Seq2SeqTransformer.load_from_checkpoint(path)
    assert loaded.output.weight is loaded.tgt_embed.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    # Gradients flow into the one tensor: the sum of what an untied twin gives its two copies.
    src, tgt = random_batch(seed=10)
    grads = _grads(loaded, src, tgt)
    assert loaded.output.weight.grad is loaded.tgt_embed.weight.grad
    twin = tiny(tie_output=False)
    twin.load_state_dict(loaded.state_dict(), strict=False)
    with torch.no_grad():
        twin.output.weight.copy_(loaded.tgt_embed.weight)
    twin_grads = _grads(twin, src, tgt)
    torch.testing.assert_close(grads["tgt_embed.weight"],
                               twin_grads["tgt_embed.weight"] + twin_grads["output.weight"], atol=1e-6, rtol=1e-5)
    assert twin_grads["output.weight"].abs().sum() > 0 and twin_grads["tgt_embed.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# 3. The loss


def smoothed_cross_entropy(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    """Label-smoothed cross-entropy written out: mean over non-pad targets of
    ``(1 - eps) * -log p[y] + eps * mean_v(-log p[v])``."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            y = int(target[b, t])
            if y == PAD:
                continue
            total += (1 - smoothing) * -log_p[b, t, y] + smoothing * -log_p[b, t].mean()
            count += 1
    return total / count


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_training_loss_is_smoothed_cross_entropy(label_smoothing):
    model = tiny(label_smoothing=label_smoothing, seed=11)
    src, tgt = random_batch(batch_size=5, seed=12)
    loss = model.training_step({"src": src, "tgt": tgt}, 0)
    with torch.no_grad():
        logits = model(src, tgt[:, :-1])
    want = smoothed_cross_entropy(logits, tgt[:, 1:], label_smoothing)
    assert loss.shape == () and loss.requires_grad
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.reshape(-1, TGT_VOCAB), tgt[:, 1:].reshape(-1), ignore_index=PAD,
                              label_smoothing=label_smoothing), atol=1e-6, rtol=0)
    # The tuple form of a batch gives the same loss.
    torch.testing.assert_close(model.training_step((src, tgt), 0), loss, atol=0, rtol=0)


def test_padding_does_not_change_the_loss():
    model = tiny(seed=13)
    src, tgt = random_batch(seed=14)
    loss = model.training_step((src, tgt), 0)
    padded = model.training_step((F.pad(src, (0, 2), value=PAD), F.pad(tgt, (0, 3), value=PAD)), 0)
    torch.testing.assert_close(padded, loss, atol=1e-6, rtol=0)
    # A changed pad position of the target would count if it were not ignored: it is.
    changed = tgt.clone()
    changed[:, 1:][tgt[:, 1:] == PAD] = 5
    assert not torch.isclose(model.training_step((src, changed), 0), loss)


# ---------------------------------------------------------------------------------------------
# 4. Generation


NUM_WORDS = 6  # the toy task's words are 3 .. 3 + NUM_WORDS - 1
TOY_VOCAB = 3 + NUM_WORDS


def reverse_task(num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Reverse 3-6 words: ``src`` words + EOS, ``tgt`` BOS + reversed words + EOS, padded."""
    src, tgt = torch.full((num, 7), PAD), torch.full((num, 8), PAD)
    for row, n in enumerate(torch.randint(3, 7, (num,), generator=generator).tolist()):
        words = torch.randint(3, TOY_VOCAB, (n,), generator=generator)
        src[row, :n], src[row, n] = words, EOS
        tgt[row, 0], tgt[row, 1 : n + 1], tgt[row, n + 1] = BOS, words.flip(0), EOS
    return src, tgt


@pytest.fixture(scope="module")
def reverse_models() -> dict[str, object]:
    """A tiny model trained on the reverse task with plain PyTorch and its own optimizer and schedule.

    Returns the fully trained model, a snapshot after 60 steps (half trained: varied, imperfect
    outputs, good for comparing decoders), and the training sources.
    """
    torch.manual_seed(0)
    model = Seq2SeqTransformer(
        TOY_VOCAB, TOY_VOCAB, d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
        dim_feedforward=64, dropout=0.0, max_len=10, lr=3e-3, warmup_steps=50, label_smoothing=0.0,
    )
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    generator = torch.Generator().manual_seed(1)
    seen: set[tuple[int, ...]] = set()
    snapshot = None
    for step in range(400):
        if step == 60:
            snapshot = copy.deepcopy(model)
        src, tgt = reverse_task(64, generator)
        seen.update(tuple(row) for row in src.tolist())
        loss = model.training_step((src, tgt), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {"trained": model.eval(), "half": snapshot.eval(), "seen": seen}


def strip(out: Tensor) -> list[list[int]]:
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in out.tolist()]


def check_layout(out: Tensor, batch_size: int, max_new_tokens: int) -> None:
    """``[B, L]`` LongTensor, ``L <= max_new_tokens``; after a row's EOS only padding."""
    assert out.dtype == torch.long and out.shape[0] == batch_size and 1 <= out.shape[1] <= max_new_tokens
    for row in out.tolist():
        if EOS in row:
            assert set(row[row.index(EOS) + 1 :]) <= {PAD}, row


@torch.no_grad()
def manual_greedy(model: Seq2SeqTransformer, src: Tensor, max_new_tokens: int, min_new_tokens: int = 0) -> list:
    """Greedy decoding by full forward passes, one source at a time."""
    out = []
    for row in src:
        tokens = [BOS]
        for position in range(max_new_tokens):
            logits = model(row[None], torch.tensor([tokens]))[0, -1]
            logits[[PAD, BOS]] = -math.inf  # never generated
            if position < min_new_tokens:
                logits[EOS] = -math.inf
            tokens.append(int(logits.argmax()))
            if tokens[-1] == EOS:
                break
        out.append(tokens[1:])
    return out


def model_log_probs(model: Seq2SeqTransformer, src: Tensor):
    """``log_probs(b, generated)`` for the reference beam search, by full forward passes (memoised)."""
    cache: dict[tuple[int, tuple[int, ...]], Tensor] = {}

    @torch.no_grad()
    def log_probs(b: int, generated: list[int]) -> Tensor:
        key = (b, tuple(generated))
        if key not in cache:
            logits = model(src[b : b + 1], torch.tensor([[BOS, *generated]]))[0, -1]
            cache[key] = torch.log_softmax(logits.float(), dim=-1).index_fill(0, torch.tensor([PAD, BOS]), -math.inf)
        return cache[key]

    return log_probs


def generation_models(reverse_models) -> dict[str, Seq2SeqTransformer]:
    return {
        "random_post_ln": tiny(seed=20, num_decoder_layers=2, tie_output=False).double().eval(),
        "random_pre_ln": tiny(seed=21, norm_first=True).double().eval(),
        "half_trained": copy.deepcopy(reverse_models["half"]).double().eval(),
    }


@pytest.mark.parametrize("name", ["random_post_ln", "random_pre_ln", "half_trained"])
def test_generate_same_tokens_with_and_without_cache(reverse_models, name):
    model = generation_models(reverse_models)[name]
    if name == "half_trained":
        src, _ = reverse_task(8, torch.Generator().manual_seed(50))
    else:
        src, _ = random_batch(batch_size=6, seed=21)
    max_new = model.hparams.max_len - 1
    greedy = model.generate(src, use_cache=True)
    assert torch.equal(greedy, model.generate(src, use_cache=False))
    check_layout(greedy, src.shape[0], max_new)
    assert strip(greedy) == manual_greedy(model, src, max_new)
    for length_penalty in (0.6, 1.5):
        beam = model.generate(src, num_beams=3, length_penalty=length_penalty, use_cache=True)
        assert torch.equal(beam, model.generate(src, num_beams=3, length_penalty=length_penalty, use_cache=False))
        check_layout(beam, src.shape[0], max_new)
        want = reference_beam_search(model_log_probs(model, src), batch_size=src.shape[0], num_beams=3,
                                     max_new_tokens=max_new, length_penalty=length_penalty)
        assert strip(beam) == want
    if name == "half_trained":  # a case where the decoders really differ and rows end at EOS
        assert not torch.equal(beam, greedy)
        assert len({len(row) for row in strip(greedy) if row[-1] == EOS}) > 1


def test_generate_min_new_tokens(reverse_models):
    model = generation_models(reverse_models)["half_trained"]
    src, _ = reverse_task(8, torch.Generator().manual_seed(51))
    free = strip(model.generate(src))
    shortest = min(len(row) for row in free)
    min_new = shortest + 1  # forbids at least one EOS that greedy takes
    for num_beams in (1, 3):
        out = model.generate(src, num_beams=num_beams, min_new_tokens=min_new)
        check_layout(out, 8, 9)
        for row in strip(out):
            assert EOS not in row[:min_new]
    assert strip(model.generate(src, min_new_tokens=min_new)) == manual_greedy(model, src, 9, min_new)
    # EOS forbidden everywhere: every row is max_new_tokens long.
    assert model.generate(src, max_new_tokens=5, min_new_tokens=5).shape == (8, 5)
    assert (model.generate(src, max_new_tokens=5, min_new_tokens=5) != EOS).all()


def test_generate_lengths_and_errors():
    model = tiny(seed=22, max_new_tokens=3)
    src, _ = random_batch(seed=23)
    assert model.generate(src).shape[1] <= 3  # hparams.max_new_tokens is the default
    assert model.generate(src, max_new_tokens=11, min_new_tokens=11).shape == (4, 11)  # max_len - 1
    unlimited = tiny(seed=22)
    assert unlimited.generate(src, min_new_tokens=TINY["max_len"] - 1).shape == (4, TINY["max_len"] - 1)
    with pytest.raises(ValueError, match=r"`max_new_tokens` \(12\) exceeds max_len - 1 = 11"):
        model.generate(src, max_new_tokens=12)
    with pytest.raises(ValueError, match=r"`max_new_tokens` \(12\) exceeds max_len - 1 = 11"):
        model.generate(src, max_new_tokens=12, num_beams=2)
    with pytest.raises(ValueError, match="`max_new_tokens` must be at least 1, got 0"):
        model.generate(src, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"`min_new_tokens` must be in \[0, max_new_tokens=3\], got 4"):
        model.generate(src, min_new_tokens=4)
    with pytest.raises(ValueError, match="`num_beams` must be at least 1, got 0"):
        model.generate(src, num_beams=0)


def test_generate_restores_training_mode_and_needs_no_grad():
    model = tiny(seed=24, dropout=0.3)
    src, _ = random_batch(seed=25)
    model.train()
    first = model.generate(src)
    assert model.training
    assert torch.equal(model.generate(src), first)  # no dropout while generating
    assert not first.requires_grad


def test_trained_model_reverses_held_out_sequences(reverse_models):
    model = reverse_models["trained"]
    src, tgt = reverse_task(300, torch.Generator().manual_seed(99))
    held_out = torch.tensor([tuple(row) not in reverse_models["seen"] for row in src.tolist()])
    src, tgt = src[held_out], tgt[held_out]
    assert len(src) >= 100
    greedy = strip(model.generate(src))
    want = [row[1 : row.index(EOS) + 1] for row in tgt.tolist()]
    exact = sum(got == ref for got, ref in zip(greedy, want, strict=True)) / len(want)
    assert exact >= 0.9, exact
    assert strip(model.generate(src, num_beams=3)) == greedy


# ---------------------------------------------------------------------------------------------
# 5. Bad input


def test_bad_token_ids():
    model = tiny()
    src, tgt = random_batch(seed=30)
    tgt_in = tgt[:, :-1]
    bad_src = src.clone()
    bad_src[1, 0] = SRC_VOCAB
    with pytest.raises(ValueError, match=r"`src` holds token ids in \[\d+, 13\], outside the vocabulary \[0, 12\]"):
        model(bad_src, tgt_in)
    with pytest.raises(ValueError, match=r"`src` holds token ids in \[\d+, 13\], outside the vocabulary \[0, 12\]"):
        model.generate(bad_src)
    bad_tgt = tgt_in.clone()
    bad_tgt[0, 1] = 20
    with pytest.raises(ValueError, match=r"`tgt_in` holds token ids in \[\d+, 20\], outside the vocabulary \[0, 10\]"):
        model(src, bad_tgt)
    negative = src.clone()
    negative[2, 1] = -1
    with pytest.raises(ValueError, match=r"`src` holds token ids in \[-1, \d+\], outside the vocabulary \[0, 12\]"):
        model(negative, tgt_in)
    negative = tgt.clone()
    negative[0, 0] = -4
    with pytest.raises(ValueError, match=r"`tgt_in` holds token ids in \[-4, \d+\], outside the vocabulary"):
        model.training_step({"src": src, "tgt": negative}, 0)
    # Source ids fit the source vocabulary, not the smaller target one.
    assert model(torch.tensor([[12, 2]]), torch.tensor([[1]])).shape == (1, 1, TGT_VOCAB)


@pytest.mark.parametrize("bad", [20, -5])
def test_bad_token_id_in_last_target_column(bad):
    model = tiny()
    src = torch.tensor([[5, 6, 2], [7, 2, 0]])
    tgt = torch.tensor([[1, 4, bad], [1, 5, 2]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.training_step({"src": src, "tgt": tgt}, 0)


def test_bad_shapes_and_lengths():
    model = tiny()
    src, tgt = random_batch(seed=31)
    with pytest.raises(ValueError, match=r"`src` has length 13, longer than max_len=12"):
        model(torch.full((2, 13), 5), torch.tensor([[1], [1]]))
    with pytest.raises(ValueError, match=r"`src` has length 13, longer than max_len=12"):
        model.generate(torch.full((2, 13), 5))
    with pytest.raises(ValueError, match=r"`tgt_in` has length 13, longer than max_len=12"):
        model(src, torch.full((4, 13), 5))
    with pytest.raises(ValueError, match=r"`src` and `tgt` batch sizes differ: 4 and 3"):
        model(src, tgt[:3, :-1])
    with pytest.raises(ValueError, match=r"`src` and `tgt` batch sizes differ: 4 and 3"):
        model.training_step({"src": src, "tgt": tgt[:3]}, 0)
    with pytest.raises(ValueError, match=r"`tgt_in` must have shape \[batch, length\], got \(5,\)"):
        model(src, tgt[0, :-1])
    with pytest.raises(ValueError, match=r"`src` must have shape \[batch, length\], got \(7,\)"):
        model.generate(src[0])
    with pytest.raises(ValueError, match=r"`tgt` must have shape \[batch, length >= 2\] \(BOS ... EOS\), got \(4, 1\)"):
        model.training_step((src, tgt[:, :1]), 0)
    with pytest.raises(ValueError, match=r"`tgt` must have shape \[batch, length >= 2\] \(BOS ... EOS\), got \(6,\)"):
        model.validation_step((src, tgt[0]), 0)


def test_one_dimensional_src_in_forward():
    with pytest.raises(ValueError, match=r"`src` must have shape \[batch, length\], got \(3,\)"):
        tiny()(torch.tensor([5, 6, 2]), torch.tensor([[1, 4]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_token_ids(dtype):
    model = tiny()
    src, tgt = random_batch(seed=32)
    with pytest.raises(TypeError, match=f"`src` must hold integer token ids, got dtype {dtype}"):
        model(src.to(dtype), tgt[:, :-1])
    with pytest.raises(TypeError, match=f"`tgt_in` must hold integer token ids, got dtype {dtype}"):
        model(src, tgt[:, :-1].to(dtype))
    with pytest.raises(TypeError, match=f"`src` must hold integer token ids, got dtype {dtype}"):
        model.generate(src.to(dtype))


def test_bad_batches():
    model = tiny()
    src, tgt = random_batch(seed=33)
    with pytest.raises(ValueError, match=r"a batch mapping needs keys 'src' and 'tgt', got \['src'\]"):
        model.training_step({"src": src}, 0)
    with pytest.raises(ValueError, match=r"a batch mapping needs keys 'src' and 'tgt', got \['source', 'target'\]"):
        model.validation_step({"source": src, "target": tgt}, 0)
    message = r"a batch must be a mapping with 'src' and 'tgt' or a tuple \(src, tgt\) of tensors, got {}"
    with pytest.raises(ValueError, match=message.format("Tensor")):
        model.training_step(src, 0)
    with pytest.raises(ValueError, match=message.format("tuple")):
        model.training_step((src,), 0)
    with pytest.raises(ValueError, match=message.format("list")):
        model.training_step([src.tolist(), tgt.tolist()], 0)
    with pytest.raises(ValueError, match=message.format("str")):
        model.test_step("src tgt", 0)
    # A bare source tensor is fine for predict_step.
    assert torch.equal(model.predict_step(src, 0), model.generate(src))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"d_model": 10, "num_heads": 4}, ValueError, r"`d_model` \(10\) must be divisible by `num_heads` \(4\)"),
    ({"share_embeddings": True}, ValueError,
     r"`share_embeddings=True` needs one vocabulary, got src_vocab_size=13 and tgt_vocab_size=11"),
    ({"pad_id": 11}, ValueError, r"`pad_id` must be a valid token id below both vocabulary sizes, got 11"),
    ({"bos_id": -1}, ValueError, r"`bos_id` must be a valid token id below both vocabulary sizes, got -1"),
    ({"eos_id": 12}, ValueError, r"`eos_id` must be a valid token id below both vocabulary sizes, got 12"),
    ({"label_smoothing": 1.0}, ValueError, r"`label_smoothing` must be in \[0, 1\), got 1.0"),
    ({"label_smoothing": -0.1}, ValueError, r"`label_smoothing` must be in \[0, 1\), got -0.1"),
    ({"dropout": 1.0}, ValueError, r"`dropout` must be in \[0, 1\), got 1.0"),
    ({"dropout": -0.5}, ValueError, r"`dropout` must be in \[0, 1\), got -0.5"),
    ({"d_model": 0}, ValueError, r"`d_model` must be at least 1, got 0"),
    ({"num_heads": 0}, ValueError, r"`num_heads` must be at least 1, got 0"),
    ({"max_len": 0}, ValueError, r"`max_len` must be at least 1, got 0"),
    ({"dim_feedforward": -1}, ValueError, r"`dim_feedforward` must be at least 1, got -1"),
    ({"activation": "tanh"}, ValueError, r"`activation` must be one of \('relu', 'gelu', 'swiglu'\), got 'tanh'"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Seq2SeqTransformer(SRC_VOCAB, TGT_VOCAB, **{**TINY, **kwargs})


@pytest.mark.parametrize("max_new_tokens", [0, 12])
def test_bad_default_max_new_tokens(max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens"):
        Seq2SeqTransformer(SRC_VOCAB, TGT_VOCAB, **{**TINY, "max_new_tokens": max_new_tokens})


def test_bad_vocabulary_sizes():
    with pytest.raises(ValueError, match="`src_vocab_size` must be at least 1, got 0"):
        Seq2SeqTransformer(0, TGT_VOCAB, **TINY)
    with pytest.raises(ValueError, match="`tgt_vocab_size` must be at least 1, got -3"):
        Seq2SeqTransformer(SRC_VOCAB, -3, **TINY)


# ---------------------------------------------------------------------------------------------
# 6. Lightning


def number_words() -> NumberWordsDataModule:
    return NumberWordsDataModule(high=300, val_size=40, test_size=40, batch_size=32)


def number_model(dm: NumberWordsDataModule, **kwargs) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(
        dm.src_vocab_size, dm.tgt_vocab_size, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
        dim_feedforward=64, dropout=0.1, max_len=24, lr=5e-3, warmup_steps=4, **kwargs,
    )


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**{
        # Several processes (ddp_spawn, gloo) on CPU; one on the tests' accelerator.
        "accelerator": accelerator_for(kwargs.get("devices", 1), kwargs.get("num_nodes", 1)), "devices": 1,
        "limit_val_batches": 2, "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, **kwargs,
    })


@pytest.fixture(scope="module")
def fitted():
    dm = number_words()
    model = number_model(dm)
    # The last validation comes after the last step, so the logged values are those of the final weights.
    # 60 steps (about a second): enough for translations that score above zero.
    fit = trainer(max_steps=60, val_check_interval=30, check_val_every_n_epoch=None)
    fit.fit(model, datamodule=dm)
    return fit, model, dm, {key: float(value) for key, value in fit.callback_metrics.items()}


@torch.no_grad()
def evaluation_oracle(model: Seq2SeqTransformer, batches: list[dict[str, Tensor]],
                      generate_batches: int = 1) -> dict[str, float]:
    """What validation should log over ``batches``: the loss (the batch-size weighted mean of the
    label-smoothed loss), perplexity (over all tokens), and BLEU/ROUGE-L of the first ``generate_batches``."""
    was_training = model.training
    model.eval()
    nll, tokens, losses, sizes, hyps, refs = 0.0, 0, [], [], [], []

    def words(ids: list[int]) -> str:
        return " ".join(str(i) for i in ids if i not in (PAD, EOS))

    for index, batch in enumerate(batches):
        src, tgt = batch["src"], batch["tgt"]
        logits = model(src, tgt[:, :-1])
        target = tgt[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), target.reshape(-1),
                                     ignore_index=PAD, reduction="sum"))
        tokens += int((target != PAD).sum())
        losses.append(float(smoothed_cross_entropy(logits, target, model.hparams.label_smoothing)))
        sizes.append(src.shape[0])
        if index < generate_batches:
            generated = model.generate(src, max_new_tokens=min(target.shape[1] + 10, model.hparams.max_len - 1))
            hyps += [words(row) for row in generated.tolist()]
            refs += [words(row) for row in target.tolist()]
    model.train(was_training)
    scorer = RougeScorer(["rougeL"])
    return {
        "loss": sum(loss * size for loss, size in zip(losses, sizes, strict=True)) / sum(sizes),
        "ppl": math.exp(nll / tokens),
        "bleu": corpus_bleu(hyps, [refs], tokenize="none").score / 100,
        "rougeL": sum(scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(refs, hyps, strict=True))
        / len(hyps),
    }


def test_fit_logs_validation_metrics_equal_to_oracles(fitted):
    fit, model, dm, logged = fitted
    assert fit.global_step == 60
    assert {"train_loss", "val_loss", "val_ppl", "val_bleu", "val_rougeL"} <= set(logged)
    batches = list(dm.val_dataloader())[:2]
    oracle = evaluation_oracle(model, batches)
    assert math.isclose(logged["val_ppl"], oracle["ppl"], rel_tol=1e-5)
    assert math.isclose(logged["val_loss"], oracle["loss"], rel_tol=1e-5)
    assert math.isclose(logged["val_bleu"], oracle["bleu"], abs_tol=1e-6)
    assert math.isclose(logged["val_rougeL"], oracle["rougeL"], abs_tol=1e-6)
    assert logged["val_ppl"] > 1.0 and logged["val_bleu"] > 0.02 and logged["val_rougeL"] > 0.1  # not vacuous
    assert math.isfinite(logged["train_loss"])


def test_test_logs_every_test_metric(fitted):
    fit, model, dm, _ = fitted
    results = fit.test(model, datamodule=dm, verbose=False)
    assert {"test_bleu", "test_rougeL", "test_ppl", "test_loss"} <= set(results[0])
    batches = list(dm.test_dataloader())
    assert len(batches) == 2
    oracle = evaluation_oracle(model, batches, generate_batches=len(batches))  # test decodes every batch
    assert math.isclose(results[0]["test_ppl"], oracle["ppl"], rel_tol=1e-5)
    assert math.isclose(results[0]["test_loss"], oracle["loss"], rel_tol=1e-5)
    assert math.isclose(results[0]["test_bleu"], oracle["bleu"], abs_tol=1e-6)
    assert math.isclose(results[0]["test_rougeL"], oracle["rougeL"], abs_tol=1e-6)


def test_predict_returns_generated_tokens(fitted):
    fit, model, dm, _ = fitted
    predictions = fit.predict(model, datamodule=dm)
    batches = list(dm.predict_dataloader())
    assert isinstance(predictions, list) and len(predictions) == len(batches) == 2
    for prediction, batch in zip(predictions, batches, strict=True):
        assert isinstance(prediction, Tensor) and prediction.dtype == torch.long
        assert torch.equal(prediction, model.generate(batch["src"]))


def test_validation_without_generation(fitted):
    """``val_generate_batches=0``: loss and perplexity only, no decoding."""
    _, _, dm, _ = fitted
    model = number_model(dm, val_generate_batches=0)
    results = trainer().validate(model, datamodule=dm, verbose=False)
    assert {"val_loss", "val_ppl"} <= set(results[0])
    assert "val_bleu" not in results[0] and "val_rougeL" not in results[0]
    assert math.isclose(results[0]["val_ppl"], evaluation_oracle(model, list(dm.val_dataloader())[:2])["ppl"],
                        rel_tol=1e-5)


def test_checkpoint_round_trip(fitted, tmp_path):
    fit, model, dm, _ = fitted
    path = tmp_path / "seq2seq.ckpt"
    fit.save_checkpoint(path)
    loaded = Seq2SeqTransformer.load_from_checkpoint(path)
    assert dict(loaded.hparams) == dict(model.hparams)
    assert loaded.hparams.src_vocab_size == dm.src_vocab_size and loaded.hparams.d_model == 32
    assert loaded.output.weight is loaded.tgt_embed.weight
    src = next(iter(dm.test_dataloader()))["src"]
    for num_beams in (1, 3):
        assert torch.equal(loaded.generate(src, num_beams=num_beams), model.generate(src, num_beams=num_beams))


# ---------------------------------------------------------------------------------------------
# 7. Two processes


class RecordValidation(L.Callback):
    """Each rank writes its logged validation metrics, a weight checksum and its own perplexity oracle."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val_")}
        # The whole validation set (each rank validates half of it), without the distributed sampler.
        oracle = evaluation_oracle(pl_module, list(trainer.datamodule.val_dataloader()))
        checksum = sum(float(p.double().sum()) for p in pl_module.parameters())
        record = {"metrics": metrics, "checksum": checksum, "oracle_ppl": oracle["ppl"], "step": trainer.global_step}
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_spawn_two_processes(tmp_path, ddp_spawn):
    dm = number_words()
    model = number_model(dm, val_generate_batches=1)
    fit = trainer(devices=2, strategy=ddp_spawn, max_steps=4, callbacks=[RecordValidation(str(tmp_path))])
    fit.fit(model, datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert {"val_loss", "val_ppl", "val_bleu", "val_rougeL"} <= set(ranks[0]["metrics"])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP keeps the replicas equal
    # Each rank validated 20 of the 40 examples; the synced perplexity is that of all 40.
    for record in ranks:
        assert math.isclose(record["metrics"]["val_ppl"], record["oracle_ppl"], rel_tol=1e-5)
    # The values come back to the launching process.
    assert math.isclose(float(fit.callback_metrics["val_ppl"]), ranks[0]["metrics"]["val_ppl"], rel_tol=1e-6)


def test_generation_never_emits_padding_or_bos():
    """An untrained model would otherwise pick PAD or BOS mid-sequence."""
    model = tiny(seed=3).eval()
    with torch.no_grad():
        model.output.weight[PAD] += 10.0  # make PAD and BOS the most likely tokens everywhere
        model.output.weight[BOS] += 10.0
    src, _ = random_batch(batch_size=5, seed=4)
    for num_beams in (1, 3):
        out = model.generate(src, max_new_tokens=8, num_beams=num_beams)
        assert not (out == BOS).any()
        for row in out.tolist():
            ended = row.index(EOS) + 1 if EOS in row else len(row)
            assert PAD not in row[:ended] and all(token == PAD for token in row[ended:])
