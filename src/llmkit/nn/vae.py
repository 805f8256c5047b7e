"""Encoders and decoders for a variational autoencoder (Kingma & Welling, 2014), MLP or convolutional.

An encoder maps ``x`` ``[B, *input_shape]`` to the mean and log-variance of a diagonal Gaussian
``q(z | x)``, each ``[B, L]``. A decoder maps ``z`` ``[B, L]`` to the parameters of ``p(x | z)``,
``[B, *input_shape]`` (logits for a Bernoulli likelihood, the mean for a Gaussian one).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from torch import Tensor, nn


def _mlp(widths: Sequence[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return layers


class MLPEncoder(nn.Module):
    """``x`` -> flatten -> ``[Linear, ReLU] * len(hidden_dims)`` -> ``Linear`` -> ``(mu, logvar)``.

    Args:
        input_shape: shape of one example, e.g. ``(64,)`` or ``(1, 8, 8)``.
        hidden_dims: widths of the hidden layers.
        latent_dim: ``L``.

    Examples:
        >>> import torch
        >>> mu, logvar = MLPEncoder(input_shape=(64,), hidden_dims=(32,), latent_dim=4)(torch.rand(5, 64))
        >>> mu.shape, logvar.shape
        (torch.Size([5, 4]), torch.Size([5, 4]))
    """

    def __init__(self, *, input_shape: Sequence[int], hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden_dims]
        self.body = nn.Sequential(nn.Flatten(), *_mlp(widths))
        # One layer gives both halves: [mu, logvar] = chunk(Linear(h), 2).
        self.head = nn.Linear(widths[-1], 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, *input_shape]`` -> ``mu``, ``logvar``, each ``[B, L]``."""
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """``z`` -> ``[Linear, ReLU] * len(hidden_dims)`` -> ``Linear`` -> reshape to ``output_shape``.

    Args:
        latent_dim: ``L``.
        hidden_dims: widths of the hidden layers, from ``z`` outwards.
        output_shape: shape of one example.

    Examples:
        >>> import torch
        >>> MLPDecoder(latent_dim=4, hidden_dims=(32,), output_shape=(1, 8, 8))(torch.randn(5, 4)).shape
        torch.Size([5, 1, 8, 8])
    """

    def __init__(self, *, latent_dim: int, hidden_dims: Sequence[int], output_shape: Sequence[int]) -> None:
        super().__init__()
        widths = [latent_dim, *hidden_dims]
        self.output_shape = tuple(output_shape)
        self.net = nn.Sequential(*_mlp(widths), nn.Linear(widths[-1], math.prod(output_shape)))

    def forward(self, z: Tensor) -> Tensor:
        """``[B, L]`` -> ``[B, *output_shape]``."""
        return self.net(z).view(z.shape[0], *self.output_shape)


def _halved(size: int) -> int:
    # Spatial size after Conv2d(kernel_size=3, stride=2, padding=1).
    return (size - 1) // 2 + 1


class ConvEncoder(nn.Module):
    """``[Conv2d(3, stride 2), ReLU]`` per channel count, flatten, ``Linear`` -> ``(mu, logvar)``.

    Each convolution halves the height and width (rounding up).

    Args:
        input_shape: ``(C, H, W)``.
        channels: output channels of each convolution.
        latent_dim: ``L``.

    Examples:
        >>> import torch
        >>> mu, _ = ConvEncoder(input_shape=(1, 8, 8), channels=(8, 16), latent_dim=4)(torch.rand(5, 1, 8, 8))
        >>> mu.shape
        torch.Size([5, 4])
    """

    def __init__(self, *, input_shape: Sequence[int], channels: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            in_channels, height, width = out_channels, _halved(height), _halved(width)
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(in_channels * height * width, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C, H, W]`` -> ``mu``, ``logvar``, each ``[B, L]``."""
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder`: ``Linear``, then transposed convolutions back to ``output_shape``.

    Each ``ConvTranspose2d`` doubles the height and width, less one where the encoder rounded up.

    Args:
        latent_dim: ``L``.
        channels: the encoder's channels, in the encoder's order.
        output_shape: ``(C, H, W)``.

    Examples:
        >>> import torch
        >>> ConvDecoder(latent_dim=4, channels=(8, 16), output_shape=(1, 8, 8))(torch.randn(5, 4)).shape
        torch.Size([5, 1, 8, 8])
    """

    def __init__(self, *, latent_dim: int, channels: Sequence[int], output_shape: Sequence[int]) -> None:
        super().__init__()
        out_channels, height, width = output_shape
        sizes = [(height, width)]
        for _ in channels:
            sizes.append((_halved(sizes[-1][0]), _halved(sizes[-1][1])))
        self.start_shape = (channels[-1], *sizes[-1])
        self.head = nn.Linear(latent_dim, math.prod(self.start_shape))
        layers: list[nn.Module] = []
        # Walk back up: the i-th transposed convolution restores sizes[i] from sizes[i + 1].
        targets = [out_channels, *channels[:-1]]
        for i in reversed(range(len(channels))):
            (h_out, w_out), (h_in, w_in) = sizes[i], sizes[i + 1]
            padding = (h_out - (2 * h_in - 1), w_out - (2 * w_in - 1))  # 0 or 1 on each axis
            layers += [
                nn.ReLU(),
                nn.ConvTranspose2d(channels[i], targets[i], kernel_size=3, stride=2, padding=1, output_padding=padding),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """``[B, L]`` -> ``[B, C, H, W]``."""
        return self.body(self.head(z).view(z.shape[0], *self.start_shape))
