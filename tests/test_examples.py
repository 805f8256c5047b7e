"""Every script in examples/ runs (on a small slice of its data)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_metrics_wmt17(wmt17):
    out = run("metrics_wmt17.py", "--limit", "60", "--batch-size", "16")
    systems, _ = wmt17
    assert len(re.findall(r"^\S+\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d{3}\s+\d+\.\d\d$", out, re.M)) == len(systems)
    largest = float(re.search(r"largest difference (\S+)", out).group(1))
    assert largest < 1e-6


def test_translate_numbers(tmp_path):
    out = run(
        "translate_numbers.py", "--high", "600", "--val-size", "64", "--test-size", "64", "--max-steps", "8",
        "--d-model", "32", "--layers", "1", "--output", str(tmp_path),
    )
    scores = re.search(r"test BLEU (\S+)  ROUGE-L (\S+)  perplexity (\S+)", out)
    assert scores is not None, out
    bleu, rouge, ppl = map(float, scores.groups())
    assert 0.0 <= bleu <= 1.0 and 0.0 <= rouge <= 1.0 and ppl > 1.0
    assert len(re.findall(r"^   -> ", out, re.M)) == 6
    assert (tmp_path / "translator.ckpt").exists()


def test_vae_digits(tmp_path):
    out = run(
        "vae_digits.py", "--epochs", "2", "--hidden-dims", "32", "--latent-dim", "4", "--nll-samples", "20",
        "--output", str(tmp_path),
    )
    scores = re.search(r"test NLL (\S+) nats .* ELBO (\S+)  active latents (\d+) of 4", out)
    assert scores is not None, out
    nll, elbo, active = float(scores.group(1)), float(scores.group(2)), int(scores.group(3))
    assert 0 < nll < -elbo and 0 <= active <= 4  # the importance-weighted bound is the tighter one
    assert re.search(r"mean squared error \S+ noisy -> \S+ denoised", out)
    pictures = {"samples.png", "reconstructions.png", "denoising.png", "interpolation.png"}
    assert {path.name for path in tmp_path.glob("*.png")} == pictures
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pictures)
    assert (tmp_path / "vae.ckpt").exists()


def test_distill_translator(tmp_path):
    out = run(
        "distill_translator.py", "--high", "300", "--val-size", "32", "--test-size", "32", "--teacher-steps", "6",
        "--steps", "4", "--teacher-d-model", "32", "--student-d-model", "16", "--layers", "1",
        "--output", str(tmp_path),
    )
    number = r"\|\s+(\S+) "
    rows = re.findall(rf"^\| (teacher|student \w+)[^|]*\|\s+(\S+)M {number * 4}\|$", out, re.M)
    assert [row[0] for row in rows] == ["teacher", "student alone", "student distilled"], out
    params = [float(row[1]) for row in rows]
    assert params[1] == params[2] < params[0]
    for _, _, bleu, rouge, ppl, ms in rows:
        assert 0.0 <= float(bleu) <= 1.0 and 0.0 <= float(rouge) <= 1.0 and float(ppl) > 1.0 and float(ms) > 0
    assert len(re.findall(r"\(distilled student\)$", out, re.M)) == 4
    assert re.search(r"distilled student (beats|does not beat) the student alone", out)
    teacher = tmp_path / "teacher.ckpt"
    assert teacher.exists()
    for name, steps in (("teacher", 6), ("student_alone", 4), ("student_distilled", 4)):
        curves = json.loads((tmp_path / f"{name}_curves.json").read_text())  # for docs/make_figures.py
        assert [step for step, _ in curves["train_loss"]] == list(range(1, steps + 1))
        assert all(loss > 0 for _, loss in curves["train_loss"])
        assert [step for step, _ in curves["val_bleu"]] == [0, steps]
        assert all(0.0 <= bleu <= 1.0 for _, bleu in curves["val_bleu"]) and curves["val_sentences"] == 32
    # A saved teacher can be given back by path.
    again = run("distill_translator.py", "--high", "300", "--val-size", "32", "--test-size", "32", "--steps", "2",
                "--teacher", str(teacher), "--student-d-model", "16", "--layers", "1", "--output", str(tmp_path))
    assert "teacher (teacher.ckpt)" in again


def test_quantize_translator(tmp_path):
    out = run(
        "quantize_translator.py", "--high", "300", "--val-size", "32", "--test-size", "32", "--steps", "6",
        "--qat-steps", "3", "--layers", "1", "--output", str(tmp_path),
    )
    rows = re.findall(r"^\| (fp32|PTQ 8da4w|QAT 8da4w)[^|]*\|\s+(\S+) \|\s+(\S+) \|\s+\d+ KiB \((\S+)x\)", out, re.M)
    assert [row[0] for row in rows] == ["fp32", "PTQ 8da4w", "QAT 8da4w"], out
    assert float(rows[0][3]) == 1.0 and float(rows[1][3]) <= 0.35 and float(rows[2][3]) <= 0.35
    assert all(0.0 <= float(row[1]) <= 1.0 and float(row[2]) >= 1.0 for row in rows)
    assert (tmp_path / "qat_8da4w.pt").exists() and (tmp_path / "fp32.ckpt").exists()
    saved = json.loads((tmp_path / "results.json").read_text())  # the table, for docs/make_figures.py
    assert [row["model"] for row in saved["rows"]] == ["fp32", "PTQ 8da4w", "QAT 8da4w, 3 steps"]
    assert all(abs(row["test_bleu"] - float(printed[1])) <= 5e-5 for row, printed in zip(saved["rows"], rows, strict=True))


def test_adversarial_translator(tmp_path):
    out = run(
        "adversarial_translator.py", "--high", "300", "--val-size", "32", "--test-size", "32", "--steps", "6",
        "--timing-steps", "2", "--layers", "1", "--methods", "fgm", "pgd", "--output", str(tmp_path),
    )
    rows = re.findall(r"^\| (plain|fgm|fgsm|pgd-3|freelb-3) +\|(.*)\|\s+(\S+) \|\s+(\S+)x \|$", out, re.M)
    assert [row[0] for row in rows] == ["plain", "fgm", "fgsm", "pgd-3", "freelb-3"], out
    for name, cells, ms, ratio in rows:
        bleu, clean, robust = (cell.strip() for cell in cells.split("|"))
        if name in ("plain", "fgm", "pgd-3"):
            assert 0.0 <= float(bleu) <= 1.0 and 0.0 <= float(robust) <= float(clean) <= 1.0
        else:
            assert bleu == clean == robust == "-"
        assert float(ms) > 0 and float(ratio) > 0
    assert re.search(r"^fgm: PGD-10 token accuracy [+-]\d", out, re.M) and re.search(r"^pgd: PGD-10", out, re.M)
    assert {"plain.ckpt", "fgm.ckpt", "pgd.ckpt"} <= {path.name for path in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "results.json").read_text())  # for docs/make_figures.py
    assert saved["checkpoints"] == {"plain": "plain.ckpt", "fgm": "fgm.ckpt", "pgd": "pgd.ckpt"}
    assert saved["data"] == {"high": 300, "val_size": 32, "test_size": 32, "seed": 0}
    for name, cells, _, _ in (row for row in rows if row[0] in ("plain", "fgm", "pgd-3")):
        bleu, _, robust = map(float, cells.split("|"))
        scores = saved["scores"][name.split("-")[0]]
        assert abs(scores["test_bleu"] - bleu) <= 5e-5 and abs(scores["robust_acc"] - robust) <= 5e-5


@pytest.mark.slow
def test_evaluate_translator(tmp_path):
    split = ("--high", "300", "--val-size", "32", "--test-size", "40")
    run("distill_translator.py", *split, "--teacher-steps", "40", "--steps", "20", "--teacher-d-model", "32",
        "--student-d-model", "16", "--layers", "1", "--output", str(tmp_path))
    run("quantize_translator.py", *split, "--model", str(tmp_path / "teacher.ckpt"), "--qat-steps", "2",
        "--output", str(tmp_path))
    out = run("evaluate_translator.py", *split, "--distill-dir", str(tmp_path), "--qat", str(tmp_path / "qat_8da4w.pt"),
              "--resamples", "200", "--trials", "500")
    interval = r"(\d\.\d{4}) ± (\d\.\d{4})"
    rows = re.findall(rf"^\| (teacher|student alone|student distilled|QAT 8da4w) +\| +{interval} +\| +{interval} +\| "
                      rf"+{interval} +\| +(\d\.\d{{4}}) +\|$", out, re.M)
    assert [row[0] for row in rows] == ["teacher", "student alone", "student distilled", "QAT 8da4w"], out
    for row in rows:
        bleu, _, chrf, _, _, _, rouge = map(float, row[1:])
        assert 0 <= bleu <= 1 and 0 <= chrf <= 1 and 0 <= rouge <= 1
    tests = re.findall(r"^\| (BLEU|chrF\+\+|TER) +\| +(\S+) \| +(\S+) \| +(\S+) \| +(\S+) \|$", out, re.M)
    assert [row[0] for row in tests] == ["BLEU", "chrF++", "TER"], out
    assert all(0 < float(p) <= 1 for row in tests for p in row[3:])
    assert re.search(r"^BLEU signature: nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:llmkit-", out, re.M)
    qa = re.findall(r"^\| (teacher|student alone|student distilled|QAT 8da4w) +\| +(\S+) \| +(\S+) \|$", out, re.M)
    assert len(qa) == 4 and all(0 <= float(em) <= float(f1) <= 1 for _, em, f1 in qa), out


def test_every_example_has_a_test():
    texts = [Path(__file__).read_text(), *(p.read_text() for p in Path(__file__).parent.glob("test_example_*.py"))]
    tested = {name for text in texts for name in re.findall(r'run\(\s*"([\w.]+)"', text)}
    assert {path.name for path in EXAMPLES.glob("*.py")} <= tested, "an example in examples/ is not run by a test"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_have_a_docstring(script):
    assert (EXAMPLES / script).read_text().lstrip().startswith('"""')


def test_compose_callbacks():
    out = run("compose_callbacks.py", "--teacher-steps", "10", "--steps", "4", "--d-model", "64", "--high", "300")
    rows = re.findall(r"^(kd, qat, adv|adv, qat, kd)\s+(\S+)\s+(\S+)\s+(\d+)$", out, re.M)
    assert len(rows) == 2 and rows[0][1:3] == rows[1][1:3], out
    assert all(left == "0" for *_, left in rows)
    assert float(re.search(r"largest loss difference between the two orders: (\S+)", out).group(1)) == 0.0
    assert float(re.search(r"after conversion: (\S+)x", out).group(1)) < 0.35


def test_train_lm(tmp_path):
    out = run(
        "train_lm.py", "--minutes", "0.05", "--student-steps", "4", "--qat-steps", "2", "--d-model", "32",
        "--layers", "1", "--vocab-size", "300", "--block-size", "32", "--eval-interval", "5", "--new-tokens", "8",
        "--output", str(tmp_path),
    )
    assert out.count("' -> '") == 3  # a sampled continuation per prompt
    rows = re.findall(r"^\| (.+?)\s+\|\s+([\d,]+) \|\s+(\S+) \|\s+(\d+) KiB \((\S+)x\) \|\s+(\S+) \|$", out, re.M)
    assert [row[0] for row in rows] == [
        "llmkit CausalLMTransformer", "nanoGPT recipe, same time", "student alone, 4 steps",
        "student distilled, 4 steps", "fp32, fine-tuned 2 steps", "QAT 8da4w, fine-tuned 2 steps",
    ], out
    assert all(1.0 < float(ppl) < 400.0 for _, _, ppl, *_ in rows)  # finite, about uniform (300) after so few steps
    assert float(rows[-1][4]) <= 0.35 and float(rows[-2][4]) == 1.0  # int4 linear weights, fp32 ones
    assert re.search(r"QAT 8da4w perplexity \S+% against fp32 fine-tuned alike", out)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "lm.ckpt").exists()
