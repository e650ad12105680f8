"""Generate videos of the referenced subjects: Kaleido sampling.

    python sample_video.py --config configs/model/X.yaml configs/sampling/Y.yaml [key=value ...]
    python sample_video.py --config ... --prompt "a red ball bounces" --ref ball.png
    torchrun --nproc_per_node P sample_video.py --config ... sequence_parallel_size=S

Inputs: ``input_file`` with ``prompt@@ref1@@ref2`` lines (the release's format) or JSONL lines
``{"prompt": ..., "references": [...], "seed": ...}``, or one video from ``--prompt``/``--ref``.
A reference is an image or a video clip (``clip.mp4#12`` for frame 12, ``clip.mp4#1.5s`` for a
time). Outputs: ``<output_dir>/<index>_<slug>/`` with ``output.mp4`` (or ``latents.safetensors``
with ``--only-save-latents``), ``contact_sheet.png`` (references beside the frames),
``subject_<k>.png``, ``text.txt`` and ``meta.json``. A finished item is skipped on a rerun; a bad
item is reported and the others go on (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sat.arguments import config_parser, parse_config
from sat.config import to_yaml
from sat.parallel import ParallelState, enable_sequence_parallel, init_parallel
from sgm.checkpoint import load_dit_state_dict, read_dit_checkpoint
from sgm.data.contact_sheet import contact_sheet
from sgm.data.references import ReferenceError, load_reference, video_to_uint8
from sgm.diffusion.schedules import SAMPLING_SHIFT
from sgm.models.engine import KaleidoPipeline, SamplerSettings, Timings, video_frames
from sgm.models.wan_vae import PIXEL_MULTIPLE, VAEConfig, build_vae
from sgm.modules.encoders.conditioner import WAN_NEGATIVE_PROMPT, TextConditioner
from sgm.modules.encoders.text import TextEncoderConfig, build_text_encoder
from sgm.registry import ModelConfig, build_dit_from_config, resolve_dtype

log = logging.getLogger("sample_video")
RELEASE_MAX_REFERENCES = 3  # what the release was trained with
SLUG_LENGTH = 120


@dataclass
class SamplingConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    load: str | None = None  # DiT checkpoint: SAT folder (latest + <iter>/...), .pt/.pth or .safetensors
    input_file: str | None = None  # prompt@@ref lines (.txt) or JSONL
    output_dir: str = "outputs/samples"
    seed: int = 1234  # item i without its own seed uses seed + i
    sampling_image_size: list[int] = field(default_factory=lambda: [512, 896])  # [height, width]
    sampling_num_frames: int = 21  # latent frames (the release's meaning): 4(n-1)+1 video frames
    sampling_fps: int = 16
    num_steps: int = 50
    guidance_scale: float = 6.0
    shift: float = SAMPLING_SHIFT
    sample_neg_prompt: str = WAN_NEGATIVE_PROMPT
    max_references: int = RELEASE_MAX_REFERENCES
    only_save_latents: bool = False
    contact_sheet: bool = True  # contact_sheet.png: the references beside a grid of the frames
    release_prompt_compat: bool = False  # True: T5 reads the whole line with its @@paths (release)
    sequence_parallel_size: int = 1
    sp_split: str = "auto"  # auto | height | width
    device: str = "auto"  # auto (cuda when available) | cpu | cuda


@dataclass
class Item:
    index: int
    line: str
    prompt: str = ""
    references: list[str] = field(default_factory=list)
    seed: int | None = None
    error: str | None = None


def validate(config: SamplingConfig) -> None:
    """Everything checkable before a model loads; raises ``ValueError`` naming the key."""
    size = config.sampling_image_size
    if len(size) != 2 or any(s <= 0 or s % PIXEL_MULTIPLE for s in size):
        raise ValueError(f"sampling_image_size: expected [height, width], multiples of {PIXEL_MULTIPLE}, got {size}")
    if config.sampling_num_frames < 1:
        raise ValueError(f"sampling_num_frames: expected at least 1 latent frame, got {config.sampling_num_frames}")
    if config.sampling_fps <= 0:
        raise ValueError(f"sampling_fps: expected a positive frame rate, got {config.sampling_fps}")
    if config.num_steps < 1:
        raise ValueError(f"num_steps: expected at least 1, got {config.num_steps}")
    if config.max_references < 0:
        raise ValueError(f"max_references: expected 0 or more, got {config.max_references}")
    if config.max_references > RELEASE_MAX_REFERENCES:
        log.warning("max_references=%d: the release was trained with at most %d", config.max_references, 3)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.sequence_parallel_size < 1 or world % config.sequence_parallel_size:
        raise ValueError(
            f"sequence_parallel_size: {config.sequence_parallel_size} must be at least 1 and divide the number of "
            f"processes ({world}; start several with torchrun --nproc_per_node)"
        )
    if config.sp_split not in ("auto", "height", "width"):
        raise ValueError(f"sp_split: expected auto, height or width, got '{config.sp_split}'")


def parse_line(index: int, line: str, compat: bool) -> Item:
    parts = [p.strip() for p in line.rstrip("\n").split("@@")]
    item = Item(index, line.rstrip("\n"), prompt=parts[0], references=[p for p in parts[1:] if p])
    if compat:
        item.prompt = item.line
    if not parts[0]:
        item.error = "empty prompt"
    return item


def parse_json_line(index: int, line: str) -> Item:
    item = Item(index, line.rstrip("\n"))
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
        unknown = set(record) - {"prompt", "references", "seed"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}")
        item.prompt = str(record.get("prompt", "")).strip()
        item.references = [str(r) for r in record.get("references", [])]
        item.seed = None if record.get("seed") is None else int(record["seed"])
    except (ValueError, TypeError) as exc:
        item.error = f"malformed JSONL line: {exc}"
        return item
    if not item.prompt:
        item.error = "empty prompt"
    return item


def read_items(config: SamplingConfig, prompt: str | None, refs: list[str]) -> list[Item]:
    if prompt is not None:
        return [Item(0, prompt, prompt=prompt, references=list(refs), error=None if prompt.strip() else "empty prompt")]
    if not config.input_file:
        raise ValueError("no input: give input_file=... or --prompt")
    path = Path(config.input_file)
    if not path.is_file():
        raise ValueError(f"input_file: {path} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        return [parse_json_line(i, line) for i, line in enumerate(lines)]
    return [parse_line(i, line, config.release_prompt_compat) for i, line in enumerate(lines)]


def slug(text: str) -> str:
    """A safe folder name part: no separators, no '..', at most 120 characters."""
    text = re.sub(r"[^\w\-,.]+", "_", text.split("@@")[0].strip())
    text = re.sub(r"\.{2,}", ".", text).strip("._")
    return text[:SLUG_LENGTH] or "item"


def write_item(
    target: Path,
    item: Item,
    images,
    latents: torch.Tensor,
    video,
    fps: int,
    meta: dict,
    only_latents: bool,
    with_sheet: bool,
) -> None:
    """Write everything into a temporary folder, then rename it into place."""
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if only_latents:
            from safetensors.torch import save_file

            save_file({"latents": latents.contiguous().cpu()}, str(tmp / "latents.safetensors"))
        else:
            import imageio.v2 as imageio

            frames = video_to_uint8(video[0])
            with imageio.get_writer(
                tmp / "output.mp4", fps=fps, codec="libx264", quality=8, macro_block_size=16, pixelformat="yuv420p"
            ) as writer:
                for frame in frames:
                    writer.append_data(frame)
            if with_sheet:
                contact_sheet(images, frames).save(tmp / "contact_sheet.png")
        for k, image in enumerate(images):
            image.save(tmp / f"subject_{k}.png")
        (tmp / "text.txt").write_text(item.line + "\n", encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_pipeline(config: SamplingConfig, device: torch.device, parallel: ParallelState) -> KaleidoPipeline:
    if device.type == "cpu" and resolve_dtype(config.model.dtype) != torch.float32:
        log.warning("%s on CPU is several times slower than float32 on most processors", config.model.dtype.value)
    dit = build_dit_from_config(config.model, device="meta" if config.load else device)
    if config.load:
        load_dit_state_dict(dit, read_dit_checkpoint(config.load), assign=True)
        dit = dit.to(device)
        log.info("loaded DiT weights from %s", config.load)
    else:
        log.warning("no DiT checkpoint (load=...): %s has RANDOM weights, the videos will be noise", config.model.name)
    enable_sequence_parallel(dit, parallel)
    text_encoder = build_text_encoder(config.text_encoder, device)
    vae = build_vae(config.vae, device)
    settings = SamplerSettings(config.num_steps, config.guidance_scale, config.shift, config.sample_neg_prompt)
    return KaleidoPipeline(
        dit, vae, TextConditioner(text_encoder, ucg_rate=0.0), settings, device, parallel, config.sp_split
    )


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--prompt", help="one video from this prompt (instead of input_file)")
    parser.add_argument("--ref", nargs="*", default=[], metavar="PATH", help="reference images or clips for --prompt")
    parser.add_argument(
        "--only-save-latents", action=argparse.BooleanOptionalAction, default=None, help="write latents, not mp4"
    )
    args, config = parse_config(parser, SamplingConfig, argv)
    if args.only_save_latents is not None:
        config.only_save_latents = args.only_save_latents
    try:
        validate(config)
        items = read_items(config, args.prompt, args.ref)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")

    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    parallel = init_parallel(config.sequence_parallel_size, device)
    torch.manual_seed(config.seed)  # random weights (no checkpoint) are the same on every rank and run
    try:
        pipeline = build_pipeline(config, device, parallel)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    height, width = config.sampling_image_size
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = to_yaml(config)
    mine = [item for item in items if item.index % parallel.dp_size == parallel.dp_rank]
    done = skipped = failed = 0
    start = time.perf_counter()
    for item in tqdm(mine, desc="videos", disable=not parallel.is_sp_leader):
        target = out_dir / f"{item.index}_{slug(item.prompt or item.line)}"
        if (target / "meta.json").is_file():
            skipped += 1
            continue
        try:
            if item.error:
                raise ValueError(item.error)
            if len(item.references) > config.max_references:
                raise ValueError(f"{len(item.references)} references, max_references is {config.max_references}")
            images = [load_reference(r) for r in item.references]
        except (ValueError, ReferenceError) as exc:
            failed += 1
            if parallel.is_sp_leader:
                log.error("item %d (line %d): %s", item.index, item.index + 1, exc)
            continue
        seed = item.seed if item.seed is not None else config.seed + item.index
        timings = Timings()
        t0 = time.perf_counter()
        latents = pipeline.generate(
            item.prompt, images, seed, height, width, config.sampling_num_frames, timings, parallel.is_sp_leader
        )
        if parallel.is_sp_leader:
            video = None if config.only_save_latents else pipeline.decode(latents, timings)
            meta = {
                "index": item.index,
                "prompt": item.prompt,
                "references": item.references,
                "seed": seed,
                "video": {
                    "frames": video_frames(config.sampling_num_frames),
                    "height": height,
                    "width": width,
                    "fps": config.sampling_fps,
                },
                "timings": {
                    **{k: round(v, 4) for k, v in dataclasses.asdict(timings).items() if k != "extra"},
                    "total_s": round(time.perf_counter() - t0, 4),
                },
                "config": resolved,
            }
            write_item(
                target,
                item,
                images,
                latents,
                video,
                config.sampling_fps,
                meta,
                config.only_save_latents,
                config.contact_sheet,
            )
        done += 1
    if parallel.is_sp_leader:
        log.info(
            "%d done, %d skipped, %d failed in %.1f s (%d item(s) for this process) -> %s",
            done,
            skipped,
            failed,
            time.perf_counter() - start,
            len(mine),
            out_dir,
        )
    if parallel.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
