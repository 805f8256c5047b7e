"""Seq2SeqTransformer.generate's decoding keywords: every strategy gives the same tokens with and
without the KV cache, and equals the search functions run on full forward passes."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmkit.generation import GenerationOutput, greedy_search
from tests.models.test_seq2seq import BOS, EOS, PAD, TGT_VOCAB, random_batch, tiny

pytestmark = [pytest.mark.usefixtures("one_thread")]

STRATEGIES = {
    "greedy_constraints": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "bad_words_ids": [[5], [6, 7]]},
    "sample": {"do_sample": True, "temperature": 0.8, "top_k": 6, "top_p": 0.9, "num_return_sequences": 3},
    "sample_min_p": {"do_sample": True, "min_p": 0.1, "repetition_penalty": 1.2},
    "beam_n_best": {"num_beams": 4, "num_return_sequences": 3, "length_penalty": 0.8},
    "diverse_beam": {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.7, "num_return_sequences": 4},
    "beam_constraints": {"num_beams": 3, "no_repeat_ngram_size": 2, "min_new_tokens": 3},
}


@pytest.fixture(scope="module")
def model():
    return tiny(seed=30, num_decoder_layers=2).double().eval()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_same_tokens_with_and_without_cache(model, name):
    src, _ = random_batch(batch_size=3, seed=31)
    prefix = [[4, 5], [], [6]]
    outs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(7)
        outs.append(model.generate(src, use_cache=use_cache, generator=generator, decoder_prefix=prefix,
                                   return_scores=True, **STRATEGIES[name]))
    cached, full = outs
    assert isinstance(cached, GenerationOutput)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.scores, full.scores)
    k = STRATEGIES[name].get("num_return_sequences", 1)
    assert cached.sequences.shape[0] == 3 * k
    for i, row in enumerate(cached.sequences.tolist()):
        forced = prefix[i // k]
        assert row[: len(forced)] == forced
        assert PAD not in row[: row.index(EOS) if EOS in row else len(row)] and BOS not in row


def test_greedy_with_processors_equals_greedy_search_over_full_forward_passes(model):
    # The oracle: the search function over the model's full forward (no cache, no generate code path).
    src, _ = random_batch(batch_size=3, seed=32)
    from llmkit.generation import BadWords, NoRepeatNGram, RepetitionPenalty

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return model(src, tokens)[:, -1].float()

    processors = [BadWords([[PAD], [BOS]]), RepetitionPenalty(1.3), NoRepeatNGram(2), BadWords([[5], [6, 7]])]
    want = greedy_search(step, batch_size=3, max_new_tokens=model.hparams.max_len - 1, bos_id=BOS, eos_id=EOS,
                         pad_id=PAD, logits_processors=processors)
    got = model.generate(src, **STRATEGIES["greedy_constraints"])
    assert torch.equal(got, want)
    for row in got.tolist():
        pairs = list(itertools.pairwise(row))
        body = pairs[: row.index(EOS)] if EOS in row else pairs
        assert len(body) == len(set(body))  # no repeated bigram
        assert 5 not in row


def test_sampling_is_reproducible_and_seeded(model):
    src, _ = random_batch(batch_size=2, seed=33)
    run = lambda seed: model.generate(src, do_sample=True, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert any(not torch.equal(run(1), run(seed)) for seed in (2, 3, 4))


def test_n_best_first_row_is_plain_beam_search(model):
    src, _ = random_batch(batch_size=3, seed=34)
    plain = model.generate(src, num_beams=4)
    n_best = model.generate(src, num_beams=4, num_return_sequences=4, return_scores=True)
    firsts = n_best.sequences[::4, : plain.shape[1]]
    assert torch.equal(firsts, plain)
    scores = n_best.scores.view(3, 4)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


def test_generate_bad_input_fails_before_decoding(model):
    src, _ = random_batch(batch_size=2, seed=35)
    calls = []
    model.decoder.register_forward_pre_hook(lambda *args: calls.append(1))
    cases = [
        ({"do_sample": True, "top_p": 0.0}, r"`top_p`"),
        ({"do_sample": True, "temperature": -1.0}, r"`temperature`"),
        ({"do_sample": True, "top_k": -2}, r"`top_k`"),
        ({"num_beams": 3, "num_return_sequences": 4}, r"num_return_sequences"),
        ({"num_beams": 3, "num_beam_groups": 2}, r"num_beam_groups"),
        ({"decoder_prefix": [[4] * 12, [4]], "max_new_tokens": 5}, r"more than max_new_tokens=5"),
        ({"decoder_prefix": [[4, TGT_VOCAB], [4]]}, r"outside the vocabulary \[0, 10\]"),
        ({"bad_words_ids": [[4, TGT_VOCAB + 3]]}, r"`bad_words_ids`"),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match):
            model.generate(src, **options)
    with pytest.raises(ValueError, match=r"`src` holds token ids in \[.*\], outside the vocabulary"):
        model.generate(src + 100, do_sample=True)
    assert calls == []


@pytest.mark.parametrize("name", ["greedy_constraints", "sample", "beam_n_best", "diverse_beam"])
def test_static_cache_same_tokens_as_dynamic(model, name):
    src, _ = random_batch(batch_size=3, seed=36)
    outs = [
        model.generate(src, cache_implementation=kind, generator=torch.Generator().manual_seed(3),
                       **STRATEGIES[name])
        for kind in ("dynamic", "static")
    ]
    assert torch.equal(*outs)


@pytest.mark.slow
def test_compiled_decode_compiles_once_and_gives_eager_tokens():
    from torch._dynamo.utils import counters

    model = tiny(seed=37).eval()
    src, _ = random_batch(batch_size=3, seed=38)
    torch._dynamo.reset()
    counters.clear()
    eager = model.generate(src, max_new_tokens=9, min_new_tokens=9)
    with torch._dynamo.config.patch(error_on_recompile=True):  # 9 positions, one graph
        assert torch.equal(model.generate(src, max_new_tokens=9, min_new_tokens=9, compile=True), eager)
    assert counters["stats"]["unique_graphs"] == 1
    beam = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 9}
    assert torch.equal(model.generate(src, compile=True, **beam), model.generate(src, **beam))
    graphs = counters["stats"]["unique_graphs"]  # the new batch shape (9 rows) compiled
    assert torch.equal(model.generate(src, compile=True, **beam), model.generate(src, **beam))
    assert counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(ValueError, match=r"`cache_implementation` must be 'dynamic' or 'static', got 'paged'"):
        model.generate(src, cache_implementation="paged")
    with pytest.raises(ValueError, match=r"needs `use_cache=True`"):
        model.generate(src, compile=True, use_cache=False)
