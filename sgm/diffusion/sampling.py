"""Sampling: Euler on σ with the state in float32 (or stochastic steps), and classifier-free guidance.

A denoiser is any ``denoise(x, sigma) -> velocity`` closure (rectified flow: ``v ≈ ε − x0``,
``dx/dσ = v``); guidance, reference latents and parallelism live in that closure, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
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


def start_index(sigmas: torch.Tensor, start_sigma: float) -> int:
    """Index of the first level of a decreasing schedule at or below ``start_sigma``: sampling from a
    given latent (SDEdit) enters the schedule there, re-noised to that level, and runs the rest.
    ``start_sigma`` 1 is the whole schedule, 0 its last level (σ = 0: the latent returned as given)."""
    if not 0.0 <= start_sigma <= 1.0:
        raise ValueError(f"start_sigma: expected a noise level in [0, 1], got {start_sigma}")
    return int((sigmas > start_sigma).sum())


def hold_known(x: torch.Tensor, known: KnownFrames | None, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x`` with its first ``o`` latent frames replaced by the known frames re-noised to ``sigma``
    (at σ = 0: the known frames themselves, exactly)."""
    if known is None:
        return x
    overlap = known.latents.shape[1]
    held = known.latents if float(sigma) == 0.0 else renoise(known.latents, known.noise, sigma)
    return torch.cat([held.to(x.dtype), x[:, overlap:]], dim=1)


def stochastic_step(
    x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, next_sigma: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """The clean latent the velocity points to, ``x0 = x − σ·v``, re-noised with fresh ``noise`` to
    ``σ_{k+1}`` (diffusers' ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``)."""
    return renoise(x - sigma * velocity, noise, next_sigma)


def sample(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: StepCallback | None = None,
    progress: bool = True,
    known: KnownFrames | None = None,
    fresh_noise: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler steps ``x ← x + (σ_{k+1} − σ_k)·v(x, σ_k)`` in float32; returns the final state.

    With ``fresh_noise`` (a draw of noise shaped like ``x``) the steps are stochastic instead
    (``stochastic_step``): each step forgets the noise it started from, so an early step's error is
    not carried along the trajectory; the last step (to σ = 0) is the same in both.
    With ``known``, the leading frames are set to the known latent at the current σ before every
    evaluation and to the known latent itself at the end (a continuation of a previous segment:
    the network sees them as part of the video and makes the rest agree with them).
    """
    x = x.to(torch.float32)
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    for k in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress):
        x = hold_known(x, known, sigmas[k])
        velocity = denoise(x, sigmas[k]).to(torch.float32)
        if fresh_noise is not None and sigmas[k + 1] > 0:
            x = stochastic_step(x, velocity, sigmas[k], sigmas[k + 1], fresh_noise().to(torch.float32))
        else:
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


def reference_guided_velocity(
    v_none: torch.Tensor, v_uncond: torch.Tensor, v_cond: torch.Tensor, *, scale: float, reference_scale: float
) -> torch.Tensor:
    """Text and references guided apart (as Phantom does): ``v_∅ + s_r·(v_u − v_∅) + s·(v_c − v_u)``
    with ``v_∅`` = negative text without references, ``v_u`` = negative text with references,
    ``v_c`` = the prompt with references. ``s_r = 1`` is plain CFG."""
    return v_none + reference_scale * (v_uncond - v_none) + scale * (v_cond - v_uncond)


def gather_evaluations(mine: list[torch.Tensor], total: int, group, *, like: torch.Tensor) -> list[torch.Tensor]:
    """Every rank of ``group`` evaluated ``evaluations[rank::size]``: all of them, in order, on every rank
    (one all-gather; a rank with fewer evaluations, or none, pads with zeros shaped ``like`` a velocity)."""
    size = dist.get_world_size(group)
    per_rank = -(-total // size)
    pad = torch.zeros_like(like, dtype=torch.float32)
    local = torch.stack(mine + [pad] * (per_rank - len(mine)))  # [per_rank, B, T, C, h, w]
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return [parts[k % size][k // size] for k in range(total)]


def guided_denoiser(
    model: Callable[..., torch.Tensor],
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    subjects,
    scale: float,
    *,
    reference_scale: float | None = None,
    reference_interval: tuple[float, float] | None = None,
    cfg_group=None,
) -> Denoiser:
    """``cfg_denoiser`` (the release's guidance, unchanged when both options are off) with:

    - ``reference_scale``: a third evaluation, the negative text *without* references, so text and
      references are guided separately (``reference_guided_velocity``; 3 evaluations per step);
    - ``reference_interval``: ``(low, high)``: reference guidance only at noise levels
      ``low ≤ σ ≤ high``, plain CFG (2 evaluations) at the others. Guidance in a limited interval
      (Kynkäänniemi et al. 2024, arXiv 2404.07724), which also saves the third evaluation outside
      it. The idea: a video's layout and motion are settled at high noise, so guiding the references
      only below that might sharpen the subjects without stilling them (measured on the demo's
      candidate model, it does not: its model card);
    - ``cfg_group``: the evaluations of a step are spread over the group's ranks (rank ``r`` runs
      evaluations ``r, r + size, ...``) and one all-gather brings them together; every rank returns
      the same velocity.
    """
    if reference_scale is None and cfg_group is None:
        return cfg_denoiser(model, context, uncond_context, subjects, scale)
    # (text, with references?) of each evaluation, in the order the velocities are combined
    evaluations = [(uncond_context, True), (context, True)]
    if reference_scale is not None and subjects is not None:
        evaluations.append((uncond_context, False))
    size = 1 if cfg_group is None else dist.get_world_size(cfg_group)
    rank = 0 if cfg_group is None else dist.get_rank(cfg_group)

    def step_evaluations(sigma: torch.Tensor) -> list:
        """This step's evaluations: the third only inside ``reference_interval``."""
        if len(evaluations) == 3 and reference_interval is not None:
            low, high = reference_interval
            if not low <= float(sigma) <= high:
                return evaluations[:2]
        return evaluations

    def run(x: torch.Tensor, sigma: torch.Tensor, group: list) -> torch.Tensor:
        """One network call for evaluations that agree on the references: ``[len(group)·B, ...]``."""
        n = len(group)
        timesteps = (sigma * TIMESTEP_SCALE).expand(n * x.shape[0])
        refs = subjects if group[0][1] else None
        if refs is not None and n > 1:
            refs = torch.cat([refs] * n) if isinstance(refs, torch.Tensor) else [torch.cat([s] * n) for s in refs]
        texts = torch.cat([text for text, _ in group])
        return model(torch.cat([x] * n), timesteps, texts, refs).to(torch.float32)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        now = step_evaluations(sigma)
        mine = now[rank::size]
        outputs = []
        for with_refs in (True, False):  # batch the evaluations that see the references (same token count)
            group = [e for e in mine if e[1] == with_refs]
            if group:
                outputs += list(run(x, sigma, group).chunk(len(group)))
        # back to this rank's order (with-references first is also the order of `evaluations`)
        velocities = outputs if cfg_group is None else gather_evaluations(outputs, len(now), cfg_group, like=x)
        if len(now) == 2:
            return guided_velocity(velocities[0], velocities[1], scale)
        return reference_guided_velocity(
            velocities[2], velocities[0], velocities[1], scale=scale, reference_scale=reference_scale
        )

    return denoise
