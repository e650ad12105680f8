"""Does a model follow its references? Evaluation on the held-out split of the shapes world.

    python tools/eval_shapes.py --data data/shapes/heldout --load <checkpoint> [--limit 50] [--json out.json]
    python tools/eval_shapes.py --data data/shapes/heldout --ground-truth    # validate the detector

For each held-out clip the model samples a video from the clip's caption and references (the
config of ``make demo``: ``configs/sampling/tiny.yaml``); the detector of tools/shapes_world.py
then finds each referenced subject by its catalogue colour in every frame:

- colour: the referenced colour appears in at least half of the frames;
- shape: the majority shape of that colour's blob is the referenced shape; identity: both;
- presence: the share of frames in which the subject is detected;
- motion: its track moves as the caption says;
- ablations in the same run: blank white references (identity should fall to chance), and the
  first two references swapped (the subject doing the first motion should now look like the
  second reference: swap-following).

``--ground-truth`` scores the dataset's own videos instead, which validates the detector.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.shapes_world import detect, motion_direction  # noqa: E402

log = logging.getLogger("eval_shapes")


def score_subject(frames: np.ndarray, shape: str, colour: str, motion: str) -> dict:
    """Colour, shape, identity, presence and motion of one referenced subject in ``[F, H, W, 3]`` frames."""
    centres, areas, shapes = [], [], []
    for frame in frames:
        found = [d for d in detect(frame) if d.colour == colour]
        if found:
            centres.append(found[0].centre)
            areas.append(found[0].area)
            shapes.append(found[0].shape)
    presence = len(centres) / len(frames)
    colour_ok = presence >= 0.5
    shape_ok = colour_ok and Counter(shapes).most_common(1)[0][0] == shape
    motion_ok = len(centres) == len(frames) and motion_direction(centres, areas) == motion
    return {
        "colour": colour_ok,
        "shape": shape_ok,
        "identity": colour_ok and shape_ok,
        "presence": presence,
        "motion": motion_ok,
    }


def summarise(scores: list[dict]) -> dict:
    if not scores:
        return {"identity": 0.0, "colour": 0.0, "shape": 0.0, "presence": 0.0, "motion": 0.0}
    return {
        key: float(np.mean([s[key] for s in scores])) for key in ("identity", "colour", "shape", "presence", "motion")
    }


def read_frames(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    return np.stack([frame for frame in imageio.get_reader(path)])


def ground_truth(data: Path, limit: int) -> dict:
    scores = []
    for meta_path in sorted((data / "meta").glob("*.json"))[:limit]:
        meta = json.loads(meta_path.read_text())
        frames = read_frames(data / "videos" / f"{meta['id']}.mp4")
        scores += [score_subject(frames, s["shape"], s["colour"], s["motion"]) for s in meta["subjects"]]
    return {**summarise(scores), "n_videos": min(limit, len(list((data / "meta").glob("*.json"))))}


def evaluate_model(data: Path, config_files: list[str], overrides: list[str], limit: int) -> dict:
    import torch
    from PIL import Image

    import sample_video
    from sat.config import load_config
    from sgm.data.references import load_reference
    from sgm.models.engine import Timings

    config = load_config(sample_video.SamplingConfig, config_files, overrides)
    pipeline = sample_video.build_pipeline(config, torch.device("cpu"), sample_video.ParallelState())
    height, width = config.sampling_image_size

    def generate(caption: str, images, seed: int) -> np.ndarray:
        latents = pipeline.generate(caption, images, seed, height, width, config.sampling_num_frames, Timings())
        video = pipeline.decode(latents)[0]  # [3, F, H, W]
        return ((video.float() + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(1, 2, 3, 0).numpy()

    normal, blank, swapped = [], [], []
    metas = sorted((data / "meta").glob("*.json"))[:limit]
    for n, meta_path in enumerate(metas):
        meta = json.loads(meta_path.read_text())
        subjects = meta["subjects"]
        refs = [load_reference(str(data / "references" / meta["id"] / f"ref{k + 1}.png")) for k in range(len(subjects))]
        frames = generate(meta["caption"], refs, config.seed + n)
        normal += [score_subject(frames, s["shape"], s["colour"], s["motion"]) for s in subjects]
        white = [Image.new("RGB", r.size, (255, 255, 255)) for r in refs]
        frames = generate(meta["caption"], white, config.seed + n)
        blank += [score_subject(frames, s["shape"], s["colour"], s["motion"]) for s in subjects]
        if len(subjects) >= 2:
            frames = generate(meta["caption"], [refs[1], refs[0], *refs[2:]], config.seed + n)
            for first, second in ((subjects[0], subjects[1]), (subjects[1], subjects[0])):
                # the slot of `first` now shows the reference of `second`: its colour should move like `first`
                swapped.append(score_subject(frames, second["shape"], second["colour"], first["motion"])["motion"])
    result = summarise(normal)
    return {
        "identity_accuracy": result["identity"],
        "colour_accuracy": result["colour"],
        "shape_accuracy": result["shape"],
        "identity_accuracy_blank_refs": summarise(blank)["identity"],
        "presence": result["presence"],
        "motion_accuracy": result["motion"],
        "swap_following": float(np.mean(swapped)) if swapped else 0.0,
        "n_videos": len(metas),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the held-out split (release layout with meta/)")
    parser.add_argument("--load", help="DiT checkpoint to evaluate")
    parser.add_argument(
        "--config", nargs="+", default=["configs/model/kaleido_tiny.yaml", "configs/sampling/tiny.yaml"]
    )
    parser.add_argument("--limit", type=int, default=50, help="held-out clips to use")
    parser.add_argument("--ground-truth", action="store_true", help="score the dataset's own videos")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = Path(args.data)
    if not (data / "meta").is_dir():
        parser.exit(2, f"error: {data}: no meta/ folder (make it with tools/make_shapes_dataset.py)\n")
    if args.ground_truth:
        figures = ground_truth(data, args.limit)
    else:
        overrides = [*args.overrides, f"load={args.load}"] if args.load else list(args.overrides)
        figures = evaluate_model(data, args.config, overrides, args.limit)
    width = max(len(k) for k in figures)
    print(
        "\n".join(
            f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in figures.items()
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
