"""A probe split: some clips of an encoded training split, linked, with their latents, optionally cut
to the first latent frame (the model card's memorisation and image probes, issue 19).

    python tools/make_probe_split.py --source data/shapes/train --out data/probe64/train --count 64 --first-frame
    python tools/make_probe_split.py --source data/shapes/train --out data/shapes_placed_img/train \
        --first-frame --captions-from data/shapes_placed/train

The source must hold ``latents/`` (tools/precompute_latents.py). The first ``--count`` clips in name
order (default: all) are linked into ``--out`` (videos, references, captions and meta, the last two
from ``--captions-from`` when given: e.g. the same clips with placed captions) and their latent files
written there. ``--first-frame`` keeps ``video[:1]`` and ``subject_mask[:1]`` (the references
unchanged): the causal Wan VAE encodes a clip's first frame alone, so that is the latent of the
first frame as an image. Train with ``data.root=<out> data.latents=true`` (and ``data.num_frames=1``
for first frames); evaluate with ``eval_shapes.py --data <out>`` (and ``sampling_num_frames=1``).
Each latent file records the digest of the source file it was cut from and the cut; a rerun keeps a
file only when both match. A clip without latents (or captions) is reported and the others go on
(exit status 1 when any was skipped).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgm.data.video import LATENT_FOLDER  # noqa: E402
from tools.precompute_latents import files_digest, recorded  # noqa: E402

log = logging.getLogger("make_probe_split")
TIME_CUT_KEYS = ("video", "subject_mask")  # tensors whose first axis is the latent frame


def cut_latents(tensors: dict, first_frame: bool) -> dict:
    """The probe's tensors: unchanged, or ``video``/``subject_mask`` cut to their first latent frame."""
    if not first_frame:
        return dict(tensors)
    return {k: v[:1].contiguous() if k in TIME_CUT_KEYS else v for k, v in tensors.items()}


def link(target: Path, link_path: Path) -> None:
    """``link_path`` -> ``target`` (absolute), replacing a link to anything else without a gap."""
    target = target.resolve()
    if link_path.is_symlink() and Path(os.readlink(link_path)) == target:
        return
    tmp = link_path.with_name(link_path.name + ".partial")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link_path)


def clip_problem(source: Path, captions: Path, clip_id: str) -> str | None:
    """Why ``clip_id`` cannot go into the probe split, or None."""
    needed = [
        source / LATENT_FOLDER / f"{clip_id}.safetensors",
        source / "references" / clip_id,
        captions / "labels" / f"{clip_id}.txt",
        captions / "meta" / f"{clip_id}.json",
    ]
    missing = [str(p) for p in needed if not p.exists()]
    return f"{clip_id}: missing {', '.join(missing)}" if missing else None


def write_clip(source: Path, captions: Path, out: Path, clip_id: str, first_frame: bool) -> bool:
    """Link one clip's files into ``out`` and write its latents; False when they were already there."""
    link(source / "videos" / f"{clip_id}.mp4", out / "videos" / f"{clip_id}.mp4")
    link(source / "references" / clip_id, out / "references" / clip_id)
    link(captions / "labels" / f"{clip_id}.txt", out / "labels" / f"{clip_id}.txt")
    link(captions / "meta" / f"{clip_id}.json", out / "meta" / f"{clip_id}.json")
    latents = source / LATENT_FOLDER / f"{clip_id}.safetensors"
    target = out / LATENT_FOLDER / latents.name
    inputs = {"probe_source": files_digest([latents]), "probe_cut": "first frame" if first_frame else "none"}
    if target.is_file() and (recorded(target) or {}).items() >= inputs.items():
        return False
    with safe_open(str(latents), framework="pt") as handle:
        metadata = {**(handle.metadata() or {}), **inputs}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tmp = target.with_suffix(".partial")
    save_file(cut_latents(tensors, first_frame), str(tmp), metadata=metadata)
    os.replace(tmp, target)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="an encoded training split (videos/, latents/, ...)")
    parser.add_argument("--out", required=True, help="the probe split to write (made when missing)")
    parser.add_argument("--count", type=int, help="the first COUNT clips in name order (default: all)")
    parser.add_argument("--first-frame", action="store_true", help="cut the latents to their first latent frame")
    parser.add_argument("--captions-from", help="take labels/ and meta/ from this split (same clip names)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source, out = Path(args.source), Path(args.out)
    captions = Path(args.captions_from) if args.captions_from else source
    for folder in (source / "videos", source / LATENT_FOLDER, captions / "labels"):
        if not folder.is_dir():
            parser.exit(
                2, f"error: {folder}: no such folder (expected an encoded split: tools/precompute_latents.py)\n"
            )
    if args.count is not None and args.count < 1:
        parser.exit(2, f"error: --count: expected a number of clips >= 1, got {args.count}\n")
    if out.resolve() in (source.resolve(), captions.resolve()):
        parser.exit(2, f"error: --out {out} is a source split; write the probe split elsewhere\n")
    ids = sorted(p.stem for p in (source / "videos").glob("*.mp4"))[: args.count]
    if out.is_dir() and (out / "videos").is_dir():
        names = {p.name.removesuffix(".mp4") for p in (out / "videos").iterdir() if not p.name.endswith(".partial")}
        stray = sorted(names - set(ids))
        if stray:
            parser.exit(
                2,
                f"error: {out} already holds {len(stray)} clips outside this selection (e.g. {stray[0]}); "
                "use a new folder\n",
            )
    for sub in ("videos", "references", "labels", "meta", LATENT_FOLDER):
        (out / sub).mkdir(parents=True, exist_ok=True)
    written = kept = bad = 0
    for clip_id in tqdm(ids, desc="clips"):
        problem = clip_problem(source, captions, clip_id)
        if problem:
            log.warning("skipping %s", problem)
            bad += 1
        elif write_clip(source, captions, out, clip_id, args.first_frame):
            written += 1
        else:
            kept += 1
    log.info("%d clips written, %d already there, %d bad skipped -> %s", written, kept, bad, out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
