"""Make the documentation's pictures, ``docs/assets/*.png``, from the examples' outputs.

    python docs/make_figures.py            # after `make install`; runs the examples whose outputs are missing
    python docs/make_figures.py --rerun    # run every example again first (after a change to the results)

It reads ``outputs/`` as ``make demo`` and ``make vae-demo`` leave it, and runs what is missing
there first, at the examples' default settings and in ``make demo``'s chain (the distillation
example's teacher is the fp32 model of the quantization example and the plain model of the
adversarial one). On a fresh clone that is about 5 minutes on 2 CPU cores; with the outputs
present, about 30 seconds (the attacks of the robustness figure). The pictures:

- ``vae_samples.png``, ``vae_reconstructions.png``, ``vae_denoising.png``, ``vae_interpolation.png``:
  the grids of ``examples/vae_digits.py``, copied.
- ``distillation_curves.png``: training loss and validation BLEU against step of the teacher, the
  student trained alone and the distilled student (``examples/distill_translator.py``'s
  ``*_curves.json``).
- ``robustness.png``: teacher-forced token accuracy under a PGD attack (the margin objective, on
  the embeddings, l2) against epsilon, for the plainly and the adversarially trained translators of
  ``examples/adversarial_translator.py`` (their checkpoints; attacked here with
  :func:`llmkit.adversarial.attack` on the test set).
- ``quantization.png``: test BLEU and linear-weight bytes of fp32, PTQ and QAT
  (``examples/quantize_translator.py``'s ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
VAE_GRIDS = ("samples", "reconstructions", "denoising", "interpolation")
STUDENTS = ("teacher", "student_alone", "student_distilled")
LABELS = {"teacher": "teacher", "student_alone": "student alone", "student_distilled": "student distilled"}
COLORS = {"teacher": "0.35", "student_alone": "tab:orange", "student_distilled": "tab:blue", "plain": "0.35"}
METHOD_NAMES = {"plain": "plain training", "fgm": "FGM", "fgsm": "FGSM", "pgd": "PGD", "freelb": "FreeLB"}
DPI = 100


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=Path, default=REPO / "outputs", help="the examples' output folders")
    parser.add_argument("--assets", type=Path, default=REPO / "docs" / "assets", help="where the PNGs go")
    parser.add_argument("--rerun", action="store_true", help="run every example again, even with its outputs there")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0, 4.0],
                        help="attack radii of the robustness figure (0: no attack)")
    parser.add_argument("--attack-steps", type=int, default=None,
                        help="PGD steps of the robustness figure (default: the adversarial example's)")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------
# The examples' outputs


def run_example(script: str, *args: str) -> None:
    """Run ``examples/<script>`` with this interpreter, from the repository's root."""
    print(f"\n$ python examples/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(REPO / "examples" / script), *args], cwd=REPO, check=True)


def ensure_outputs(outputs: Path, rerun: bool = False) -> None:
    """Run the examples whose outputs are missing (all with ``rerun``), as ``make demo`` chains them."""
    distill, quantize, adversarial, vae = (outputs / name for name in (
        "distill_translator", "quantize_translator", "adversarial_translator", "vae_digits"))
    teacher = distill / "teacher.ckpt"
    new_teacher = rerun or not teacher.exists() or any(
        not (distill / f"{name}_curves.json").exists() for name in STUDENTS)
    if new_teacher:
        run_example("distill_translator.py", "--output", str(distill))
    # The other two start from the teacher: a new one makes their results stale.
    if new_teacher or not (quantize / "results.json").exists():
        run_example("quantize_translator.py", "--model", str(teacher), "--output", str(quantize))
    if new_teacher or not (adversarial / "results.json").exists():
        run_example("adversarial_translator.py", "--plain", str(teacher), "--output", str(adversarial))
    if rerun or any(not (vae / f"{name}.png").exists() for name in VAE_GRIDS):
        run_example("vae_digits.py", "--output", str(vae))


def read_json(path: Path) -> Any:
    """The JSON in ``path``."""
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Measuring


def robust_accuracy(
    model: nn.Module, batches: Iterable[Any], epsilons: Sequence[float], *, steps: int = 10, ignore_index: int = 0,
) -> list[float]:
    """Teacher-forced token accuracy under a PGD attack at each epsilon (``0``: no attack), in eval mode.

    The attack is :func:`llmkit.adversarial.attack`'s PGD on the embeddings, l2 per sample, maximising
    the number of wrong tokens (``objective="margin"``), as ``RobustnessEvaluation`` measures it.
    """
    from llmkit.adversarial import attack

    if not any(epsilon > 0 for epsilon in epsilons) or any(epsilon < 0 for epsilon in epsilons):
        raise ValueError(f"`epsilons` must be >= 0 with at least one > 0, got {list(epsilons)}")
    model.eval()
    correct = [0] * len(epsilons)
    counted = [0] * len(epsilons)
    for batch in batches:
        clean: tuple[torch.Tensor, torch.Tensor] | None = None
        for index, epsilon in enumerate(epsilons):
            if epsilon == 0:
                continue
            result = attack(model, batch, method="pgd", epsilon=epsilon, steps=steps, norm="l2", objective="margin",
                            ignore_index=ignore_index)
            right, total = result.accuracy(batch, ignore_index=ignore_index)
            correct[index] += int(right)
            counted[index] += int(total)
            if clean is None:
                clean = result.accuracy(batch, ignore_index=ignore_index, clean=True)
        assert clean is not None
        for index, epsilon in enumerate(epsilons):
            if epsilon == 0:
                correct[index] += int(clean[0])
                counted[index] += int(clean[1])
    return [right / max(total, 1) for right, total in zip(correct, counted, strict=True)]


def robustness_from_outputs(
    adversarial: Path, epsilons: Sequence[float], steps: int | None = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Attack every checkpoint that ``examples/adversarial_translator.py`` recorded, on its test split."""
    from llmkit import Seq2SeqTransformer
    from llmkit.data import NumberWordsDataModule

    results = read_json(adversarial / "results.json")
    data = NumberWordsDataModule(**results["data"])
    batches = list(data.test_dataloader())
    curves = {}
    for name, relative in results["checkpoints"].items():
        model = Seq2SeqTransformer.load_from_checkpoint(adversarial / relative, map_location="cpu", weights_only=True)
        curves[name] = robust_accuracy(model, batches, epsilons, steps=steps or results["attack_steps"],
                                       ignore_index=data.pad_id)
    return curves, results


# ---------------------------------------------------------------------------------------------
# Drawing


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def _moving_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_distillation(curves: Mapping[str, Mapping[str, Any]], path: Path, smooth: int = 10) -> Path:
    """Training loss and validation BLEU against step, one line per model.

    Args:
        curves: ``{name: {"train_loss": [[step, loss], ...], "val_bleu": [[step, bleu], ...]}}`` (and
            optionally ``"params"`` and ``"val_sentences"``), as ``examples/distill_translator.py``
            writes them to ``<name>_curves.json``; names ``teacher``, ``student_alone``, ``student_distilled``.
        path: the PNG to write.
        smooth: the training loss is drawn as a moving mean over this many steps.
    """
    figure, (loss_axis, bleu_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, curve in curves.items():
        label = LABELS.get(name, name)
        if "params" in curve:
            label += f" ({curve['params'] / 1e3:.0f}K params)"
        color = COLORS.get(name)
        if curve["train_loss"]:
            steps, losses = zip(*curve["train_loss"], strict=True)
            loss_axis.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
            loss_axis.plot(steps, _moving_mean(losses, smooth), color=color, label=label, linewidth=1.6)
        if curve["val_bleu"]:
            steps, bleus = zip(*curve["val_bleu"], strict=True)
            bleu_axis.plot(steps, bleus, color=color, label=label, marker="o", markersize=3, linewidth=1.6)
    loss_axis.set(yscale="log", xlabel="training step", ylabel="training cross-entropy (nats/token)",
                  title=f"Training loss (the model's own; {smooth}-step mean)")
    sentences = next((curve["val_sentences"] for curve in curves.values() if "val_sentences" in curve), None)
    on = f"{sentences} validation sentences" if sentences else "validation sentences"
    bleu_axis.set(xlabel="training step", ylabel="BLEU (greedy)", ylim=(0, 1.02), title=f"BLEU on {on}")
    loss_axis.legend(fontsize=8, loc="upper right")
    bleu_axis.legend(fontsize=8, loc="lower right")
    for axis in (loss_axis, bleu_axis):
        axis.grid(alpha=0.3)
    figure.suptitle("Knowledge distillation of the en->fr number translator")
    figure.tight_layout()
    return _save(figure, path)


def plot_robustness(
    epsilons: Sequence[float], accuracies: Mapping[str, Sequence[float]], path: Path, *,
    train_epsilon: float | None = None, attack_steps: int = 10, sentences: int | None = None,
) -> Path:
    """Token accuracy under attack against epsilon, one line per training method.

    Args:
        epsilons: attack radii (0: no attack).
        accuracies: ``{method: [accuracy at each epsilon]}``; ``"plain"`` is plain training.
        path: the PNG to write.
        train_epsilon: the adversarial training's radius, marked with a dotted line.
        attack_steps: PGD steps, for the title.
        sentences: test sentences attacked, for the title.
    """
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name, values in accuracies.items():
        label = METHOD_NAMES.get(name, name)
        if name != "plain":
            label += " adversarial training" + (f" (ε = {train_epsilon:g})" if train_epsilon else "")
        axis.plot(epsilons, values, marker="o", label=label, color=COLORS.get(name), linewidth=1.8)
    if train_epsilon:
        axis.axvline(train_epsilon, color="0.6", linestyle=":", linewidth=1)
    axis.set(xlabel="attack radius ε (l2 per sentence pair, on the embeddings)",
             ylabel="token accuracy under attack", ylim=(0, 1.02))
    on = f" on {sentences} test sentences" if sentences else ""
    axis.set_title(f"PGD-{attack_steps} attack (margin objective){on}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def plot_quantization(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str | None = None) -> Path:
    """Test BLEU, test cross-entropy and linear-weight bytes of each model, as bars.

    Args:
        rows: ``[{"model", "test_bleu", "test_ppl", "weight_bytes", "fp32_weight_bytes"}, ...]``, as
            ``examples/quantize_translator.py`` writes them to ``results.json``.
        path: the PNG to write.
        title: the figure's title.
    """
    names = [row["model"].replace(", ", ",\n") for row in rows]
    colors = ["0.45", "tab:orange", "tab:blue", "tab:green", "tab:purple"][: len(rows)]
    figure, (bleu_axis, loss_axis, size_axis) = plt.subplots(1, 3, figsize=(11, 3.8))
    bars = bleu_axis.bar(names, [row["test_bleu"] for row in rows], color=colors)
    bleu_axis.bar_label(bars, fmt="%.4f", fontsize=8)
    bleu_axis.set(ylabel="test BLEU (greedy)", ylim=(0, 1.12), title="BLEU (higher is better)")
    # Perplexities near 1 differ in the fourth decimal: their logarithms, the cross-entropy, show it.
    losses = [math.log(row["test_ppl"]) for row in rows]
    bars = loss_axis.bar(names, losses, color=colors)
    loss_axis.bar_label(bars, labels=[f"{loss:.2g}" for loss in losses], fontsize=8)
    loss_axis.set(ylabel="test cross-entropy (nats/token)", ylim=(0, max(max(losses), 1e-9) * 1.15),
                  title="ln(perplexity) (lower is better)")
    kib = [row["weight_bytes"] / 1024 for row in rows]
    bars = size_axis.bar(names, kib, color=colors)
    ratios = [row["weight_bytes"] / row["fp32_weight_bytes"] for row in rows]
    size_axis.bar_label(bars, labels=[f"{k:.0f} KiB\n({r:.2f}x)" for k, r in zip(kib, ratios, strict=True)],
                        fontsize=8)
    size_axis.set(ylabel="linear layers' weights (KiB)", ylim=(0, max(kib) * 1.25), title="Size")
    for axis in (bleu_axis, loss_axis, size_axis):
        axis.grid(axis="y", alpha=0.3)
        axis.tick_params(axis="x", labelsize=8)
    figure.suptitle(title or "fp32, post-training quantization and quantization-aware training")
    figure.tight_layout()
    return _save(figure, path)


def copy_vae_grids(source: Path, assets: Path) -> list[Path]:
    """``examples/vae_digits.py``'s four grids, as ``vae_<name>.png``."""
    assets.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(source / f"{name}.png", assets / f"vae_{name}.png")) for name in VAE_GRIDS]


# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Run what is missing, then draw every picture and print its size and key numbers."""
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    start = time.perf_counter()
    ensure_outputs(args.outputs, args.rerun)
    print("\ndrawing", flush=True)
    written = copy_vae_grids(args.outputs / "vae_digits", args.assets)

    distill = args.outputs / "distill_translator"
    curves = {name: read_json(distill / f"{name}_curves.json") for name in STUDENTS}
    written.append(plot_distillation(curves, args.assets / "distillation_curves.png"))

    accuracies, results = robustness_from_outputs(args.outputs / "adversarial_translator", args.epsilons,
                                                  args.attack_steps)
    steps = args.attack_steps or results["attack_steps"]
    written.append(plot_robustness(args.epsilons, accuracies, args.assets / "robustness.png",
                                   train_epsilon=results["epsilon"], attack_steps=steps,
                                   sentences=results["data"]["test_size"]))

    quantized = read_json(args.outputs / "quantize_translator" / "results.json")
    written.append(plot_quantization(
        quantized["rows"], args.assets / "quantization.png",
        title=f"{quantized['scheme']} (groups of {quantized['group_size']}): post-training quantization vs "
              f"{quantized['qat_steps']} steps of QAT, {quantized['test_size']} test sentences"))

    print(f"\n{len(written)} pictures in {time.perf_counter() - start:.0f} s:")
    for path in written:
        print(f"  {path.relative_to(REPO) if path.is_relative_to(REPO) else path}  {path.stat().st_size / 1024:.0f} KB")
    print("\nfinal validation BLEU: " + ", ".join(
        f"{LABELS[name]} {curve['val_bleu'][-1][1]:.4f}" for name, curve in curves.items() if curve["val_bleu"]))
    print(f"token accuracy under PGD-{steps} at epsilon {', '.join(f'{e:g}' for e in args.epsilons)}:")
    for name, values in accuracies.items():
        print(f"  {name:<8} " + "  ".join(f"{value:.4f}" for value in values))
    print("test BLEU: " + ", ".join(f"{row['model']} {row['test_bleu']:.4f}" for row in quantized["rows"]))


if __name__ == "__main__":
    main()
