"""A griffe extension: the Sphinx roles in llmkit's docstrings become links on the site.

The docstrings are Google-style and name other objects the way torch's and Lightning's do, with
Sphinx roles (``:class:`~llmkit.nn.CausalDecoder```, ``:meth:`generate```), which read well in
``help()``. mkdocstrings does not know the roles, so at build time this extension rewrites each
one into a mkdocstrings cross-reference (``[`CausalDecoder`][llmkit.nn.transformer.CausalDecoder]``),
the name resolved in the docstring's own scope as Python would (imports, members, enclosing
classes and modules). A name the API reference does not render (private, undocumented, not
exported, or outside llmkit, such as ``torchmetrics.Metric``) becomes plain code. The sources are
not changed.

mkdocs.yml loads it: ``extensions: [docs/sphinx_roles.py]`` in the python handler's options.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?P<kind>class|meth|func|attr|mod|data|obj|exc|const):`(?P<tilde>~?)(?P<target>[^`]+?)`")
CALLABLE_KINDS = ("meth", "func")


def rendered(pkg: griffe.Module, api_pages: Path) -> set[str]:
    """Canonical paths of the objects the API reference renders, each a link target.

    The ``:::`` directives of the API pages, each module's exports (``__all__``, else its public
    names) and each class's public members with a docstring (mkdocstrings hides the rest).
    """
    paths: set[str] = set()

    def visit(obj: griffe.Object, root: bool = False) -> None:
        obj = obj.final_target if obj.is_alias else obj
        if obj.path in paths or not (root or obj.docstring):
            return
        paths.add(obj.path)
        if obj.is_module and not root:
            return  # a submodule is not rendered inside its parent's page (show_submodules: false)
        names = [str(name) for name in obj.exports] if obj.is_module and obj.exports else [
            name for name in obj.members if not name.startswith("_")
        ]
        for name in names:
            member = obj.members.get(name)
            if member is not None and (obj.is_module or not member.is_alias):
                visit(member)

    for page in sorted(api_pages.glob("*.md")):
        for path in re.findall(r"^::: (\S+)", page.read_text(), re.MULTILINE):
            visit(pkg.modules_collection[path], root=True)
    return paths


def resolve(obj: griffe.Object, target: str, targets: set[str]) -> str | None:
    """The full path of ``target`` seen from ``obj``, or ``None`` when the reference renders no such object."""
    first, _, rest = target.partition(".")
    if first == obj.package.name:
        path = target
    else:
        try:
            path = obj.resolve(first)
        except (griffe.NameResolutionError, ValueError):
            return None
        path = f"{path}.{rest}" if rest else path
    try:
        found = obj.modules_collection[path]
    except KeyError:
        return None
    canonical: str = found.final_target.path if found.is_alias else found.path
    return canonical if canonical in targets else None


def rewrite(obj: griffe.Object, text: str, targets: set[str]) -> str:
    """``text`` with every role a cross-reference (or code, where nothing documented is named)."""

    def replace(match: re.Match[str]) -> str:
        target = match["target"].removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        if match["kind"] in CALLABLE_KINDS:
            shown += "()"
        path = resolve(obj, target, targets)
        return f"[`{shown}`][{path}]" if path else f"`{shown}`"

    return ROLE.sub(replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring in a loaded package (llmkit)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite every docstring of the package once, after it is loaded."""
        targets = rendered(pkg, Path(__file__).parent / "api")
        # Members that are not aliases form a tree: each object is reached once.
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value, targets)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
