"""Encode a training set once with the frozen VAE, so training reads latents instead of videos.

    python tools/precompute_latents.py --config configs/model/kaleido_tiny.yaml configs/training/tiny.yaml data.root=...

Reads the dataset exactly as training does (frame rule, resize and crop, letterboxed references),
encodes the video and every reference (one frame each) and writes
``<data.root>/latents/<id>.safetensors`` (``video [T, C, h, w]``, ``subjects [N, C, h, w]``,
float32), each through a temporary name. Train on them with ``data.latents=true``. Existing files
are kept (rerun after an interruption); bad samples are skipped and counted. ``--shard K/N`` splits
the work between N processes started at once (e.g. one thread each on a CPU).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sat.arguments import config_parser, parse_config  # noqa: E402
from sgm.data.video import LATENT_FOLDER, BadSampleError, VideoDataset  # noqa: E402
from sgm.models.wan_vae import build_vae, frame_multiple  # noqa: E402
from sgm.pipeline import resolve_components  # noqa: E402
from sgm.registry import resolve_device  # noqa: E402
from sgm.training import TrainingConfig  # noqa: E402

log = logging.getLogger("precompute_latents")


def main(argv=None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--shard", default="0/1", help="K/N: this process encodes samples K, K+N, ... (run N at once)")
    args, config = parse_config(parser, TrainingConfig, argv)
    try:
        shard, shards = (int(v) for v in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        parser.exit(2, f"error: --shard must be K/N with 0 <= K < N, got '{args.shard}'\n")
    config.data.latents = False
    try:
        components = resolve_components(config)
        dataset = VideoDataset(config.data, frames_multiple=frame_multiple(components.geometry.temporal_stride))
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    device = resolve_device(config.device)
    config.vae.path = components.vae_path
    vae = build_vae(config.vae, device)
    out = Path(config.data.root) / LATENT_FOLDER
    out.mkdir(exist_ok=True)
    written = skipped = kept = 0
    for sample_id in tqdm(dataset.ids[shard::shards], desc="latents"):
        target = out / f"{sample_id}.safetensors"
        if target.is_file():
            kept += 1
            continue
        try:
            sample = dataset.load(sample_id)
        except BadSampleError as exc:
            log.warning("skipping sample %s", exc)
            skipped += 1
            continue
        with torch.no_grad():
            video = vae.encode(sample["mp4"][None].to(device).transpose(1, 2))[0]  # [T, C, h, w]
            subjects = vae.encode_references(sample["subject_images"][None].to(device))[0]  # [N, C, h, w]
        tmp = target.with_suffix(".partial")
        save_file({"video": video.cpu().contiguous(), "subjects": subjects.cpu().contiguous()}, str(tmp))
        os.replace(tmp, target)
        written += 1
    log.info("%d written, %d already there, %d bad samples skipped -> %s", written, kept, skipped, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
