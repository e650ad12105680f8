"""Quality and size of fp8 weight storage against the model dtype, in one run.

    python benchmarks/weight_formats.py [--skip-large]

For the shipped demo model (float32) and the ``kaleido-1.3b`` architecture (random weights, bf16,
the committed tiny text encoder and VAE; 64×64, 3 latent frames, 1 reference): the blocks' resident
weight bytes, the relative error (‖a − b‖ / ‖b‖) of one DiT forward on the same input, and of a
sampled latent, for ``memory.weights`` = fp8 and fp8_scaled against the model dtype. Prints; asserts
nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sat.config import load_config  # noqa: E402
from sgm.registry import ARCHITECTURES  # noqa: E402

log = logging.getLogger("weight_formats")
ARCH_1P3B = [  # kaleido-1.3b (the registry's) reading the committed tiny text encoder's features
    "model.name=kaleido-1.3b",
    f"model.arch.text_dim={ARCHITECTURES['kaleido-tiny'].text_dim}",
    "model.dtype=bfloat16",
]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(name: str, files: list[str], overrides: list[str], request: dict) -> None:
    from sgm.memory import resident_weight_bytes
    from sgm.pipeline import KaleidoPipeline, SamplingConfig

    rows, reference = [], None
    for weights in ("model", "fp8", "fp8_scaled"):
        torch.manual_seed(0)  # the same random weights (1.3B) before quantisation
        config = load_config(SamplingConfig, files, [*overrides, f"memory.weights={weights}"])
        pipe = KaleidoPipeline.from_config(config, device=torch.device("cpu"))
        dit = pipe.dit
        generator = torch.Generator().manual_seed(5)
        height, width = request["height"], request["width"]
        shape = pipe.geometry.latent_shape(height=height, width=width, latent_frames=3, channels=16)
        x = torch.randn((1, *shape), generator=generator).to(dit.dtype)
        subjects = torch.randn((1, 1, 16, *shape[2:]), generator=generator).to(dit.dtype)
        context = torch.randn((1, 8, dit.config.text_dim), generator=generator).to(dit.dtype)
        with torch.no_grad():
            forward = dit(x, torch.tensor([500.0]), context, subjects)
        latents = pipe.generate_latents("a red ball", **request)
        if reference is None:
            reference = (forward, latents)
        rows.append(
            (
                weights,
                resident_weight_bytes(dit.transformer.layers),
                relative(forward, reference[0]),
                relative(latents, reference[1]),
            )
        )
    log.info("%s:", name)
    log.info("| weights | blocks' bytes | × model dtype | forward rel. error | sampled latent rel. error |")
    log.info("|---|---|---|---|---|")
    for weights, size, forward_error, latent_error in rows:
        log.info(
            "| %s | %s | %.3f | %.4f | %.4f |", weights, f"{size:,}", size / rows[0][1], forward_error, latent_error
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-large", action="store_true", help="only the demo model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sgm.pipeline").setLevel(logging.ERROR)
    os.chdir(ROOT)
    refs = [Image.open(ROOT / "assets/kaleido-shapes/examples/heldout_00009_ref1.png").convert("RGB")]
    measure(
        "demo model (float32, 25 steps)",
        ["configs/sampling/shapes.yaml"],
        [],
        {"references": refs, "seed": 1, "height": 96, "width": 96, "num_frames": 9},
    )
    if not args.skip_large:
        files = [str(ROOT / "configs/model/kaleido_tiny.yaml"), str(ROOT / "configs/sampling/tiny.yaml")]
        measure(
            "kaleido-1.3b architecture (random weights, bfloat16, 4 steps)",
            files,
            [*ARCH_1P3B, "num_steps=4"],
            {"references": refs, "seed": 1, "height": 64, "width": 64, "num_frames": 9},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
