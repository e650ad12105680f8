"""Sigma schedules of rectified flow, as pure functions (spec-dit-diffusion.md §5.5, §10).

Convention: ``x_σ = (1 − σ)·x0 + σ·ε``; σ = 1 is pure noise; a schedule runs from 1 down to 0.
"""

from __future__ import annotations

import math

import torch

# The DiT's timestep input is 1000·σ (continuous), in training and sampling alike (spec-dit §2).
TIMESTEP_SCALE = 1000.0
# The release samples with a fixed shift (not the resolution-dependent training shift).
SAMPLING_SHIFT = 7.0


def shifted_schedule(num_steps: int, shift: float = SAMPLING_SHIFT) -> torch.Tensor:
    """``num_steps + 1`` sigmas ``σ_k = shift(1−u)/(1 + (shift−1)(1−u))``, ``u = k/num_steps``: float32.

    The release's rounding recipe (spec §10 item 1), which this reproduces bit for bit:
    ``u`` and ``s = u / (shift + u − shift·u)`` in float64, ``s`` cast to float32, then
    ``σ = 1 − s`` in float32. Evaluating ``1 − s`` in float64 first differs by one float32 step
    at some indices (16, 42 and 48 of the 50-step schedule).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    s = (u / (shift + u - shift * u)).to(torch.float32)
    return 1.0 - s


# Resolution-dependent training shift (spec §5.2): mu is linear in the spatial tokens per frame.
SHIFT_BASE_TOKENS, SHIFT_BASE_MU = 256, 0.5
SHIFT_MAX_TOKENS, SHIFT_MAX_MU = 4096, 1.15


def resolution_shift(tokens_per_frame: int) -> float:
    """``e^μ`` with ``μ = 0.5 + 0.65·(L − 256)/(4096 − 256)``, ``L`` = the DiT's video tokens per latent
    frame (``VideoGeometry.tokens_per_frame``; the release: ``(h·w)/(2·2)`` for its 2×2 patch).

    512×896 video (latent 64×112, L = 1792): 2.138; 720×1280 (L = 3600): 2.904.
    """
    slope = (SHIFT_MAX_MU - SHIFT_BASE_MU) / (SHIFT_MAX_TOKENS - SHIFT_BASE_TOKENS)
    return math.exp(SHIFT_BASE_MU + slope * (tokens_per_frame - SHIFT_BASE_TOKENS))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``s·σ / (s·σ + 1 − σ)`` evaluated as the release does, bit for bit in float32 (spec §10 item 3).

    Order: ``r = 1/σ``; ``a = float32(s) + r``; ``a = a − 1``; ``out = reciprocal(a)·float32(s)``.
    The algebraically equal ``sσ/(sσ + 1 − σ)`` misses the release's values by one float32 step
    in about 40 % of cases.
    """
    s = torch.tensor(shift, dtype=torch.float32)
    a = s + torch.reciprocal(sigmas.to(torch.float32))
    a = a - 1
    return torch.reciprocal(a) * s
