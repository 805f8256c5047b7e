"""VAE against its oracles.

- the KL term against ``torch.distributions.kl_divergence``; the Gaussian likelihood against
  ``torch.distributions.Normal``;
- the pytorch/examples VAE recipe, written plainly here, with its weights copied: the same loss;
- the importance-weighted ``log p(x)`` against a plain one-chunk computation on the same draws,
  and above the one-sample ELBO on average;
- KL warm-up and free bits against their closed forms;
- Lightning: a fit on the real digits improves the ELBO and logs what it promises; reconstruct,
  denoise, sample, interpolate; checkpoint round trip; two processes (``ddp_spawn``);
- bad input: each a clear error.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from llmkit import VAE
from llmkit.data import DigitsDataModule
from llmkit.models.vae import gaussian_kl
from tests.accelerator import accelerator_for


def digits_batch(n: int = 32, flat: bool = True) -> Tensor:
    data = DigitsDataModule(flatten=flat)
    return data.split("train").tensors[0][:n]


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        # Several processes (ddp_spawn, gloo) on CPU; one on the tests' accelerator.
        accelerator=accelerator_for(kwargs.get("devices", 1), kwargs.get("num_nodes", 1)), devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------
# 1. The terms of the ELBO


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(6, 5), torch.randn(6, 5)
    q = Normal(mu, torch.exp(0.5 * logvar))
    expected = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_gaussian_log_prob_matches_torch_distributions(scale):
    torch.manual_seed(0)
    vae = VAE(input_shape=(1, 4, 4), latent_dim=3, hidden_dims=(8,), likelihood="gaussian", gaussian_scale=scale)
    if scale is None:
        with torch.no_grad():
            vae.log_scale.fill_(-0.7)  # a learned value
        scale = math.exp(-0.7)
        assert vae.log_scale.requires_grad
    params, x = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    expected = Normal(params, scale).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(vae.log_prob(params, x), expected)


def test_bernoulli_log_prob_is_minus_binary_cross_entropy():
    vae = VAE(input_shape=(8,), latent_dim=2, hidden_dims=(4,))
    logits, x = torch.randn(3, 8), torch.rand(3, 8)
    expected = -F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").sum(1)
    torch.testing.assert_close(vae.log_prob(logits, x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. The pytorch/examples recipe, weights copied


class RecipeVAE(nn.Module):
    """pytorch/examples' ``vae/main.py`` model, with ``pixels`` in and out."""

    def __init__(self, pixels: int, width: int, latent: int) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(pixels, width), nn.Linear(width, latent), nn.Linear(width, latent)
        self.fc3, self.fc4 = nn.Linear(latent, width), nn.Linear(width, pixels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h1 = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(logvar) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def recipe_loss(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    bce = F.binary_cross_entropy(recon_x, x, reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def copy_recipe_weights(recipe: RecipeVAE, vae: VAE) -> None:
    with torch.no_grad():
        vae.encoder.body[1].weight.copy_(recipe.fc1.weight)
        vae.encoder.body[1].bias.copy_(recipe.fc1.bias)
        vae.encoder.head.weight.copy_(torch.cat([recipe.fc21.weight, recipe.fc22.weight]))
        vae.encoder.head.bias.copy_(torch.cat([recipe.fc21.bias, recipe.fc22.bias]))
        vae.decoder.net[0].weight.copy_(recipe.fc3.weight)
        vae.decoder.net[0].bias.copy_(recipe.fc3.bias)
        vae.decoder.net[2].weight.copy_(recipe.fc4.weight)
        vae.decoder.net[2].bias.copy_(recipe.fc4.bias)


def test_loss_and_gradients_equal_the_pytorch_examples_recipe():
    torch.manual_seed(0)
    recipe = RecipeVAE(64, 40, 6)
    vae = VAE(input_shape=(64,), latent_dim=6, hidden_dims=(40,))
    copy_recipe_weights(recipe, vae)
    x = digits_batch(16)
    torch.manual_seed(1)
    recon, mu, logvar = recipe(x)
    expected = recipe_loss(recon, x, mu, logvar) / len(x)  # the recipe sums over the batch
    torch.manual_seed(1)
    terms = vae.loss_terms(x)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(-terms["elbo"], expected, rtol=1e-5, atol=1e-4)
    expected.backward()
    terms["loss"].backward()
    torch.testing.assert_close(vae.decoder.net[2].weight.grad, recipe.fc4.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae.encoder.head.weight.grad[:6], recipe.fc21.weight.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. The importance-weighted estimate


def plain_log_likelihood(vae: VAE, x: Tensor, eps: Tensor) -> Tensor:
    """``log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)`` in one piece, with ``torch.distributions``."""
    mu, logvar = vae.encode(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = mu + q.scale * eps  # (K, B, L)
    log_px = vae.log_prob(vae.decode(z.flatten(0, 1)).view(len(eps), *x.shape), x)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    return torch.logsumexp(log_px + log_pz - q.log_prob(z).sum(-1), dim=0) - math.log(len(eps))


@pytest.mark.parametrize("chunk_size", [7, 40, None])
def test_log_likelihood_equals_a_plain_estimate_on_the_same_draws(chunk_size):
    torch.manual_seed(0)
    vae = VAE(input_shape=(64,), latent_dim=4, hidden_dims=(16,)).eval()
    x = digits_batch(5)
    samples = 40
    torch.manual_seed(3)
    estimate = vae.log_likelihood(x, num_samples=samples, chunk_size=chunk_size)
    # The same draws: the estimate takes them chunk by chunk from the global generator.
    torch.manual_seed(3)
    step = chunk_size or samples
    eps = torch.cat([torch.randn(min(step, samples - i), 5, 4) for i in range(0, samples, step)])
    with torch.no_grad():
        expected = plain_log_likelihood(vae, x, eps)
    assert estimate.shape == (5,)
    torch.testing.assert_close(estimate, expected, rtol=1e-5, atol=1e-4)


def test_importance_weighted_estimate_is_above_the_elbo_on_average():
    torch.manual_seed(0)
    vae = VAE(input_shape=(64,), latent_dim=4, hidden_dims=(32,)).eval()
    x = digits_batch(200)
    iw = vae.log_likelihood(x, num_samples=200)
    elbo = vae.log_likelihood(x, num_samples=1)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        analytic_elbo = vae.log_prob(vae.decode(vae.reparameterize(mu, logvar)), x) - gaussian_kl(mu, logvar).sum(-1)
    assert iw.mean() > elbo.mean() + 0.1
    assert iw.mean() > analytic_elbo.mean() + 0.1


# ---------------------------------------------------------------------------------------------
# 4. KL warm-up and free bits


def test_kl_warmup_is_linear_to_beta():
    vae = VAE(input_shape=(8,), latent_dim=2, hidden_dims=(4,), beta=0.5, kl_warmup_steps=100)
    assert [vae.kl_weight(step) for step in (0, 50, 100, 1000)] == [0.0, 0.25, 0.5, 0.5]
    assert VAE(input_shape=(8,), latent_dim=2, hidden_dims=(4,), beta=2.0).kl_weight(0) == 2.0


def test_free_bits_floor_each_dimension_of_the_batch_mean_kl():
    torch.manual_seed(0)
    vae = VAE(input_shape=(64,), latent_dim=5, hidden_dims=(16,), free_bits=0.5, beta=0.7)
    x = digits_batch(8)
    torch.manual_seed(1)
    terms = vae.loss_terms(x)
    torch.manual_seed(1)
    params, mu, logvar = vae(x)
    recon = -vae.log_prob(params, x).mean()
    kl_dims = gaussian_kl(mu, logvar).mean(0)
    expected = recon + 0.7 * torch.maximum(kl_dims, torch.tensor(0.5)).sum()
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["kl"], kl_dims.sum())  # the logged KL is the true one


# ---------------------------------------------------------------------------------------------
# 5. Networks and inference


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 7, 9), (2, 5, 5)])
def test_conv_networks_give_back_the_input_shape(shape):
    vae = VAE(input_shape=shape, latent_dim=3, architecture="conv", hidden_dims=(4, 6))
    x = torch.rand(2, *shape)
    params, mu, logvar = vae(x)
    assert params.shape == (2, *shape) and mu.shape == logvar.shape == (2, 3)
    assert vae.sample(4).shape == (4, *shape)


def test_mlp_on_images_and_default_widths():
    assert VAE(input_shape=(1, 8, 8)).hidden_dims == (400,)
    assert VAE(input_shape=(1, 8, 8), architecture="conv").hidden_dims == (32, 64)
    vae = VAE(input_shape=(1, 8, 8), latent_dim=3, hidden_dims=(16, 8))
    assert vae(torch.rand(2, 1, 8, 8))[0].shape == (2, 1, 8, 8)


def test_inference_methods_shapes_ranges_and_modes():
    torch.manual_seed(0)
    vae = VAE(input_shape=(64,), latent_dim=4, hidden_dims=(16,))
    vae.train()
    x = digits_batch(3)
    samples = vae.sample(5)
    assert samples.shape == (5, 64) and samples.min() >= 0 and samples.max() <= 1
    assert vae.reconstruct(x).shape == (3, 64)
    assert vae.reconstruct(x[0]).shape == (64,)  # one example
    torch.testing.assert_close(vae.reconstruct(x), vae.reconstruct(x))  # deterministic: z = mu
    noisy = x + 0.5 * torch.randn_like(x)  # leaves [0, 1]: clamped, no error
    assert vae.denoise(noisy).shape == (3, 64)
    path = vae.interpolate(x[0], x[1], steps=6)
    assert path.shape == (6, 64)
    torch.testing.assert_close(path[0], vae.reconstruct(x[0]))
    torch.testing.assert_close(path[-1], vae.reconstruct(x[1]))
    assert vae.interpolate(x[:2], x[1:], steps=3).shape == (2, 3, 64)
    assert vae.training  # restored


# ---------------------------------------------------------------------------------------------
# 6. Lightning


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[VAE, DigitsDataModule, L.Trainer, Path]:
    """A small VAE trained 40 epochs on the digits, with a checkpoint."""
    root = tmp_path_factory.mktemp("vae")
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    model = VAE(input_shape=(64,), latent_dim=8, hidden_dims=(128,), kl_warmup_steps=100, lr=2e-3, test_nll_samples=50)
    fit = trainer(max_epochs=40, default_root_dir=root, enable_checkpointing=True)
    fit.fit(model, datamodule=data)
    return model, data, fit, Path(fit.checkpoint_callback.best_model_path or fit.checkpoint_callback.last_model_path)


def test_fit_improves_the_elbo_and_logs_its_terms(fitted):
    model, data, fit, _ = fitted
    logged = fit.callback_metrics
    assert {"train_elbo", "train_recon", "train_kl", "val_elbo", "val_recon", "val_kl", "val_active_units"} <= set(
        logged
    )
    untrained = VAE(input_shape=(64,), latent_dim=8, hidden_dims=(128,))
    x = data.split("val").tensors[0]
    torch.manual_seed(0)
    before = untrained.log_likelihood(x, num_samples=20).mean()
    torch.manual_seed(0)
    after = model.log_likelihood(x, num_samples=20).mean()
    assert after > before + 5  # nats per image
    torch.testing.assert_close(logged["val_elbo"], -(logged["val_recon"] + logged["val_kl"]), rtol=1e-4, atol=1e-3)
    assert 1 <= logged["val_active_units"] <= 8


def test_active_units_count_latents_whose_mean_varies(fitted):
    model, data, _, _ = fitted
    x = data.split("val").tensors[0]
    with torch.no_grad():
        mu = model.encode(x)[0]
    expected = (mu.var(0, unbiased=False) > 0.01).sum().item()
    model.val_activity.reset()
    model.val_activity.update(mu[:100])
    model.val_activity.update(mu[100:])
    assert model.val_activity.compute().item() == expected
    model.val_activity.reset()


def test_test_logs_nll_above_the_elbo_bound(fitted):
    model, data, fit, _ = fitted
    (results,) = fit.test(model, datamodule=data, verbose=False)
    assert {"test_elbo", "test_nll"} <= set(results)
    assert results["test_nll"] < -results["test_elbo"]  # IW-50 is a tighter bound than the ELBO


def test_denoising_brings_noisy_digits_closer_to_the_clean_ones(fitted):
    model, data, _, _ = fitted
    clean = data.split("test").tensors[0]
    torch.manual_seed(0)
    noisy = (clean + 0.5 * torch.randn_like(clean)).clamp(0, 1)
    denoised = model.denoise(noisy)
    assert F.mse_loss(denoised, clean) < 0.7 * F.mse_loss(noisy, clean)


def test_predict_returns_reconstructions(fitted):
    model, data, fit, _ = fitted
    batches = fit.predict(model, datamodule=data)
    assert torch.cat(batches).shape == (len(data.split("test")), 64)


def test_checkpoint_round_trip(fitted):
    model, data, _, path = fitted
    loaded = VAE.load_from_checkpoint(path)
    assert loaded.hparams.latent_dim == 8 and tuple(loaded.hparams.hidden_dims) == (128,)
    x = data.split("test").tensors[0][:10]
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))


def test_conv_gaussian_fit_runs_and_learns_the_scale():
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=128, flatten=False)
    model = VAE(
        input_shape=(1, 8, 8), latent_dim=4, architecture="conv", hidden_dims=(8, 16), likelihood="gaussian", lr=1e-2
    )
    trainer(max_epochs=3, limit_val_batches=1).fit(model, datamodule=data)
    assert model.log_scale.item() < -0.1  # the learned scale shrank from 1
    assert math.isfinite(model.log_likelihood(data.split("test").tensors[0][:8], num_samples=5).mean().item())


class RecordingVAE(VAE):
    """Keeps each step's ELBO terms, to check what is logged against them."""

    def loss_terms(self, x: Tensor) -> dict[str, Tensor]:
        terms = super().loss_terms(x)
        self.steps.append({k: float(terms[k].detach()) for k in ("elbo", "recon", "kl")})
        return terms


def test_train_terms_are_logged_as_means_over_each_logging_interval(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0, verbose=False)
    model = RecordingVAE(input_shape=(64,), latent_dim=4, hidden_dims=(16,))
    model.steps = []
    fit = trainer(max_steps=12, log_every_n_steps=4, limit_val_batches=0, logger=CSVLogger(tmp_path, name="run"))
    fit.fit(model, datamodule=DigitsDataModule(batch_size=64))
    rows = [row for row in csv.DictReader((tmp_path / "run" / "version_0" / "metrics.csv").open()) if row["train_elbo"]]
    assert [int(row["step"]) for row in rows] == [3, 7, 11]
    for row in rows:
        window = model.steps[int(row["step"]) - 3 : int(row["step"]) + 1]
        for name in ("elbo", "recon", "kl"):
            expected = sum(step[name] for step in window) / len(window)
            assert math.isclose(float(row[f"train_{name}"]), expected, rel_tol=1e-5)


class RecordRanks(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        checksum = sum(float(p.double().sum()) for p in pl_module.parameters())
        record = {"metrics": metrics, "checksum": checksum, "step": trainer.global_step}
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ddp_spawn_two_processes(tmp_path, ddp_spawn):
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    model = VAE(input_shape=(64,), latent_dim=4, hidden_dims=(32,))
    fit = trainer(
        devices=2, strategy=ddp_spawn, max_steps=4, val_check_interval=4, limit_val_batches=2,
        callbacks=[RecordRanks(str(tmp_path))],
    )
    fit.fit(model, datamodule=data)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert {"val_elbo", "val_active_units"} <= set(ranks[0]["metrics"])
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # synced
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


# ---------------------------------------------------------------------------------------------
# 7. Bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latent_dim": 0}, "`latent_dim` must be at least 1, got 0"),
        ({"beta": -0.1}, "`beta` must be >= 0, got -0.1"),
        ({"free_bits": -1.0}, "`free_bits` must be >= 0"),
        ({"kl_warmup_steps": -5}, "`kl_warmup_steps` must be >= 0, got -5"),
        ({"likelihood": "poisson"}, "`likelihood` must be one of \\('bernoulli', 'gaussian'\\), got 'poisson'"),
        ({"architecture": "rnn"}, "`architecture` must be one of \\('mlp', 'conv'\\), got 'rnn'"),
        ({"architecture": "conv"}, "`architecture='conv'` needs `input_shape` \\(C, H, W\\), got \\(64,\\)"),
        ({"input_shape": (8, 8)}, "`input_shape` must be \\(D,\\) or \\(C, H, W\\)"),
        ({"input_shape": (0,)}, "`input_shape` must be"),
        ({"hidden_dims": ()}, "`hidden_dims` must be positive widths"),
        ({"gaussian_scale": 0.0, "likelihood": "gaussian"}, "`gaussian_scale` must be positive"),
        ({"lr": 0.0}, "`lr` must be positive"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAE(**{"input_shape": (64,), **kwargs})


def test_bad_inputs():
    vae = VAE(input_shape=(64,), latent_dim=2, hidden_dims=(8,))
    with pytest.raises(ValueError, match="Bernoulli likelihood needs `x` in \\[0, 1\\], got values in \\[0, 16\\]"):
        vae.training_step((16 * torch.rand(4, 64)).round(), 0)
    with pytest.raises(TypeError, match="`x` must be a floating-point tensor, got dtype torch\\.int64"):
        vae.log_likelihood(torch.ones(4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="a batch must be a tensor x or a tuple/list whose first item is x, got dict"):
        vae.training_step({"x": torch.rand(4, 64)}, 0)
    with pytest.raises(ValueError, match="`num_samples` must be at least 1, got 0"):
        vae.log_likelihood(torch.rand(2, 64), num_samples=0)
    with pytest.raises(ValueError, match="`steps` must be at least 2, got 1"):
        vae.interpolate(torch.rand(64), torch.rand(64), steps=1)
    with pytest.raises(ValueError, match="`n` must be at least 1, got 0"):
        vae.sample(0)
    # Gaussian data may take any value.
    gaussian = VAE(input_shape=(64,), latent_dim=2, hidden_dims=(8,), likelihood="gaussian")
    assert torch.isfinite(gaussian.loss_terms(16 * torch.rand(4, 64))["loss"])


MLP_SHAPE = re.escape("`x` must have shape [B, 64] (input_shape=(64,)), got ")
CONV_SHAPE = re.escape("`x` must have shape [B, 1, 8, 8] (input_shape=(1, 8, 8)), got ")


def _mlp(**kwargs) -> VAE:
    return VAE(input_shape=(64,), latent_dim=2, hidden_dims=(8,), **kwargs)


def _conv() -> VAE:
    return VAE(input_shape=(1, 8, 8), architecture="conv", latent_dim=2, hidden_dims=(4,))


# Each way in: the error comes before any network sees the batch.
ENTRY_POINTS = {
    "forward": lambda vae, x: vae(x),
    "encode": lambda vae, x: vae.encode(x),
    "training_step": lambda vae, x: vae.training_step((x, torch.zeros(len(x))), 0),
    "loss_terms": lambda vae, x: vae.loss_terms(x),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("make", "x", "match"),
    [
        (_mlp, torch.rand(4, 65), MLP_SHAPE + re.escape("[4, 65]") + "$"),
        (_mlp, torch.rand(4, 1, 8, 8), MLP_SHAPE + re.escape("[4, 1, 8, 8]: images, but this VAE takes flat") + ".*"
         + re.escape("flatten them with `x.flatten(1)`")),
        (_mlp, torch.rand(2, 3, 64), MLP_SHAPE + re.escape("[2, 3, 64]: too many dimensions (3, expected 2)")),
        (_conv, torch.rand(4, 64), CONV_SHAPE + re.escape("[4, 64]: flat examples, but this VAE takes images") + ".*"
         + re.escape("reshape with `x.view(-1, 1, 8, 8)`")),
        (_conv, torch.rand(8, 8), CONV_SHAPE + re.escape("[8, 8]: too few dimensions (2, expected 4)")),
        (_conv, torch.rand(4, 1, 8, 9), CONV_SHAPE + re.escape("[4, 1, 8, 9]") + "$"),
    ],
)
def test_wrong_shapes_name_the_expected_and_the_given_shape(make, x, match, entry):
    with pytest.raises(ValueError, match=match):
        ENTRY_POINTS[entry](make(), x)


@pytest.mark.parametrize("make", [_mlp, _conv])
def test_one_example_without_a_batch_dimension(make):
    vae = make()
    x = torch.rand(vae.input_shape)
    with pytest.raises(ValueError, match=re.escape("one example without its batch dimension; use `x[None]`")):
        vae(x)
    assert vae(x[None])[0].shape == (1, *vae.input_shape)
    assert vae.reconstruct(x).shape == vae.input_shape  # the inference methods take one example


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_nan_and_inf_values_are_refused(entry, likelihood):
    vae = _mlp(likelihood=likelihood)
    all_nan = re.escape("`x` must be finite, got 256 NaN and 0 inf values among 256 (shape [4, 64])")
    with pytest.raises(ValueError, match=all_nan):
        ENTRY_POINTS[entry](vae, torch.full((4, 64), math.nan))
    x = torch.rand(4, 64)
    x[1, 3], x[2, 5], x[3, 7] = math.nan, math.inf, -math.inf
    with pytest.raises(ValueError, match=re.escape("`x` must be finite, got 1 NaN and 2 inf values among 256")):
        ENTRY_POINTS[entry](vae, x)
    x = torch.rand(4, 64)
    x[0, 0] = -math.inf
    with pytest.raises(ValueError, match=re.escape("`x` must be finite, got 0 NaN and 1 inf values")):
        ENTRY_POINTS[entry](vae, x)


def test_nan_is_refused_by_every_inference_method_and_step():
    vae = _mlp()
    nan = torch.full((2, 64), math.nan)
    finite = "must be finite, got 128 NaN"
    with pytest.raises(ValueError, match=f"`x` {finite}"):
        vae.reconstruct(nan)
    with pytest.raises(ValueError, match=f"`x_noisy` {finite}"):
        vae.denoise(nan)
    with pytest.raises(ValueError, match=f"`x1` {finite}"):
        vae.interpolate(nan, torch.rand(2, 64))
    with pytest.raises(ValueError, match=f"`x` {finite}"):
        vae.log_likelihood(nan, num_samples=2)
    for step in (vae.validation_step, vae.test_step, vae.predict_step):
        with pytest.raises(ValueError, match=f"`x` {finite}"):
            step(nan, 0)


def test_check_inputs_false_skips_the_values_but_not_the_shape():
    vae = _mlp(check_inputs=False)
    _, mu, _ = vae(torch.full((4, 64), math.nan))
    assert mu.isnan().all()
    with pytest.raises(ValueError, match=MLP_SHAPE + re.escape("[4, 65]")):
        vae(torch.rand(4, 65))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_values_are_checked_once_per_training_step(monkeypatch):
    vae = _mlp()
    calls = []
    check = VAE._check_values
    monkeypatch.setattr(VAE, "_check_values", lambda self, x, name: calls.append(name) or check(self, x, name))
    vae.training_step((torch.rand(4, 64), torch.zeros(4)), 0)
    assert calls == ["x"]  # one fused reduction and one host sync per batch
    calls.clear()
    vae.reconstruct(torch.rand(4, 64))
    vae.log_likelihood(torch.rand(4, 64), num_samples=2)
    assert calls == ["x", "x"]
