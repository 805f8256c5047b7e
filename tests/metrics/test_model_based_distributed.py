"""The model-based metrics in a real 2-process ``gloo`` group on CPU.

Each rank loads the metric from the same local checkpoint and updates with its share of a
corpus; ``compute()`` syncs the states (sums, a maximum, and for BERTScore with corpus idf the
concatenated token matches), so on both ranks it must equal the metric of the whole corpus in
one process (which the other test files check against the oracles). One spawned group runs
every scenario.
"""

from __future__ import annotations

import json
import random
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from llmkit.metrics.model_based import AnswerRelevance, BERTScore, Faithfulness, Toxicity
from tests.conftest import _free_port, spawn_group
from tests.metrics import tiny_hf

WORLD_SIZE = 2
NUM_SAMPLES = 14
GROUP_TIMEOUT = 240

TWICE = ("toxicity_uneven", "bertscore_idf_uneven")

METRICS: dict[str, type] = {
    "toxicity": Toxicity,
    "faithfulness": Faithfulness,
    "relevance": AnswerRelevance,
    "bertscore": BERTScore,
}


def corpus(num: int = NUM_SAMPLES, seed: int = 0) -> tuple[list[str], list[str], list[list[str]]]:
    """``(outputs, contexts, references)``: random sentences of the tiny vocabulary, some two references."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = rng.choices(tiny_hf.WORDS[:-5], k=rng.randint(2, 9))
        return " ".join(words) + rng.choice([" .", " !", ". " + " ".join(rng.choices(tiny_hf.WORDS[:-5], k=3)) + " ."])

    outputs = [sentence() for _ in range(num)]
    contexts = [sentence() for _ in range(num)]
    refs = [[sentence()] if index % 2 else [sentence(), sentence()] for index in range(num)]
    return outputs, contexts, refs


def _ranges(num: int, split: str) -> list[list[tuple[int, int]]]:
    """Per rank, the ``[lo, hi)`` sample ranges of its update batches (of 4)."""
    chunks = lambda lo, hi: [(start, min(start + 4, hi)) for start in range(lo, hi, 4)]  # noqa: E731
    if split == "even":
        return [chunks(0, num // 2), chunks(num // 2, num)]
    if split == "uneven":
        return [[(0, 1)], chunks(1, num)]
    if split == "empty_rank":
        return [[], chunks(0, num)]
    raise ValueError(split)


def build_scenarios(paths: tiny_hf.Checkpoints) -> dict[str, dict[str, Any]]:
    outputs, contexts, refs = corpus()
    second = {
        "toxicity": lambda lo, hi: (outputs[lo:hi],),
        "faithfulness": lambda lo, hi: (outputs[lo:hi], contexts[lo:hi]),
        "relevance": lambda lo, hi: (outputs[lo:hi], contexts[lo:hi]),
        "bertscore": lambda lo, hi: (outputs[lo:hi], refs[lo:hi]),
    }
    specs = [
        ("toxicity", {"model": str(paths.toxic), "threshold": 0.4}, ("even", "uneven", "empty_rank")),
        ("faithfulness", {"model": str(paths.nli)}, ("even",)),
        ("relevance", {"model": str(paths.encoder)}, ("uneven",)),
        ("bertscore", {"model": str(paths.encoder)}, ("even",)),
        ("bertscore", {"model": str(paths.encoder), "idf": True, "num_layers": 1}, ("even", "uneven", "empty_rank")),
    ]
    scenarios = {}
    for metric, kwargs, splits in specs:
        for split in splits:
            name = f"{metric}_{'idf_' if kwargs.get('idf') else ''}{split}"
            batches = [[second[metric](lo, hi) for lo, hi in rank] for rank in _ranges(NUM_SAMPLES, split)]
            scenarios[name] = {"metric": metric, "kwargs": kwargs, "batches": batches, "whole": second[metric](0, NUM_SAMPLES)}
    return scenarios


def _result(metric: Any) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a rank without updates: compute before update
        return {key: value.item() for key, value in metric.compute().items()}


def _worker(rank: int, world_size: int, port: int, scenarios: dict[str, dict[str, Any]], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=90)
    )
    try:
        results = {}
        for name, scenario in scenarios.items():
            kwargs = dict(scenario["kwargs"])
            metric = METRICS[scenario["metric"]](kwargs.pop("model"), **kwargs)
            for batch in scenario["batches"][rank]:
                metric.update(*batch)
            results[name] = _result(metric)
            if name in TWICE:
                # compute() restores this rank's own states: updating on goes on from them. (Only where
                # every rank updates: a rank without updates returns its cached value without syncing.)
                for batch in scenario["batches"][rank]:
                    metric.update(*batch)
                results[name + "_twice"] = _result(metric)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_group(scenarios: dict[str, dict[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    return spawn_group(_worker, (WORLD_SIZE, _free_port(), scenarios, str(out_dir)), out_dir, WORLD_SIZE, GROUP_TIMEOUT)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    paths = tiny_hf.save_checkpoints(tmp_path_factory.mktemp("tiny_hf"))
    scenarios = build_scenarios(paths)
    return scenarios, run_group(scenarios, tmp_path_factory.mktemp("ddp"))


def _whole(scenario: dict[str, Any], times: int = 1) -> dict[str, float]:
    kwargs = dict(scenario["kwargs"])
    metric = METRICS[scenario["metric"]](kwargs.pop("model"), **kwargs)
    for _ in range(times):
        metric.update(*scenario["whole"])
    return {key: value.item() for key, value in metric.compute().items()}


SCENARIOS = [
    "toxicity_even", "toxicity_uneven", "toxicity_empty_rank", "faithfulness_even", "relevance_uneven",
    "bertscore_even", "bertscore_idf_even", "bertscore_idf_uneven", "bertscore_idf_empty_rank",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", SCENARIOS)
def test_ranks_sync_to_the_whole_corpus(group, name):
    scenarios, results = group
    want = _whole(scenarios[name])
    assert all(0.0 < value < 1.0 for value in want.values())  # not a trivial corpus
    for rank in range(WORLD_SIZE):
        got = results[rank][name]
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (name, rank, key)
    # Both ranks agree exactly: they reduce the same states.
    assert results[0][name] == results[1][name]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", TWICE)
def test_ranks_keep_their_own_states_after_compute(group, name):
    scenarios, results = group
    want = _whole(scenarios[name], times=2)  # every sample counted twice
    for rank in range(WORLD_SIZE):
        for key in want:
            assert results[rank][name + "_twice"][key] == pytest.approx(want[key], abs=1e-6), (name, rank, key)
