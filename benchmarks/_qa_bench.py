"""QAScore beside torchmetrics' SQuAD on 10,000 question-answer pairs (rows for benchmarks/metrics.py).

The questions are built from the WMT17 en-de data: each has 1-3 gold answers, overlapping spans
of a reference sentence; the prediction is one of them (30%, half of those upper-cased with an
article and a full stop added) or a span of a system's translation of that sentence at the same
place. Both libraries get the same pairs (torchmetrics in its SQuAD dict form, built outside the
clock); the scores are checked to agree before anything is timed.

    python benchmarks/_qa_bench.py     # print the rows alone
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkit.metrics.functional.qa import qa_score
from llmkit.metrics.qa import QAScore
from tests.conftest import load_wmt17

NUM_PAIRS = 10_000
BATCH_SIZE = 64


def qa_questions(num: int = NUM_PAIRS, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """``(preds, golds)``: ``num`` questions from the WMT17 reference and systems (see the module doc)."""
    systems, reference = load_wmt17()
    rng = random.Random(seed)
    preds, golds = [], []
    for index in range(num):
        line = index % len(reference)
        words = reference[line].split()
        hyp_words = systems[index % len(systems)][1][line].split() or ["leer"]
        start, length = rng.randrange(len(words)), rng.randint(1, 6)
        sample = [" ".join(words[start : start + length])]
        for _ in range(rng.randint(0, 2)):
            lo = min(max(0, start + rng.randint(-1, 1)), len(words) - 1)
            sample.append(" ".join(words[lo : max(start + length + rng.randint(-1, 1), lo + 1)]))
        if rng.random() < 0.3:
            pred = rng.choice(sample)
            pred = "The " + pred.upper() + "." if rng.random() < 0.5 else pred
        else:
            at = int(start / len(words) * len(hyp_words))
            pred = " ".join(hyp_words[at : at + rng.randint(1, 8)])
        preds.append(pred)
        golds.append(sample)
    return preds, golds


def _median_seconds(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    result = fn()
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_rows(runs: int) -> list[tuple[str, float, str, float]]:
    """``(task, llmkit seconds, peer name, peer seconds)`` rows, medians of ``runs`` timed runs.

    QAScore (SQuAD v1.1 rules) against torchmetrics' ``SQuAD``: the 10,000 pairs in one update,
    and in updates of 64 (an evaluation loop's batches), then ``compute()``.
    """
    from torchmetrics.functional.text.squad import squad as tm_squad
    from torchmetrics.text import SQuAD

    preds, golds = qa_questions()
    tm_preds = [{"prediction_text": pred, "id": str(index)} for index, pred in enumerate(preds)]
    tm_target = [
        {"answers": {"answer_start": [0] * len(sample), "text": sample}, "id": str(index)}
        for index, sample in enumerate(golds)
    ]

    # Identical numbers: torchmetrics' functional form in float64 equals ours to 1e-9.
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        exact = tm_squad(tm_preds, tm_target)
    finally:
        torch.set_default_dtype(dtype)
    ours = qa_score(preds, golds)
    for key in ("exact_match", "f1"):
        if abs(ours[key].item() - exact[key].item() / 100) > 1e-9:
            raise RuntimeError(f"QAScore's {key} {ours[key].item()} differs from torchmetrics' {exact[key].item()}%")

    def run(metric_class: Callable[[], Any], pred_batches: list[Any], target_batches: list[Any]) -> dict[str, float]:
        metric = metric_class()
        for pred_batch, target_batch in zip(pred_batches, target_batches, strict=True):
            metric.update(pred_batch, target_batch)
        return {key: value.item() for key, value in metric.compute().items()}

    rows = []
    for label, size in (("one update", NUM_PAIRS), (f"updates of {BATCH_SIZE}", BATCH_SIZE)):
        cuts = range(0, NUM_PAIRS, size)
        ours_t, ours_scores = _median_seconds(
            lambda cuts=cuts, size=size: run(
                QAScore, [preds[i : i + size] for i in cuts], [golds[i : i + size] for i in cuts]
            ),
            runs,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer_t, peer_scores = _median_seconds(
                lambda cuts=cuts, size=size: run(
                    SQuAD, [tm_preds[i : i + size] for i in cuts], [tm_target[i : i + size] for i in cuts]
                ),
                runs,
            )
        # torchmetrics' SQuAD class sums float32 states: equal to float32 rounding.
        for key in ("exact_match", "f1"):
            if abs(ours_scores[key] - peer_scores[key] / 100) > 1e-5:
                raise RuntimeError(f"QAScore's {key} differs from torchmetrics SQuAD's: {ours_scores} {peer_scores}")
        rows.append((f"QA EM/F1 10k pairs, {label}", ours_t, "torchmetrics SQuAD", peer_t))
    return rows


if __name__ == "__main__":
    for task, ours_s, peer, peer_s in bench_rows(runs=3):
        print(f"| {task:<34} | {ours_s:9.3f} | {peer:<28} | {peer_s:9.3f} | {peer_s / ours_s:7.2f}x |")
