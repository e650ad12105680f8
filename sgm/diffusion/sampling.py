"""Sampling: Euler on σ with the state in float32, and classifier-free guidance.

A denoiser is any ``denoise(x, sigma) -> velocity`` closure (rectified flow: ``v ≈ ε − x0``,
``dx/dσ = v``); guidance, reference latents and parallelism live in that closure, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sgm.diffusion.schedules import TIMESTEP_SCALE

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class KnownFrames:
    """Leading latent frames held at a known clean latent (the tail of a previous segment)."""

    latents: torch.Tensor  # [B, o, C, h, w] clean (σ = 0)
    noise: torch.Tensor  # [B, o, C, h, w] what they are re-noised with: the segment's own starting noise


def renoise(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_σ = (1 − σ)·x0 + σ·ε``: where a clean latent sits at noise level σ."""
    return (1 - sigma) * clean + sigma * noise


def hold_known(x: torch.Tensor, known: KnownFrames | None, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x`` with its first ``o`` latent frames replaced by the known frames re-noised to ``sigma``
    (at σ = 0: the known frames themselves, exactly)."""
    if known is None:
        return x
    overlap = known.latents.shape[1]
    held = known.latents if float(sigma) == 0.0 else renoise(known.latents, known.noise, sigma)
    return torch.cat([held.to(x.dtype), x[:, overlap:]], dim=1)


def sample(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: StepCallback | None = None,
    progress: bool = True,
    known: KnownFrames | None = None,
) -> torch.Tensor:
    """Euler steps ``x ← x + (σ_{k+1} − σ_k)·v(x, σ_k)`` in float32; returns the final state.

    With ``known``, the leading frames are set to the known latent at the current σ before every
    evaluation and to the known latent itself at the end (a continuation of a previous segment:
    the network sees them as part of the video and makes the rest agree with them).
    """
    x = x.to(torch.float32)
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    for k in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress):
        x = hold_known(x, known, sigmas[k])
        velocity = denoise(x, sigmas[k]).to(torch.float32)
        x = x + (sigmas[k + 1] - sigmas[k]) * velocity
        if callback is not None:
            callback(k, x, sigmas[k])
    return hold_known(x, known, 0.0)


def guided_velocity(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``v_u + s·(v_c − v_u)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def double_subjects(subjects):
    """The same reference latents for both CFG halves (``[uncond, cond]`` batch order)."""
    if subjects is None:
        return None
    if isinstance(subjects, torch.Tensor):
        return torch.cat([subjects, subjects])
    return [torch.cat([s, s]) for s in subjects]


def cfg_denoiser(
    model: Callable[..., torch.Tensor],
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    subjects,
    scale: float,
) -> Denoiser:
    """A denoiser that evaluates ``[uncond, cond]`` in one network call (2 evaluations per step), or
    the conditional half alone when ``scale`` is 1 (what step- and CFG-distilled LoRAs sample with).

    The two halves differ only in their text; both see the same reference latents (release).
    The timestep fed to the network is ``1000·σ``.
    """
    if scale == 1.0:  # v_u + 1·(v_c − v_u) = v_c: one evaluation per step, no unconditional half

        def conditional(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            timesteps = (sigma * TIMESTEP_SCALE).expand(x.shape[0])
            return model(x, timesteps, context, subjects).to(torch.float32)

        return conditional
    both_contexts = torch.cat([uncond_context, context])
    both_subjects = double_subjects(subjects)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        timesteps = (sigma * TIMESTEP_SCALE).expand(2 * x.shape[0])
        out = model(torch.cat([x, x]), timesteps, both_contexts, both_subjects).to(torch.float32)
        v_uncond, v_cond = out.chunk(2)
        return guided_velocity(v_uncond, v_cond, scale)

    return denoise
