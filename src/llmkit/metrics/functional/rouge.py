"""ROUGE-N, ROUGE-L and ROUGE-Lsum equal to Google's rouge-score, on text or token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.metrics._state import sum_dtype
from llmkit.metrics.functional._corpus import (
    TextTarget,
    TokenStream,
    check_text_corpus,
    encode_streams,
    flatten_token_ids,
    is_token_ids,
)
from llmkit.metrics.functional._lcs import lcs_lengths, pad_sentences, union_lcs_mask
from llmkit.metrics.functional._ngrams import clipped_ngram_matches, ngram_totals
from llmkit.metrics.tokenizers import SEPARATOR, porter_stem, rouge_token_stream

ROUGE_KEYS = (*(f"rouge{n}" for n in range(1, 10)), "rougeL", "rougeLsum")
ACCUMULATE = ("best", "avg")
# The three numbers of each key, in the order of the state's last dimension.
SCORE_NAMES = ("fmeasure", "precision", "recall")


def _check_rouge_args(rouge_keys: str | Sequence[str], accumulate: str) -> tuple[str, ...]:
    keys = (rouge_keys,) if isinstance(rouge_keys, str) else tuple(rouge_keys)
    if not keys:
        raise ValueError(f"`rouge_keys` must name at least one of {ROUGE_KEYS}")
    for key in keys:
        if key not in ROUGE_KEYS:
            raise ValueError(f"`rouge_keys` must be among {ROUGE_KEYS}, got {key!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"`rouge_keys` holds a key twice: {keys}")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"`accumulate` must be one of {ACCUMULATE}, got {accumulate!r}")
    return keys


@dataclass
class _Pairs:
    """Every (sample, reference) pair as flat token ids; for ROUGE-Lsum also as sentences."""

    pred_tokens: Tensor  # [sum(pred_lens)] the prediction of each pair, concatenated
    pred_lens: Tensor  # [P]
    ref_tokens: Tensor  # [sum(ref_lens)]
    ref_lens: Tensor  # [P]
    sample: Tensor  # [P] the sample of each pair, non-decreasing
    num_samples: int
    # Text only: the sentences of the predictions, then of the references, as a flat corpus,
    # and how many sentences each prediction and then each reference has.
    sentence_tokens: Tensor | None = None
    sentence_lens: Tensor | None = None
    sentence_counts: Tensor | None = None


def _select(tokens: Tensor, lens: Tensor, which: Tensor) -> tuple[Tensor, Tensor]:
    """Return the sentences ``which`` (indices, repeats allowed) of a flat corpus, flat."""
    starts = torch.cumsum(lens, 0) - lens
    out_lens = lens[which]
    out_starts = torch.cumsum(out_lens, 0) - out_lens
    shift = torch.repeat_interleave(starts[which] - out_starts, out_lens)
    return tokens[torch.arange(shift.numel(), device=tokens.device) + shift], out_lens


def _split(tokens: Tensor, lens: Tensor) -> list[list[int]]:
    flat, out, start = tokens.tolist(), [], 0
    for length in lens.tolist():
        out.append(flat[start : start + length])
        start += length
    return out


def _text_pairs(
    preds: Sequence[str], target: TextTarget, keys: tuple[str, ...], use_stemmer: bool
) -> _Pairs:
    hyps, refs = check_text_corpus(preds, target)
    stemmer = porter_stem if use_stemmer else None
    texts = [*hyps, *(ref for sample_refs in refs for ref in sample_refs)]
    sample = torch.tensor([index for index, sample_refs in enumerate(refs) for _ in sample_refs], dtype=torch.long)
    streams: list[TokenStream] = [(rouge_token_stream(texts, stemmer), SEPARATOR, len(texts))]
    sentence_counts: list[int] = []
    if "rougeLsum" in keys:
        # rouge-score splits on newlines and drops empty lines (not lines without tokens).
        per_text = [[part for part in text.split("\n") if part] for text in texts]
        sentence_counts = [len(parts) for parts in per_text]
        sentences = [part for parts in per_text for part in parts]
        streams.append((rouge_token_stream(sentences, stemmer), SEPARATOR, len(sentences)))
    encoded = encode_streams(*streams)
    tokens, lens = encoded[0]
    num_hyps = len(hyps)
    hyp_total = int(lens[:num_hyps].sum())
    pred_tokens, pred_lens = _select(tokens[:hyp_total], lens[:num_hyps], sample)
    pairs = _Pairs(
        pred_tokens=pred_tokens,
        pred_lens=pred_lens,
        ref_tokens=tokens[hyp_total:],
        ref_lens=lens[num_hyps:],
        sample=sample,
        num_samples=num_hyps,
    )
    if "rougeLsum" in keys:
        pairs.sentence_tokens, pairs.sentence_lens = encoded[1]
        pairs.sentence_counts = torch.tensor(sentence_counts, dtype=torch.long)
    return pairs


def _id_pairs(preds: Tensor, target: Tensor, ignore_index: int | None) -> _Pairs:
    corpus = flatten_token_ids(preds, target, ignore_index)
    pred_tokens, pred_lens = _select(corpus.hyp_tokens, corpus.hyp_lens, corpus.ref_owner)
    return _Pairs(
        pred_tokens=pred_tokens,
        pred_lens=pred_lens,
        ref_tokens=corpus.ref_tokens,
        ref_lens=corpus.ref_lens,
        sample=corpus.ref_owner,
        num_samples=corpus.num_samples,
    )


def _scores(overlap: Tensor, pred_count: Tensor, ref_count: Tensor) -> Tensor:
    """``[P, 3]`` (fmeasure, precision, recall) in float64, computed as rouge-score does."""
    dtype = sum_dtype(overlap.device)
    precision = overlap.to(dtype) / pred_count.clamp(min=1).to(dtype)
    recall = overlap.to(dtype) / ref_count.clamp(min=1).to(dtype)
    total = precision + recall
    fmeasure = torch.where(total > 0, 2 * precision * recall / total, 0.0)
    return torch.stack([fmeasure, precision, recall], dim=1)


def _rouge_n(pairs: _Pairs, orders: list[int]) -> dict[int, Tensor]:
    max_order = max(orders)
    overlap = clipped_ngram_matches(
        pairs.pred_tokens, pairs.pred_lens, pairs.ref_tokens, pairs.ref_lens,
        torch.arange(pairs.pred_lens.numel(), device=pairs.pred_lens.device), max_order,
    )
    pred_count, ref_count = ngram_totals(pairs.pred_lens, max_order), ngram_totals(pairs.ref_lens, max_order)
    return {n: _scores(overlap[n - 1], pred_count[n - 1], ref_count[n - 1]) for n in orders}


def _rouge_l(pairs: _Pairs) -> Tensor:
    lcs = lcs_lengths(_split(pairs.pred_tokens, pairs.pred_lens), _split(pairs.ref_tokens, pairs.ref_lens))
    lcs_tensor = torch.tensor(lcs, dtype=torch.long, device=pairs.pred_lens.device)
    both = (pairs.pred_lens > 0) & (pairs.ref_lens > 0)
    # rouge-score divides by the raw lengths and scores 0 when either side is empty.
    return torch.where(both.unsqueeze(1), _scores(lcs_tensor, pairs.pred_lens, pairs.ref_lens), 0.0)


def _rouge_lsum(pairs: _Pairs) -> Tensor:
    """Summary-level LCS (ROUGE paper, section 3.2) with rouge-score's no-double-counting rule."""
    assert pairs.sentence_tokens is not None and pairs.sentence_lens is not None
    assert pairs.sentence_counts is not None
    num_samples, num_pairs = pairs.num_samples, pairs.sample.numel()
    counts, lens = pairs.sentence_counts, pairs.sentence_lens
    first = torch.cumsum(counts, 0) - counts  # first sentence of each text
    # Texts: the predictions (one per sample), then the references (one per pair).
    cand_text, ref_text = pairs.sample, num_samples + torch.arange(num_pairs)
    # Every (reference sentence, candidate sentence) of each pair, numbered pair by pair.
    per_pair = counts[ref_text] * counts[cand_text]
    pair_of = torch.repeat_interleave(torch.arange(num_pairs), per_pair)
    local = torch.arange(pair_of.numel()) - torch.repeat_interleave(torch.cumsum(per_pair, 0) - per_pair, per_pair)
    cand_count = counts[cand_text][pair_of]
    ref_sentence = first[ref_text][pair_of] + torch.div(local, cand_count, rounding_mode="floor")
    cand_sentence = first[cand_text][pair_of] + local % cand_count

    padded = pad_sentences(pairs.sentence_tokens, lens, -1)
    # The union, over candidate sentences, of the reference positions each LCS uses.
    union = union_lcs_mask(padded, lens, ref_sentence, cand_sentence)
    hit_row, hit_col = torch.nonzero(union, as_tuple=True)
    hit_tokens = padded[hit_row, hit_col]
    # Reference sentences come text by text, pair by pair, so the hits are grouped by pair.
    text_of_sentence = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    hit_lens = torch.bincount(text_of_sentence[hit_row] - num_samples, minlength=num_pairs)
    # Each hit consumes one count of its token on both sides, so a token hits at most as
    # often as the candidate holds it (the union never holds it more than the reference).
    text_lens = torch.zeros(counts.numel(), dtype=torch.long).index_add_(0, text_of_sentence, lens)
    text_tokens = pairs.sentence_tokens
    cand_tokens, cand_lens = _select(text_tokens, text_lens, cand_text)
    hits = clipped_ngram_matches(hit_tokens, hit_lens, cand_tokens, cand_lens, torch.arange(num_pairs), 1)[0]
    ref_lens = text_lens[ref_text]
    scores = _scores(hits, cand_lens, ref_lens)
    return torch.where(((ref_lens > 0) & (cand_lens > 0)).unsqueeze(1), scores, 0.0)


def _accumulate(scores: Tensor, sample: Tensor, num_samples: int, accumulate: str) -> Tensor:
    """Reduce ``[P, 3]`` pair scores to ``[B, 3]`` sample scores over each sample's references."""
    if accumulate == "avg":
        sums = torch.zeros(num_samples, 3, dtype=scores.dtype, device=scores.device).index_add_(0, sample, scores)
        counts = torch.bincount(sample, minlength=num_samples).clamp(min=1)
        return sums / counts.unsqueeze(1)
    # "best": the reference with the highest F-measure, the first on a tie (np.argmax).
    fmeasure = scores[:, 0]
    best = torch.full((num_samples,), -1.0, dtype=scores.dtype, device=scores.device)
    best.scatter_reduce_(0, sample, fmeasure, reduce="amax")
    index = torch.arange(sample.numel(), device=sample.device)
    first = torch.full((num_samples,), sample.numel(), dtype=torch.long, device=sample.device)
    is_best = fmeasure == best[sample]
    first.scatter_reduce_(0, sample[is_best], index[is_best], reduce="amin")
    return scores[first]


def _rouge_update(
    preds: Sequence[str] | Tensor,
    target: TextTarget | Tensor,
    rouge_keys: tuple[str, ...],
    use_stemmer: bool = False,
    accumulate: str = "best",
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Score one batch.

    Returns:
        ``(sums [K, 3], num_samples [])``: per key the sums over samples of fmeasure,
        precision and recall (float64), and the number of samples.
    """
    if is_token_ids(preds, target):
        assert isinstance(preds, Tensor) and isinstance(target, Tensor)
        pairs = _id_pairs(preds, target, ignore_index)
    else:
        assert not isinstance(preds, Tensor) and not isinstance(target, Tensor)
        pairs = _text_pairs(preds, target, rouge_keys, use_stemmer)
    orders = [int(key[5:]) for key in rouge_keys if key[5:].isdigit()]
    by_order = _rouge_n(pairs, orders) if orders else {}
    # Token ids form one sentence each, where ROUGE-Lsum is ROUGE-L.
    lsum_is_l = pairs.sentence_tokens is None
    needs_l = "rougeL" in rouge_keys or ("rougeLsum" in rouge_keys and lsum_is_l)
    l_scores = _rouge_l(pairs) if needs_l else None
    per_key: dict[str, Tensor] = {}
    for key in rouge_keys:
        if key[5:].isdigit():
            per_key[key] = by_order[int(key[5:])]
        elif key == "rougeL" or lsum_is_l:
            assert l_scores is not None
            per_key[key] = l_scores
        else:
            per_key[key] = _rouge_lsum(pairs)
    sums = torch.stack(
        [_accumulate(per_key[key], pairs.sample, pairs.num_samples, accumulate).sum(0) for key in rouge_keys]
    )
    return sums, torch.tensor(pairs.num_samples, dtype=torch.long)


def _rouge_compute(sums: Tensor, num_samples: Tensor, rouge_keys: Sequence[str]) -> dict[str, Tensor]:
    """Average the per-sample scores: ``{f"{key}_{fmeasure|precision|recall}": 0-d tensor}``."""
    means = (sums / num_samples.clamp(min=1)).to(torch.get_default_dtype())
    return {
        f"{key}_{name}": means[row, column]
        for row, key in enumerate(rouge_keys)
        for column, name in enumerate(SCORE_NAMES)
    }


def rouge_score(
    preds: Sequence[str] | Tensor,
    target: TextTarget | Tensor,
    rouge_keys: str | Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    use_stemmer: bool = False,
    accumulate: str = "best",
    ignore_index: int | None = None,
) -> dict[str, Tensor]:
    """ROUGE scores equal to the mean over samples of ``rouge_score.rouge_scorer.RougeScorer``'s.

    Text is tokenized as rouge-score does (lowercased, runs of ``[a-z0-9]``); ``rougeLsum``
    splits sentences on newlines, as rouge-score does; nothing is ever downloaded.

    Args:
        preds: the predictions: one string per sample, or ``[B, T]`` integer token ids.
        target: the references: per sample a string or a sequence of strings, or ``[B, T']`` /
            ``[B, R, T']`` integer token ids.
        rouge_keys: among ``"rouge1"`` ... ``"rouge9"``, ``"rougeL"``, ``"rougeLsum"``.
        use_stemmer: stem words longer than three characters with nltk's Porter stemmer.
        accumulate: with several references, ``"best"`` takes per key the reference with the
            highest F-measure (rouge-score's ``score_multi``); ``"avg"`` averages over them.
        ignore_index: for token ids, the padding id, dropped before scoring. Token ids form one
            sentence each, so ``rougeLsum`` equals ``rougeL`` on them.

    Returns:
        ``{f"{key}_{fmeasure|precision|recall}": 0-d tensor}``; all zeros for an empty corpus.

    Raises:
        ValueError: If a key or ``accumulate`` is unknown, the corpus sizes differ, a sample has
            no reference, or token-id shapes do not fit.
        TypeError: If the inputs are neither text nor integer tensors, or mix the two.

    Examples:
        >>> preds, target = ["the cat sat on the mat"], ["the cat lay on the mat"]
        >>> scores = rouge_score(preds, target, rouge_keys=("rouge1", "rougeL"))
        >>> {key: round(value.item(), 4) for key, value in scores.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'rouge1_fmeasure': 0.8333, 'rouge1_precision': 0.8333, 'rouge1_recall': 0.8333,
         'rougeL_fmeasure': 0.8333, 'rougeL_precision': 0.8333, 'rougeL_recall': 0.8333}
    """
    keys = _check_rouge_args(rouge_keys, accumulate)
    sums, num_samples = _rouge_update(preds, target, keys, use_stemmer, accumulate, ignore_index)
    return _rouge_compute(sums, num_samples, keys)
