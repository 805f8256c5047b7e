"""examples/decode_in_validation.py runs on a small slice of its data and prints scores and examples."""

from __future__ import annotations

import csv
import re

import pytest

from tests.test_examples import run


@pytest.mark.slow  # a fresh Python importing Lightning: 10-20 s on 2 busy cores
def test_decode_in_validation(tmp_path):
    out = run(
        "decode_in_validation.py", "--high", "300", "--val-size", "32", "--max-steps", "8", "--val-every", "4",
        "--batch-size", "16", "--d-model", "32", "--layers", "1", "--output", str(tmp_path),
    )
    scores = re.findall(r"^step\s+(\d+)  val_loss \S+  val_bleu (\S+)  val_chrf (\S+)$", out, re.M)
    assert [int(step) for step, _, _ in scores] == [4, 8], out
    assert all(0.0 <= float(value) <= 1.0 for _, bleu, chrf in scores for value in (bleu, chrf))
    assert len(re.findall(r"^   -> ", out, re.M)) == 4  # the four examples of the last validation
    with open(tmp_path / "generation_examples.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["4"] * 4 + ["8"] * 4
    assert all(row["source"] and row["reference"] and not re.search(r"\d", row["source"]) for row in rows)
    # The decoding tour: three n-best rows best first, three samples, two diverse beams.
    n_best = [float(score) for score in re.findall(r"^  beam 4, n-best\s+(\S+)  ", out, re.M)]
    assert len(n_best) == 3 and n_best == sorted(n_best, reverse=True), out
    assert len(re.findall(r"^  top-p 0.9, T 1.2 ", out, re.M)) == 3
    assert len(re.findall(r"^  diverse beams ", out, re.M)) == 2
