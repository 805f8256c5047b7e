"""Property-based tests: llmkit's tokenizers and text metrics against sacrebleu and rouge-score.

The oracles are the reference implementations themselves: sacrebleu for BLEU and its
tokenizers, Google's rouge-score (with nltk's Porter stemmer) for ROUGE, and float64
``torch.nn.functional.cross_entropy`` for perplexity.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nltk.stem import porter
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize
from sacrebleu.metrics.bleu import BLEU, _get_tokenizer

from llmkit.metrics import BLEUScore, Perplexity, ROUGEScore
from llmkit.metrics.functional import bleu_score, rouge_score
from llmkit.metrics.tokenizers import porter_stem, tokenize_bleu, tokenize_rouge

TOL = 1e-6
TOKENIZERS = ("13a", "intl", "char", "none")
SMOOTH_METHODS = ("none", "floor", "add-k", "exp")
ROUGE_KEYS = ("rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum")
SCORE_NAMES = ("fmeasure", "precision", "recall")
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]

# sacrebleu's tokenizer objects, built once (each caches its lines).
SACRE_TOKENIZERS = {name: _get_tokenizer(name)() for name in TOKENIZERS}
NLTK_STEMMER = porter.PorterStemmer()

# Every control character llmkit may use to separate lines, and the mathematical digits that
# `intl` uses as separators: a line holding them all forces the per-line fallbacks.
ALL_SEPARATORS = "".join(map(chr, [*range(0x01, 0x09), *range(0x0E, 0x1C)]))
INTL_DIGITS = "\U0001d7d8\U0001d7ce\U0001d7e2\U0001d7ec\U0001d7f6"

# ---------------------------------------------------------------------------------------------
# Strategies.

TRICKY_PIECES = [
    *"0123456789",
    *".,-",
    " ", "  ", "\t", "\n", "-\n",
    "&", "quot;", "amp;", "lt;", "gt;", "&quot;", "&amp;", "&lt;", "&gt;", "&amp;lt;",
    "<skipped>", "<skip", "ped>",
    *"()[]{}<>",
    *"$%/:@",
    "\x01", "\x02",
    *"aZbYcX",
    "the", "Cat", "U.S.", "1,000.50", "3.", ".5", "...", ",,", ".,.", "9-",
]
tricky_text = st.lists(st.sampled_from(TRICKY_PIECES), max_size=25).map("".join)
# Rarely, a line that holds every separator candidate.
tricky_line = st.one_of(
    tricky_text,
    st.tuples(tricky_text, st.sampled_from([ALL_SEPARATORS, INTL_DIGITS, ALL_SEPARATORS + INTL_DIGITS]), tricky_text)
    .map("".join),
)
unicode_line = st.text(max_size=30)

# BLEU sentences: a small pool of words, so that n-grams match, mixed with punctuation.
BLEU_WORDS = [
    "the", "The", "THE", "cat", "Cat", "sat", "on", "mat", "a", "dog", "is",
    "1,000", "3.5", "x-1", "2-3", "U.S.", "don't", "Straße", "İstanbul", "naïve", "K", "é", "中文",
    "&amp;", "&quot;", "<skipped>",
    ",", ".", "!", "?", "-", "(", ")", "$", "%", "@", "...", "'",
]
WORD_SEPS = [" ", " ", " ", " ", " ", " ", "", "  ", "\t", "\n"]


@st.composite
def sentences(draw, words=BLEU_WORDS, max_words=10):
    picked = draw(st.lists(st.sampled_from(words), max_size=max_words))
    parts = []
    for index, word in enumerate(picked):
        if index:
            parts.append(draw(st.sampled_from(WORD_SEPS)))
        parts.append(word)
    return "".join(parts)


@st.composite
def text_corpora(draw, sentence=None, max_samples=8, max_refs=3, min_samples=1):
    """``(preds, refs)``: per sample one hypothesis and a list of 1..max_refs references."""
    sentence = sentences() if sentence is None else sentence
    num = draw(st.integers(min_samples, max_samples))
    preds = [draw(sentence) for _ in range(num)]
    # References are fresh sentences or edits of the hypothesis, so that long n-grams match.
    refs = [
        [draw(st.one_of(sentence, edited(pred, sentence))) for _ in range(draw(st.integers(1, max_refs)))]
        for pred in preds
    ]
    return preds, refs


@st.composite
def edited(draw, text, sentence):
    """``text`` with some of its space-separated pieces dropped and a fresh sentence put in."""
    pieces = text.split(" ")
    kept = [piece for piece in pieces if draw(st.integers(0, 3))]
    kept.insert(draw(st.integers(0, len(kept))), draw(sentence))
    return " ".join(kept)


def ref_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """llmkit's references per sample -> sacrebleu's reference streams (``None`` = missing)."""
    num_streams = max(map(len, refs))
    return [[sample[j] if j < len(sample) else None for sample in refs] for j in range(num_streams)]


def sacrebleu_score(preds, refs, *, n_gram=4, **kwargs) -> float:
    return BLEU(max_ngram_order=n_gram, **kwargs).corpus_score(preds, ref_streams(refs)).score / 100


bleu_options = st.fixed_dictionaries(
    {
        "tokenize": st.sampled_from(TOKENIZERS),
        "lowercase": st.booleans(),
        "smooth_method": st.sampled_from(SMOOTH_METHODS),
        "smooth_value": st.one_of(st.none(), st.floats(0.0, 2.0)),
        "n_gram": st.integers(1, 5),
        "effective_order": st.booleans(),
    }
)


# ROUGE texts: sentences of words (inflected ones for the stemmer) joined by newlines.
ROUGE_WORDS = [
    "the", "The", "cat", "cats", "sat", "sitting", "on", "mat", "mats", "a", "dog", "dogs",
    "running", "runs", "ran", "happily", "generalization", "28", "x1", "jähriger", "Koch", "Straße",
    "İ", "K", "ü", "\x01", ",", ".", "-", "!",
]
rouge_sentence = sentences(ROUGE_WORDS, max_words=8)


@st.composite
def rouge_texts(draw, unicode=False):
    if unicode and draw(st.booleans()):
        return draw(st.text(max_size=25))
    lines = draw(st.lists(rouge_sentence, max_size=3))
    return draw(st.sampled_from(["\n", "\n", "\n\n", " \n"])).join(lines)


# ---------------------------------------------------------------------------------------------
# 1. Tokenizers.


def sacre_tokenize(lines: list[str], name: str, lowercase: bool) -> list[list[str]]:
    tokenizer = SACRE_TOKENIZERS[name]
    return [tokenizer((line.lower() if lowercase else line).rstrip()).split() for line in lines]


@settings(max_examples=150, deadline=None, suppress_health_check=HEALTH)
@given(
    lines=st.lists(tricky_line, min_size=1, max_size=6),
    name=st.sampled_from(TOKENIZERS),
    lowercase=st.booleans(),
)
def test_tokenize_bleu_tricky_ascii(lines, name, lowercase):
    assert tokenize_bleu(lines, name, lowercase) == sacre_tokenize(lines, name, lowercase)


@settings(max_examples=150, deadline=None, suppress_health_check=HEALTH)
@given(
    lines=st.lists(unicode_line, min_size=1, max_size=6),
    name=st.sampled_from(TOKENIZERS),
    lowercase=st.booleans(),
)
def test_tokenize_bleu_unicode(lines, name, lowercase):
    assert tokenize_bleu(lines, name, lowercase) == sacre_tokenize(lines, name, lowercase)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("lowercase", [False, True])
def test_tokenize_bleu_every_separator(name, lowercase):
    """Lines that hold every separator candidate take the per-line fallback paths."""
    lines = [f"A{ALL_SEPARATORS}b, 1.5 {INTL_DIGITS}.", "c-1 d", "", f"{ALL_SEPARATORS}&amp; x."]
    assert tokenize_bleu(lines, name, lowercase) == sacre_tokenize(lines, name, lowercase)
    assert tokenize_bleu(lines[:1], name, lowercase) == sacre_tokenize(lines[:1], name, lowercase)


ROUGE_CHARS = st.one_of(
    st.characters(),
    st.sampled_from(list("äöüÄÖÜßİK\x01 \n\t-.,abcdefghijklmnopqrstuvwxyzABCXYZ0123456789")),
)
rouge_tokenizer_text = st.one_of(
    st.text(ROUGE_CHARS, max_size=40),
    st.lists(st.sampled_from([*ROUGE_WORDS, " ", "  "]), max_size=12).map(" ".join),
)


@settings(max_examples=200, deadline=None, suppress_health_check=HEALTH)
@given(text=rouge_tokenizer_text, stem=st.booleans())
def test_tokenize_rouge(text, stem):
    expected = rouge_tokenize.tokenize(text, NLTK_STEMMER if stem else None)
    assert tokenize_rouge(text, porter_stem if stem else None) == expected


# ---------------------------------------------------------------------------------------------
# 2. BLEU on text.


@settings(max_examples=100, deadline=None, suppress_health_check=HEALTH)
@given(corpus=text_corpora(), options=bleu_options)
def test_bleu_text_matches_sacrebleu(corpus, options):
    preds, refs = corpus
    expected = sacrebleu_score(preds, refs, **options)
    got = bleu_score(preds, refs, **options).item()
    assert abs(got - expected) <= TOL, (got, expected)


@settings(max_examples=40, deadline=None, suppress_health_check=HEALTH)
@given(corpus=text_corpora(sentence=unicode_line, max_samples=4), options=bleu_options)
def test_bleu_unicode_text_matches_sacrebleu(corpus, options):
    preds, refs = corpus
    expected = sacrebleu_score(preds, refs, **options)
    got = bleu_score(preds, refs, **options).item()
    assert abs(got - expected) <= TOL, (got, expected)


@settings(max_examples=40, deadline=None, suppress_health_check=HEALTH)
@given(corpus=text_corpora(), options=bleu_options)
def test_bleu_matches_sacrebleu_corpus_bleu(corpus, options):
    """The n_gram=4 case through sacrebleu's ``corpus_bleu`` entry point, single refs as str."""
    preds, refs = corpus
    expected = (
        sacrebleu.corpus_bleu(
            preds,
            ref_streams(refs),
            smooth_method=options["smooth_method"],
            smooth_value=options["smooth_value"],
            lowercase=options["lowercase"],
            tokenize=options["tokenize"],
            use_effective_order=options["effective_order"],
        ).score
        / 100
    )
    target = [sample[0] if len(sample) == 1 else sample for sample in refs]
    got = bleu_score(preds, target, **{**options, "n_gram": 4}).item()
    assert abs(got - expected) <= TOL, (got, expected)


# ---------------------------------------------------------------------------------------------
# 3. BLEU on token ids.


@st.composite
def id_corpora(draw):
    """``(preds [B, T], target [B, T'] or [B, R, T'], ignore_index)`` with padding at row ends."""
    batch = draw(st.integers(1, 6))
    length = draw(st.integers(1, 8))
    ref_length = draw(st.integers(1, 8))
    three_d = draw(st.booleans())
    num_refs = draw(st.integers(1, 3)) if three_d else 1
    ignore_index = draw(st.sampled_from([None, 0, -100, 7]))
    pad = 0 if ignore_index is None else ignore_index
    token = st.integers(1, 5)

    def row(size):
        if ignore_index is None:
            return draw(st.lists(token, min_size=size, max_size=size))
        # Padding at the end; sometimes a whole row of it (a missing reference).
        used = draw(st.integers(0, size))
        return draw(st.lists(token, min_size=used, max_size=used)) + [pad] * (size - used)

    preds = torch.tensor([row(length) for _ in range(batch)], dtype=torch.long)
    target = torch.tensor(
        [[row(ref_length) for _ in range(num_refs)] for _ in range(batch)], dtype=torch.long
    )
    if not three_d:
        target = target[:, 0]
    return preds, target, ignore_index


def ids_to_text(row: list[int], ignore_index: int | None) -> str:
    return " ".join(str(token) for token in row if token != ignore_index)


def id_refs(target: torch.Tensor, ignore_index: int | None) -> list[list[str]]:
    """Per sample, the references as text: all-padding rows are missing, at least "" is left."""
    if target.ndim == 2:
        target = target.unsqueeze(1)
    refs = []
    for sample in target.tolist():
        texts = [ids_to_text(row, ignore_index) for row in sample]
        kept = [text for text in texts if text] if ignore_index is not None else texts
        refs.append(kept or [""])
    return refs


@settings(max_examples=100, deadline=None, suppress_health_check=HEALTH)
@given(corpus=id_corpora(), options=bleu_options)
def test_bleu_token_ids_match_sacrebleu(corpus, options):
    preds, target, ignore_index = corpus
    hyps = [ids_to_text(row, ignore_index) for row in preds.tolist()]
    kwargs = {**options, "tokenize": "none", "lowercase": False}
    expected = sacrebleu_score(hyps, id_refs(target, ignore_index), **kwargs)
    options = {key: value for key, value in options.items() if key not in ("tokenize", "lowercase")}
    got = bleu_score(preds, target, ignore_index=ignore_index, **options).item()
    assert abs(got - expected) <= TOL, (got, expected)


# ---------------------------------------------------------------------------------------------
# 4. ROUGE on text.


def rouge_oracle(preds, refs, keys, use_stemmer, accumulate) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=use_stemmer)
    totals = {f"{key}_{name}": 0.0 for key in keys for name in SCORE_NAMES}
    for pred, sample_refs in zip(preds, refs, strict=True):
        if accumulate == "best":
            best = scorer.score_multi(sample_refs, pred)
            for key in keys:
                for name in SCORE_NAMES:
                    totals[f"{key}_{name}"] += getattr(best[key], name)
        else:
            scores = [scorer.score(ref, pred) for ref in sample_refs]
            for key in keys:
                for name in SCORE_NAMES:
                    totals[f"{key}_{name}"] += sum(getattr(s[key], name) for s in scores) / len(scores)
    return {name: total / max(len(preds), 1) for name, total in totals.items()}


rouge_options = st.fixed_dictionaries(
    {
        "rouge_keys": st.lists(st.sampled_from(ROUGE_KEYS), min_size=1, max_size=5, unique=True).map(tuple),
        # The stemmer is slow in rouge-score: use it rarely.
        "use_stemmer": st.sampled_from([False, False, False, True]),
        "accumulate": st.sampled_from(["best", "avg"]),
    }
)


def assert_rouge_close(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert abs(got[name].item() - value) <= TOL, (name, got[name].item(), value)


@settings(max_examples=80, deadline=None, suppress_health_check=HEALTH)
@given(
    corpus=st.one_of(
        text_corpora(sentence=rouge_texts(), max_samples=5, min_samples=0),
        text_corpora(sentence=rouge_texts(unicode=True), max_samples=4),
    ),
    options=rouge_options,
)
def test_rouge_matches_rouge_score(corpus, options):
    preds, refs = corpus
    expected = rouge_oracle(preds, refs, options["rouge_keys"], options["use_stemmer"], options["accumulate"])
    target = [sample[0] if len(sample) == 1 else sample for sample in refs]
    assert_rouge_close(rouge_score(preds, target, **options), expected)


# ---------------------------------------------------------------------------------------------
# 5. Metric classes: batches add up to the whole corpus.


@st.composite
def batch_bounds(draw, size):
    """Cut points splitting ``range(size)`` into consecutive batches (empty ones allowed)."""
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=4)))
    return [0, *cuts, size]


@settings(max_examples=40, deadline=None, suppress_health_check=HEALTH)
@given(data=st.data(), corpus=text_corpora(), options=bleu_options)
def test_bleu_metric_batches_equal_functional(data, corpus, options):
    preds, refs = corpus
    bounds = data.draw(batch_bounds(len(preds)))
    metric = BLEUScore(**options)
    for start, end in pairwise(bounds):
        metric.update(preds[start:end], refs[start:end])
    got = metric.compute().item()
    assert abs(got - bleu_score(preds, refs, **options).item()) <= TOL
    assert abs(got - sacrebleu_score(preds, refs, **options)) <= TOL


@settings(max_examples=40, deadline=None, suppress_health_check=HEALTH)
@given(data=st.data(), corpus=id_corpora(), options=bleu_options)
def test_bleu_metric_token_id_batches_equal_functional(data, corpus, options):
    preds, target, ignore_index = corpus
    options = {key: value for key, value in options.items() if key not in ("tokenize", "lowercase")}
    bounds = data.draw(batch_bounds(preds.shape[0]))
    metric = BLEUScore(ignore_index=ignore_index, **options)
    for start, end in pairwise(bounds):
        if end > start:
            metric.update(preds[start:end], target[start:end])
    expected = bleu_score(preds, target, ignore_index=ignore_index, **options).item()
    assert abs(metric.compute().item() - expected) <= TOL


@settings(max_examples=25, deadline=None, suppress_health_check=HEALTH)
@given(
    data=st.data(),
    corpus=text_corpora(sentence=rouge_texts(), max_samples=6, min_samples=0),
    options=rouge_options,
)
def test_rouge_metric_batches_equal_functional(data, corpus, options):
    preds, refs = corpus
    bounds = data.draw(batch_bounds(len(preds)))
    metric = ROUGEScore(**options)
    for start, end in pairwise(bounds):
        metric.update(preds[start:end], refs[start:end])
    expected = rouge_score(preds, refs, **options)
    assert_rouge_close(metric.compute(), {name: value.item() for name, value in expected.items()})


# Relative tolerance per logits dtype: float64 logits are scored in float64 (the result is
# float32, hence relative); float32 and half-precision logits are scored in float32.
PPL_RTOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


@st.composite
def perplexity_batches(draw):
    """Batches of logits ``[B, T, V]`` and targets ``[B, T]`` (B and T vary per batch)."""
    vocab = draw(st.integers(2, 8))
    ignore_index = draw(st.sampled_from([None, -100, 0]))
    dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 5))
        logits = (torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
        target = torch.randint(0, vocab, (batch, length), generator=generator)
        if ignore_index is not None:
            ignored = torch.rand(batch, length, generator=generator) < draw(st.sampled_from([0.0, 0.3, 1.0]))
            target = target.masked_fill(ignored, ignore_index)
        batches.append((logits, target))
    return batches, ignore_index, vocab, dtype


@settings(max_examples=60, deadline=None, suppress_health_check=HEALTH)
@given(case=perplexity_batches())
def test_perplexity_batches_equal_float64_cross_entropy(case):
    batches, ignore_index, vocab, dtype = case
    metric = Perplexity(ignore_index=ignore_index)
    for logits, target in batches:
        metric.update(logits, target)
    got = metric.compute().item()
    # The oracle: float64 cross-entropy, averaged over every kept token of the concatenated data.
    logits = torch.cat([logits.reshape(-1, vocab) for logits, _ in batches]).double()
    target = torch.cat([target.reshape(-1) for _, target in batches])
    kwargs = {} if ignore_index is None else {"ignore_index": ignore_index}
    nll = F.cross_entropy(logits, target, reduction="mean", **kwargs).item()
    if math.isnan(nll):  # every token ignored
        assert math.isnan(got)
    else:
        expected = math.exp(nll)
        assert abs(got - expected) <= PPL_RTOL[dtype] * max(1.0, expected), (got, expected)
