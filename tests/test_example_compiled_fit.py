"""examples/compiled_fit.py runs end to end (inductor, both ways of compiling, every callback)."""

from __future__ import annotations

import pytest

from tests.test_examples import run


@pytest.mark.slow
def test_compiled_fit():
    out = run("compiled_fit.py", "--steps", "7", "--d-model", "32", "--layers", "1", "--high", "300")
    assert "| eager " in out and "| compile=True " in out
    assert "converted to IntxUnpackedToInt8Tensor" in out and "test BLEU" in out
