"""The engine: one place that turns prompts, videos and reference images into the DiT's tensors.

Sampling (spec-dit §5.5, §7): references fitted to the video size and VAE-encoded one by one;
prompt and negative prompt encoded; seeded float32 noise; Euler on the shift-7 schedule with
``[uncond, cond]`` guidance (both halves see the same references); the latent cast to the model
dtype; VAE decode. Under sequence parallelism the noise and every reference latent are sliced
along H or W, the DiT runs on its slice with the slice's RoPE offset, and the slices are
gathered before decoding.

Training (spec-dit §5.2) uses the same pieces: the video and each reference VAE-encoded (the
references letterboxed by the data loader with the sampler's function), captions through the
same conditioner (with dropout), σ and ε from a generator seeded by (seed, step, data rank) so a
sequence-parallel group draws them once, and the same slicing along H or W.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from sat.parallel import ParallelState, gather, shard, split_dim, token_offset
from sgm.data.references import fit_reference, image_to_tensor
from sgm.diffusion.loss import rf_loss, training_sigmas
from sgm.diffusion.sampling import cfg_denoiser, sample
from sgm.diffusion.schedules import SAMPLING_SHIFT, shifted_schedule
from sgm.models.wan_vae import SPATIAL_STRIDE, TEMPORAL_STRIDE, WanVAE
from sgm.modules.dit import KaleidoDiT
from sgm.modules.encoders.conditioner import WAN_NEGATIVE_PROMPT, TextConditioner


@dataclass(frozen=True)
class SamplerSettings:
    num_steps: int = 50
    guidance_scale: float = 6.0
    shift: float = SAMPLING_SHIFT
    negative_prompt: str = WAN_NEGATIVE_PROMPT


@dataclass
class Timings:
    references_s: float = 0.0
    text_s: float = 0.0
    sampling_s: float = 0.0
    decode_s: float = 0.0
    network_calls: int = 0
    extra: dict = field(default_factory=dict)


def latent_shape(height: int, width: int, latent_frames: int, channels: int) -> tuple[int, int, int, int]:
    """``(T, C, h, w)`` of the latent of a ``height × width`` video with ``latent_frames`` frames."""
    return latent_frames, channels, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE


def video_frames(latent_frames: int) -> int:
    return TEMPORAL_STRIDE * (latent_frames - 1) + 1


def prepare_references(images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """``[1, N, 3, H, W]`` in [-1, 1]: each image letterboxed on white to the video size."""
    return torch.stack([image_to_tensor(fit_reference(im, height, width)) for im in images])[None]


class KaleidoPipeline:
    """DiT + VAE + text conditioner on one device (and one SP group)."""

    def __init__(
        self,
        dit: KaleidoDiT,
        vae: WanVAE,
        conditioner: TextConditioner,
        settings: SamplerSettings,
        device: torch.device,
        parallel: ParallelState | None = None,
        sp_split: str = "auto",
    ):
        self.dit = dit.eval()
        self.vae = vae
        self.conditioner = conditioner
        self.settings = settings
        self.device = device
        self.parallel = parallel or ParallelState()
        self.sp_split = sp_split

    def reference_latents(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor | None:
        """``[1, N, C, h, w]`` latents of the references (each its own one-frame clip), or None."""
        if not images:
            return None
        pixels = prepare_references(images, height, width).to(self.device)
        return self.vae.encode_references(pixels)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        images: Sequence[Image.Image],
        seed: int,
        height: int,
        width: int,
        latent_frames: int,
        timings: Timings | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """The sampled latent ``[1, T, C, h, w]`` float32 (full size on every rank of the SP group)."""
        timings = timings or Timings()
        start = time.perf_counter()
        subjects = self.reference_latents(images, height, width)
        timings.references_s += time.perf_counter() - start

        start = time.perf_counter()
        context = self.conditioner([prompt])[0]["crossattn"].to(self.device)
        uncond = self.conditioner.unconditional(self.settings.negative_prompt, 1)["crossattn"].to(self.device)
        timings.text_s += time.perf_counter() - start

        shape = latent_shape(height, width, latent_frames, self.dit.config.in_channels)
        noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(self.device)
        dim = split_dim(shape[2], self.parallel.sp_size, self.sp_split)
        noise = shard(noise, dim, self.parallel)
        if subjects is not None:
            subjects = shard(subjects, dim, self.parallel)
        offset = token_offset(tuple(noise.shape), dim, self.parallel)

        def network(x, timesteps, ctx, subj):
            timings.network_calls += 1
            return self.dit(x, timesteps, ctx, subj, token_offset=offset)

        start = time.perf_counter()
        denoise = cfg_denoiser(network, context, uncond, subjects, self.settings.guidance_scale)
        sigmas = shifted_schedule(self.settings.num_steps, self.settings.shift)
        latents = sample(denoise, noise, sigmas, progress=progress)
        timings.sampling_s += time.perf_counter() - start
        return gather(latents, dim, self.parallel)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, timings: Timings | None = None) -> torch.Tensor:
        """``[1, T, C, h, w]`` -> video ``[1, 3, F, H, W]`` in [-1, 1]; the latent is first cast to the
        model dtype as the release does."""
        start = time.perf_counter()
        video = self.vae.decode(latents.to(self.dit.dtype))
        if timings is not None:
            timings.decode_s += time.perf_counter() - start
        return video


def step_generator(seed: int, step: int, data_rank: int) -> torch.Generator:
    """The same generator on every rank of a sequence-parallel group, a different one per replica and step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + data_rank)


def training_loss(
    network,
    vae: WanVAE,
    conditioner: TextConditioner,
    batch: dict,
    step: int,
    seed: int,
    parallel: ParallelState,
    sp_split: str = "auto",
) -> torch.Tensor:
    """The rectified-flow loss of one micro-batch (``mp4 [B, F, 3, H, W]``, ``subject_images
    [B, N, 3, H, W]``, ``txt``; or precomputed ``latents [B, T, C, h, w]`` and ``subject_latents
    [B, N, C, h, w]``); ``network(x, timesteps, context, subjects, token_offset=...)``."""
    device = vae.multiplier.device
    with torch.no_grad():
        if "latents" in batch:
            x0, subjects = batch["latents"].to(device), batch["subject_latents"].to(device)
        else:
            x0 = vae.encode(batch["mp4"].to(device).transpose(1, 2))  # [B, T, C, h, w]
            subjects = vae.encode_references(batch["subject_images"].to(device))
        context = conditioner(batch["txt"], step=step, data_rank=parallel.dp_rank)[0]["crossattn"]
    generator = step_generator(seed, step, parallel.dp_rank)
    sigmas = training_sigmas(x0.shape[0], x0.shape[3], x0.shape[4], generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    dim = split_dim(x0.shape[3], parallel.sp_size, sp_split)
    x0, noise, subjects = (shard(t, dim, parallel) for t in (x0, noise, subjects))
    offset = token_offset(tuple(x0.shape), dim, parallel)
    return rf_loss(lambda x, t, c, s: network(x, t, c, s, token_offset=offset), x0, noise, sigmas, context, subjects)
