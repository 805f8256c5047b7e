"""BLEUScore, ROUGEScore and Perplexity in a real 2-process ``gloo`` group on CPU.

Each rank updates with its share of a corpus; ``compute()`` syncs the sum-reduced states, so
on both ranks it must equal the functional score of the whole corpus, computed here in the
parent process. All scenarios run in one spawned group (starting processes is the slow part),
and the tests below check one scenario each.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from llmkit.metrics import BLEUScore, Perplexity, ROUGEScore
from llmkit.metrics.functional import bleu_score, perplexity, rouge_score
from tests.conftest import WMT17_PATH, _free_port, load_wmt17, spawn_group

WORLD_SIZE = 2
NUM_SENTENCES = 200
NUM_ROUGE_SENTENCES = 120
BATCH_SIZE = 32
PAD = 0
# Seconds the whole group may take before the test fails instead of hanging CI.
GROUP_TIMEOUT = 180
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

METRICS: dict[str, type] = {"bleu": BLEUScore, "rouge": ROUGEScore, "perplexity": Perplexity}

# ---------------------------------------------------------------------------------------------
# The corpus: the first sentences of one WMT17 system (a second system as another reference),
# or a synthetic one where ../shared/data is absent, so that the group always runs.

# fmt: off
_WORDS = [
    "der", "die", "das", "ein", "eine", "Koch", "Haus", "Stadt", "Mann", "Frau", "Kind", "Jahr", "Woche",
    "Tag", "ist", "war", "wurde", "hat", "in", "im", "auf", "mit", "nach", "von", "zu", "und", "oder",
    "nicht", "heute", "gestern", "tot", "gefunden", "gesagt", "neue", "alte", "San", "Francisco", "Berlin",
    "Regierung", "Polizei", "Einkaufszentrum", "Treppenhaus", "Bruder", "Opfer", ".",
]
# fmt: on


def _perturb(rng: random.Random, words: list[str]) -> str:
    out = []
    for word in words:
        roll = rng.random()
        if roll < 0.1:
            continue
        out.append(rng.choice(_WORDS) if roll < 0.25 else word)
        if roll > 0.95:
            out.append(rng.choice(_WORDS))
    return " ".join(out)


def synthetic_corpus(num: int = NUM_SENTENCES, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """``(hyps, refs, alt_refs)``: references of random words and two perturbed copies."""
    rng = random.Random(seed)
    refs_words = [rng.choices(_WORDS, k=rng.randint(4, 25)) for _ in range(num)]
    refs = [" ".join(words) for words in refs_words]
    hyps = [_perturb(rng, words) for words in refs_words]
    alts = [_perturb(rng, words) for words in refs_words]
    return hyps, refs, alts


def text_corpus() -> tuple[list[str], list[str], list[str]]:
    """``(hyps, refs, alt_refs)`` of ``NUM_SENTENCES`` samples."""
    if WMT17_PATH.exists():
        systems, reference = load_wmt17()
        return systems[0][1][:NUM_SENTENCES], reference[:NUM_SENTENCES], systems[-1][1][:NUM_SENTENCES]
    return synthetic_corpus()


def encode(sentences: list[str], vocab: dict[str, int]) -> torch.Tensor:
    """Whitespace words as ids (from 1), padded with ``PAD`` to the longest sentence of the list."""
    rows = [[vocab.setdefault(word, len(vocab) + 1) for word in sentence.split()] for sentence in sentences]
    out = torch.full((len(rows), max((len(row) for row in rows), default=0)), PAD, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def encode_targets(refs: list[str], alts: list[str], offset: int, vocab: dict[str, int]) -> torch.Tensor:
    """``[B, 2, T]`` ids: the reference, and the second reference for even samples only.

    The odd samples' second row is all padding, which counts as a missing reference.
    """
    first = encode(refs, vocab)
    second = encode(alts, vocab)
    width = max(first.shape[1], second.shape[1])
    target = torch.full((len(refs), 2, width), PAD, dtype=torch.long)
    target[:, 0, : first.shape[1]] = first
    target[:, 1, : second.shape[1]] = second
    odd = torch.tensor([(offset + index) % 2 == 1 for index in range(len(refs))])
    target[odd, 1] = PAD
    return target


# ---------------------------------------------------------------------------------------------
# The scenarios: per rank a list of update batches, and the whole corpus for the expectation.

Batch = tuple[Any, Any]


def _chunks(start: int, stop: int, size: int = BATCH_SIZE) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, stop)) for lo in range(start, stop, size)]


def _split_ranges(num: int, split: str) -> list[list[tuple[int, int]]]:
    """Per rank, the ``[lo, hi)`` sample ranges of its update batches."""
    if split == "even":
        half = num // 2
        return [_chunks(0, half), _chunks(half, num)]
    if split == "uneven":  # rank 0 sees one sample, rank 1 all the others
        return [[(0, 1)], _chunks(1, num)]
    if split == "empty_rank":  # rank 0 never updates
        return [[], _chunks(0, num)]
    raise ValueError(split)


def build_scenarios() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(scenarios, expected)``: what the workers run, and the whole-corpus functional scores."""
    hyps, refs, alts = text_corpus()
    num = len(hyps)
    scenarios: dict[str, dict[str, Any]] = {}
    expected: dict[str, Any] = {}

    def add(name: str, metric: str, kwargs: dict[str, Any], make_batch: Any, num_samples: int, split: str) -> None:
        ranges = _split_ranges(num_samples, split)
        scenarios[name] = {
            "metric": metric,
            "kwargs": kwargs,
            "batches": [[make_batch(lo, hi) for lo, hi in rank_ranges] for rank_ranges in ranges],
        }

    # BLEU on text, one reference per sample.
    for split in ("even", "uneven", "empty_rank"):
        add(f"bleu_text_{split}", "bleu", {}, lambda lo, hi: (hyps[lo:hi], refs[lo:hi]), num, split)
    expected_bleu = bleu_score(hyps, refs).item()
    for split in ("even", "uneven", "empty_rank"):
        expected[f"bleu_text_{split}"] = expected_bleu

    # BLEU on token ids with padding, [B, 2, T] targets with missing second references.
    vocab: dict[str, int] = {}

    def ids_batch(lo: int, hi: int) -> Batch:
        return encode(hyps[lo:hi], vocab), encode_targets(refs[lo:hi], alts[lo:hi], lo, vocab)

    for split in ("even", "uneven"):
        add(f"bleu_ids_{split}", "bleu", {"ignore_index": PAD}, ids_batch, num, split)
    whole_preds, whole_target = ids_batch(0, num)
    expected_ids = bleu_score(whole_preds, whole_target, ignore_index=PAD).item()
    # Token ids are words: the same score as sacrebleu's "none" tokenizer on the text.
    text_target = [
        [ref, alt] if index % 2 == 0 else [ref] for index, (ref, alt) in enumerate(zip(refs, alts, strict=True))
    ]
    assert expected_ids == pytest.approx(bleu_score(hyps, text_target, tokenize="none").item(), abs=1e-6)
    for split in ("even", "uneven"):
        expected[f"bleu_ids_{split}"] = expected_ids

    # ROUGE on documents of two sentences (so that rougeLsum differs from rougeL), two references.
    # Fewer sentences: rougeLsum is the slow key.
    docs = [f"{hyps[i]}\n{hyps[i + 1]}" for i in range(0, NUM_ROUGE_SENTENCES - 1, 2)]
    doc_refs = [
        [f"{refs[i]}\n{refs[i + 1]}", f"{alts[i]}\n{alts[i + 1]}"] for i in range(0, NUM_ROUGE_SENTENCES - 1, 2)
    ]
    for split in ("even", "uneven", "empty_rank"):
        add(
            f"rouge_text_{split}",
            "rouge",
            {"rouge_keys": ROUGE_KEYS},
            lambda lo, hi: (docs[lo:hi], doc_refs[lo:hi]),
            len(docs),
            split,
        )
    expected_rouge = {key: value.item() for key, value in rouge_score(docs, doc_refs, rouge_keys=ROUGE_KEYS).items()}
    for split in ("even", "uneven", "empty_rank"):
        expected[f"rouge_text_{split}"] = expected_rouge

    # Perplexity on random logits with ignored positions; float64 logits sum exactly enough
    # for 1e-6, float32 logits are summed per call in float32 (see test_perplexity_float32).
    generator = torch.Generator().manual_seed(0)
    num_rows = 24
    logits = torch.randn(num_rows, 12, 20, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, 20, (num_rows, 12), generator=generator)
    labels[torch.rand(num_rows, 12, generator=generator) < 0.2] = -100
    labels[0, :6] = -100
    for dtype_name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        cast = logits.to(dtype)
        for split in ("even", "uneven", "empty_rank"):
            name = f"perplexity_{dtype_name}_{split}"
            scenarios[name] = {
                "metric": "perplexity",
                "kwargs": {"ignore_index": -100},
                "batches": [
                    [(cast[lo:hi], labels[lo:hi]) for lo, hi in rank_ranges]
                    for rank_ranges in _split_ranges_rows(num_rows, split)
                ],
            }
            expected[name] = perplexity(cast, labels, ignore_index=-100).item()
    expected["_perplexity_f64_reference"] = perplexity(logits, labels, ignore_index=-100).item()
    return scenarios, expected


def _split_ranges_rows(num: int, split: str) -> list[list[tuple[int, int]]]:
    ranges = _split_ranges(num, split)
    # Smaller batches for the few rows of logits: several updates per rank.
    return [[(lo, hi) for start, stop in rank_ranges for lo, hi in _chunks(start, stop, 5)] for rank_ranges in ranges]


# ---------------------------------------------------------------------------------------------
# The worker, run by each rank of the group.


def _local_state(metric: Any) -> dict[str, list[Any]]:
    return {key: getattr(metric, key).reshape(-1).tolist() for key in metric._defaults}


def _as_python(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: item.item() for key, item in value.items()}
    return value.item()


def _worker(rank: int, world_size: int, port: int, scenarios: dict[str, dict[str, Any]], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        results: dict[str, Any] = {}
        for name, scenario in scenarios.items():
            metric = METRICS[scenario["metric"]](**scenario["kwargs"])
            for preds, target in scenario["batches"][rank]:
                metric.update(preds, target)
            before = _local_state(metric)
            with warnings.catch_warnings():
                # A rank without updates warns that compute comes before update.
                warnings.simplefilter("ignore", UserWarning)
                value = metric.compute()
            # compute() syncs and then restores this rank's own states, so accumulation can go on.
            results[name] = {
                "value": _as_python(value),
                "local_kept": _local_state(metric) == before,
                "num_updates": len(scenario["batches"][rank]),
            }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_group(scenarios: dict[str, dict[str, Any]], out_dir: Path, timeout: float = GROUP_TIMEOUT) -> list[dict]:
    """Run ``_worker`` on ``WORLD_SIZE`` spawned ranks; fail (not hang) past ``timeout`` seconds."""
    return spawn_group(_worker, (WORLD_SIZE, _free_port(), scenarios, str(out_dir)), out_dir, WORLD_SIZE, timeout)


def _run_all(out_dir: Path) -> tuple[list[dict], dict[str, Any]]:
    scenarios, expected = build_scenarios()
    return run_group(scenarios, out_dir), expected


@pytest.fixture(scope="module")
def group_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict[str, Any]]:
    """Every scenario run once in a 2-process gloo group, and the expected scores.

    Under pytest-xdist the first worker to get here runs the group and the others read its
    results (xdist's recipe for session-wide work), instead of each spawning its own.
    """
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _run_all(tmp_path_factory.mktemp("ddp"))
    from filelock import FileLock  # a dependency of torch

    shared = tmp_path_factory.getbasetemp().parent  # this session's, common to its workers
    cached = shared / "llmkit_ddp_group.json"
    with FileLock(str(cached) + ".lock"):
        if cached.exists():
            results, expected = json.loads(cached.read_text())
            return results, expected
        results, expected = _run_all(tmp_path_factory.mktemp("ddp"))
        cached.write_text(json.dumps([results, expected]))
        return results, expected


def _close(got: Any, want: Any, tol: float = 1e-6, rel: float = 0.0) -> bool:
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_close(got[key], want[key], tol, rel) for key in want)
    return math.isclose(got, want, abs_tol=tol, rel_tol=rel)


def _check(group_results: tuple[list[dict], dict[str, Any]], name: str, tol: float = 1e-6, rel: float = 0.0) -> None:
    results, expected = group_results
    per_rank = [rank_results[name] for rank_results in results]
    # Both ranks agree exactly: they reduce the same summed states.
    assert per_rank[0]["value"] == per_rank[1]["value"], name
    for rank, result in enumerate(per_rank):
        assert _close(result["value"], expected[name], tol, rel), (name, rank, result["value"], expected[name])
        assert result["local_kept"], (name, rank)


# ---------------------------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize("split", ["even", "uneven", "empty_rank"])
def test_bleu_text(group_results, split):
    _check(group_results, f"bleu_text_{split}")


def test_bleu_empty_rank_really_had_no_update(group_results):
    results, _ = group_results
    assert results[0]["bleu_text_empty_rank"]["num_updates"] == 0
    assert results[1]["bleu_text_empty_rank"]["num_updates"] > 0


@pytest.mark.parametrize("split", ["even", "uneven"])
def test_bleu_token_ids_with_ignore_index(group_results, split):
    _check(group_results, f"bleu_ids_{split}")


@pytest.mark.parametrize("split", ["even", "uneven", "empty_rank"])
def test_rouge_text_multi_reference(group_results, split):
    _check(group_results, f"rouge_text_{split}")
    _, expected = group_results
    assert set(expected[f"rouge_text_{split}"]) == {
        f"{key}_{name}" for key in ROUGE_KEYS for name in ("fmeasure", "precision", "recall")
    }


@pytest.mark.parametrize("split", ["even", "uneven", "empty_rank"])
def test_perplexity_with_ignore_index(group_results, split):
    _check(group_results, f"perplexity_f64_{split}")


@pytest.mark.parametrize("split", ["even", "uneven", "empty_rank"])
def test_perplexity_float32(group_results, split):
    # The functional form sums all tokens in one float32 cross_entropy call, the metric one
    # float32 sum per update: equal to float32 rounding, not to 1e-6 absolute.
    _check(group_results, f"perplexity_f32_{split}", tol=0.0, rel=1e-5)
    _, expected = group_results
    assert math.isclose(expected[f"perplexity_f32_{split}"], expected["_perplexity_f64_reference"], rel_tol=1e-5)


def test_scores_are_not_trivial(group_results):
    """Guard against a corpus on which every scenario trivially agrees (such as all zeros)."""
    _, expected = group_results
    assert 0.01 < expected["bleu_text_even"] < 1.0
    assert 0.01 < expected["bleu_ids_even"] < 1.0
    rouge = expected["rouge_text_even"]
    assert 0.01 < rouge["rougeLsum_fmeasure"] < 1.0
    assert rouge["rouge2_fmeasure"] < rouge["rouge1_fmeasure"]
    assert expected["perplexity_f64_even"] > 1.0
