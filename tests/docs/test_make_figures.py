"""docs/make_figures.py: its drawing functions on tiny synthetic inputs (the full pipeline runs the examples)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from llmkit import Seq2SeqTransformer

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "make_figures.py"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("make_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG
    assert path.stat().st_size < 150 * 1024


def test_plot_distillation(figures, tmp_path):
    def curve(scale: float, steps: int) -> dict:
        return {"train_loss": [[s, scale * math.exp(-s / 50) + 0.05] for s in range(1, steps + 1)],
                "val_bleu": [[s, 1 - math.exp(-s / (60 * scale))] for s in range(0, steps + 1, 25)],
                "params": int(1e5 * scale), "val_sentences": 128}

    curves = {"teacher": curve(4.0, 120), "student_alone": curve(3.0, 50), "student_distilled": curve(2.0, 50)}
    check_png(figures.plot_distillation(curves, tmp_path / "curves.png"))


def test_plot_robustness(figures, tmp_path):
    epsilons = [0.0, 0.5, 1.0, 2.0]
    accuracies = {"plain": [0.99, 0.7, 0.4, 0.1], "fgm": [0.98, 0.9, 0.8, 0.5]}
    check_png(figures.plot_robustness(epsilons, accuracies, tmp_path / "robust.png", train_epsilon=1.0,
                                      sentences=500))


def test_plot_quantization(figures, tmp_path):
    rows = [{"model": "fp32", "test_bleu": 0.98, "test_ppl": 1.2, "weight_bytes": 400_000, "fp32_weight_bytes": 400_000},
            {"model": "PTQ 8da4w", "test_bleu": 0.91, "test_ppl": 1.5, "weight_bytes": 116_000,
             "fp32_weight_bytes": 400_000},
            {"model": "QAT 8da4w, 100 steps", "test_bleu": 0.97, "test_ppl": 1.25, "weight_bytes": 116_000,
             "fp32_weight_bytes": 400_000}]
    check_png(figures.plot_quantization(rows, tmp_path / "quantization.png"))


def test_copy_vae_grids(figures, tmp_path):
    import matplotlib.pyplot as plt

    source = tmp_path / "vae_digits"
    source.mkdir()
    for name in figures.VAE_GRIDS:
        plt.imsave(source / f"{name}.png", torch.rand(8, 8).numpy(), cmap="gray_r")
    written = figures.copy_vae_grids(source, tmp_path / "assets")
    assert [path.name for path in written] == [f"vae_{name}.png" for name in figures.VAE_GRIDS]
    for path in written:
        check_png(path)


def test_robust_accuracy(figures):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(12, 12, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                               dim_feedforward=32, max_len=16)
    tgt = torch.cat([torch.ones(4, 1, dtype=torch.long), torch.randint(3, 12, (4, 5)), torch.full((4, 1), 2)], 1)
    batch = {"src": torch.randint(3, 12, (4, 6)), "tgt": tgt}
    accuracies = figures.robust_accuracy(model, [batch, batch], [0.0, 0.5, 4.0], steps=2)
    assert len(accuracies) == 3 and all(0.0 <= value <= 1.0 for value in accuracies)
    assert not model.training
    with pytest.raises(ValueError, match="at least one > 0"):
        figures.robust_accuracy(model, [batch], [0.0])


def test_ensure_outputs_runs_what_is_missing_in_the_demo_chain(figures, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(figures, "run_example", lambda script, *args: ran.append(script))
    figures.ensure_outputs(tmp_path)
    assert ran == ["distill_translator.py", "quantize_translator.py", "adversarial_translator.py", "vae_digits.py"]

    for folder, names in {
        "distill_translator": ["teacher.ckpt", *(f"{name}_curves.json" for name in figures.STUDENTS)],
        "quantize_translator": ["results.json"],
        "adversarial_translator": ["results.json"],
        "vae_digits": [f"{name}.png" for name in figures.VAE_GRIDS],
    }.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_text(json.dumps({}))
    ran.clear()
    figures.ensure_outputs(tmp_path)
    assert ran == []
    (tmp_path / "quantize_translator" / "results.json").unlink()
    figures.ensure_outputs(tmp_path)
    assert ran == ["quantize_translator.py"]
    ran.clear()
    figures.ensure_outputs(tmp_path, rerun=True)
    assert len(ran) == 4
