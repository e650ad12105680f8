"""Run the Kaleido DiT end to end on the CPU: build, condition on references, sample latents.

Until the text encoder, the VAE and the shipped demo weights exist, this demo uses *random*
weights, random text embeddings and random reference latents, and writes latents (not a video).
It shows the network's contract, token layout and sampling loop at laptop scale.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sat.arguments import config_parser, parse_config  # noqa: E402
from sgm.diffusion.sampling import cfg_denoiser, sample  # noqa: E402
from sgm.diffusion.schedules import shifted_schedule  # noqa: E402
from sgm.registry import ModelConfig, build_dit_from_config, count_parameters  # noqa: E402

log = logging.getLogger("dit_demo")


@dataclass
class DemoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 1234
    num_steps: int = 20
    guidance_scale: float = 6.0
    shift: float = 7.0
    num_references: int = 2
    latent_frames: int = 3
    latent_height: int = 16
    latent_width: int = 24
    text_tokens: int = 16
    output_dir: str = "outputs/dit_demo"


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    _, config = parse_config(parser, DemoConfig, argv)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)

    start = time.perf_counter()
    model = build_dit_from_config(config.model).eval()
    arch = model.config
    log.info(
        "built %s: %s parameters (RANDOM weights: no trained demo model yet)",
        config.model.name,
        f"{count_parameters(model):,}",
    )

    shape = (1, config.latent_frames, arch.in_channels, config.latent_height, config.latent_width)
    refs = torch.randn(
        1, config.num_references, arch.in_channels, config.latent_height, config.latent_width, generator=generator
    )
    context = torch.randn(1, config.text_tokens, arch.text_dim, generator=generator)
    uncond = torch.randn(1, config.text_tokens, arch.text_dim, generator=generator)
    noise = torch.randn(shape, generator=generator)
    log.info(
        "random text embeddings and %d random reference latents (no text encoder / VAE yet)", config.num_references
    )

    denoise = cfg_denoiser(model, context, uncond, refs if config.num_references else None, config.guidance_scale)
    with torch.no_grad():
        latents = sample(denoise, noise, shifted_schedule(config.num_steps, config.shift))

    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "latents.safetensors"
    tmp = target.with_suffix(".tmp")
    save_file({"latents": latents.contiguous(), "references": refs}, str(tmp))
    os.replace(tmp, target)
    tokens = (config.num_references + config.latent_frames) * (config.latent_height // 2) * (config.latent_width // 2)
    log.info(
        "done: %d steps x 2 evaluations, %d tokens per evaluation, latents %s -> %s in %.1f s (random weights)",
        config.num_steps,
        tokens,
        list(latents.shape),
        target,
        time.perf_counter() - start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
