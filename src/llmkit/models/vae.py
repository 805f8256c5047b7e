"""VAE: a variational autoencoder (Kingma & Welling, 2014) as a LightningModule."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import AttributeDict
from torch import Tensor, nn
from torchmetrics import Metric

from llmkit._compile import compiles, eager
from llmkit._logging import WindowedMeans
from llmkit.nn.vae import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

Batch = Tensor | tuple[Tensor, ...] | list[Tensor]

ARCHITECTURES = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")
_LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, 1))`` per latent dimension, in nats: same shape as ``mu``.

    Examples:
        >>> gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor([[0., 0., 0.],
                [0., 0., 0.]])
    """
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


def _pass(model: VAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``VAE.forward`` after its checks: ``(x_hat_params, mu, logvar)``."""
    mu, logvar = model._encode(x)
    return model.decode(model.reparameterize(mu, logvar)), mu, logvar


@functools.cache
def _compiled_pass() -> Callable[[VAE, Tensor], tuple[Tensor, Tensor, Tensor]]:
    # One compiled function for every VAE with `compile=True`, kept outside the module (a deepcopy
    # must not call back into the original).
    return cast(Callable[[VAE, Tensor], tuple[Tensor, Tensor, Tensor]], torch.compile(_pass))


class _LatentActivity(Metric):
    """The variance over examples of each latent mean ``E_q[z_u | x]``, synced across processes.

    A unit is *active* when that variance exceeds a threshold (Burda et al., 2016: 0.01).
    """

    full_state_update = False
    count: Tensor
    total: Tensor
    total_sq: Tensor

    def __init__(self, latent_dim: int, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(latent_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(latent_dim, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mu: Tensor) -> None:
        mu = mu.detach().to(torch.float64)
        self.count += mu.shape[0]
        self.total += mu.sum(0)
        self.total_sq += mu.square().sum(0)

    def compute(self) -> Tensor:
        mean = self.total / self.count.clamp(min=1)
        variance = self.total_sq / self.count.clamp(min=1) - mean.square()
        return (variance > self.threshold).sum().to(torch.float32)


class VAE(L.LightningModule):
    """A variational autoencoder that generates, reconstructs, denoises and estimates ``log p(x)``.

    The encoder gives a diagonal Gaussian ``q(z | x) = N(mu, exp(logvar))`` over ``latent_dim``
    latents, ``z`` is drawn by reparameterisation, and the decoder gives the parameters of
    ``p(x | z)``: logits of independent Bernoullis (``likelihood="bernoulli"``, data in [0, 1]) or
    the mean of a Gaussian with a learned scalar scale (``gaussian_scale=None``, as the
    sigma-VAE) or a fixed one. The prior is ``N(0, I)`` and the KL term is analytic.

    Training minimises ``recon + beta_t * KL`` per example (the negative ELBO when
    ``beta_t = 1``), where ``beta_t`` rises linearly from 0 to ``beta`` over ``kl_warmup_steps``
    and, with ``free_bits > 0``, each latent dimension's batch-mean KL counts as at least
    ``free_bits`` nats (Kingma et al., 2016). Logged, in nats per example: ``train_elbo``,
    ``train_recon``, ``train_kl`` (the bound itself, whatever ``beta_t``), ``val_elbo``,
    ``val_recon``, ``val_kl``, ``val_active_units``, and at test ``test_elbo``, ``test_recon``,
    ``test_kl`` and ``test_nll`` (importance-weighted, ``test_nll_samples`` samples).

    With a Bernoulli likelihood on grey levels in [0, 1] (as the pytorch/examples VAE on MNIST),
    ``log p(x | z)`` is minus the binary cross-entropy: a score to compare models by, not a
    normalised density of continuous data.

    Batches are a tensor ``x`` ``[B, *input_shape]`` or a tuple/list whose first item is ``x``.
    Subclasses change the networks by overriding :meth:`build_encoder` and :meth:`build_decoder`.

    Args:
        input_shape: shape of one example: ``(D,)`` or ``(C, H, W)``.
        latent_dim: ``L``, latent dimensions.
        hidden_dims: widths of the MLP's hidden layers, or the convolutions' channels
            (``None``: ``(400,)`` for the MLP, ``(32, 64)`` for convolutions).
        architecture: ``"mlp"`` or ``"conv"`` (``input_shape`` must then be ``(C, H, W)``).
        likelihood: ``"bernoulli"`` or ``"gaussian"``.
        gaussian_scale: the Gaussian likelihood's fixed standard deviation; ``None`` learns it.
        beta: weight of the KL term after warm-up (``beta=1``: the ELBO).
        kl_warmup_steps: optimizer steps over which the KL weight rises linearly from 0 to ``beta``.
        free_bits: nats per latent dimension below which the KL term is not pushed down.
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        test_nll_samples: importance samples for ``test_nll`` (0: not computed).
        active_threshold: variance of a latent's mean above which it counts as active.
        check_inputs: check the values of every batch: finite, and in [0, 1] for a Bernoulli
            likelihood (one fused reduction and one host sync per batch). Types and shapes are
            always checked.
        compile: run the encoder, the draw of ``z`` and the decoder (:meth:`forward` after its
            checks) through ``torch.compile`` (inductor). ``trainer.fit(torch.compile(vae))``
            works too (Lightning's way: it compiles the steps).

    Raises:
        ValueError: If an argument is out of range (``latent_dim < 1``, ``beta < 0``, an unknown
            ``likelihood``, ...); later, at ``forward``, ``encode``, a step or an inference method,
            if a batch has the wrong shape or NaN, inf or out-of-range values (:meth:`check_input`).

    Examples:
        >>> import torch
        >>> vae = VAE(input_shape=(64,), latent_dim=4, hidden_dims=(32,))
        >>> x = torch.rand(5, 64)
        >>> logits, mu, logvar = vae(x)
        >>> logits.shape, mu.shape
        (torch.Size([5, 64]), torch.Size([5, 4]))
        >>> vae.sample(3).shape, vae.log_likelihood(x, num_samples=10).shape
        (torch.Size([3, 64]), torch.Size([5]))
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (64,),
        latent_dim: int = 16,
        hidden_dims: Sequence[int] | None = None,
        architecture: str = "mlp",
        likelihood: str = "bernoulli",
        gaussian_scale: float | None = None,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        test_nll_samples: int = 500,
        active_threshold: float = 0.01,
        check_inputs: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._check_arguments()
        self.input_shape = tuple(int(size) for size in input_shape)
        if hidden_dims is None:
            hidden_dims = (400,) if architecture == "mlp" else (32, 64)
        self.hidden_dims = tuple(hidden_dims)
        self.encoder = self.build_encoder()
        self.decoder = self.build_decoder()
        if likelihood == "gaussian":
            if gaussian_scale is None:
                self.log_scale = nn.Parameter(torch.zeros(()))
            else:
                self.register_buffer("log_scale", torch.tensor(math.log(gaussian_scale)))
        self.val_activity = _LatentActivity(latent_dim, active_threshold)
        self._train_log = WindowedMeans(("train_elbo", "train_recon", "train_kl"), prog_bar=("train_elbo",))

    @property
    def hp(self) -> AttributeDict:
        """The hyperparameters saved by ``save_hyperparameters()``, with attribute access."""
        return cast(AttributeDict, self.hparams)

    def _check_arguments(self) -> None:
        hp = self.hp
        shape = tuple(hp.input_shape)
        if len(shape) not in (1, 3) or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"`input_shape` must be (D,) or (C, H, W) of positive ints, got {shape}")
        if hp.architecture not in ARCHITECTURES:
            raise ValueError(f"`architecture` must be one of {ARCHITECTURES}, got {hp.architecture!r}")
        if hp.architecture == "conv" and len(shape) != 3:
            raise ValueError(f"`architecture='conv'` needs `input_shape` (C, H, W), got {shape}")
        if hp.likelihood not in LIKELIHOODS:
            raise ValueError(f"`likelihood` must be one of {LIKELIHOODS}, got {hp.likelihood!r}")
        if hp.latent_dim < 1:
            raise ValueError(f"`latent_dim` must be at least 1, got {hp.latent_dim}")
        if hp.hidden_dims is not None and (len(hp.hidden_dims) == 0 or min(hp.hidden_dims) < 1):
            raise ValueError(f"`hidden_dims` must be positive widths, at least one, got {tuple(hp.hidden_dims)}")
        if hp.gaussian_scale is not None and not hp.gaussian_scale > 0:
            raise ValueError(f"`gaussian_scale` must be positive or None (learned), got {hp.gaussian_scale}")
        for name in ("beta", "free_bits", "weight_decay"):
            if not hp[name] >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {hp[name]}")
        for name in ("kl_warmup_steps", "test_nll_samples"):
            if hp[name] < 0:
                raise ValueError(f"`{name}` must be >= 0, got {hp[name]}")
        if not hp.lr > 0:
            raise ValueError(f"`lr` must be positive, got {hp.lr}")

    # -----------------------------------------------------------------------------------------
    # The networks: override these two to change them.

    def build_encoder(self) -> nn.Module:
        """The network ``x [B, *input_shape] -> (mu [B, L], logvar [B, L])``."""
        if self.hp.architecture == "conv":
            return ConvEncoder(input_shape=self.input_shape, channels=self.hidden_dims, latent_dim=self.hp.latent_dim)
        return MLPEncoder(input_shape=self.input_shape, hidden_dims=self.hidden_dims, latent_dim=self.hp.latent_dim)

    def build_decoder(self) -> nn.Module:
        """The network ``z [B, L] -> parameters of p(x | z) [B, *input_shape]``."""
        if self.hp.architecture == "conv":
            return ConvDecoder(latent_dim=self.hp.latent_dim, channels=self.hidden_dims, output_shape=self.input_shape)
        return MLPDecoder(
            latent_dim=self.hp.latent_dim, hidden_dims=self.hidden_dims[::-1], output_shape=self.input_shape
        )

    # -----------------------------------------------------------------------------------------
    # The model

    def check_input(self, x: Tensor, name: str = "x") -> None:
        """Raise unless ``x`` is a float ``[B, *input_shape]`` batch of finite values.

        The type and shape are checked on the host, always. With ``check_inputs=True`` the values
        are checked too (finite, and in [0, 1] for a Bernoulli likelihood) by one fused reduction,
        ``aminmax`` (a NaN propagates to both ends, an inf shows at one), and one host sync.

        Args:
            x: the batch, ``[B, *input_shape]``.
            name: the argument's name in error messages.

        Raises:
            TypeError: If ``x`` is not a floating-point tensor.
            ValueError: If ``x`` does not have the shape ``[B, *input_shape]`` (the message says
                whether dimensions are missing or an image/flat layout was mixed up), holds NaN or
                inf values, or (Bernoulli likelihood) values outside [0, 1].
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(self._shape_error(x, name))
        if self.hp.check_inputs and x.numel():
            self._check_values(x, name)

    def _shape_error(self, x: Tensor, name: str) -> str:
        dims = ", ".join(map(str, self.input_shape))
        message = f"`{name}` must have shape [B, {dims}] (input_shape={self.input_shape}), got {list(x.shape)}"
        want_ndim = len(self.input_shape) + 1
        same_size = x.ndim >= 2 and math.prod(x.shape[1:]) == math.prod(self.input_shape)
        if same_size and x.ndim == 2 and want_ndim == 4:
            return f"{message}: flat examples, but this VAE takes images; reshape with `x.view(-1, {dims})`"
        if same_size and want_ndim == 2:
            return f"{message}: images, but this VAE takes flat examples; flatten them with `x.flatten(1)`"
        if tuple(x.shape) == self.input_shape:
            return f"{message}: one example without its batch dimension; use `x[None]`"
        if x.ndim < want_ndim:
            return f"{message}: too few dimensions ({x.ndim}, expected {want_ndim})"
        if x.ndim > want_ndim:
            return f"{message}: too many dimensions ({x.ndim}, expected {want_ndim})"
        return message

    def _check_values(self, x: Tensor, name: str) -> None:
        # One fused reduction for both checks: a NaN propagates to min and max, an inf shows at one
        # end. The first `.item()` waits for it (the one host sync); the second is a copy.
        low, high = (value.item() for value in torch.aminmax(x.detach()))
        if not (math.isfinite(low) and math.isfinite(high)):
            num_nan, num_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise ValueError(
                f"`{name}` must be finite, got {num_nan} NaN and {num_inf} inf values among {x.numel()} "
                f"(shape {list(x.shape)})"
            )
        if self.hp.likelihood == "bernoulli" and (low < 0 or high > 1):
            raise ValueError(f"a Bernoulli likelihood needs `{name}` in [0, 1], got values in [{low:.4g}, {high:.4g}]")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, *input_shape]`` -> ``mu``, ``logvar`` of ``q(z | x)``, each ``[B, L]``.

        Raises:
            TypeError: If ``x`` is not a floating-point tensor.
            ValueError: If ``x`` has the wrong shape or (``check_inputs=True``) NaN, inf or
                out-of-range values; see :meth:`check_input`.
        """
        self.check_input(x)
        return self._encode(x)

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # For callers that have checked `x` already (one check, one host sync, per batch).
        mu, logvar = self.encoder(x)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """``z`` ``[B, L]`` -> parameters of ``p(x | z)`` ``[B, *input_shape]`` (logits or mean)."""
        params: Tensor = self.decoder(z)
        return params

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """A draw ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)``, differentiable in both."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[B, *input_shape]`` -> ``(x_hat_params [B, *input_shape], mu [B, L], logvar [B, L])``.

        ``z`` is drawn from ``q(z | x)``; ``x_hat_params`` are the logits (Bernoulli) or the mean
        (Gaussian) of ``p(x | z)``.

        Raises:
            TypeError: If ``x`` is not a floating-point tensor.
            ValueError: If ``x`` has the wrong shape or (``check_inputs=True``) NaN, inf or
                out-of-range values; see :meth:`check_input`.
        """
        self.check_input(x)
        return (_compiled_pass() if compiles(self, self.hp.compile) else _pass)(self, x)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``log p(x | z)`` per example, ``[...]``.

        Args:
            params: decoder outputs ``[..., *input_shape]``.
            x: data broadcastable to ``params``.
        """
        params = params.float()
        x = x.float().expand_as(params)
        dims = tuple(range(params.ndim - len(self.input_shape), params.ndim))
        if self.hp.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, x, reduction="none").sum(dims)
        log_scale = self.log_scale.float()
        log_density = -0.5 * ((x - params) * torch.exp(-log_scale)).square() - log_scale - 0.5 * _LOG_2PI
        return log_density.sum(dims)

    def mean(self, params: Tensor) -> Tensor:
        """The mean of ``p(x | z)`` from the decoder's outputs (``sigmoid`` of Bernoulli logits)."""
        return torch.sigmoid(params) if self.hp.likelihood == "bernoulli" else params

    def kl_weight(self, step: int | None = None) -> float:
        """``beta_t`` at optimizer step ``step`` (default: the trainer's global step)."""
        if step is None:
            step = self.global_step
        warmup = self.hp.kl_warmup_steps
        return float(self.hp.beta) * (min(1.0, step / warmup) if warmup > 0 else 1.0)

    @eager
    def _kl_weight_tensor(self, like: Tensor) -> Tensor:
        # A tensor made outside any compiled graph, so that a graph holding the loss does not
        # specialise on (and recompile for) each step's warm-up weight.
        return torch.tensor(self.kl_weight(), dtype=like.dtype, device=like.device)

    def loss_terms(self, x: Tensor) -> dict[str, Tensor]:
        """One-sample ELBO terms for ``x``, each a 0-d mean over the batch, in nats per example.

        Returns:
            ``loss`` (what training minimises), ``elbo``, ``recon`` (``-log p(x | z)``), ``kl``,
            and ``mu`` ``[B, L]``.
        """
        params, mu, logvar = self(x)
        recon = -self.log_prob(params, x)  # [B]
        kl = gaussian_kl(mu.float(), logvar.float())  # [B, L]
        kl_per_dim = kl.mean(0)  # [L]
        kl_term = kl_per_dim.clamp(min=self.hp.free_bits).sum() if self.hp.free_bits > 0 else kl_per_dim.sum()
        recon_mean, kl_mean = recon.mean(), kl_per_dim.sum()
        loss = recon_mean + self._kl_weight_tensor(kl_term) * kl_term
        return {"loss": loss, "elbo": -(recon_mean + kl_mean), "recon": recon_mean, "kl": kl_mean, "mu": mu}

    # -----------------------------------------------------------------------------------------
    # Inference

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def _as_batch(self, x: Tensor, name: str) -> tuple[Tensor, bool]:
        single = isinstance(x, Tensor) and tuple(x.shape) == self.input_shape
        x = x.unsqueeze(0) if single else x
        self.check_input(x, name)
        return x, single

    def sample(self, n: int) -> Tensor:
        """``n`` new examples ``[n, *input_shape]``: the means of ``p(x | z)`` for ``z ~ N(0, I)``."""
        if n < 1:
            raise ValueError(f"`n` must be at least 1, got {n}")
        with self._inference():
            z = torch.randn(n, self.hp.latent_dim, device=self.device)
            return self.mean(self.decode(z)).float()

    def reconstruct(self, x: Tensor) -> Tensor:
        """The mean of ``p(x | z = mu(x))`` for ``x`` ``[B, *input_shape]`` (or one example)."""
        return self._reconstruct(x, "x")

    def _reconstruct(self, x: Tensor, name: str) -> Tensor:
        batch, single = self._as_batch(x, name)
        with self._inference():
            out = self.mean(self.decode(self._encode(batch)[0])).float()
        return out[0] if single else out

    def denoise(self, x_noisy: Tensor) -> Tensor:
        """Project noisy examples onto what the model learned: the reconstruction of ``x_noisy``.

        ``x_noisy`` ``[B, *input_shape]`` (or one example) may leave the data range: for a
        Bernoulli likelihood it is clamped to [0, 1] first.
        """
        if isinstance(x_noisy, Tensor) and self.hp.likelihood == "bernoulli":
            x_noisy = x_noisy.clamp(0.0, 1.0)
        return self._reconstruct(x_noisy, "x_noisy")

    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 8) -> Tensor:
        """Decode ``steps`` points on the line between the latent means of ``x1`` and ``x2``.

        Args:
            x1: ``[*input_shape]`` or ``[B, *input_shape]``.
            x2: the same shape as ``x1``.
            steps: points, both ends included (at least 2).

        Returns:
            ``[steps, *input_shape]``, or ``[B, steps, *input_shape]`` for batches.
        """
        if steps < 2:
            raise ValueError(f"`steps` must be at least 2, got {steps}")
        a, single = self._as_batch(x1, "x1")
        b, _ = self._as_batch(x2, "x2")
        if a.shape != b.shape:
            raise ValueError(f"`x1` and `x2` must have the same shape, got {list(x1.shape)} and {list(x2.shape)}")
        with self._inference():
            mu_a, mu_b = self._encode(a)[0], self._encode(b)[0]
            weights = torch.linspace(0, 1, steps, device=mu_a.device, dtype=mu_a.dtype)[None, :, None]
            z = torch.lerp(mu_a[:, None], mu_b[:, None], weights)  # (B, steps, L)
            out = self.mean(self.decode(z.flatten(0, 1))).float().view(a.shape[0], steps, *self.input_shape)
        return out[0] if single else out

    def log_likelihood(self, x: Tensor, num_samples: int = 500, chunk_size: int | None = None) -> Tensor:
        """The importance-weighted estimate of ``log p(x)`` (Burda et al., 2016), nats per example.

        ``log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x)`` with ``z_k ~ q(z | x)``: a lower bound on
        ``log p(x)`` that tightens as ``K = num_samples`` grows (``K = 1``: the ELBO). The samples
        are drawn ``chunk_size`` at a time and combined with a running log-sum-exp, so memory
        does not grow with ``K``.

        Args:
            x: ``[B, *input_shape]``.
            num_samples: ``K``.
            chunk_size: samples per chunk (``None``: about 4 M decoder outputs per chunk).

        Returns:
            ``[B]`` float32.
        """
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be at least 1, got {num_samples}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"`chunk_size` must be at least 1, got {chunk_size}")
        self.check_input(x)
        batch = x.shape[0]
        if chunk_size is None:
            chunk_size = max(1, 2**22 // max(1, batch * math.prod(self.input_shape)))
        with self._inference():
            mu, logvar = (t.float() for t in self._encode(x))
            std = torch.exp(0.5 * logvar)
            total: Tensor | None = None
            for start in range(0, num_samples, chunk_size):
                k = min(chunk_size, num_samples - start)
                eps = torch.randn(k, *mu.shape, device=mu.device)
                z = mu + std * eps  # (k, B, L)
                params = self.decode(z.flatten(0, 1)).view(k, batch, *self.input_shape)
                log_px = self.log_prob(params, x)  # (k, B)
                log_pz = -0.5 * (z.square() + _LOG_2PI).sum(-1)
                log_qz = -0.5 * (eps.square() + _LOG_2PI).sum(-1) - 0.5 * logvar.sum(-1)
                chunk = torch.logsumexp(log_px + log_pz - log_qz, dim=0)
                total = chunk if total is None else torch.logaddexp(total, chunk)
            assert total is not None
            return total - math.log(num_samples)

    # -----------------------------------------------------------------------------------------
    # Lightning

    def _unpack(self, batch: Batch) -> Tensor:
        x = batch[0] if isinstance(batch, tuple | list) and len(batch) > 0 else batch
        if not isinstance(x, Tensor):
            raise ValueError(
                f"a batch must be a tensor x or a tuple/list whose first item is x, got {type(batch).__name__}"
            )
        return x  # checked by `encode`, once per batch

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """``recon + beta_t * KL``; logs ``train_elbo``, ``train_recon``, ``train_kl``.

        Each ``self.log`` costs Lightning about a millisecond, as much as a whole step of a small
        VAE, so the three values are summed on the device and logged as their means over the last
        ``Trainer(log_every_n_steps=...)`` steps, on the steps where Lightning hands them to the
        logger (and on the first step, for the progress bar).

        Raises:
            TypeError: If ``x`` is not a floating-point tensor.
            ValueError: If the batch is not ``x`` or a tuple/list starting with ``x``, or ``x`` has
                the wrong shape or (``check_inputs=True``) NaN, inf or out-of-range values.
        """
        x = self._unpack(batch)
        terms = self.loss_terms(x)
        values = {"train_elbo": terms["elbo"], "train_recon": terms["recon"], "train_kl": terms["kl"]}
        self._log_training(values, x.shape[0])
        return terms["loss"]

    # Under `trainer.fit(torch.compile(vae))` Lightning compiles the whole steps: logging runs
    # eagerly, outside the graph (Dynamo cannot trace `self.log`).
    @eager
    def _log_training(self, values: dict[str, Tensor], batch_size: int) -> None:
        self._train_log.update(self, values, batch_size=batch_size)

    @eager
    def _log_evaluation(self, stage: str, terms: dict[str, Tensor], size: int) -> None:
        self.log(f"{stage}_elbo", terms["elbo"], prog_bar=True, batch_size=size, sync_dist=True)
        self.log(f"{stage}_recon", terms["recon"], batch_size=size, sync_dist=True)
        self.log(f"{stage}_kl", terms["kl"], batch_size=size, sync_dist=True)

    def _evaluate(self, batch: Batch, stage: str) -> Tensor:
        x = self._unpack(batch)
        terms = self.loss_terms(x)
        self._log_evaluation(stage, terms, x.shape[0])
        return terms["mu"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Logs ``val_elbo``, ``val_recon``, ``val_kl`` and, per epoch, ``val_active_units``."""
        self.val_activity.update(self._evaluate(batch, "val"))

    def on_validation_epoch_end(self) -> None:
        """Logs ``val_active_units``: latents whose mean varies across the validation set."""
        self.log("val_active_units", self.val_activity.compute())
        self.val_activity.reset()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Logs ``test_elbo``, ``test_recon``, ``test_kl`` and ``test_nll`` (importance-weighted)."""
        self._evaluate(batch, "test")
        if self.hp.test_nll_samples > 0:
            x = self._unpack(batch)
            nll = -self.log_likelihood(x, num_samples=self.hp.test_nll_samples).mean()
            self.log("test_nll", nll, batch_size=x.shape[0], sync_dist=True)

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Reconstructions ``[B, *input_shape]`` of the batch."""
        return self.reconstruct(self._unpack(batch))

    def configure_optimizers(self) -> Any:
        """Adam, as the reference VAE recipes (override as usual)."""
        return torch.optim.Adam(self.parameters(), lr=self.hp.lr, weight_decay=self.hp.weight_decay)
