"""Encode a training set once with the frozen VAE, so training reads latents instead of videos.

    python tools/precompute_latents.py --config configs/model/kaleido_tiny.yaml configs/training/tiny.yaml data.root=...

Reads the dataset exactly as training does (frame rule, resize and crop, letterboxed references),
encodes the video and every reference (one frame each) and writes
``<data.root>/latents/<id>.safetensors`` (``video [T, C, h, w]``, ``subjects [N, C, h, w]``,
float32; ``subject_mask [T, h, w]``, uint8: the latent cells that encode a subject's pixels, for
``subject_loss_weight``), each through a temporary name. Train on them with ``data.latents=true``. Each file's
metadata records what made it: the digest of the VAE's files, the data settings that shape the
inputs, and the digest of the sample's video and reference files. On a rerun (after an
interruption) a file is kept only when all three match; otherwise it is encoded again (a new VAE, a
changed clip). Bad samples are skipped and counted. ``--shard K/N`` splits the work between N
processes started at once (e.g. one thread each on a CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sat.arguments import config_parser, parse_config  # noqa: E402
from sgm.data.subject_mask import FOREGROUND_THRESHOLD, foreground, latent_mask, to_uint8  # noqa: E402
from sgm.data.video import LATENT_FOLDER, BadSampleError, VideoDataset  # noqa: E402
from sgm.models.wan_vae import build_vae, frame_multiple  # noqa: E402
from sgm.pipeline import resolve_components  # noqa: E402
from sgm.registry import resolve_device  # noqa: E402
from sgm.training import TrainingConfig  # noqa: E402

log = logging.getLogger("precompute_latents")
SETTINGS_KEYS = ("height", "width", "num_frames", "fps", "max_references")  # data settings that shape the inputs


def files_digest(paths: list[Path]) -> str:
    """sha256 over the names (relative to their common folder) and contents of ``paths``."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def vae_digest(path: str | Path) -> str:
    """Digest of a VAE on disk: every file of a diffusers folder, or the one ``.pth``."""
    path = Path(path)
    return files_digest(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])


def sample_digest(root: Path, sample_id: str) -> str:
    """Digest of the files a sample's latents are made from: its video and its reference images."""
    references = root / "references" / sample_id
    images = sorted(p for p in references.iterdir() if p.is_file()) if references.is_dir() else []
    return files_digest([root / "videos" / f"{sample_id}.mp4", *images])


def recorded(path: Path) -> dict | None:
    """The metadata a latent file was written with, or None when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata()
    except Exception:  # a truncated or foreign file is encoded again
        return None


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
    root = Path(config.data.root)
    out = root / LATENT_FOLDER
    out.mkdir(exist_ok=True)
    inputs = {
        "vae": vae_digest(config.vae.path),
        "settings": json.dumps({key: getattr(config.data, key) for key in SETTINGS_KEYS}, sort_keys=True),
        "subject_mask": f"foreground threshold {FOREGROUND_THRESHOLD}",  # files from before masks are encoded again
    }
    geometry = components.geometry
    written = skipped = kept = replaced = 0
    for sample_id in tqdm(dataset.ids[shard::shards], desc="latents"):
        target = out / f"{sample_id}.safetensors"
        metadata = {**inputs, "source": sample_digest(root, sample_id)}
        if target.is_file():
            if recorded(target) == metadata:
                kept += 1
                continue
            replaced += 1
        try:
            sample = dataset.load(sample_id)
        except BadSampleError as exc:
            log.warning("skipping sample %s", exc)
            skipped += 1
            continue
        with torch.no_grad():
            video = vae.encode(sample["mp4"][None].to(device).transpose(1, 2))[0]  # [T, C, h, w]
            subjects = vae.encode_references(sample["subject_images"][None].to(device))[0]  # [N, C, h, w]
        pixels = foreground(to_uint8(sample["mp4"]).transpose(0, 1)[None])  # [1, F, H, W]
        mask = latent_mask(pixels, temporal_stride=geometry.temporal_stride, spatial_stride=geometry.spatial_stride)
        tmp = target.with_suffix(".partial")
        tensors = {
            "video": video.cpu().contiguous(),
            "subjects": subjects.cpu().contiguous(),
            "subject_mask": mask[0].to(torch.uint8).contiguous(),  # [T, h, w]
        }
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, target)
        written += 1
    log.info(
        "%d written (%d of them replacing latents of other inputs), %d already there, %d bad samples skipped -> %s",
        written,
        replaced,
        kept,
        skipped,
        out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
