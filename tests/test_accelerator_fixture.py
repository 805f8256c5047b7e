"""Every Trainer the tests build takes its accelerator from one place: ``tests/accelerator.py``.

- ``LLMKIT_TEST_ACCELERATOR`` is parsed there (default ``cpu``; an unknown name is a clear error);
- the ``accelerator`` fixture returns it; several processes stay on CPU (gloo);
- a scan of every ``Trainer(...)`` call in tests/ (its syntax tree): none names an accelerator
  literally, and each one gets it from ``ACCELERATOR``, ``accelerator_for(...)`` or the fixture, so
  that a future test cannot slip past ``LLMKIT_TEST_ACCELERATOR`` onto Lightning's default
  ``"auto"`` (a GPU where one is) or a hard-coded ``"cpu"``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import accelerator as module
from tests.accelerator import ACCELERATOR, ACCELERATORS, accelerator_for, parse_accelerator

TESTS = Path(__file__).resolve().parent
# The names through which a Trainer may get its accelerator (the fixture is a test's argument).
ALLOWED_NAMES = {"ACCELERATOR", "MULTIPROCESS_ACCELERATOR", "accelerator"}
ALLOWED_CALLS = {"accelerator_for"}
LITERAL = re.compile(r"""\baccelerator["']?\s*[:=]\s*(?:["']|None\b)""")


# ---------------------------------------------------------------------------------------------
# The variable and the fixture


@pytest.mark.parametrize(("text", "expected"), [(None, "cpu"), ("", "cpu"), ("cuda", "cuda"), (" GPU ", "gpu"),
                                                ("mps", "mps"), ("auto", "auto"), ("cpu", "cpu")])
def test_parse_accelerator(text, expected):
    assert parse_accelerator(text) == expected


@pytest.mark.parametrize("text", ["tpu", "cuda:0", "cpus"])
def test_unknown_accelerator_is_a_clear_error(text):
    with pytest.raises(ValueError, match=rf"LLMKIT_TEST_ACCELERATOR must be one of cpu, cuda, mps, gpu, auto "
                                         rf"\(default cpu\), got '{re.escape(text)}'"):
        parse_accelerator(text)


def test_unknown_accelerator_in_the_environment_fails_at_import():
    """What conftest.py meets first: the error names the variable, the choices and the value."""
    env = {**os.environ, "LLMKIT_TEST_ACCELERATOR": "tpu"}
    result = subprocess.run([sys.executable, "-c", "import tests.accelerator"], cwd=TESTS.parent, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "ValueError: LLMKIT_TEST_ACCELERATOR must be one of cpu, cuda, mps, gpu, auto (default cpu), got 'tpu'" \
        in result.stderr


def test_fixture_returns_the_one_value(accelerator):
    assert accelerator == ACCELERATOR in ACCELERATORS


@pytest.mark.parametrize(("devices", "num_nodes", "several"), [
    (1, 1, False), (2, 1, True), (1, 2, True), ([0], 1, False), ([0, 1], 1, True), ("2", 1, True),
    ("0,1", 1, True), ("1", 1, False), ("auto", 1, False),
])
def test_several_processes_stay_on_cpu(monkeypatch, devices, num_nodes, several):
    monkeypatch.setattr(module, "ACCELERATOR", "cuda")
    assert accelerator_for(devices, num_nodes) == ("cpu" if several else "cuda")


# ---------------------------------------------------------------------------------------------
# The scan


def _sources() -> list[Path]:
    # Not the one place itself, nor this file, whose bad examples are strings.
    skip = {TESTS / "accelerator.py", Path(__file__).resolve()}
    return sorted(p for p in TESTS.rglob("*.py") if p.resolve() not in skip)


def _is_trainer_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name == "Trainer"


def _allowed_value(value: ast.expr) -> bool:
    if isinstance(value, ast.Name):
        return value.id in ALLOWED_NAMES
    if isinstance(value, ast.Attribute):
        return value.attr in ALLOWED_NAMES
    if isinstance(value, ast.Call):
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        return name in ALLOWED_CALLS
    return False


def _accelerator_values(tree: ast.AST) -> list[ast.expr]:
    """The values given to ``accelerator`` in ``tree``: keywords ``accelerator=`` and dict keys ``"accelerator"``."""
    values: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "accelerator":
            values.append(node.value)
        elif isinstance(node, ast.Dict):
            values.extend(
                v for k, v in zip(node.keys, node.values, strict=True)
                if isinstance(k, ast.Constant) and k.value == "accelerator"
            )
    return values


def _enclosing_functions(tree: ast.Module) -> dict[ast.Call, ast.AST]:
    """Each ``Trainer(...)`` call and the innermost function (or the module) around it."""
    found: dict[ast.Call, ast.AST] = {}

    def visit(node: ast.AST, scope: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) else scope
            if _is_trainer_call(child):
                assert isinstance(child, ast.Call)
                found[child] = inner
            visit(child, inner)

    visit(tree, tree)
    return found


def trainer_call_problems(source: str, filename: str = "<test>") -> tuple[int, list[str]]:
    """``(number of Trainer calls, what is wrong)`` in one file's source."""
    problems = [
        f"{filename}:{number}: accelerator given literally ({line.strip()!r}); use tests.accelerator"
        for number, line in enumerate(source.splitlines(), 1) if LITERAL.search(line)
    ]
    tree = ast.parse(source, filename)
    calls = _enclosing_functions(tree)
    for call, scope in calls.items():
        where = f"{filename}:{call.lineno}"
        direct = [k.value for k in call.keywords if k.arg == "accelerator"]
        unpacked = any(k.arg is None for k in call.keywords)
        # Given directly, or through `**` of a mapping built in the same function.
        values = direct or (_accelerator_values(scope) if unpacked else [])
        if not values:
            problems.append(f"{where}: Trainer(...) gets no accelerator from tests.accelerator or the fixture "
                            "(Lightning's default 'auto' would pick a GPU where one is)")
        problems.extend(
            f"{where}: Trainer(...) takes its accelerator from {ast.unparse(v)!r}, not from ACCELERATOR, "
            "accelerator_for(...) or the `accelerator` fixture"
            for v in values if not _allowed_value(v)
        )
    return len(calls), problems


def test_every_trainer_in_tests_takes_its_accelerator_from_the_one_place():
    total, problems = 0, []
    for path in _sources():
        count, found = trainer_call_problems(path.read_text(), str(path.relative_to(TESTS.parent)))
        total += count
        problems.extend(found)
    assert not problems, "\n".join(problems)
    assert total >= 6  # the scan sees the helpers' and the tests' Trainers (it would pass vacuously otherwise)


@pytest.mark.parametrize(("source", "problem"), [
    ("L.Trainer(accelerator='cpu', max_steps=1)", "accelerator given literally"),
    ('L.Trainer(**{"accelerator": "cuda", "devices": 1})', "accelerator given literally"),
    ("Trainer(max_steps=1)", "gets no accelerator"),
    ("def f(**kw):\n    return L.Trainer(**{'devices': 1, **kw})", "gets no accelerator"),
    ("L.Trainer(accelerator=device)", "takes its accelerator from 'device'"),
    ("pl.Trainer(accelerator=None)", "accelerator given literally"),
])
def test_the_scan_catches_hard_coded_and_missing_accelerators(source, problem):
    _, problems = trainer_call_problems(source)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("source", [
    "L.Trainer(accelerator=ACCELERATOR, max_steps=1)",
    "def test(accelerator):\n    L.Trainer(accelerator=accelerator)",
    "def trainer(**kw):\n    d = dict(accelerator=accelerator_for(kw.get('devices', 1)))\n    return L.Trainer(**{**d, **kw})",
    "def trainer(**kw):\n    return L.Trainer(**{'accelerator': accel.ACCELERATOR, **kw})",
])
def test_the_scan_accepts_the_one_place(source):
    count, problems = trainer_call_problems(source)
    assert count == 1 and not problems, problems
