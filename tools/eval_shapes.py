"""Does a model follow its references? Evaluation on held-out clips of the shapes world.

    python tools/eval_shapes.py                       # the shipped demo model, 40 generated held-out clips
    python tools/eval_shapes.py --data data/shapes/heldout --load <checkpoint> [--limit 50] [--json out.json]
    python tools/eval_shapes.py --ground-truth        # validate the detector on the clips themselves
    python tools/eval_shapes.py --reconstruct         # the VAE alone: score its reconstructions of the clips

Clips come from ``--data`` (a held-out split written by tools/make_shapes_dataset.py) or, without
it, are generated here (held-out clips of ``--seed``: each has a colour–shape pair never seen in
training). For each clip the model samples a video from the clip's references and an ordinal
caption ("the first object moves left while the second object bounces": no colour or shape named,
so appearance can only come from the references), with the config of ``make demo``
(``configs/sampling/shapes.yaml``); the detector of tools/shapes_world.py then finds each referenced
subject by its catalogue colour in every frame:

- colour: the referenced colour appears in at least half of the frames;
- shape: the majority shape of that colour's blob is the referenced shape; identity: both;
- presence: the share of frames in which the subject is detected;
- one piece: the subject's colour forms exactly one blob (8-connected, of the detector's minimum
  area) in every frame where it is found: the layout apart from the shape (a sample that draws a
  subject twice, or cut by another, fails it; ground truth: 1.000 on 100 generated held-out clips);
- motion: its track moves as the caption says (not scored on one-frame samples, printed "-");
- ablations in the same run: blank white references (identity should fall to chance), and the
  first two references swapped (the subject doing the first motion should now look like the
  second reference: swap-following).

``--ground-truth`` scores the clips' own videos instead, which validates the detector;
``--degrade blur=1.5,noise=16`` blurs and/or noises them first (the detector must read mild
degradations as it reads clean clips: on 100 generated held-out clips identity 1.000 under a
1.5-px blur or noise of 16 grey levels, 0.984 under a 2-px blur; ``downsample=K`` resizes each frame
to 1/K and back: where in scale the shapes live).
``--reconstruct --latent-degrade lowpass=K,noise=S`` low-passes and/or noises the latents between
encoder and decoder: whether the decoder survives a DiT's small errors and at which latent scale
the shapes live (a latent ``lowpass=K`` is the pixel grid of ``downsample=`` K times the VAE's stride).
``--start-sigma S`` starts every sample from the clip's own video (through the VAE) re-noised to
the noise level S instead of from pure noise: identity from S = 0.6 but not from 0.95 says the model
finishes shapes it is given and does not choose them.
``--each-checkpoint --load <run> --csv <file>`` evaluates every complete checkpoint of a training run
(``--ema``: its weight average), oldest first, one CSV row each: the figures during training. A
rerun evaluates only checkpoints without a row made from the same weights and settings (digests in
the row), and keeps the rows of checkpoints the run has pruned since.
``--reconstruct`` scores the config's VAE's reconstructions (encode, decode) of those videos: the
ceiling that any DiT generating through this VAE can reach. ``--confusion`` also prints, for the
scored videos (a model's: those made with the references), which shape and which motion the
detector found for each referenced shape and captioned motion ("-": for a shape, the subject's
colour was found in fewer than half of the frames; for a motion, not in every frame).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.make_shapes_dataset import HELD_OUT_EVERY, make_clip  # noqa: E402
from tools.shapes_world import MOTIONS, SHAPES, detect, motion_direction, ordinal_caption, start_places  # noqa: E402

log = logging.getLogger("eval_shapes")
DEFAULT_CONFIG = ["configs/sampling/shapes.yaml"]  # the model comes from the checkpoint's card
GOALS = {  # the demo model's goals (issue 8): at least, except for blank references (near chance)
    "identity_accuracy": 0.8,
    "colour_accuracy": 0.9,
    "shape_accuracy": 0.8,
    "motion_accuracy": 0.8,
    "swap_following": 0.8,
}


@dataclass
class Clip:
    id: str
    subjects: list[dict]  # shape, colour, motion
    references: list  # PIL images
    frames: np.ndarray | None  # [F, H, W, 3] uint8 ground truth (read lazily for --data)
    background: str | None = None  # shapes_world.BACKGROUND_NAMES entry (unknown in older datasets' meta)


def score_subject(frames: np.ndarray, shape: str, colour: str, motion: str) -> dict:
    """Colour, shape, identity, presence and motion of one referenced subject in ``[F, H, W, 3]`` frames."""
    centres, areas, shapes, pieces = [], [], [], []
    for frame in frames:
        found = [d for d in detect(frame) if d.colour == colour]
        if found:
            centres.append(found[0].centre)
            areas.append(found[0].area)
            shapes.append(found[0].shape)
            pieces.append(found[0].pieces)
    presence = len(centres) / len(frames)
    colour_ok = presence >= 0.5
    seen_shape = Counter(shapes).most_common(1)[0][0] if colour_ok else None
    # a motion is only read from a track of every frame: a gap would fake a jump
    seen_motion = motion_direction(centres, areas) if len(centres) == len(frames) else None
    # one frame shows no motion at all (every found subject would read as "still"): not scored
    motion_ok = seen_motion == motion if len(frames) > 1 else None
    return {
        "colour": colour_ok,
        "shape": seen_shape == shape,
        "identity": colour_ok and seen_shape == shape,
        "presence": presence,
        # the layout, apart from the shape: drawn once and whole (one piece) wherever it is found
        "one_piece": colour_ok and all(n == 1 for n in pieces),
        "motion": motion_ok,
        "detected_shape": seen_shape,
        "detected_motion": seen_motion,
    }


def share(values: list) -> float | None:
    """The mean of ``values`` (0.0 when there are none); None when they are not scored (None: one frame)."""
    if any(value is None for value in values):
        return None
    return float(np.mean(values)) if values else 0.0


def summarise(scores: list[dict]) -> dict:
    keys = ("identity", "colour", "shape", "presence", "one_piece", "motion")
    return {key: share([s[key] for s in scores]) for key in keys}


def read_frames(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    return np.stack([frame for frame in imageio.get_reader(path)])


def load_clips(data: Path | None, limit: int, seed: int, with_frames: bool) -> list[Clip]:
    """``limit`` clips of the split at ``data``, or generated held-out clips of ``seed``."""
    if data is None:
        clips = []
        for n in range(limit):
            clip = make_clip(seed, HELD_OUT_EVERY * n + HELD_OUT_EVERY - 1)
            clips.append(Clip(clip["id"], clip["subjects"], clip["references"], clip["frames"], clip["background"]))
        return clips
    from sgm.data.references import load_reference

    clips = []
    for meta_path in sorted((data / "meta").glob("*.json"))[:limit]:
        meta = json.loads(meta_path.read_text())
        refs = [
            load_reference(str(data / "references" / meta["id"] / f"ref{k + 1}.png"))
            for k in range(len(meta["subjects"]))
        ]
        frames = read_frames(data / "videos" / f"{meta['id']}.mp4") if with_frames else None
        clips.append(Clip(meta["id"], meta["subjects"], refs, frames, meta.get("background")))
    return clips


Scored = tuple[dict, dict]  # (the subject asked for: shape, colour, motion; score_subject's result)


def score_clips(clips: list[Clip]) -> list[Scored]:
    """Every subject of every clip, scored in the clip's own frames."""
    return [(s, score_subject(c.frames, s["shape"], s["colour"], s["motion"])) for c in clips for s in c.subjects]


def subject_figures(scored: list[Scored], n_videos: int) -> dict:
    return {**summarise([score for _, score in scored]), "n_videos": n_videos}


# What --degrade (the frames, with --ground-truth) and --latent-degrade (the latents between the
# VAE's encoder and decoder, with --reconstruct) accept: each key's unit, and the integer factors.
FRAME_DEGRADATIONS = {"blur": "PIXELS", "noise": "GREY_LEVELS", "downsample": "FACTOR"}
LATENT_DEGRADATIONS = {"lowpass": "FACTOR", "noise": "STD"}
FACTOR_KEYS = {"downsample", "lowpass"}


def parse_degradation(
    text: str, flag: str = "--degrade", keys: dict[str, str] = FRAME_DEGRADATIONS
) -> dict[str, float]:
    """``"blur=1.5,noise=16"`` -> ``{"blur": 1.5, "noise": 16.0}``: each of ``keys`` optional, at most
    once, each >= 0; the factors (``downsample``, ``lowpass``) whole numbers >= 1."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        factor_ok = key not in FACTOR_KEYS or (number >= 1 and number == int(number))
        if key not in keys or number < 0 or not factor_ok or key in out:
            expected = " and/or ".join(f"{k}={unit}" for k, unit in keys.items())
            raise ValueError(f"{flag}: expected {expected} (each >= 0, factors whole and >= 1), got '{item}'")
        out[key] = int(number) if key in FACTOR_KEYS else number
    return out


def degrade(
    frames: np.ndarray, *, blur: float = 0.0, noise: float = 0.0, downsample: int = 1, seed: int = 0
) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 frames under a Gaussian blur of radius ``blur`` pixels, then Gaussian
    noise of standard deviation ``noise`` grey levels: the detector must read mild degradations of
    ground truth (a VAE's or a DiT's) as it reads the clean clips. ``downsample`` K resizes each frame
    to 1/K of its size and back (bilinear): what survives at a coarser resolution, to compare with
    ``degrade_latents``'s low-pass of the latents."""
    from PIL import Image, ImageFilter

    out = frames
    if downsample > 1:
        height, width = frames.shape[1:3]
        small = (width // downsample, height // downsample)
        out = np.stack(
            [
                np.asarray(Image.fromarray(f).resize(small, Image.BILINEAR).resize((width, height), Image.BILINEAR))
                for f in out
            ]
        )
    if blur:
        out = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(blur))) for f in out])
    if noise:
        rng = np.random.default_rng(seed)
        out = np.clip(out + rng.normal(0.0, noise, out.shape), 0, 255).astype(np.uint8)
    return out


def check_lowpass(lowpass: int, height: int, width: int) -> None:
    """``lowpass`` must divide the latent grid (``height`` × ``width`` cells)."""
    if height % lowpass or width % lowpass:
        raise ValueError(f"--latent-degrade: lowpass={lowpass} does not divide the latent grid {height} x {width}")


def degrade_latents(latents, *, lowpass: int = 1, noise: float = 0.0, seed: int = 0):
    """VAE latents ``[B, T, C, h, w]`` (normalised, as the DiT sees them) averaged over ``lowpass`` ×
    ``lowpass`` cells and spread back (bilinear), then plus Gaussian noise of standard deviation
    ``noise``: how robust the decoder is to a DiT's small errors, and at which latent scale the
    evaluation's shapes live (compare ``degrade(downsample=4·lowpass)``: the same grid in pixels)."""
    import torch
    import torch.nn.functional as F

    out = latents
    if lowpass > 1:
        batch, frames, channels, height, width = latents.shape
        check_lowpass(lowpass, height, width)
        planes = latents.reshape(batch * frames, channels, height, width)  # [B·T, C, h, w]
        coarse = F.avg_pool2d(planes, lowpass)  # [B·T, C, h/K, w/K]
        out = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).view(latents.shape)
    if noise:
        generator = torch.Generator().manual_seed(seed)
        out = out + noise * torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return out


def ground_truth(clips: list[Clip]) -> dict:
    return subject_figures(score_clips(clips), len(clips))


def confusion(pairs: list[tuple[str, str | None]], labels: tuple[str, ...]) -> str:
    """Counts of (asked, detected) label pairs: a row per asked label, a column per detected one, "-" = none."""
    columns = [*labels, None]
    counts = Counter(pairs)
    width = max(len(label) for label in labels)
    lines = [" " * width + "".join(f" {label or '-':>{width}}" for label in columns)]
    for asked in labels:
        row = [counts[(asked, seen)] for seen in columns]
        if any(row):
            lines.append(f"{asked:>{width}}" + "".join(f" {n or '.':>{width}}" for n in row))
    return "\n".join(lines)


def confusion_tables(scored: list[Scored]) -> str:
    """The shape and the motion confusion tables of scored subjects."""
    shapes = [(subject["shape"], score["detected_shape"]) for subject, score in scored]
    motions = [(subject["motion"], score["detected_motion"]) for subject, score in scored]
    return f"shape asked (rows) vs detected\n{confusion(shapes, SHAPES)}\n\n" + (
        f"motion asked (rows) vs detected\n{confusion(motions, MOTIONS)}"
    )


def video_tensor(frames: np.ndarray):
    """uint8 frames ``[F, H, W, 3]`` -> float ``[1, 3, F, H, W]`` in [-1, 1], as the VAE encodes them."""
    import torch

    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def reconstruct(
    clips: list[Clip], config_files: list[str], overrides: list[str], latent_degradation: dict | None = None
) -> list[Clip]:
    """The clips with their frames replaced by the config's VAE's reconstructions (the latents
    through ``degrade_latents(**latent_degradation)`` on the way, seeded by the clip's index)."""
    import torch
    from tqdm.auto import tqdm

    from sat.config import load_config
    from sgm.data.references import video_to_uint8
    from sgm.models.wan_vae import build_vae
    from sgm.pipeline import SamplingConfig, resolve_components

    config = load_config(SamplingConfig, config_files, overrides)
    config.vae.path = resolve_components(config).vae_path
    vae = build_vae(config.vae, torch.device("cpu"))
    if latent_degradation and clips:  # before any work: one line, no progress bar
        height, width = clips[0].frames.shape[1:3]
        check_lowpass(latent_degradation.get("lowpass", 1), height // vae.spatial_stride, width // vae.spatial_stride)
    out = []
    for n, clip in enumerate(tqdm(clips, desc="reconstruct")):
        latents = vae.encode(video_tensor(clip.frames))
        if latent_degradation:
            latents = degrade_latents(latents, **latent_degradation, seed=n)
        frames = video_to_uint8(vae.decode(latents)[0])
        out.append(dataclasses.replace(clip, frames=frames))
    return out


@dataclass
class ModelScores:
    """What a model generated for the clips, scored: with the references, blank ones, swapped ones."""

    normal: list[Scored]
    blank: list[Scored]
    swapped: list[bool]  # per swapped pair: the appearance followed the reference into its new slot


def sample_and_score(
    clips: list[Clip],
    config_files: list[str],
    overrides: list[str],
    keep: slice = slice(None),
    placed: bool = False,
    start_sigma: float = 1.0,
) -> ModelScores:
    """Sample every clip (references, blank references, swapped references) and score the videos'
    frames ``keep`` (all by default; e.g. the second segment of a 2-segment video). ``placed``: the
    captions also say where each subject starts (``shapes_world.place_phrase``) and the background.
    ``start_sigma`` < 1: every sample starts from the clip's own video (its first frames, encoded by the
    config's VAE) re-noised to that level (SDEdit): what the model keeps of a layout it is given."""
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from sat.config import load_config
    from sgm.data.references import video_to_uint8
    from sgm.pipeline import KaleidoPipeline, SamplingConfig

    config = load_config(SamplingConfig, config_files, overrides)
    pipeline = KaleidoPipeline.from_config(config, device=torch.device("cpu"))
    height, width = config.sampling_image_size
    num_frames = pipeline.geometry.video_frames(config.sampling_num_frames)

    def generate(caption: str, images, seed: int, init: torch.Tensor | None) -> np.ndarray:
        video = pipeline(
            caption,
            references=images,
            seed=seed,
            height=height,
            width=width,
            num_frames=num_frames,
            init_latents=init,
            start_sigma=start_sigma,
        )
        return video_to_uint8(video[0])[keep]

    normal, blank, swapped = [], [], []
    for n, clip in enumerate(tqdm(clips, desc="clips")):
        init = pipeline.vae.encode(video_tensor(clip.frames[:num_frames])) if start_sigma < 1.0 else None
        subjects, refs = clip.subjects, clip.references
        places = start_places([s["track"] for s in subjects]) if placed else None
        caption = ordinal_caption([s["motion"] for s in subjects], places, clip.background if placed else None)
        frames = generate(caption, refs, config.seed + n, init)
        normal += [(s, score_subject(frames, s["shape"], s["colour"], s["motion"])) for s in subjects]
        white = [Image.new("RGB", r.size, (255, 255, 255)) for r in refs]
        frames = generate(caption, white, config.seed + n, init)
        blank += [(s, score_subject(frames, s["shape"], s["colour"], s["motion"])) for s in subjects]
        if len(subjects) >= 2:
            frames = generate(caption, [refs[1], refs[0], *refs[2:]], config.seed + n, init)
            for first, second in ((subjects[0], subjects[1]), (subjects[1], subjects[0])):
                # the slot of `first` now shows the reference of `second`: its colour should move like `first`
                swapped.append(score_subject(frames, second["shape"], second["colour"], first["motion"])["motion"])
    return ModelScores(normal, blank, swapped)


def model_figures(scores: ModelScores, n_videos: int) -> dict:
    result = summarise([score for _, score in scores.normal])
    blank = summarise([score for _, score in scores.blank])
    return {
        "identity_accuracy": result["identity"],
        "colour_accuracy": result["colour"],
        "shape_accuracy": result["shape"],
        "identity_accuracy_blank_refs": blank["identity"],
        "colour_accuracy_blank_refs": blank["colour"],
        "presence": result["presence"],
        "one_piece": result["one_piece"],
        "motion_accuracy": result["motion"],
        "swap_following": share(scores.swapped),
        "n_videos": n_videos,
    }


def evaluate_model(clips: list[Clip], config_files: list[str], overrides: list[str]) -> dict:
    """The figures of the model of ``config_files`` + ``overrides`` on ``clips``."""
    return model_figures(sample_and_score(clips, config_files, overrides), len(clips))


def table(figures: dict) -> str:
    """One line per figure, with its goal and whether it is met."""
    width = max(len(k) for k in figures)
    lines = [f"{'figure':<{width}}  value  goal"]
    for key, value in figures.items():
        if value is None:  # motion and swap-following of one-frame samples
            lines.append(f"{key:<{width}}  -      (one frame: no motion to score)")
        elif isinstance(value, float):
            goal = f">= {GOALS[key]:.2f} {'met' if value >= GOALS[key] else 'NOT met'}" if key in GOALS else ""
            lines.append(f"{key:<{width}}  {value:.3f}  {goal}".rstrip())
        else:
            lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)


CSV_KEYS = ("iteration", "weights_sha256", "settings_sha256")  # then the figures


def sha256_of(paths: list[Path]) -> str:
    """The digest of ``paths`` (names and contents) that tools/precompute_latents.py records."""
    from tools.precompute_latents import files_digest

    return files_digest(paths)


def run_checkpoints(run: Path, ema: bool) -> list[tuple[int, Path]]:
    """``(iteration, weights path)`` of every complete checkpoint of the training run ``run``, oldest first."""
    from sgm.checkpoint import SAT_MODEL_FILE
    from sgm.training import EMA_FILE, complete_checkpoints

    tags = sorted(int(tag) for tag in complete_checkpoints(run))
    return [(tag, run / str(tag) / (EMA_FILE if ema else SAT_MODEL_FILE)) for tag in tags]


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier ``--each-checkpoint`` CSV (none when the file is missing)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> None:
    """All rows, by iteration, through a temporary name."""
    rows = sorted(rows, key=lambda row: int(row["iteration"]))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        # the union of the rows' keys: rows kept from before a figure was added lack it
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def each_checkpoint(run: Path, ema: bool, out: Path, settings: dict, evaluate) -> tuple[list[dict], int]:
    """Evaluate every complete checkpoint of ``run`` with ``evaluate(weights path) -> figures`` into the
    CSV ``out``; rows made from the same weights and settings are kept, not evaluated again. Returns
    the rows and how many were evaluated. ``ValueError`` when ``out`` holds rows of other settings."""
    settings_sha = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    rows = read_rows(out)
    other = [row["iteration"] for row in rows if row.get("settings_sha256") != settings_sha]
    if other:
        raise ValueError(f"{out}: rows made with other settings (iteration {other[0]}); write these to another --csv")
    by_iteration = {int(row["iteration"]): row for row in rows}
    evaluated = 0
    for iteration, weights in run_checkpoints(run, ema):
        if not weights.is_file():
            log.warning("%s: no %s: skipped", weights.parent, weights.name)
            continue
        weights_sha = sha256_of([weights])
        if by_iteration.get(iteration, {}).get("weights_sha256") == weights_sha:
            continue
        log.info("evaluating %s", weights)
        figures = evaluate(weights)
        by_iteration[iteration] = {
            "iteration": str(iteration),
            "weights_sha256": weights_sha,
            "settings_sha256": settings_sha,
            **{key: csv_value(value) for key, value in figures.items()},
        }
        write_rows(out, list(by_iteration.values()))
        evaluated += 1
    return sorted(by_iteration.values(), key=lambda row: int(row["iteration"])), evaluated


def csv_value(value) -> str:
    """A figure as a CSV cell: floats to 6 places, an unscored figure (None) empty, shown "-"."""
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def rows_table(rows: list[dict]) -> str:
    """The figures of each row, one line per iteration."""
    keys = [key for key in dict.fromkeys(k for row in rows for k in row) if key not in CSV_KEYS and key != "n_videos"]
    lines = ["iteration  " + "  ".join(keys)]
    for row in rows:
        values = "  ".join(
            f"{float(row[key]):>{len(key)}.3f}" if row.get(key) else f"{'-':>{len(key)}}" for key in keys
        )
        lines.append(f"{int(row['iteration']):>9}  {values}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a held-out split (release layout with meta/); default: generate clips")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated held-out clips")
    parser.add_argument("--load", help="DiT checkpoint to evaluate (default: the config's)")
    parser.add_argument("--config", nargs="+", default=DEFAULT_CONFIG)
    parser.add_argument("--limit", type=int, default=40, help="held-out clips to use")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ground-truth", action="store_true", help="score the clips' own videos")
    mode.add_argument("--reconstruct", action="store_true", help="score the VAE's reconstructions of the clips")
    parser.add_argument(
        "--degrade",
        default="",
        help="with --ground-truth: blur, noise and/or downsample the clips first (blur=PIXELS,noise=GREY_LEVELS,"
        "downsample=FACTOR)",
    )
    parser.add_argument(
        "--latent-degrade",
        default="",
        help="with --reconstruct: low-pass and/or noise the latents before decoding (lowpass=FACTOR,noise=STD)",
    )
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument(
        "--frames",
        default=":",
        help="score only these video frames, START:STOP (e.g. 8: for the second segment of segments=2 overlap=1)",
    )
    parser.add_argument("--confusion", action="store_true", help="also print shape and motion confusion tables")
    parser.add_argument(
        "--placed",
        action="store_true",
        help="captions also say where each subject starts and the background (for make_shapes_dataset.py --placed)",
    )
    parser.add_argument(
        "--start-sigma",
        type=float,
        default=1.0,
        help="start every sample from the clip's own video re-noised to this level in [0, 1) (SDEdit): "
        "where in the noise levels the model decides shape and motion (default 1: plain sampling)",
    )
    parser.add_argument(
        "--each-checkpoint",
        action="store_true",
        help="with --load <training run> and --csv: evaluate every complete checkpoint of the run, one row each",
    )
    parser.add_argument("--ema", action="store_true", help="with --each-checkpoint: the weight averages")
    parser.add_argument("--csv", help="with --each-checkpoint: the rows (kept and extended on a rerun)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = Path(args.data) if args.data else None
    if data is not None and not (data / "meta").is_dir():
        parser.exit(2, f"error: {data}: no meta/ folder (make it with tools/make_shapes_dataset.py)\n")
    try:
        degradation = parse_degradation(args.degrade)
        latent_degradation = parse_degradation(args.latent_degrade, "--latent-degrade", LATENT_DEGRADATIONS)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    if degradation and not args.ground_truth:
        parser.exit(2, "error: --degrade applies to --ground-truth only\n")
    if latent_degradation and not args.reconstruct:
        parser.exit(2, "error: --latent-degrade applies to --reconstruct only\n")
    if not 0.0 <= args.start_sigma <= 1.0:
        parser.exit(2, f"error: --start-sigma: expected a noise level in [0, 1], got {args.start_sigma}\n")
    if args.start_sigma < 1.0 and (args.ground_truth or args.reconstruct):
        parser.exit(2, "error: --start-sigma applies to a model's samples, not --ground-truth or --reconstruct\n")
    if args.each_checkpoint:
        if args.ground_truth or args.reconstruct:
            parser.exit(
                2, "error: --each-checkpoint evaluates a model's checkpoints, not --ground-truth or --reconstruct\n"
            )
        if not args.load or not args.csv:
            parser.exit(2, "error: --each-checkpoint needs --load <training run folder> and --csv <file>\n")
        if not run_checkpoints(Path(args.load), args.ema):
            parser.exit(2, f"error: --load {args.load}: no complete checkpoint (<iteration>/complete.json) in it\n")
    elif args.ema or args.csv:
        parser.exit(2, "error: --ema and --csv apply to --each-checkpoint only\n")
    with_frames = args.ground_truth or args.reconstruct or args.start_sigma < 1.0
    clips = load_clips(data, args.limit, args.seed, with_frames=with_frames)
    if args.placed and any(c.background is None for c in clips):
        parser.exit(2, f"error: --placed: {data}/meta has no 'background' (write it with make_shapes_dataset.py)\n")
    if degradation:
        clips = [dataclasses.replace(c, frames=degrade(c.frames, **degradation, seed=n)) for n, c in enumerate(clips)]
    missing = [] if args.ground_truth else [name for name in args.config if not Path(name).is_file()]
    if missing:
        # --config takes every word after it: an override written after it reads as a file name
        hint = " (write key=value overrides before --config)" if "=" in missing[0] else ""
        parser.exit(2, f"error: --config: {missing[0]}: no such file{hint}\n")
    if args.ground_truth or args.reconstruct:
        rebuilt = clips
        if args.reconstruct:
            try:
                rebuilt = reconstruct(clips, args.config, list(args.overrides), latent_degradation)
            except ValueError as error:
                parser.exit(2, f"error: {error}\n")
        scored = score_clips(rebuilt)
        figures = subject_figures(scored, len(clips))
    else:
        overrides = [*args.overrides, f"load={args.load}"] if args.load else list(args.overrides)
        try:
            start, stop = (int(v) if v else None for v in args.frames.split(":"))
        except ValueError:
            parser.exit(2, f"error: --frames: expected START:STOP (either may be empty), got '{args.frames}'\n")
        if args.each_checkpoint:
            settings = {
                "clips": json.dumps([[clip.id, clip.subjects] for clip in clips], default=str),
                "data": args.data,
                "seed": args.seed,
                "config": {name: sha256_of([Path(name)]) for name in args.config},
                "overrides": list(args.overrides),
                "frames": args.frames,
                "placed": args.placed,
                "start_sigma": args.start_sigma,
                "ema": args.ema,
            }

            def evaluate(weights: Path) -> dict:
                scores = sample_and_score(
                    clips,
                    args.config,
                    [*args.overrides, f"load={weights}"],
                    slice(start, stop),
                    args.placed,
                    args.start_sigma,
                )
                return model_figures(scores, len(clips))

            try:
                rows, evaluated = each_checkpoint(Path(args.load), args.ema, Path(args.csv), settings, evaluate)
            except (ValueError, FileNotFoundError) as error:
                parser.exit(2, f"error: {error}\n")
            if rows:
                print(rows_table(rows))
            log.info("%d checkpoints evaluated, %d rows kept -> %s", evaluated, len(rows) - evaluated, args.csv)
            return 0
        try:
            scores = sample_and_score(clips, args.config, overrides, slice(start, stop), args.placed, args.start_sigma)
        except (ValueError, FileNotFoundError) as error:  # a bad config key, checkpoint or model folder
            parser.exit(2, f"error: {error}\n")
        scored, figures = scores.normal, model_figures(scores, len(clips))
    print(table(figures))
    if args.confusion:
        print()
        print(confusion_tables(scored))
    if args.json:
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
