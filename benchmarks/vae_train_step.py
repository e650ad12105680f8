"""Training-step speed of the small Wan VAE: our RMS norms vs diffusers' own, in the same run.

``tools/train_vae.py`` switches the VAE's Wan RMS norms to their sum-of-squares form
(``sgm.models.wan_vae.use_fast_rms_norms``). This times one training step (encode the posterior
mean, decode, L1 loss, backward) of two copies of one ``AutoencoderKLWan`` with the same weights:
diffusers' norms (``F.normalize``) and ours. Repeats are interleaved (diffusers, ours, ...) and
medians reported, with the largest output difference between the two.

Prints the ratio (diffusers / ours: > 1 means ours is faster). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgm.models.wan_vae import use_fast_rms_norms  # noqa: E402

log = logging.getLogger("vae_train_step")


def train_step(model: torch.nn.Module, video: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds of one forward + backward, and the reconstruction."""
    start = time.perf_counter()
    out = model(video, sample_posterior=False).sample
    (out - video).abs().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, out.detach()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dim", type=int, default=16, help="the shipped demo VAE's width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=40, help="pixels (a training crop)")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    theirs = AutoencoderKLWan(base_dim=args.base_dim, z_dim=16, num_res_blocks=1, dim_mult=[1, 2, 2, 2])
    ours = copy.deepcopy(theirs)
    norms = use_fast_rms_norms(ours)
    video = torch.rand(args.batch, 3, args.frames, args.crop, args.crop) * 2 - 1
    times = {"diffusers": [], "ours": []}
    outputs = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, model in (("diffusers", theirs), ("ours", ours)):
            seconds, outputs[name] = train_step(model, video)
            if repeat:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    difference = (outputs["ours"] - outputs["diffusers"]).abs().max().item()
    log.info(
        "VAE base %d, %d norms, batch %d x %d frames x %d px, %d threads: diffusers %.3f s, ours %.3f s per step; "
        "ratio %.2f; max output difference %.1e",
        args.base_dim,
        norms,
        args.batch,
        args.frames,
        args.crop,
        torch.get_num_threads(),
        median["diffusers"],
        median["ours"],
        median["diffusers"] / median["ours"],
        difference,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
