"""The site builds with ``mkdocs build --strict`` (no warning, no broken link or reference), and its API
reference documents every public name: those of DESIGN.md and every public module's ``__all__``."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import ROOT, python_blocks

pytest.importorskip("mkdocs", reason="the docs extra (mkdocs-material, mkdocstrings[python]) is not installed")

DESIGN = ROOT / ".." / "shared" / "DESIGN.md"
# Each public module and the API page that documents it.
MODULES = {
    "llmkit": "llmkit",
    "llmkit.nn": "nn",
    "llmkit.generation": "generation",
    "llmkit.callbacks": "callbacks",
    "llmkit.adversarial": "adversarial",
    "llmkit.metrics": "metrics",
    "llmkit.metrics.functional": "metrics-functional",
    "llmkit.metrics.significance": "significance",
    "llmkit.data": "data",
}
_ID = re.compile(r'\sid="([^"]+)"')


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    if result.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{result.stderr[-8000:]}", pytrace=False)
    return out


def _anchors(site: Path, page: str) -> set[str]:
    return set(_ID.findall((site / "api" / page / "index.html").read_text(encoding="utf-8")))


def design_names() -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from llmkit... import name`` in DESIGN.md's Python blocks."""
    names = []
    for block in python_blocks(DESIGN):
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llmkit":
                names += [(node.module, alias.name) for alias in node.names]
    return names


def test_site_builds_strictly(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "changelog" / "index.html").read_text(encoding="utf-8").count("Unreleased") >= 1


def test_design_names_are_documented(site: Path) -> None:
    if not DESIGN.is_file():
        pytest.skip(f"{DESIGN} is absent (it lives beside the repository in CI)")
    names = design_names()
    assert len(names) > 30, "DESIGN.md's import lines were not found"
    missing = [f"{module}.{name}" for module, name in names if f"{module}.{name}" not in _anchors(site, MODULES[module])]
    assert not missing, f"public names of DESIGN.md missing from the API reference: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_all_is_documented(site: Path, module: str) -> None:
    public = [name for name in importlib.import_module(module).__all__ if not name.startswith("_")]
    anchors = _anchors(site, MODULES[module])
    missing = [name for name in public if f"{module}.{name}" not in anchors]
    assert not missing, f"names in {module}.__all__ missing from docs/api/{MODULES[module]}.md: {missing}"


def test_readme_links_resolve() -> None:
    # The README is read on the forge, outside the site: its relative links must name files that exist.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if "://" not in target]
    assert local, "the README links no guide"
    missing = [target for target in local if not (ROOT / target).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_sphinx_roles_render_as_links_or_code(site: Path) -> None:
    # docs/sphinx_roles.py rewrites the docstrings' Sphinx roles at build time: none is left as text.
    pages = sorted((site / "api").rglob("index.html"))
    left = {page.parent.name: re.findall(r":(?:class|meth|func|attr|mod|data|obj|exc):`", page.read_text("utf-8"))
            for page in pages}
    assert not any(left.values()), f"Sphinx roles left as text: { {k: len(v) for k, v in left.items() if v} }"
    # CausalLMTransformer's ":class:`~llmkit.nn.CausalDecoder`" links to the class's anchor on the nn page.
    text = (site / "api" / "llmkit" / "index.html").read_text("utf-8")
    link = re.search(r'<a class="autorefs autorefs-internal"[^>]*href="([^"]+)"><code>CausalDecoder</code></a>', text)
    assert link is not None, "the role :class:`~llmkit.nn.CausalDecoder` did not become a link"
    page, _, anchor = link.group(1).partition("#")
    assert anchor in _ID.findall((site / "api" / "llmkit" / page / "index.html").resolve().read_text("utf-8"))
