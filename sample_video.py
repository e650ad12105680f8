"""Generate videos of the referenced subjects: Kaleido sampling.

    python sample_video.py --config configs/sampling/Y.yaml load=CHECKPOINT [key=value ...]
    python sample_video.py --config configs/model/X.yaml configs/sampling/Y.yaml [key=value ...]
    python sample_video.py --config ... --prompt "a red ball bounces" --ref ball.png
    torchrun --nproc_per_node P sample_video.py --config ... sequence_parallel_size=S

The checkpoint's ``kaleido_model.json`` names its architecture (a model YAML is then optional and
must agree with it). The library under this script is ``sgm.pipeline`` (the model) and
``sgm.data.items`` (item lines, fingerprints, atomic item folders): this file parses arguments and
runs the batch loop.

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
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sat.arguments import config_parser, parse_config
from sat.config import to_yaml
from sat.parallel import init_parallel
from sgm.data.items import (
    check_seed,
    file_identity,
    finished_fingerprint,
    item_fingerprint,
    read_items,
    remove_stale_temporaries,
    slug,
    write_failures,
    write_item,
)
from sgm.data.references import ReferenceError, load_reference
from sgm.pipeline import (
    KaleidoPipeline,
    SamplingConfig,
    Timings,
    choose_tier,
    memory_plans,
    plan_table,
    resolve_components,
    validate_sampling,
)
from sgm.prompt_extend import extend_prompt
from sgm.registry import resolve_device

log = logging.getLogger("sample_video")


def agreed_prompt(prompt: str, references: int, config: SamplingConfig, parallel) -> str:
    """The prompt to sample with: extended once by the video group's leader and shared with its ranks
    (two calls to a chat model need not give the same text)."""
    if not config.prompt_extend.enabled:
        return prompt
    leader = parallel.is_video_leader
    box = [extend_prompt(prompt, references=references, config=config.prompt_extend) if leader else None]
    if parallel.video_size > 1:
        torch.distributed.broadcast_object_list(box, group=parallel.video_group, group_src=0)
    return box[0]


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--prompt", help="one video from this prompt (instead of input_file)")
    parser.add_argument("--ref", nargs="*", default=[], metavar="PATH", help="reference images or clips for --prompt")
    parser.add_argument(
        "--only-save-latents", action=argparse.BooleanOptionalAction, default=None, help="write latents, not mp4"
    )
    parser.add_argument(
        "--plan", action="store_true", help="print the planned peak device memory of every memory tier and exit"
    )
    parser.add_argument("--vram", type=float, metavar="GIB", help="with --plan: mark the fastest tier that fits")
    args, config = parse_config(parser, SamplingConfig, argv)
    if args.only_save_latents is not None:
        config.only_save_latents = args.only_save_latents
    if args.plan:
        try:
            components = resolve_components(config, planning=True)
            plans = memory_plans(config, components)
            chosen = choose_tier(plans, args.vram) if args.vram else None
        except ValueError as exc:
            parser.exit(2, f"error: {exc}\n")
        height, width = config.sampling_image_size
        frames = components.geometry.video_frames(config.sampling_num_frames)
        print(
            f"{components.name} ({components.dtype}), {height}x{width}x{frames}, {config.max_references} references, "
            f"guidance {config.guidance_scale}, sp {config.sequence_parallel_size}, cfg {config.cfg_parallel_size}, "
            f"fsdp {config.fsdp}: planned peak device memory (GiB)"
        )
        print("\n".join(plan_table(plans, chosen.tier if chosen else None)))
        if chosen:
            print(f"--vram {args.vram:g}: memory.tier={chosen.tier} (planned peak {chosen.peak / 2**30:.1f} GiB)")
        return 0
    try:
        components = resolve_components(config)
        validate_sampling(config, components)
        items = read_items(config, args.prompt, args.ref)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")

    device = resolve_device(config.device)
    parallel = init_parallel(config.sequence_parallel_size, device, config.cfg_parallel_size)
    torch.manual_seed(config.seed)  # random weights (no checkpoint) are the same on every rank and run
    try:
        pipeline = KaleidoPipeline.from_config(config, device=device, parallel=parallel, components=components)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    height, width = config.sampling_image_size
    num_frames = components.geometry.video_frames(config.sampling_num_frames)  # of one segment
    out_dir = Path(config.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.exit(2, f"error: output_dir: cannot create {out_dir} ({exc.strerror or exc})\n")
    resolved = to_yaml(config)
    if parallel.is_video_leader and (cleaned := remove_stale_temporaries(out_dir)):
        log.info("removed %d temporary folder(s) left by killed runs in %s", cleaned, out_dir)
    weights = [file_identity(p) for p in (config.load, components.vae_path, components.text_encoder_path) if p]
    weights += [file_identity(entry.path) for entry in config.lora]
    mine = [item for item in items if item.index % parallel.dp_size == parallel.dp_rank]
    done = skipped = failed = 0
    failures: list[dict] = []  # this process's failed items, for failed_items*.jsonl
    start = time.perf_counter()
    for item in tqdm(mine, desc="videos", disable=not parallel.is_video_leader):
        target = out_dir / f"{item.index}_{slug(item.prompt or item.line)}"
        try:
            if item.error:
                raise ValueError(item.error)
            seed = check_seed(item.seed if item.seed is not None else config.seed + item.index)
            if len(item.references) > config.max_references:
                raise ValueError(f"{len(item.references)} references, max_references is {config.max_references}")
            images = [load_reference(r) for r in item.references]  # reports a bad reference in its words
            fingerprint = item_fingerprint(item, seed, config, weights)
            if (target / "meta.json").is_file():
                if finished_fingerprint(target) == fingerprint:
                    skipped += 1  # the same inputs made this output
                    continue
                if parallel.is_video_leader:
                    log.info("item %d: its inputs changed since %s was written: regenerating", item.index, target)
        except (ValueError, ReferenceError, OSError) as exc:
            failed += 1
            if parallel.is_video_leader:
                log.error("item %d (line %d): %s", item.index, item.index + 1, exc)
                failures.append({"index": item.index, "line": item.index + 1, "input": item.line, "error": str(exc)})
            continue
        timings = Timings()
        t0 = time.perf_counter()
        prompt = agreed_prompt(item.prompt, len(images), config, parallel)
        latents = pipeline.generate_latents(
            prompt,
            references=images,
            seed=seed,
            height=height,
            width=width,
            num_frames=num_frames,
            progress=parallel.is_video_leader,
            timings=timings,
        )
        if parallel.is_video_leader:
            video = None if config.only_save_latents else pipeline.decode(latents, timings=timings)
            meta = {
                "index": item.index,
                "prompt": item.prompt,
                "extended_prompt": prompt if prompt != item.prompt else None,  # what the DiT read, if extended
                "references": item.references,
                "seed": seed,
                "video": {
                    "frames": pipeline.output_frames(num_frames),
                    "segments": config.segments,
                    "overlap_latent_frames": config.overlap,
                    "height": height,
                    "width": width,
                    "fps": config.sampling_fps,
                },
                "timings": {
                    **{k: round(v, 4) for k, v in dataclasses.asdict(timings).items()},
                    "total_s": round(time.perf_counter() - t0, 4),
                },
                "config": resolved,
                "fingerprint": fingerprint,
            }
            try:
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
            except OSError as exc:  # read-only or full disk: this item is lost, finished ones are kept
                failed += 1
                message = f"cannot write {target} ({exc.strerror or exc})"
                log.error("item %d: %s", item.index, message)
                failures.append({"index": item.index, "line": item.index + 1, "input": item.line, "error": message})
                continue
        done += 1
    report = out_dir / ("failed_items.jsonl" if parallel.world_size == 1 else f"failed_items.rank{parallel.rank}.jsonl")
    if failures:
        write_failures(report, failures)
    elif report.exists():
        report.unlink()  # a rerun that failed nothing: the old list is stale
    counts = torch.tensor([done, skipped, failed, len(mine)])
    if parallel.world_size > 1:  # the run's totals: every data-parallel group's items, counted once
        torch.distributed.all_reduce(counts)
        counts //= parallel.video_size
    if parallel.rank == 0:
        listed = " (listed in failed_items*.jsonl)" if counts[2] else ""
        log.info(
            "%d done, %d skipped, %d failed%s in %.1f s (%d item(s) in this run) -> %s",
            *counts[:3].tolist(),
            listed,
            time.perf_counter() - start,
            int(counts[3]),
            out_dir,
        )
    if parallel.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # Under torchrun a non-zero exit makes the launcher print a crash dump for what is an
        # ordinary bad item: the failures are logged and listed in failed_items.rank<r>.jsonl.
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
