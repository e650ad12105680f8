"""Alignment targets of the demo world, per latent cell and per reference.

Per latent cell: which shape and colour cover it, and where in its subject it sits
(``sgm/diffusion/alignment.py``; training key ``alignment``).

    python tools/make_token_targets.py --data data/shapes/train

For every clip with ``meta/<id>.json`` (``tools/make_shapes_dataset.py``) and ``latents/<id>.safetensors``
(``tools/precompute_latents.py`` or ``tools/make_probe_split.py``), the clip's subjects are drawn again
as their silhouettes (in order: a later subject covers an earlier one, as in the video) on the frames
that each latent frame encodes, and ``targets/<id>.safetensors`` gets, on the latent grid:
``class_shape [T, 1 + shapes, h, w]`` and ``class_colour [T, 1 + colours, h, w]`` (class 0 the
background; the share of the cell's pixels of each class, averaged over the latent frame's video
frames), ``offset [T, 2, h, w]`` (the mean (row, column) offset of the cell's subject pixels from their
subject's centre, in subject sizes) and ``offset_weight [T, 1, h, w]`` (the cell's subject share),
and per reference (``ref<k>.png`` shows subject ``k``) its subject's shape and colour as one-hot rows,
``reference_class_shape [N, 1 + shapes]`` and ``reference_class_colour [N, 1 + colours]``.
The latent grid and frame count are read from the latent file, so first-frame probe splits get
first-frame targets. Each file is written through a temporary name; a clip without meta or latents
is reported and the others go on (exit status 1 when any was skipped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgm.data.video import LATENT_FOLDER  # noqa: E402
from sgm.diffusion.alignment import TARGETS_FOLDER  # noqa: E402
from tools.shapes_world import COLOURS, FRAME, SHAPES, silhouette  # noqa: E402

log = logging.getLogger("make_token_targets")
COLOUR_NAMES = tuple(COLOURS)


def pixel_labels(subjects: list[dict], frame: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One video frame: ``shape`` and ``colour`` class per pixel ``[FRAME, FRAME]`` (0: background,
    1 + catalogue index) and the (row, column) offset of each subject pixel from its subject's centre
    in subject sizes ``[2, FRAME, FRAME]`` (0 on the background). Sprites are placed as
    ``shapes_world.render`` places them."""
    shape = np.zeros((FRAME, FRAME), np.int64)
    colour = np.zeros((FRAME, FRAME), np.int64)
    offset = np.zeros((2, FRAME, FRAME), np.float32)
    rows, cols = np.mgrid[0:FRAME, 0:FRAME].astype(np.float32) + 0.5  # pixel centres
    for subject in subjects:
        x, y, size = subject["track"][frame]
        left, top = int(round(x - size / 2)), int(round(y - size / 2))
        inside = np.zeros((FRAME, FRAME), bool)
        mask = np.asarray(silhouette(subject["shape"], size)) > 127  # [size, size]
        # the part of the sprite inside the frame
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + size, FRAME), min(left + size, FRAME)
        if r1 <= r0 or c1 <= c0:
            continue
        inside[r0:r1, c0:c1] = mask[r0 - top : r1 - top, c0 - left : c1 - left]
        shape[inside] = 1 + SHAPES.index(subject["shape"])
        colour[inside] = 1 + COLOUR_NAMES.index(subject["colour"])
        offset[0][inside] = (rows[inside] - (top + size / 2)) / size
        offset[1][inside] = (cols[inside] - (left + size / 2)) / size
    return shape, colour, offset


def latent_frame_groups(video_frames: int, latent_frames: int) -> list[list[int]]:
    """The video frames each latent frame encodes: the Wan VAE encodes frame 0 alone, then ``s``
    frames per latent frame (``s = (F − 1) / (T − 1)``); one latent frame is the first frame."""
    if latent_frames == 1:
        return [[0]]
    stride, rest = divmod(video_frames - 1, latent_frames - 1)
    if rest:
        raise ValueError(f"{latent_frames} latent frames do not encode {video_frames} video frames")
    return [[0]] + [list(range(1 + (k - 1) * stride, 1 + k * stride)) for k in range(1, latent_frames)]


def clip_targets(meta: dict, latent_frames: int, grid: tuple[int, int], references: int = 0) -> dict[str, torch.Tensor]:
    """The targets of one clip on a latent grid ``grid`` (h, w) of ``latent_frames`` frames, with the
    classes of its first ``references`` references."""
    cell = FRAME // grid[0]
    if grid[0] * cell != FRAME or grid[1] * cell != FRAME:
        raise ValueError(f"a latent grid of {grid} does not tile {FRAME} x {FRAME} pixels")
    subjects = meta["subjects"]
    out: dict[str, list[torch.Tensor]] = {"class_shape": [], "class_colour": [], "offset": [], "offset_weight": []}
    for group in latent_frame_groups(len(subjects[0]["track"]), latent_frames):
        per_frame = {key: [] for key in out}
        for frame in group:
            shape, colour, offset = (torch.from_numpy(a) for a in pixel_labels(subjects, frame))
            subject = (shape > 0).float()[None]  # [1, H, W]
            per_frame["class_shape"].append(F.one_hot(shape, 1 + len(SHAPES)).permute(2, 0, 1).float())
            per_frame["class_colour"].append(F.one_hot(colour, 1 + len(COLOUR_NAMES)).permute(2, 0, 1).float())
            per_frame["offset"].append(offset * subject)
            per_frame["offset_weight"].append(subject)
        for key, maps in per_frame.items():
            pooled = F.avg_pool2d(torch.stack(maps), cell).mean(0)  # [K, h, w]: shares over the cell and frames
            out[key].append(pooled)
    stacked = {key: torch.stack(maps) for key, maps in out.items()}  # [T, K, h, w]
    # offset: the mean over the cell's subject pixels, not over all its pixels
    stacked["offset"] = stacked["offset"] / stacked["offset_weight"].clamp_min(1e-6)
    if references:
        shapes = torch.tensor([1 + SHAPES.index(s["shape"]) for s in subjects[:references]])
        colours = torch.tensor([1 + COLOUR_NAMES.index(s["colour"]) for s in subjects[:references]])
        stacked["reference_class_shape"] = F.one_hot(shapes, 1 + len(SHAPES)).float()
        stacked["reference_class_colour"] = F.one_hot(colours, 1 + len(COLOUR_NAMES)).float()
    return stacked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a split folder with meta/ and latents/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(args.data)
    if not (root / LATENT_FOLDER).is_dir():
        parser.exit(2, f"error: --data: {root} has no {LATENT_FOLDER}/ folder (run tools/precompute_latents.py)\n")
    out_dir = root / TARGETS_FOLDER
    out_dir.mkdir(exist_ok=True)
    ids = sorted(p.stem for p in (root / LATENT_FOLDER).glob("*.safetensors"))
    bad = []
    for sample_id in tqdm(ids, desc="targets"):
        meta_path = root / "meta" / f"{sample_id}.json"
        try:
            meta = json.loads(meta_path.read_text())
            with safe_open(str(root / LATENT_FOLDER / f"{sample_id}.safetensors"), framework="pt") as handle:
                latent_frames, _, *grid = handle.get_slice("video").get_shape()
                references = handle.get_slice("subjects").get_shape()[0]
            targets = clip_targets(meta, latent_frames, tuple(grid), references)
        except (OSError, ValueError, KeyError) as exc:
            bad.append(sample_id)
            log.warning("%s: %s", sample_id, exc)
            continue
        tmp = out_dir / f".{sample_id}.safetensors.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in targets.items()}, str(tmp))
        os.replace(tmp, out_dir / f"{sample_id}.safetensors")
    log.info("%d clips: %d target files written to %s, %d skipped", len(ids), len(ids) - len(bad), out_dir, len(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
