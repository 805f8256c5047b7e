"""A fit on 2 nodes x 1 process, both nodes on this machine, launched as ``torchrun --nnodes 2`` would.

Two processes run ``tests/multinode_fit.py``, each with the variables a launcher gives one node
(``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), under
``Trainer(num_nodes=2, devices=1, strategy="ddp")`` on gloo: Lightning's ``LightningEnvironment``,
as on a cluster without a scheduler. The fit trains with ``KnowledgeDistillation``,
``QuantizationAwareTraining`` and ``AdversarialTraining`` together and validates on a set that
Lightning's ``DistributedSampler`` shards across the nodes; the BLEU, ROUGE-L and perplexity it logs
(synced by torchmetrics) must equal those of one process on the merged shards: sacrebleu,
rouge-score and a float64 cross-entropy over what the nodes generated and predicted. Under
torchrun's own variables Lightning takes ``TorchElasticEnvironment`` instead; that selection and its
ranks (and those of the first case) are checked in this process too, without a second launch (starting
two processes is the slow part).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from rouge_score import rouge_scorer

from tests.callbacks.helpers import trainer
from tests.conftest import _free_port
from tests.multinode_fit import EOS, NUM_EVAL, NUM_NODES, PAD

ROOT = Path(__file__).resolve().parents[1]
# Seconds both nodes may take (10-30 s here, mostly imports) before the test fails instead of hanging.
LAUNCH_TIMEOUT = 150
# Variables of a scheduler or an outer launcher: with them Lightning would pick another cluster
# environment (SLURM, LSF, MPI, TorchElastic) or other ranks than the ones each node is given.
FOREIGN_PREFIXES = ("SLURM_", "LSB_", "LSF_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")
LAUNCH_VARIABLES = (
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "ROLE_RANK", "RANK", "LOCAL_RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE",
)


def clean_environment() -> dict[str, str]:
    """``os.environ`` without any launcher's or scheduler's variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES) and k not in LAUNCH_VARIABLES}


def node_environment(node: int, port: int) -> dict[str, str]:
    """The environment of node ``node``'s one process, in the variables Lightning reads."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return clean_environment() | {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node), "WORLD_SIZE": str(NUM_NODES),
        "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath,
    }


def launch_nodes(out: Path, timeout: float = LAUNCH_TIMEOUT) -> list[dict[str, Any]]:
    """Run both nodes; fail (not hang) past ``timeout`` s or when one fails, with both nodes' output."""
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    logs = [out / f"node{node}.log" for node in range(NUM_NODES)]
    try:
        for node, log in enumerate(logs):
            with log.open("wb") as handle:  # the child keeps its own descriptor
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "tests.multinode_fit", str(out)], cwd=ROOT,
                    env=node_environment(node, port), stdout=handle, stderr=subprocess.STDOUT,
                ))
        deadline = time.monotonic() + timeout
        # A node that failed leaves the other waiting in a collective: stop at the first failure.
        while any(p.poll() is None for p in processes) and not any(p.poll() for p in processes):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    codes = [process.returncode for process in processes]
    if codes != [0] * NUM_NODES:
        tails = "\n".join(f"--- node {node} (exit {code}):\n{log.read_text(errors='replace')[-4000:]}"
                          for node, (code, log) in enumerate(zip(codes, logs, strict=True)))
        pytest.fail(f"the {NUM_NODES} nodes did not both exit 0 (time limit {timeout} s):\n{tails}")
    return [json.loads((out / f"node{node}.json").read_text()) for node in range(NUM_NODES)]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each node wrote, from one launch per session.

    Under pytest-xdist the first worker to get here launches the nodes and the others read what
    they wrote (as ``tests/metrics/test_distributed.py`` does).
    """
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return launch_nodes(tmp_path_factory.mktemp("nodes"))
    from filelock import FileLock  # a dependency of torch

    cached = tmp_path_factory.getbasetemp().parent / "llmkit_multinode.json"
    with FileLock(str(cached) + ".lock"):
        if cached.exists():
            return list(json.loads(cached.read_text()))
        results = launch_nodes(tmp_path_factory.mktemp("nodes"))
        cached.write_text(json.dumps(results))
        return results


# ---------------------------------------------------------------------------------------------
# The oracle: one process on the merged shards


def words(ids: list[int]) -> str:
    """Token ids as the model's metrics score them: EOS and padding dropped, each id one word."""
    return " ".join(str(i) for i in ids if i not in (PAD, EOS))


def one_process_scores(shards: list[dict[str, Any]]) -> dict[str, float]:
    """BLEU (sacrebleu), ROUGE-L F1 (rouge-score, mean over samples) and perplexity (float64) of ``shards``."""
    preds = [words(row) for shard in shards for row in shard["preds"]]
    refs = [words(row[1:]) for shard in shards for row in shard["tgt"]]  # the ids after BOS
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(refs, preds, strict=True)]
    logits = torch.tensor([row for shard in shards for row in shard["logits"]], dtype=torch.float64)
    target = torch.tensor([row[1:] for shard in shards for row in shard["tgt"]])
    log_probs = logits.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return {
        "bleu": sacrebleu.corpus_bleu(preds, [refs], tokenize="none").score / 100,
        "rougeL": sum(rouge) / len(rouge),
        "ppl": math.exp(-log_probs[target != PAD].mean().item()),
    }


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.slow
def test_each_node_has_its_ranks_under_lightning_environment(nodes):
    for node, result in enumerate(nodes):  # each node also asserted these itself
        assert result["environment"] == "LightningEnvironment"
        ranks = {name: result[name] for name in ("node_rank", "global_rank", "local_rank", "world_size", "num_nodes")}
        assert ranks == {"node_rank": node, "global_rank": node, "local_rank": 0, "world_size": 2, "num_nodes": 2}


@pytest.mark.slow
def test_the_sampler_shards_the_validation_set_across_the_nodes(nodes):
    shards = [result["stages"]["validate"] for result in nodes]
    for node, shard in enumerate(shards):
        # DistributedSampler without shuffling: every NUM_NODES-th sample, each decoded and scored once.
        assert shard["idx"] == list(range(node, NUM_EVAL, NUM_NODES))
        assert len(shard["preds"]) == len(shard["tgt"]) == len(shard["logits"]) == len(shard["idx"])
    assert sorted(shards[0]["idx"] + shards[1]["idx"]) == list(range(NUM_EVAL))


@pytest.mark.slow
def test_logged_metrics_equal_one_process_on_the_merged_shards(nodes):
    shards = [result["stages"]["validate"] for result in nodes]
    logged = [shard["logged"] for shard in shards]
    assert logged[0] == logged[1]  # synced: the same values on both nodes
    expected = one_process_scores(shards)
    # Lightning logs float32: BLEU and ROUGE-L to its rounding, perplexity (< 16 here) within 1e-6.
    assert logged[0]["bleu"] == pytest.approx(expected["bleu"], rel=1e-6, abs=1e-7)
    assert logged[0]["rougeL"] == pytest.approx(expected["rougeL"], rel=1e-6, abs=1e-7)
    assert logged[0]["ppl"] == pytest.approx(expected["ppl"], abs=1e-6)
    # Not vacuous: one node's shard alone scores otherwise, so a missing sync would show.
    for shard in shards:
        alone = one_process_scores([shard])
        assert all(abs(alone[name] - expected[name]) > 1e-4 for name in expected), (alone, expected)


@pytest.mark.slow
def test_ddp_keeps_the_nodes_identical_and_qat_converts_both(nodes):
    hashes = [result["hashes"] for result in nodes]
    # The nodes start from different seeds: DDP broadcast node 0's weights, then kept them equal.
    assert hashes[0]["start"] == hashes[1]["start"]
    assert hashes[0]["end"] == hashes[1]["end"] != hashes[0]["start"]
    for result in nodes:
        assert result["linear_weights"] == ["IntxUnpackedToInt8Tensor"]  # every Linear converted


@pytest.mark.slow
def test_trainer_test_after_conversion_equals_one_process_on_the_merged_shards(nodes):
    assert "test_error" not in nodes[0], nodes[0]["test_error"]
    shards = [result["stages"]["test"] for result in nodes]
    logged = [shard["logged"] for shard in shards]
    assert logged[0] == logged[1]
    expected = one_process_scores(shards)
    assert logged[0] == pytest.approx(expected, rel=1e-6, abs=1e-6)


NODE_1_VARIABLES = {
    # What a node-rank launch gives node 1 (Lightning's "general purpose cluster"): LightningEnvironment.
    "lightning": {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "1", "WORLD_SIZE": "2",
                  "LOCAL_RANK": "0"},
    # What `torchrun --nnodes 2 --nproc_per_node 1 --node_rank 1` gives its process: TorchElasticEnvironment.
    "torchrun": {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1",
                 "LOCAL_RANK": "0", "GROUP_RANK": "1", "ROLE_RANK": "1", "LOCAL_WORLD_SIZE": "1",
                 "GROUP_WORLD_SIZE": "2", "ROLE_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "llmkit-test"},
}


@pytest.mark.parametrize(("launcher", "environment"), [
    ("lightning", LightningEnvironment), ("torchrun", TorchElasticEnvironment),
])
def test_launch_variables_select_the_cluster_environment_and_the_nodes_ranks(monkeypatch, launcher, environment):
    """Lightning's choice from node 1's variables, in this process: no process group is formed."""
    for name in set(os.environ) - set(clean_environment()):
        monkeypatch.delenv(name)
    for name, value in NODE_1_VARIABLES[launcher].items():
        monkeypatch.setenv(name, value)
    # The Trainer sets the process-wide rank of rank-zero logging to its global rank: restored after.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    fit = trainer(devices=1, num_nodes=2, strategy="ddp")  # on CPU: two processes
    assert type(fit.strategy.cluster_environment) is environment
    ranks = {name: getattr(fit, name) for name in ("node_rank", "global_rank", "local_rank", "world_size", "num_nodes")}
    assert ranks == {"node_rank": 1, "global_rank": 1, "local_rank": 0, "world_size": 2, "num_nodes": 2}
