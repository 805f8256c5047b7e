"""Train the VAE on scikit-learn's bundled 8x8 handwritten digits, then look at what it learned.

The test split is scored (importance-weighted negative log-likelihood and ELBO, nats per image)
and four PNG grids are written: new samples, test digits beside their reconstructions, noisy test
digits beside the denoised ones, and walks through the latent space between pairs of digits.
Needs the ``plot`` extra (matplotlib) for the pictures.

    python examples/vae_digits.py                  # the full run (under a minute on 2 cores)
    python examples/vae_digits.py --epochs 2       # a smoke test
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from llmkit import VAE
from llmkit.data import DigitsDataModule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[400, 400])
    parser.add_argument("--architecture", choices=("mlp", "conv"), default="mlp")
    parser.add_argument("--kl-warmup-steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--noise", type=float, default=0.3, help="std of the Gaussian noise to denoise")
    parser.add_argument("--nll-samples", type=int, default=500, help="importance samples for the test NLL")
    parser.add_argument("--output", type=Path, default=Path("outputs/vae_digits"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def save_grid(rows: list[tuple[str, Tensor]], path: Path, title: str) -> None:
    """One row of 8x8 images per ``(label, images [N, 64 or 1x8x8])``, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for _, images in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.8, len(rows) * 0.9 + 0.4), squeeze=False)
    for row, (label, images) in enumerate(rows):
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(images):
                axis.imshow(images[column].reshape(8, 8).cpu(), cmap="gray_r", vmin=0.0, vmax=1.0)
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(batch_size=args.batch_size, flatten=args.architecture == "mlp", seed=args.seed)
    model = VAE(
        input_shape=data.input_shape,
        latent_dim=args.latent_dim,
        hidden_dims=args.hidden_dims,
        architecture=args.architecture,
        kl_warmup_steps=args.kl_warmup_steps,
        lr=args.lr,
        test_nll_samples=args.nll_samples,
    )
    checkpoint = ModelCheckpoint(
        dirpath=args.output, filename="vae", monitor="val_elbo", mode="max", enable_version_counter=False
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=args.epochs, callbacks=[checkpoint], logger=False, enable_model_summary=False
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    minutes = (time.perf_counter() - start) / 60
    active = int(trainer.callback_metrics["val_active_units"])
    model = VAE.load_from_checkpoint(checkpoint.best_model_path)
    (scores,) = trainer.test(model, datamodule=data, verbose=False)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"\ndigits, {len(data.split('train'))} training images, {parameters / 1e3:.0f} K parameters, "
          f"{args.epochs} epochs in {minutes:.1f} min")
    print(f"test NLL {scores['test_nll']:.2f} nats (importance-weighted, {args.nll_samples} samples)  "
          f"ELBO {scores['test_elbo']:.2f}  active latents {active}"
          f" of {args.latent_dim}")

    torch.manual_seed(args.seed)
    test = data.split("test").tensors[0]
    clean = test[:12]
    noisy = (clean + args.noise * torch.randn_like(clean)).clamp(0, 1)
    denoised = model.denoise(noisy)
    error = {name: F.mse_loss(images, clean).item() for name, images in (("noisy", noisy), ("denoised", denoised))}
    print(f"denoising (noise std {args.noise}): mean squared error {error['noisy']:.4f} noisy -> "
          f"{error['denoised']:.4f} denoised")

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install 'llmkit[plot]'): no pictures")
        return
    args.output.mkdir(parents=True, exist_ok=True)
    samples = model.sample(48)
    save_grid([(f"{i + 1}", samples[i * 12 : (i + 1) * 12]) for i in range(4)], args.output / "samples.png",
              "New digits: means of p(x | z), z ~ N(0, I)")
    save_grid([("test", clean), ("reconstructed", model.reconstruct(clean))], args.output / "reconstructions.png",
              "Test digits and their reconstructions")
    save_grid([("clean", clean), ("noisy", noisy), ("denoised", denoised)], args.output / "denoising.png",
              f"Denoising: Gaussian noise (std {args.noise}) in, the VAE's reconstruction out")
    walks = model.interpolate(test[0:4], test[4:8], steps=10)
    save_grid([(f"{i + 1}", walk) for i, walk in enumerate(walks)], args.output / "interpolation.png",
              "Walks through the latent space between two test digits")
    print(f"pictures: {', '.join(sorted(p.name for p in args.output.glob('*.png')))} in {args.output}")
    print(f"checkpoint: {checkpoint.best_model_path}")


if __name__ == "__main__":
    main()
