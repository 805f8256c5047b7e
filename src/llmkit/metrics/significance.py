"""Significance tests and confidence intervals for corpus metrics, equal to sacrebleu's.

A corpus score (BLEU, chrF, TER) is a function of per-sentence statistics summed over the
corpus. Built with ``keep_sentence_stats=True``, :class:`~llmkit.metrics.BLEUScore`,
:class:`~llmkit.metrics.CHRFScore` and :class:`~llmkit.metrics.TERScore` keep those rows, so a
resample of the corpus is one weighted sum, and a thousand resamples one matrix product:

- :func:`confidence_interval`: bootstrap resampling of one system (Koehn, 2004);
- :func:`paired_bootstrap`: paired bootstrap resampling against a baseline (sacrebleu's
  ``--paired-bs``, after Moses' ``bootstrap-hypothesis-difference-significance.pl``);
- :func:`paired_approximate_randomization`: paired approximate randomization against a baseline
  (sacrebleu's ``--paired-ar``, after Riezler and Maxwell, 2005, and MultEval).

Given the same seed and number of resamples, the indices are drawn with numpy's
``default_rng(seed)`` exactly as sacrebleu 2.x draws them, so the p-values, means and intervals are
sacrebleu's (in the metric's units: sacrebleu's / 100). As in sacrebleu and MultEval, only
differences strictly larger than the observed one count, so a system identical to the baseline
gets the smallest p-value, ``1 / (trials + 1)``, not 1. Every system of one test must hold the
same sentences in the same order; under DDP the rows are gathered in rank order, so call these
functions on every process (they synchronise) with metrics updated on the same batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from llmkit.metrics._sentence_stats import SentenceStatsMetric

__all__ = ["SignificanceResult", "confidence_interval", "paired_approximate_randomization", "paired_bootstrap"]

# sacrebleu's default seed (its `SACREBLEU_SEED`).
DEFAULT_SEED = 12345
# Resamples or trials scored per matrix product, to bound memory ([chunk, N] weights).
_CHUNK = 1000


@dataclass(frozen=True)
class SignificanceResult:
    """The result of one system, in the units of its metric's ``compute()``.

    Attributes:
        score: the corpus score of the system.
        mean: the mean score over the bootstrap resamples (``None`` when none were drawn).
        ci: half the width of the bootstrap interval, sacrebleu's ``±`` (``mean ± ci``).
        lower: the lower percentile bound of the interval (``None`` when no resamples).
        upper: the upper percentile bound of the interval.
        p_value: the probability of a difference from the baseline at least as large under the null
            hypothesis; ``None`` for the baseline itself.
    """

    score: float
    mean: float | None = None
    ci: float | None = None
    lower: float | None = None
    upper: float | None = None
    p_value: float | None = None


def _check_system(name: str, metric: object) -> SentenceStatsMetric:
    if not isinstance(metric, SentenceStatsMetric):
        raise TypeError(
            f"system {name!r} must be a corpus metric that keeps sentence statistics (BLEUScore, CHRFScore, "
            f"TERScore), got {type(metric).__name__}"
        )
    if not metric.keep_sentence_stats:
        raise ValueError(
            f"system {name!r} ({type(metric).__name__}) keeps no per-sentence statistics; "
            "build it with `keep_sentence_stats=True`"
        )
    return metric


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must be in (0, 1), got {level!r}")


def _sentence_stats(systems: Mapping[str, SentenceStatsMetric], baseline: str) -> dict[str, Tensor]:
    """The rows of every system, checked to be of one metric, one configuration and one corpus size."""
    if not isinstance(systems, Mapping) or not systems:
        raise TypeError(f"`systems` must be a non-empty mapping of name to metric, got {systems!r}")
    if baseline not in systems:
        raise ValueError(f"`baseline` {baseline!r} is not one of the systems {list(systems)}")
    metrics = {name: _check_system(name, metric) for name, metric in systems.items()}
    reference = metrics[baseline]
    rows = {}
    for name, metric in metrics.items():
        # The reference count may differ; the metric and everything that changes a score may not.
        if type(metric) is not type(reference) or _configuration(metric) != _configuration(reference):
            raise ValueError(
                f"system {name!r} is scored by {metric.signature()!r} ({type(metric).__name__}) but the baseline "
                f"by {reference.signature()!r} ({type(reference).__name__}); compare systems under one metric"
            )
        rows[name] = metric.sentence_stats()
    sizes = {name: stats.shape[0] for name, stats in rows.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every system must hold the same sentences, got sentence counts {sizes}")
    if sizes[baseline] == 0:
        raise ValueError("the systems hold no sentence yet; call `update` first")
    return rows


def _configuration(metric: SentenceStatsMetric) -> str:
    """The signature without its reference count."""
    return "|".join(field for field in metric.signature().split("|") if not field.startswith("nrefs:"))


def _resample_weights(indices: np.ndarray, like: Tensor) -> list[Tensor]:
    """How often each resample draws each sentence: ``[R, N]`` indices to chunks of ``[chunk, N]`` weights."""
    num_sentences = indices.shape[1]
    chunks = []
    for start in range(0, indices.shape[0], _CHUNK):
        chunk = indices[start : start + _CHUNK]
        offsets = np.arange(chunk.shape[0])[:, None] * num_sentences
        counts = np.bincount((chunk + offsets).ravel(), minlength=chunk.size).reshape(chunk.shape)
        chunks.append(torch.from_numpy(counts).to(device=like.device, dtype=like.dtype))
    return chunks


def _resampled_scores(metric: SentenceStatsMetric, stats: Tensor, weights: list[Tensor]) -> Tensor:
    """The score of each resample, ``[R]``: ``score_from_stats`` of the weighted sum of the rows."""
    return torch.cat([metric.score_from_stats(chunk @ stats) for chunk in weights]).double().cpu()


def _draw(seed: int | None, num_resamples: int, num_sentences: int) -> np.ndarray:
    """The resampling indices of sacrebleu ``[R, N]``: ``default_rng(seed).choice`` with replacement."""
    return _choice(np.random.default_rng(seed), num_resamples, num_sentences)


def _choice(rng: np.random.Generator, num_resamples: int, num_sentences: int) -> np.ndarray:
    return rng.choice(num_sentences, size=(num_resamples, num_sentences), replace=True)


def _estimate(score: float, resampled: Tensor, level: float = 0.95) -> SignificanceResult:
    """The mean and interval of resampled scores, as sacrebleu's ``estimate_ci``."""
    ordered = torch.sort(resampled).values
    count = ordered.numel()
    # sacrebleu's 1/40 from each side at 95%; the small slack keeps n * 0.025 from rounding down.
    lower_index = int(count * (1.0 - level) / 2.0 + 1e-9)
    lower, upper = float(ordered[lower_index]), float(ordered[count - lower_index - 1])
    return SignificanceResult(
        score=score, mean=float(ordered.mean()), ci=0.5 * (upper - lower), lower=lower, upper=upper
    )


def _p_value(statistics: Tensor, observed: float) -> float:
    """MultEval's p-value: ``(#{statistic > observed} + 1) / (trials + 1)``."""
    return (int((statistics > observed).sum()) + 1) / (statistics.numel() + 1)


def confidence_interval(
    metric: SentenceStatsMetric, *, num_resamples: int = 1000, seed: int | None = DEFAULT_SEED, level: float = 0.95
) -> SignificanceResult:
    """Bootstrap confidence interval of a corpus score (sacrebleu's ``--confidence``).

    Args:
        metric: a ``BLEUScore``, ``CHRFScore`` or ``TERScore`` built with ``keep_sentence_stats=True``
            and updated with the corpus.
        num_resamples: the bootstrap resamples of the corpus (sentences drawn with replacement).
        seed: numpy's seed (sacrebleu's ``SACREBLEU_SEED``, default 12345); ``None`` draws fresh entropy.
        level: the coverage of the interval, 0.95 as sacrebleu.

    Returns:
        The corpus score, the mean over resamples, ``ci`` (sacrebleu's half-width) and the percentile
        bounds ``lower``/``upper``.

    Raises:
        TypeError: If ``metric`` does not keep sentence statistics by design.
        ValueError: If it was built without ``keep_sentence_stats=True``, holds no sentence, or an
            argument is out of range.

    Examples:
        >>> from llmkit.metrics import BLEUScore
        >>> bleu = BLEUScore(keep_sentence_stats=True)
        >>> bleu.update(["the cat sat on the mat", "a dog ran"], [["the cat sat on a mat"], ["a dog ran off"]])
        >>> result = confidence_interval(bleu, num_resamples=100)
        >>> result.lower <= result.mean <= result.upper
        True
    """
    _check_count("num_resamples", num_resamples)
    _check_level(level)
    stats = _sentence_stats({"system": metric}, "system")["system"]
    weights = _resample_weights(_draw(seed, num_resamples, stats.shape[0]), stats)
    score = float(metric.score_from_stats(stats.sum(0)))
    return _estimate(score, _resampled_scores(metric, stats, weights), level)


def paired_bootstrap(
    systems: Mapping[str, SentenceStatsMetric],
    baseline: str,
    *,
    num_resamples: int = 1000,
    seed: int | None = DEFAULT_SEED,
) -> dict[str, SignificanceResult]:
    """Paired bootstrap resampling of each system against a baseline (sacrebleu's ``--paired-bs``).

    All systems are scored on the same resamples of the sentences. A system's p-value is the share
    of resamples whose absolute score difference from the baseline, centred on its mean, exceeds the
    observed difference (Koehn, 2004; MultEval's +1 correction).

    Args:
        systems: name to metric (one class and configuration, ``keep_sentence_stats=True``, updated on
            the same sentences in the same order); the baseline among them.
        baseline: the name of the baseline system.
        num_resamples: the bootstrap resamples, 1,000 as sacrebleu.
        seed: numpy's seed, 12345 as sacrebleu; ``None`` draws fresh entropy.

    Returns:
        Per system, in the order given: score, bootstrap mean, ``ci``, bounds, and (except for the
        baseline) the p-value.

    Raises:
        TypeError: If ``systems`` is not a mapping of metrics that keep sentence statistics.
        ValueError: If ``baseline`` is not among them, the systems differ in metric, configuration
            or number of sentences, or ``num_resamples < 1``.

    Examples:
        >>> from llmkit.metrics import BLEUScore
        >>> refs = [["the cat sat on the mat"], ["a dog ran off"], ["it is raining"]]
        >>> systems = {name: BLEUScore(keep_sentence_stats=True) for name in ("base", "new")}
        >>> systems["base"].update(["the cat sat", "a dog", "it rains"], refs)
        >>> systems["new"].update(["the cat sat on the mat", "a dog ran off", "it is raining"], refs)
        >>> results = paired_bootstrap(systems, "base", num_resamples=200)
        >>> results["new"].score, results["base"].p_value
        (1.0, None)
    """
    _check_count("num_resamples", num_resamples)
    rows = _sentence_stats(systems, baseline)
    num_sentences = rows[baseline].shape[0]
    # sacrebleu draws the baseline's and each system's indices from fresh generators of one seed:
    # the same indices for all, so one set of weights serves every system.
    weights = _resample_weights(_draw(seed, num_resamples, num_sentences), rows[baseline])
    metric = systems[baseline]
    base_score = float(metric.score_from_stats(rows[baseline].sum(0)))
    base_scores = _resampled_scores(metric, rows[baseline], weights)
    results = {}
    for name, stats in rows.items():
        if name == baseline:
            results[name] = _estimate(base_score, base_scores)
            continue
        score = float(metric.score_from_stats(stats.sum(0)))
        scores = _resampled_scores(metric, stats, weights)
        differences = (scores - base_scores).abs()
        p_value = _p_value(differences - differences.mean(), abs(base_score - score))
        estimate = _estimate(score, scores)
        results[name] = SignificanceResult(**{**estimate.__dict__, "p_value": p_value})
    return results


def paired_approximate_randomization(
    systems: Mapping[str, SentenceStatsMetric],
    baseline: str,
    *,
    num_trials: int = 10000,
    num_resamples: int = 0,
    seed: int | None = DEFAULT_SEED,
) -> dict[str, SignificanceResult]:
    """Paired approximate randomization of each system against a baseline (sacrebleu's ``--paired-ar``).

    Each trial swaps the two systems' outputs of every sentence with probability 1/2; a system's
    p-value is the share of trials whose absolute score difference exceeds the observed one (MultEval's
    +1 correction). Optionally, bootstrap intervals as sacrebleu's ``--paired-ar-confidence-n``.

    Args:
        systems: name to metric (one class and configuration, ``keep_sentence_stats=True``, updated on
            the same sentences in the same order); the baseline among them.
        baseline: the name of the baseline system.
        num_trials: the randomization trials, 10,000 as sacrebleu.
        num_resamples: bootstrap resamples for intervals (sacrebleu's ``n_ar_confidence``); 0 for none.
        seed: numpy's seed, 12345 as sacrebleu; ``None`` draws fresh entropy.

    Returns:
        Per system, in the order given: score, p-value (``None`` for the baseline), and with
        ``num_resamples > 0`` the bootstrap mean, ``ci`` and bounds.

    Raises:
        TypeError: If ``systems`` is not a mapping of metrics that keep sentence statistics.
        ValueError: If ``baseline`` is not among them, the systems differ in metric, configuration
            or number of sentences, or a count is out of range.

    Examples:
        >>> from llmkit.metrics import BLEUScore
        >>> refs = [["the cat sat on the mat"], ["a dog ran off"], ["it is raining"]]
        >>> systems = {name: BLEUScore(keep_sentence_stats=True) for name in ("base", "new")}
        >>> systems["base"].update(["the cat sat", "a dog", "it rains"], refs)
        >>> systems["new"].update(["the cat sat on the mat", "a dog ran off", "it is raining"], refs)
        >>> result = paired_approximate_randomization(systems, "base", num_trials=99)["new"]
        >>> result.score, 0 < result.p_value <= 1
        (1.0, True)
    """
    _check_count("num_trials", num_trials)
    _check_count("num_resamples", num_resamples, minimum=0)
    rows = _sentence_stats(systems, baseline)
    num_sentences = rows[baseline].shape[0]
    metric = systems[baseline]
    base_stats = rows[baseline]
    base_score = float(metric.score_from_stats(base_stats.sum(0)))
    results = {}
    if num_resamples:
        base_weights = _resample_weights(_draw(seed, num_resamples, num_sentences), base_stats)
        results[baseline] = _estimate(base_score, _resampled_scores(metric, base_stats, base_weights))
    else:
        results[baseline] = SignificanceResult(score=base_score)
    for name, stats in rows.items():
        if name == baseline:
            continue
        # sacrebleu draws each system's swaps (and then its resamples) from a fresh generator of one seed.
        rng = np.random.default_rng(seed)
        swaps = rng.integers(2, size=(num_trials, num_sentences), dtype=bool)
        score = float(metric.score_from_stats(stats.sum(0)))
        differences = []
        for start in range(0, num_trials, _CHUNK):
            take_base = torch.from_numpy(swaps[start : start + _CHUNK]).to(device=stats.device, dtype=stats.dtype)
            take_system = 1.0 - take_base
            # The two pseudo-systems of each trial: one takes the baseline's rows where the other takes the system's.
            first = metric.score_from_stats(take_base @ base_stats + take_system @ stats)
            second = metric.score_from_stats(take_system @ base_stats + take_base @ stats)
            differences.append((first - second).abs().double().cpu())
        p_value = _p_value(torch.cat(differences), abs(base_score - score))
        if num_resamples:
            weights = _resample_weights(_choice(rng, num_resamples, num_sentences), stats)
            estimate = _estimate(score, _resampled_scores(metric, stats, weights))
            results[name] = SignificanceResult(**{**estimate.__dict__, "p_value": p_value})
        else:
            results[name] = SignificanceResult(score=score, p_value=p_value)
    return {name: results[name] for name in rows}
