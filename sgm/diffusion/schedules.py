"""Sigma schedules of rectified flow, as pure functions (spec-dit-diffusion.md §5.5, §10).

Convention: ``x_σ = (1 − σ)·x0 + σ·ε``; σ = 1 is pure noise; a schedule runs from 1 down to 0.
"""

from __future__ import annotations

import torch

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
