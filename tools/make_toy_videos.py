"""Write a small toy training set in the release layout: squares moving across grey frames.

    python tools/make_toy_videos.py --out data/toy --count 8

``labels/<id>.txt`` (a caption), ``videos/<id>.mp4`` and ``references/<id>/ref*.png`` (the
square's colour alone; every other clip also gets a second reference). Enough to run the
training loop end to end; not enough to learn anything interesting (the shapes world of the demo
model is a separate tool).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("make_toy_videos")


def make_video_dataset(root: Path, count: int = 4, frames: int = 12, size: int = 64, fps: int = 8) -> Path:
    """A dataset in the release layout: moving coloured squares, captions, 1-2 references each."""
    import imageio.v2 as imageio
    import numpy as np
    from PIL import Image

    for folder in ("labels", "videos", "references"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 40)]
    for i in range(count):
        sample = f"clip{i:03d}"
        colour = colours[i % len(colours)]
        with imageio.get_writer(root / "videos" / f"{sample}.mp4", fps=fps, codec="libx264", macro_block_size=16) as w:
            for t in range(frames):
                frame = np.full((size, size, 3), 90, dtype=np.uint8)
                x = 4 + (t * 3 + 7 * i) % (size - 20)
                frame[20:36, x : x + 16] = colour
                w.append_data(frame)
        (root / "labels" / f"{sample}.txt").write_text(f"the object moves right {i}\nsecond line is ignored\n")
        refs = root / "references" / sample
        refs.mkdir(exist_ok=True)
        Image.new("RGB", (24, 24), colour).save(refs / "ref1.png")
        if i % 2:
            Image.new("RGB", (20, 30), colours[(i + 1) % len(colours)]).save(refs / "ref2.png")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to create")
    parser.add_argument("--count", type=int, default=8, help="number of clips")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=64, help="frame height and width")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = make_video_dataset(Path(args.out), args.count, args.frames, args.size)
    log.info("wrote %d clips under %s", args.count, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
