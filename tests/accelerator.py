"""The accelerator every test's Trainer runs on, read once from ``LLMKIT_TEST_ACCELERATOR``.

``LLMKIT_TEST_ACCELERATOR=cuda pytest tests/callbacks`` runs the tests that build a Trainer on a
GPU; unset, they run on ``cpu``. This module is the one place that reads the variable: the
``accelerator`` fixture (tests/conftest.py) returns :data:`ACCELERATOR`, and the helpers that
build Trainers call :func:`accelerator_for`. tests/test_accelerator_fixture.py fails on any
``Trainer(...)`` in tests/ that names its accelerator another way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

ENV = "LLMKIT_TEST_ACCELERATOR"
ACCELERATORS = ("cpu", "cuda", "mps", "gpu", "auto")

# Tests of several processes on one machine (DDP over gloo, 2 nodes x 1 process) stay on CPU
# whatever ENV says: a GPU machine may have a single device, and gloo is the CPU backend.
MULTIPROCESS_ACCELERATOR = "cpu"


def parse_accelerator(value: str | None) -> str:
    """The accelerator named by ``value`` (the variable's text; ``None`` or blank: ``"cpu"``).

    Raises:
        ValueError: If ``value`` names none of :data:`ACCELERATORS`.
    """
    if value is None or not value.strip():
        return "cpu"
    name = value.strip().lower()
    if name not in ACCELERATORS:
        raise ValueError(f"{ENV} must be one of {', '.join(ACCELERATORS)} (default cpu), got {value!r}")
    return name


ACCELERATOR = parse_accelerator(os.environ.get(ENV))


def accelerator_for(devices: int | str | Sequence[int] = 1, num_nodes: int = 1) -> str:
    """:data:`ACCELERATOR` for a Trainer of one process; :data:`MULTIPROCESS_ACCELERATOR` for several.

    Args:
        devices: the Trainer's ``devices`` (several: an int above 1 or a list of more than one).
        num_nodes: the Trainer's ``num_nodes``.
    """
    if isinstance(devices, str):  # "2", "0,1" (Lightning's strings); "auto" and "-1" count as one here
        devices = [int(d) for d in devices.split(",") if d.strip()] if "," in devices else (
            int(devices) if devices.strip().isdigit() else 1
        )
    several = len(devices) > 1 if isinstance(devices, Sequence) else devices > 1
    return MULTIPROCESS_ACCELERATOR if several or num_nodes > 1 else ACCELERATOR
