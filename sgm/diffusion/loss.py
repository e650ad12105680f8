"""The rectified-flow training loss (spec-dit §5.2).

``σ = shift(sigmoid(n))`` with ``n ~ N(0, 1)`` (logit-normal) and the resolution-dependent shift;
``x_σ = (1 − σ)·x0 + σ·ε``; the network predicts the velocity ``ε − x0``; unweighted MSE over
every latent element, averaged over the batch (optionally weighted per element, e.g. toward the
subjects: ``sgm.data.subject_mask``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sgm.diffusion.schedules import TIMESTEP_SCALE, resolution_shift, shift_sigmas


def training_sigmas(
    batch: int, tokens_per_frame: int, generator: torch.Generator, shift: float | None = None
) -> torch.Tensor:
    """``[batch]`` float32 noise levels: logit-normal (0, 1), kept inside (0, 1), then shifted by
    ``shift``, or unset (the release) by the resolution shift of the DiT's ``tokens_per_frame`` video
    tokens per latent frame."""
    n = torch.randn(batch, generator=generator)
    eps = torch.finfo(torch.float32).eps
    sigmas = torch.sigmoid(n).clamp(eps, 1 - eps)
    return shift_sigmas(sigmas, resolution_shift(tokens_per_frame) if shift is None else shift)


def rf_loss(
    network: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    context: torch.Tensor,
    subjects: torch.Tensor | list[torch.Tensor] | None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared velocity error (a scalar) for latents ``x0 [B, T, C, h, w]`` at noise levels
    ``sigmas [B]``; ``weights`` (broadcast against ``x0``) scale each element's squared error."""
    s = sigmas.to(device=x0.device, dtype=torch.float32).view(-1, 1, 1, 1, 1)
    x_sigma = x0 * (1 - s) + noise * s
    velocity = network(x_sigma, sigmas.to(x0.device) * TIMESTEP_SCALE, context, subjects)
    error = (velocity.float() - (noise - x0)).pow(2)
    return (error if weights is None else error * weights).mean()
