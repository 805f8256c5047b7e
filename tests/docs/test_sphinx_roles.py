"""docs/sphinx_roles.py: each Sphinx role becomes a cross-reference to what the API reference renders, or code."""

from __future__ import annotations

import importlib.util

import pytest

from tests.docs.blocks import ROOT

griffe = pytest.importorskip("griffe", reason="the docs extra (mkdocstrings[python]) is not installed")

spec = importlib.util.spec_from_file_location("sphinx_roles", ROOT / "docs" / "sphinx_roles.py")
sphinx_roles = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sphinx_roles)


@pytest.fixture(scope="module")
def package():
    pkg = griffe.load("llmkit", search_paths=[str(ROOT / "src")], resolve_aliases=False)
    return pkg, sphinx_roles.rendered(pkg, ROOT / "docs" / "api")


def test_rendered_holds_the_reference_and_leaves_out_the_rest(package) -> None:
    _, targets = package
    # Exported names under their canonical paths, documented methods, the directives' own targets.
    assert {"llmkit.nn.transformer.CausalDecoder", "llmkit.models.causal_lm.CausalLMTransformer",
            "llmkit.models.causal_lm.CausalLMTransformer.generate", "llmkit.metrics.significance",
            "llmkit.callbacks.quantization.quantized_weight_bytes"} <= targets
    # Private and unexported names, and submodules that have no page of their own.
    assert not {"llmkit.callbacks._composition.Composition", "llmkit.data.numbers.EpochShuffleSampler",
                "llmkit.adversarial.settings"} & targets


@pytest.mark.parametrize(("where", "text", "expected"), [
    # A full path, shown short with "~", to the canonical path of the rendered object.
    ("llmkit.models.causal_lm.CausalLMTransformer", ":class:`~llmkit.nn.CausalDecoder`",
     "[`CausalDecoder`][llmkit.nn.transformer.CausalDecoder]"),
    # A name seen from the docstring's scope, as Python resolves it (the module's imports); methods get ().
    ("llmkit.models.causal_lm.CausalLMTransformer", ":meth:`Seq2SeqTransformer.generate`",
     "[`Seq2SeqTransformer.generate()`][llmkit.models.seq2seq.Seq2SeqTransformer.generate]"),  # llmkit.models' name
    ("llmkit.models.causal_lm.CausalLMTransformer.generate", ":meth:`generate`",
     "[`generate()`][llmkit.models.causal_lm.CausalLMTransformer.generate]"),
    ("llmkit.nn.transformer.CausalDecoder", ":class:`StaticKVCache`",
     "[`StaticKVCache`][llmkit.nn.attention.StaticKVCache]"),
    # Outside llmkit, private, unexported or unknown: code, never a link that would break the build.
    ("llmkit.metrics.bleu.BLEUScore", ":class:`torchmetrics.Metric`", "`torchmetrics.Metric`"),
    ("llmkit.callbacks.distillation.KnowledgeDistillation", ":class:`~llmkit.callbacks._composition.Composition`",
     "`Composition`"),
    ("llmkit.data.numbers.NumberWordsDataModule", ":class:`EpochShuffleSampler`", "`EpochShuffleSampler`"),
    ("llmkit.nn.transformer.CausalDecoder", ":func:`no_such_name`", "`no_such_name()`"),
    # Text around the roles is kept.
    ("llmkit.nn.transformer.CausalDecoder", "a :class:`KVCache` or a :class:`StaticKVCache`.",
     "a [`KVCache`][llmkit.nn.attention.KVCache] or a [`StaticKVCache`][llmkit.nn.attention.StaticKVCache]."),
])
def test_rewrite(package, where: str, text: str, expected: str) -> None:
    pkg, targets = package
    obj = pkg.modules_collection[where]
    assert sphinx_roles.rewrite(obj, text, targets) == expected
