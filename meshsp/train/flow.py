"""Flow matching as diffusers' ``FlowMatchEulerDiscreteScheduler`` samples it.

``x_t = (1 - sigma) * x0 + sigma * noise`` with ``sigma`` in ``[0, 1]`` and the transformer's
timestep ``t = sigma * 1000``; the model predicts the velocity ``noise - x0`` (the Euler step of the
scheduler is ``x_{t'} = x_t + (sigma' - sigma) * prediction``). The loss is the mean squared error
over the whole prediction: every rank of a data rank computes it on the full sequence.

Each sample's noise and sigma come from a generator seeded by ``(seed, step, position in the global
batch)``, so they depend neither on the layout nor on which rank draws them.

Example::

    noise, t = draw_noise(x0, seed=0, step=3, positions=[0, 1])
    x_t, target = noisy_and_target(x0, noise, t)
    loss = flow_loss(prediction, target)
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

__all__ = ["draw_noise", "flow_loss", "noisy_and_target", "sample_generator"]


def sample_generator(seed: int, step: int, position: int, stream: str = "noise") -> torch.Generator:
    """A CPU generator of its own for one sample of one step (a 63-bit seed from the tuple); ``stream``
    keeps independent draws apart (``"noise"``: sigma and noise, ``"vae"``: the latent sample)."""
    return torch.Generator().manual_seed(random.Random(f"{stream}:{seed}:{step}:{position}").getrandbits(63))


def draw_noise(x0: torch.Tensor, *, seed: int, step: int, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise like x0, timesteps [b] in [0, 1000])``, sample ``i`` drawn from ``positions[i]``'s generator."""
    if len(positions) != x0.shape[0]:
        raise ValueError(f"{len(positions)} positions for a batch of {x0.shape[0]} samples; give one per sample.")
    noises, sigmas = [], []
    for position in positions:
        g = sample_generator(seed, step, position)
        sigmas.append(torch.rand((), generator=g))
        noises.append(torch.randn(x0.shape[1:], generator=g, dtype=torch.float32))
    noise = torch.stack(noises).to(device=x0.device, dtype=x0.dtype)
    return noise, torch.stack(sigmas).mul(1000.0).to(x0.device)


def noisy_and_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, velocity target)`` for timesteps in the scheduler's ``[0, 1000]``."""
    sigma = (timesteps.float() / 1000.0).view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - sigma) * x0 + sigma * noise, noise - x0


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element, in float32."""
    return F.mse_loss(prediction.float(), target.float())
