"""examples/compiled_fit.py runs end to end (inductor, both ways of compiling, every callback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compiled_fit(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compiled_fit.py"), "--steps", "7", "--d-model", "32",
         "--layers", "1", "--high", "300"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "| eager " in out and "| compile=True " in out
    assert "converted to IntxUnpackedToInt8Tensor" in out and "test BLEU" in out
