"""Does a DiT read its references' shapes? Paired denoising errors with altered references.

    python tools/reference_gap.py --config configs/sampling/shapes_next.yaml --data data/probe/train \
        [--skip 0] [--limit 64] [--sigmas 0.95,0.9,0.8,0.6] [--seeds 2] [--first-frame] [--aligned] \
        load=<checkpoint>

For clips with precomputed latents (``tools/precompute_latents.py``), at each noise level σ, the DiT's
velocity error over the subjects' latent cells (their ``subject_mask``) is measured with four sets of
references, all with the same noise and the same ordinal caption ("the first object moves left": no
shape or colour named, as in ``tools/eval_shapes.py``):

- ``true``: each subject re-rendered by the world's ``reference_image`` at a size and rotation drawn
  from a seed of its own (clip, slot); with ``--aligned``, by ``aligned_reference_image`` (upright at
  the clip's size on a frame-sized canvas, as ``make_shapes_dataset.py --aligned`` draws references:
  the demo's references would be out of that world's distribution);
- ``shape``: the same size, rotation and colour, another shape with the same pattern (striped shapes
  swap with each other, plain with plain: stripes are a texture, read like a colour, and would
  otherwise count as shape);
- ``colour``: the same size, rotation and shape, another colour;
- ``blank``: white images;
- ``named`` / ``named_shape``: white images and a caption that names each subject's colour and
  shape ("the red star moves left", as half of the training captions do) / the same colour and the
  ``shape`` variant's shape: whether the DiT draws a shape it is told in words.

A model that takes a subject's shape from its reference predicts the subject worse when the
reference shows another shape: ``shape gap = error(shape) / error(true) - 1`` > 0; the colour gap
says the same of colours, the blank gap of references as a whole, and ``text shape gap =
error(named_shape) / error(named) - 1`` of shapes named in the caption. Each gap comes with its
standard error over the paired measurements. Being paired (same clips, noise and caption), the gaps separate training
variants after runs far too short for sampled identity (``eval_shapes.py``) to move: a sampled
identity over 50 subjects moves in steps of 0.02 and has a noise of about ±0.06.
Prints one row per σ and, with ``--json``, writes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.shapes_world import (  # noqa: E402
    COLOURS,
    PATTERNED,
    SHAPES,
    aligned_reference_image,
    ordinal_caption,
    reference_image,
    subject_phrase,
)

log = logging.getLogger("reference_gap")
VARIANTS = ("true", "shape", "colour", "blank", "named", "named_shape")
GAPS = {"shape_gap": ("shape", "true"), "colour_gap": ("colour", "true"), "blank_gap": ("blank", "true")}
GAPS["text_shape_gap"] = ("named_shape", "named")


def altered_inputs(subjects: list[dict], clip_index: int, aligned: bool = False) -> dict[str, tuple[str, list]]:
    """The variants' ``(caption, references)`` of one clip (PIL images), each subject at the size and
    rotation drawn from the seed of (clip, slot), so that the variants differ only in what they are
    meant to; ``aligned``: drawn as the aligned world's references (upright, the clip's size)."""
    from PIL import Image

    def draw(shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
        return aligned_reference_image(shape, colour) if aligned else reference_image(shape, colour, rng)

    refs: dict[str, list] = {name: [] for name in ("true", "shape", "colour", "blank")}
    other_shapes = []
    for slot, subject in enumerate(subjects):
        seed = 1000 * clip_index + slot
        choice = np.random.default_rng(seed + 7_000_000)
        same_pattern = [s for s in SHAPES if (s in PATTERNED) == (subject["shape"] in PATTERNED)]
        other_shapes.append(str(choice.choice([s for s in same_pattern if s != subject["shape"]])))
        other_colour = str(choice.choice([c for c in COLOURS if c != subject["colour"]]))
        refs["true"].append(draw(subject["shape"], subject["colour"], np.random.default_rng(seed)))
        refs["shape"].append(draw(other_shapes[-1], subject["colour"], np.random.default_rng(seed)))
        refs["colour"].append(draw(subject["shape"], other_colour, np.random.default_rng(seed)))
        refs["blank"].append(Image.new("RGB", refs["true"][-1].size, (255, 255, 255)))
    ordinal = ordinal_caption([s["motion"] for s in subjects])
    return {
        **{name: (ordinal, images) for name, images in refs.items()},
        "named": (named_caption(subjects, [s["shape"] for s in subjects]), refs["blank"]),
        "named_shape": (named_caption(subjects, other_shapes), refs["blank"]),
    }


def named_caption(subjects: list[dict], shapes: list[str]) -> str:
    """'the red star moves left while ...' with ``shapes`` in place of the subjects' own."""
    phrases = [
        subject_phrase(f"the {s['colour']} {shape}", s["motion"]) for s, shape in zip(subjects, shapes, strict=True)
    ]
    return " while ".join(phrases)


def gap_rows(errors: dict[float, dict[str, list[float]]]) -> list[dict]:
    """Per σ: the mean error of each variant and each gap ``mean(a) / mean(b) - 1`` with its standard
    error over the paired measurements (``std(a_i - b_i) / sqrt(n) / mean(b)``)."""
    rows = []
    for sigma, by_variant in errors.items():
        values = {name: np.asarray(v, dtype=np.float64) for name, v in by_variant.items()}
        row = {"sigma": sigma, **{f"error_{name}": float(v.mean()) for name, v in values.items()}}
        for gap, (a, b) in GAPS.items():
            n = len(values[b])
            row[gap] = float(values[a].mean() / values[b].mean() - 1)
            spread = np.std(values[a] - values[b], ddof=1) if n > 1 else float("nan")
            row[f"{gap}_se"] = float(spread / np.sqrt(n) / values[b].mean())
        row["n"] = len(values["true"])
        rows.append(row)
    return rows


def parse_sigmas(text: str) -> list[float]:
    try:
        sigmas = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sigmas: expected numbers separated by commas, got '{text}'") from None
    if not sigmas or any(not 0 < s <= 1 for s in sigmas):
        raise ValueError(f"--sigmas: every noise level must be in (0, 1], got '{text}'")
    return sigmas


def measure(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    import torch
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from sat.config import load_config
    from sgm.diffusion.schedules import TIMESTEP_SCALE
    from sgm.pipeline import KaleidoPipeline, SamplingConfig

    sigmas = parse_sigmas(args.sigmas)
    root = Path(args.data)
    ids = sorted(p.stem for p in (root / "latents").glob("*.safetensors"))[args.skip : args.skip + args.limit]
    if not ids:
        raise ValueError(f"{root / 'latents'}: no precomputed latents (tools/precompute_latents.py writes them)")
    config = load_config(SamplingConfig, args.config, overrides)
    pipeline = KaleidoPipeline.from_config(config, device=torch.device("cpu"))
    height, width = config.sampling_image_size
    errors = {s: {name: [] for name in VARIANTS} for s in sigmas}
    with torch.no_grad():
        for index, sample_id in enumerate(tqdm(ids, desc="clips")):
            meta = json.loads((root / "meta" / f"{sample_id}.json").read_text())
            tensors = load_file(str(root / "latents" / f"{sample_id}.safetensors"))
            frames = 1 if args.first_frame else tensors["video"].shape[0]
            x0 = tensors["video"][None, :frames].float()  # [1, T, C, h, w]
            mask = tensors["subject_mask"][None, :frames, None].float()  # [1, T, 1, h, w]
            if mask.sum() == 0:
                log.warning("%s: no subject cells in the latent mask; skipped", sample_id)
                continue
            subjects = meta["subjects"][: config.max_references]
            inputs = {
                name: (
                    pipeline.conditioner([caption])[0]["crossattn"],
                    pipeline.reference_latents(images, height, width),
                )
                for name, (caption, images) in altered_inputs(subjects, index, args.aligned).items()
            }
            for seed in range(args.seeds):
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(10_000 * index + seed))
                for sigma in sigmas:
                    x_sigma = x0 * (1 - sigma) + noise * sigma
                    timesteps = torch.full((1,), sigma * TIMESTEP_SCALE)
                    for name, (context, refs) in inputs.items():
                        velocity = pipeline.dit(x_sigma, timesteps, context, refs).float()
                        error = ((velocity - (noise - x0)).pow(2) * mask).sum() / (mask.sum() * x0.shape[2])
                        errors[sigma][name].append(float(error))
    return gap_rows(errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["configs/sampling/shapes_next.yaml"])
    parser.add_argument("--data", required=True, help="a split with latents/ and meta/ (precompute_latents.py)")
    parser.add_argument("--skip", type=int, default=0, help="clips skipped first (sorted by id)")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--sigmas", default="0.95,0.9,0.8,0.6")
    parser.add_argument("--seeds", type=int, default=2, help="noise draws per clip and σ")
    parser.add_argument("--first-frame", action="store_true", help="the first latent frame only (image DiTs)")
    parser.add_argument(
        "--aligned",
        action="store_true",
        help="references as the aligned world draws them (make_shapes_dataset --aligned)",
    )
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        rows = measure(args, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'sigma':>6} {'error true':>11}" + "".join(f"{gap.replace('_', ' '):>22}" for gap in GAPS) + f"{'n':>6}")
    for row in rows:
        gaps = "".join(f"{row[gap]:>+13.4f} ± {row[gap + '_se']:.4f}" for gap in GAPS)
        print(f"{row['sigma']:>6.2f} {row['error_true']:>11.4f}{gaps}{row['n']:>6}")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.json)
    log.info("reference gaps at %d noise levels over %d measurements each", len(rows), rows[0]["n"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
