"""Fenced Python blocks of the Markdown pages (docs/ and README.md), and a Trainer cut to a few steps to run them."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.accelerator import ACCELERATOR

ROOT = Path(__file__).resolve().parents[2]

# An opening fence: indentation (a block may sit in a list or an admonition), three or more
# backticks, then the language and optional attributes (```python title="x").
_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})\s*(?P<lang>[\w+-]*)(?P<rest>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line of its opening fence (1-based), its language and code."""

    path: Path
    line: int
    lang: str
    code: str


def blocks(path: Path) -> Iterator[Block]:
    """Yield every fenced block of a Markdown file, in order, with its indentation removed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^{re.escape(indent)}{fence}`*\s*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: the fence opened here is never closed")
        yield Block(path, i + 1, opening["lang"].lower(), "\n".join(body) + "\n")
        i = j + 1


def python_blocks(path: Path) -> list[Block]:
    return [block for block in blocks(path) if block.lang in ("python", "py", "python3")]


def pages() -> list[Path]:
    """The pages whose Python blocks run: every Markdown file under docs/, and the README."""
    return [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


# What every Trainer of a docs block runs: a few steps, so the pages can show real settings
# (max_steps=1500) and still run in the suite. `val_check_interval` (an int beyond the cut
# epoch is refused by Lightning) and `max_time` are dropped.
MAX_STEPS = 3
# Batch limits: a page's own smaller limit (0 turns a loop off) is kept.
LIMITS = {"limit_train_batches": MAX_STEPS, "limit_val_batches": 2, "limit_test_batches": 2, "limit_predict_batches": 2}
CAPS: dict[str, Any] = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "log_every_n_steps": 1,
}
DROPPED = ("val_check_interval", "max_time")


def capped(init: Any) -> Any:
    """Wrap ``Trainer.__init__`` so that every Trainer stops after at most ``MAX_STEPS`` steps.

    A Trainer whose page names no accelerator gets the suite's (``tests.accelerator``), not
    Lightning's ``"auto"``.
    """

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        max_steps = kwargs.get("max_steps", -1)
        kwargs["max_steps"] = MAX_STEPS if max_steps in (None, -1) else min(max_steps, MAX_STEPS)
        for name in DROPPED:
            kwargs.pop(name, None)
        for name, cap in LIMITS.items():
            given = kwargs.get(name)
            kwargs[name] = min(given, cap) if isinstance(given, int) or given == 0 else cap
        kwargs.update(CAPS)
        kwargs.setdefault("accelerator", ACCELERATOR)
        init(self, *args, **kwargs)

    return __init__
