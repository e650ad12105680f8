"""Generate the synthetic multi-subject world (tools/shapes_world.py) in the release's layout.

    python tools/make_shapes_dataset.py --out data/shapes --count 3000 --seed 0

Writes ``<out>/train/`` and ``<out>/heldout/``, each with ``labels/``, ``videos/`` and
``references/<id>/ref<k>.png``, plus ``meta/<id>.json`` (subjects, motions, tracks) for
evaluation. Every 10th clip is held out; held-out clips contain at least one colour-shape pair
that training never shows (``shapes_world.is_held_out``). Subjects of a clip have distinct
colours and tracks that never overlap. Seeded: the same seed gives the same clips.

``--aligned PIXELS`` writes a diagnostic world instead (not the demo's): every subject stands
still at the sprite size, its box starting on a PIXELS lattice (16: the next demo DiT's token, VAE
stride 4 times patch 4; 32: a token of patch 8, one sprite per token), and its reference is the
subject upright at that size in the middle of a white frame-sized canvas, so that copying a
reference into the clip is a shift by whole tokens, with no rescaling, rotation or sub-token offset
(model card, "An aligned world").

``--upright`` writes a second diagnostic world: the demo's clips (positions and motions, so
sub-token offsets), but every subject at the sprite size and its reference as the aligned world
draws it (upright, that size): what is left of copying a reference is where it lands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.shapes_world import (  # noqa: E402
    BACKGROUND_NAMES,
    BACKGROUNDS,
    COLOURS,
    FRAMES,
    MOTIONS,
    SHAPES,
    SPRITE,
    Subject,
    aligned_reference_image,
    caption,
    grid_start,
    is_held_out,
    plan_motion,
    reference_image,
    render,
    start_for,
)

log = logging.getLogger("make_shapes_dataset")
HELD_OUT_EVERY = 10
FPS = 8


def tracks_apart(subjects: list[Subject]) -> bool:
    for a in range(len(subjects)):
        for b in range(a + 1, len(subjects)):
            for (xa, ya, sa), (xb, yb, sb) in zip(subjects[a].track, subjects[b].track, strict=True):
                if abs(xa - xb) < (sa + sb) / 2 + 2 and abs(ya - yb) < (sa + sb) / 2 + 2:
                    return False
    return True


HELD_OUT_PAIRS = [(s, c) for s in SHAPES for c in COLOURS if is_held_out(s, c)]


def choose_pairs(rng: np.random.Generator, held_out: bool, count: int) -> list[tuple[str, str]]:
    """Distinct-colour (shape, colour) pairs; a held-out clip starts with a held-out pair, a
    training clip has none."""
    pairs = [HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]] if held_out else []
    while len(pairs) < count:
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        if colour not in {c for _, c in pairs} and not is_held_out(shape, colour):
            pairs.append((shape, colour))
    return pairs


def make_clip(seed: int, index: int, placed: bool = False, aligned: int | None = None, upright: bool = False) -> dict:
    """One clip's frames, references, caption and metadata (pure function of ``seed`` and ``index``;
    ``placed`` changes only the caption, which then also says where each subject starts and the background;
    ``aligned`` (pixels) makes the aligned world's clip: still subjects on that lattice, upright references;
    ``upright``: the demo's clip with every subject at the sprite size and upright references at that size)."""
    rng = np.random.default_rng([seed, index])
    held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    count = int(rng.integers(1, 4))
    for _ in range(100):
        pairs = choose_pairs(rng, held_out, count)
        subjects = []
        for shape, colour in pairs:
            if aligned:
                subject = Subject(shape, colour, "still", grid_start(rng, aligned), SPRITE)
            else:
                motion = str(rng.choice(MOTIONS))
                start = start_for(motion, rng)
                size = SPRITE + int(rng.integers(-2, 5))  # drawn in both worlds, after the start: the same clips follow
                subject = Subject(shape, colour, motion, start, SPRITE if upright else size)
            plan_motion(subject, FRAMES)
            subjects.append(subject)
        if tracks_apart(subjects):
            break
        if rng.random() < 0.2:
            count = max(1, count - 1)  # crowded: fewer subjects
    else:
        raise RuntimeError(f"clip {index}: no non-overlapping layout found")
    background = int(rng.integers(len(BACKGROUNDS)))
    return {
        "id": f"{'heldout' if held_out else 'train'}_{index:05d}",
        "split": "heldout" if held_out else "train",
        "frames": render(subjects, BACKGROUNDS[background]),
        "references": [
            aligned_reference_image(s.shape, s.colour)
            if aligned or upright
            else reference_image(s.shape, s.colour, rng)
            for s in subjects
        ],
        "caption": caption(subjects, rng, BACKGROUND_NAMES[background] if placed else None),
        "background": BACKGROUND_NAMES[background],
        "subjects": [
            {"shape": s.shape, "colour": s.colour, "motion": s.motion, "track": [list(p) for p in s.track]}
            for s in subjects
        ],
    }


def write_clip(root: Path, clip: dict) -> None:
    import imageio.v2 as imageio

    folder = root / clip["split"]
    for sub in ("labels", "videos", "meta", f"references/{clip['id']}"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    video = folder / "videos" / f"{clip['id']}.mp4"
    tmp = video.with_suffix(".tmp.mp4")
    with imageio.get_writer(
        tmp, fps=FPS, codec="libx264", quality=9, macro_block_size=16, pixelformat="yuv420p"
    ) as writer:
        for frame in clip["frames"]:
            writer.append_data(frame)
    tmp.replace(video)
    for k, image in enumerate(clip["references"], start=1):
        image.save(folder / "references" / clip["id"] / f"ref{k}.png")
    (folder / "labels" / f"{clip['id']}.txt").write_text(clip["caption"] + "\n")
    meta = {k: clip[k] for k in ("id", "split", "caption", "background", "subjects")}
    (folder / "meta" / f"{clip['id']}.json").write_text(json.dumps(meta))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root (train/ and heldout/ are created)")
    parser.add_argument("--count", type=int, default=3000, help="clips in all (every 10th held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--placed", action="store_true", help="captions also say where each subject starts and the background"
    )
    parser.add_argument(
        "--aligned",
        type=int,
        metavar="PIXELS",
        help="the diagnostic aligned world: still subjects whose boxes start on this lattice (a DiT token: 16, or "
        "32 for patch 8), upright references at the clip's size",
    )
    parser.add_argument(
        "--upright",
        action="store_true",
        help="the diagnostic upright world: the demo's clips, every subject at the sprite size, upright references",
    )
    args = parser.parse_args(argv)
    if args.aligned is not None and args.upright:
        parser.exit(2, "error: --aligned and --upright are two different worlds: give one\n")
    if args.aligned is not None and not 0 < args.aligned <= SPRITE:
        parser.exit(2, f"error: --aligned: expected a lattice of 1 to {SPRITE} pixels, got {args.aligned}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(args.out)
    for index in tqdm(range(args.count), desc="clips"):
        write_clip(root, make_clip(args.seed, index, args.placed, args.aligned, args.upright))
    held = len(range(HELD_OUT_EVERY - 1, args.count, HELD_OUT_EVERY))
    log.info("wrote %d clips (%d train, %d held out) under %s", args.count, args.count - held, held, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
