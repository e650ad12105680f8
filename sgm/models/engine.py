"""The training step's loss, assembled from the pieces sampling uses (``sgm.pipeline``).

Sampling (spec-dit §5.5, §7, in ``sgm.pipeline.KaleidoPipeline``): references fitted to the
video size and VAE-encoded one by one; prompt and negative prompt encoded; seeded float32 noise;
Euler on the shift-7 schedule with ``[uncond, cond]`` guidance; VAE decode; under sequence
parallelism the latents are sliced along H or W with the slice's RoPE offset.

Training (spec-dit §5.2) uses the same pieces: the video and each reference VAE-encoded (the
references letterboxed by the data loader with the sampler's function), captions through the
same conditioner (with dropout), σ and ε from a generator seeded by (seed, step, data rank) so a
sequence-parallel group draws them once, and the same slicing along H or W.
"""

from __future__ import annotations

import torch

from sat.parallel import ParallelState, shard, split_dim, token_offset
from sgm.data.subject_mask import foreground, latent_mask, subject_loss_weights, to_uint8
from sgm.diffusion.loss import rf_loss, training_sigmas
from sgm.geometry import VideoGeometry
from sgm.models.wan_vae import WanVAE
from sgm.modules.encoders.conditioner import TextConditioner


def step_generator(seed: int, step: int, data_rank: int) -> torch.Generator:
    """The same generator on every rank of a sequence-parallel group, a different one per replica and step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + data_rank)


def training_loss(
    network,
    vae: WanVAE,
    conditioner: TextConditioner,
    batch: dict,
    *,
    step: int,
    seed: int,
    parallel: ParallelState,
    geometry: VideoGeometry,
    sp_split: str = "auto",
    subject_weight: float = 1.0,
    shift: float | None = None,
    alignment_weight: float = 0.0,
    parts: dict | None = None,
) -> torch.Tensor:
    """The rectified-flow loss of one micro-batch (``mp4 [B, F, 3, H, W]``, ``subject_images
    [B, N, 3, H, W]``, ``txt``; or precomputed ``latents [B, T, C, h, w]`` and ``subject_latents
    [B, N, C, h, w]``); ``network(x, timesteps, context, subjects, token_offset=...)``. The
    resolution shift and the sequence-parallel slicing follow ``geometry``'s DiT patch.

    ``subject_weight`` ≠ 1 weights the squared error of the latent cells that encode a subject
    (``subject_mask [B, T, h, w]`` of precomputed latents, or found in ``mp4``) by that factor
    against 1 elsewhere, each item's weights averaging 1; 1 is the release's unweighted loss. ``shift``
    replaces the resolution shift of the noise levels (None: the release's).

    ``alignment_weight`` > 0 adds that times the alignment loss of the batch's ``alignment_targets``
    (``sgm.diffusion.alignment``; ``network`` then returns ``(velocity, alignment loss)`` when given
    ``alignment_targets``). ``parts``, when given, receives the ``diffusion`` and ``alignment`` losses
    (detached) of the returned sum."""
    device = vae.multiplier.device
    with torch.no_grad():
        if "latents" in batch:
            x0, subjects = batch["latents"].to(device), batch["subject_latents"].to(device)
        else:
            x0 = vae.encode(batch["mp4"].to(device).transpose(1, 2))  # [B, T, C, h, w]
            subjects = vae.encode_references(batch["subject_images"].to(device))
        context = conditioner(batch["txt"], step=step, data_rank=parallel.dp_rank)[0]["crossattn"]
    weights = None
    if subject_weight != 1.0:
        weights = subject_loss_weights(batch_subject_mask(batch, geometry).to(device), subject_weight)
        weights = weights[:, :, None]  # [B, T, 1, h, w]: one weight per latent cell, for every channel
    generator = step_generator(seed, step, parallel.dp_rank)
    sigmas = training_sigmas(x0.shape[0], geometry.tokens_per_frame(x0.shape[3], x0.shape[4]), generator, shift)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    patch = geometry.patch_size[1:]
    dim = split_dim(x0.shape[3], parallel.sp_size, sp_split, patch=patch)
    x0, noise, subjects = (shard(t, dim, parallel, patch=patch) for t in (x0, noise, subjects))
    if weights is not None:  # normalised over the whole item above, so the shards' mean is the item's
        weights = shard(weights, dim, parallel, patch=patch)
    offset = token_offset(tuple(x0.shape), dim, parallel, patch=patch)
    if alignment_weight <= 0:
        loss = rf_loss(
            lambda x, t, c, s: network(x, t, c, s, token_offset=offset), x0, noise, sigmas, context, subjects, weights
        )
        if parts is not None:
            parts["diffusion"] = loss.detach()
        return loss
    if parallel.sp_size > 1:
        raise ValueError("alignment: the alignment loss runs without sequence parallelism")
    targets = {k: v.to(device) for k, v in batch["alignment_targets"].items()}
    alignment = []

    def network_velocity(x, t, c, s):
        velocity, aux = network(x, t, c, s, token_offset=offset, alignment_targets=targets)
        alignment.append(aux)
        return velocity

    diffusion = rf_loss(network_velocity, x0, noise, sigmas, context, subjects, weights)
    if parts is not None:
        parts.update(diffusion=diffusion.detach(), alignment=alignment[0].detach())
    return diffusion + alignment_weight * alignment[0]


def batch_subject_mask(batch: dict, geometry: VideoGeometry) -> torch.Tensor:
    """``[B, T, h, w]`` bool: the latent cells of a batch that encode a subject's pixels."""
    if "subject_mask" in batch:
        return batch["subject_mask"]
    if "mp4" not in batch:
        raise ValueError(
            "subject_loss_weight: these precomputed latents have no subject_mask; "
            "run tools/precompute_latents.py again to add it"
        )
    pixels = foreground(to_uint8(batch["mp4"]).transpose(1, 2))  # [B, F, H, W]
    return latent_mask(pixels, temporal_stride=geometry.temporal_stride, spatial_stride=geometry.spatial_stride)
