"""Every Python block of the docs and the README runs, so an example that breaks fails the suite.

The blocks of one page run in order in one namespace (a later block uses what an earlier one
built), in a fresh working directory, with each ``lightning.pytorch.Trainer`` cut to a few steps
(``tests/docs/blocks.py``): the pages show real settings, the suite checks that the code runs.
Shell, YAML and text blocks are not run.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from tests.docs.blocks import ROOT, Block, blocks, capped, pages, python_blocks

PAGES = [page for page in pages() if python_blocks(page)]


def _run(block: Block, namespace: dict[str, object]) -> None:
    code = compile(block.code, f"{block.path.relative_to(ROOT)}:{block.line}", "exec")
    try:
        exec(code, namespace)
    except Exception as error:  # name the block, with the traceback inside it
        lines = traceback.format_exception(error)
        pytest.fail(f"the block at {block.path.relative_to(ROOT)}:{block.line} raised:\n{''.join(lines)}", pytrace=False)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(Trainer, "__init__", capped(Trainer.__init__))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    # The pages' models are tiny: one thread is fastest, and two would fight over the CPUs beside
    # another test process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in python_blocks(page):
            _run(block, namespace)
    finally:
        torch.set_num_threads(threads)


def test_collector_finds_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n```python\nx = 1\n```\n\n- item\n\n    ```python title=\"a\"\n    y = x + 1\n    ```\n"
        "```bash\nls\n```\n````python\nz = '```'\n````\n",
        encoding="utf-8",
    )
    found = python_blocks(page)
    assert [(b.line, b.code) for b in found] == [(2, "x = 1\n"), (8, "y = x + 1\n"), (14, "z = '```'\n")]
    assert [b.lang for b in blocks(page)] == ["python", "python", "bash", "python"]


def test_unclosed_fence_is_named(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"page.md:1: the fence opened here is never closed"):
        list(blocks(page))


def test_trainer_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accelerator: str) -> None:
    monkeypatch.setattr(Trainer, "__init__", capped(Trainer.__init__))
    common = {"accelerator": accelerator, "default_root_dir": tmp_path, "logger": False}
    trainer = Trainer(max_steps=1500, val_check_interval=100, **common)
    assert trainer.max_steps == 3
    assert trainer.max_epochs == 1
    assert Trainer(max_steps=2, **common).max_steps == 2
    # A page's own smaller limits are kept: 0 turns validation off, 1 batch stays 1.
    quiet = Trainer(limit_val_batches=0, limit_train_batches=1, **common)
    assert (quiet.limit_val_batches, quiet.limit_train_batches, quiet.limit_test_batches) == (0, 1, 2)
    assert Trainer(limit_val_batches=0.5, **common).limit_val_batches == 2
