"""Shared fixtures: the accelerator of the tests' Trainers, the WMT17 en-de system outputs from ../shared/data."""

from __future__ import annotations

import bz2
import json
import os
import pickle
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

# The one place the accelerator comes from (env LLMKIT_TEST_ACCELERATOR, default cpu; an unknown
# name fails here, before any test runs, with the valid choices).
from tests.accelerator import ACCELERATOR, ENV

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on two cores: two workers of two threads each oversubscribe the CPUs, which
    # makes torch's small ops several times slower. One thread per worker.
    torch.set_num_threads(1)


def pytest_report_header(config: pytest.Config) -> str:
    return f"llmkit test accelerator: {ACCELERATOR} (set {ENV} to change it)"


@pytest.fixture(scope="session")
def accelerator() -> str:
    """The accelerator of every single-process Trainer the tests build (``LLMKIT_TEST_ACCELERATOR``).

    Multi-process tests use ``tests.accelerator.accelerator_for``, which keeps them on CPU (gloo).
    """
    return ACCELERATOR


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models, restored after.

    Tiny tensors gain nothing from threads, and under ``pytest -n 2`` on two cores they
    oversubscribe the CPUs (several times slower). Use with ``pytest.mark.usefixtures``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WMT17_PATH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wmt17_en_de_systems.pkl.bz2"


def load_wmt17() -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Return ``(systems, reference)``: 16 ``(name, 3004 outputs)`` pairs and the 3004 references."""
    with bz2.open(WMT17_PATH, "rb") as handle:
        data = pickle.load(handle)
    *systems, (name, streams) = data
    assert name == "reference"
    return systems, streams[0]


@pytest.fixture(scope="session")
def wmt17() -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The WMT17 en-de systems and reference; skips where ../shared/data is absent."""
    if not WMT17_PATH.exists():
        pytest.skip(f"WMT17 data not found at {WMT17_PATH} (only CI and developers' machines have ../shared/data)")
    return load_wmt17()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_group(
    worker: Callable[..., None], args: tuple[Any, ...], out_dir: Path | None = None, nprocs: int = 2, timeout: float = 180
) -> list[dict[str, Any]]:
    """Run ``worker(rank, *args)`` on ``nprocs`` spawned processes; fail (not hang) past ``timeout`` seconds.

    ``join`` raises with a worker's traceback when a rank fails, and stops the others. With
    ``out_dir``, returns what each rank wrote to ``out_dir / f"rank{rank}.json"``.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    context = torch.multiprocessing.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {nprocs}-process gloo group did not finish in {timeout} s")
    if out_dir is None:
        return []
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nprocs)]


@pytest.fixture
def ddp_spawn(monkeypatch: pytest.MonkeyPatch) -> DDPStrategy:
    """A two-process-ready ``DDPStrategy`` (spawn, gloo on CPU) on a free local port.

    Collectives fail (instead of hanging) after a minute; each process uses one thread.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
