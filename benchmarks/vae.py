"""llmkit's VAE beside the pytorch/examples VAE recipe on the bundled 8x8 digits, in one process.

The recipe (github.com/pytorch/examples, ``vae/main.py``) is written out plainly below, sized
for 64 pixels: ``64 -> 400 -> 20`` latents ``-> 400 -> 64``, ReLU, Bernoulli likelihood (binary
cross-entropy on grey levels), Adam at 1e-3, batch 128, a bare training loop.

1. Test NLL: the importance-weighted estimate of ``-log p(x)`` with 500 samples (Burda et al.),
   nats per image, after the same number of epochs: the recipe, llmkit's VAE with the same
   network, loss and optimizer (``llmkit, recipe``), and llmkit's VAE as this table recommends
   (``llmkit, tuned``: the settings below). Mean and spread over seeds.
2. Lightning overhead: epoch time of ``Trainer.fit`` on llmkit's VAE against the plain loop on
   the same network, batch size and DataLoader: with no progress bar, with one refreshed every
   10 steps (the recipe prints every 10 batches) and with Lightning's default (every step); and,
   for reference, ``Trainer.fit`` on the recipe's own model and loss in the barest LightningModule
   (Lightning's overhead alone).

    python benchmarks/vae.py [--epochs 100] [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from _timing import EpochTimer
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import Tensor, nn
from torch.utils.data import DataLoader

from llmkit import VAE
from llmkit.data import DigitsDataModule

WIDTH, LATENT, LR, BATCH = 400, 20, 1e-3, 128
# llmkit's recommended settings for this data (see the README's VAE section).
TUNED: dict[str, Any] = {"hidden_dims": (WIDTH, WIDTH), "kl_warmup_steps": 500, "lr": 2e-3}


class RecipeVAE(nn.Module):
    """pytorch/examples' VAE, with 64 pixels in and out."""

    def __init__(self, pixels: int = 64, width: int = WIDTH, latent: int = LATENT) -> None:
        super().__init__()
        self.fc1 = nn.Linear(pixels, width)
        self.fc21 = nn.Linear(width, latent)
        self.fc22 = nn.Linear(width, latent)
        self.fc3 = nn.Linear(latent, width)
        self.fc4 = nn.Linear(width, pixels)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``mu``, ``logvar``."""
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """``mu + eps * std``."""
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode_logits(self, z: Tensor) -> Tensor:
        """The decoder before its sigmoid."""
        return self.fc4(F.relu(self.fc3(z)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pixel probabilities, ``mu``, ``logvar``."""
        mu, logvar = self.encode(x.view(-1, 64))
        z = self.reparameterize(mu, logvar)
        return torch.sigmoid(self.decode_logits(z)), mu, logvar


def recipe_loss(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """pytorch/examples' loss: reconstruction + KL divergence, summed over the batch."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 64), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


@torch.no_grad()
def recipe_log_likelihood(model: RecipeVAE, x: Tensor, num_samples: int) -> Tensor:
    """The importance-weighted ``log p(x)`` estimate, written plainly: ``[B]`` nats."""
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(num_samples, *mu.shape)  # (K, B, L)
    log_px = -F.binary_cross_entropy_with_logits(model.decode_logits(z), x.expand(num_samples, -1, -1),
                                                 reduction="none").sum(-1)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    return torch.logsumexp(log_px + log_pz - log_qz, dim=0) - math.log(num_samples)


def train_recipe(loader: DataLoader, epochs: int, seed: int) -> tuple[RecipeVAE, list[float]]:
    """The recipe's training loop; returns the model and each epoch's seconds."""
    torch.manual_seed(seed)
    model = RecipeVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    epoch_times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, _ in loader:
            optimizer.zero_grad()
            recon, mu, logvar = model(x)
            loss = recipe_loss(recon, x, mu, logvar)
            loss.backward()
            optimizer.step()
        epoch_times.append(time.perf_counter() - start)
    return model, epoch_times


class BareRecipe(L.LightningModule):
    """The recipe's own model and loss in the barest LightningModule: Lightning's overhead alone."""

    def __init__(self) -> None:
        super().__init__()
        self.model = RecipeVAE()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The recipe's loss, summed over the batch."""
        x, _ = batch
        recon, mu, logvar = self.model(x)
        return recipe_loss(recon, x, mu, logvar)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam at the recipe's rate."""
        return torch.optim.Adam(self.parameters(), lr=LR)


def train_llmkit(
    data: DigitsDataModule, epochs: int, seed: int, refresh_rate: int = 0, bare: bool = False, **kwargs: Any
) -> tuple[L.LightningModule, list[float]]:
    """``Trainer.fit`` on llmkit's VAE (or, ``bare``, on :class:`BareRecipe`); no logger, no checkpoints.

    The progress bar is refreshed every ``refresh_rate`` steps (0: no bar).
    """
    L.seed_everything(seed, verbose=False)
    model = BareRecipe() if bare else VAE(
        **{"input_shape": (64,), "latent_dim": LATENT, "hidden_dims": (WIDTH,), "lr": LR, **kwargs}
    )
    timer = EpochTimer()
    callbacks: list[L.Callback] = [timer]
    if refresh_rate:
        callbacks.append(TQDMProgressBar(refresh_rate=refresh_rate))
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        enable_progress_bar=bool(refresh_rate),
    )
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    return model, timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=500, help="importance samples for the test NLL")
    parser.add_argument("--quick", action="store_true", help="10 epochs, 1 seed")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds = 10, 1
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    data = DigitsDataModule(batch_size=BATCH)
    data.setup()
    test_x = data.split("test").tensors[0]

    nll: dict[str, list[float]] = {"recipe": [], "llmkit, recipe": [], "llmkit, tuned": []}
    times: dict[str, list[float]] = {"recipe": [], "bare": [], "no bar": [], "bar every 10": [], "bar every step": []}
    for seed in range(args.seeds):
        recipe, recipe_times = train_recipe(data.train_dataloader(), args.epochs, seed)
        torch.manual_seed(1000 + seed)
        nll["recipe"].append(-recipe_log_likelihood(recipe, test_x, args.samples).mean().item())
        times["recipe"] += recipe_times[1:]  # the first epoch warms up
        for name, kwargs in (("llmkit, recipe", {}), ("llmkit, tuned", TUNED)):
            model, _ = train_llmkit(data, args.epochs, seed, **kwargs)
            torch.manual_seed(1000 + seed)
            assert isinstance(model, VAE)
            nll[name].append(-model.log_likelihood(test_x, num_samples=args.samples).mean().item())
        times["bare"] += train_llmkit(data, args.epochs, seed, bare=True)[1][1:]
        for name, refresh in (("no bar", 0), ("bar every 10", 10), ("bar every step", 1)):
            times[name] += train_llmkit(data, args.epochs, seed, refresh_rate=refresh)[1][1:]

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):6.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:4.2f}"

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; digits: {len(data.split('train'))} train, "
          f"{len(test_x)} test images; {args.epochs} epochs, batch {BATCH}, {args.seeds} seed(s)\n")
    tuned = "llmkit VAE, " + ", ".join(f"{k}={v}" for k, v in TUNED.items())
    width = len(tuned)
    print(f"| {'model':<{width}} | {'test NLL (IW-' + str(args.samples) + '), nats':>24} |")
    print(f"|{'-' * (width + 2)}|{'-' * 26}|")
    print(f"| {'pytorch/examples recipe (64-400-20)':<{width}} | {spread(nll['recipe']):>24} |")
    print(f"| {'llmkit VAE, the recipe settings':<{width}} | {spread(nll['llmkit, recipe']):>24} |")
    print(f"| {tuned:<{width}} | {spread(nll['llmkit, tuned']):>24} |")
    plain = statistics.median(times["recipe"])
    print(f"\n| {'epoch time (median), batch ' + str(BATCH):<40} | {'seconds':>10} | {'ratio':>7} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 9}|")
    print(f"| {'plain loop (the recipe)':<40} | {plain:10.4f} | {1.0:6.2f}x |")
    bare = statistics.median(times["bare"])
    print(f"| {'Trainer.fit, the recipe bare, no bar':<40} | {bare:10.4f} | {bare / plain:6.2f}x |")
    for name in ("no bar", "bar every 10", "bar every step"):
        ours = statistics.median(times[name])
        print(f"| {'Trainer.fit, llmkit VAE, ' + name:<40} | {ours:10.4f} | {ours / plain:6.2f}x |")

if __name__ == "__main__":
    main()
