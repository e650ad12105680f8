"""Generate videos of the referenced subjects: Kaleido sampling.

    python sample_video.py --config configs/sampling/Y.yaml load=CHECKPOINT [key=value ...]
    python sample_video.py --config configs/model/X.yaml configs/sampling/Y.yaml [key=value ...]
    python sample_video.py --config ... --prompt "a red ball bounces" --ref ball.png
    torchrun --nproc_per_node P sample_video.py --config ... sequence_parallel_size=S

The checkpoint's ``kaleido_model.json`` names its architecture (a model YAML is then optional and
must agree with it). The library under this script is ``sgm.pipeline``: this file parses
arguments, reads the items and writes the outputs.

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
import hashlib
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
from sat.parallel import init_parallel
from sgm.data.contact_sheet import contact_sheet
from sgm.data.references import ReferenceError, load_reference, split_selector, video_to_uint8
from sgm.pipeline import KaleidoPipeline, SamplingConfig, Timings, resolve_components, validate_sampling
from sgm.registry import resolve_device

log = logging.getLogger("sample_video")
SLUG_LENGTH = 120
SLUG_BYTES = 180


@dataclass
class Item:
    index: int
    line: str
    prompt: str = ""
    references: list[str] = field(default_factory=list)
    seed: int | None = None
    error: str | None = None


def parse_line(index: int, line: str, compat: bool) -> Item:
    parts = [p.strip() for p in line.rstrip("\n").split("@@")]
    item = Item(index, line.rstrip("\n"), prompt=parts[0], references=[p for p in parts[1:] if p])
    if compat:
        item.prompt = item.line
    if not parts[0]:
        item.error = "empty prompt"
    return item


MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit; JSON and YAML integers beyond are a mistake


def check_seed(seed: object) -> int:
    """An item's seed: an integer (not a bool, not a float) in [0, 2^63 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer, got {json.dumps(seed)}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed: expected 0 to {MAX_SEED}, got {seed}")
    return seed


def parse_json_line(index: int, line: str) -> Item:
    item = Item(index, line.rstrip("\n"))
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
        unknown = set(record) - {"prompt", "references", "seed"}
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}")
        prompt = record.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError(f'"prompt": expected a string, got {json.dumps(prompt)}')
        references = record.get("references", [])
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise ValueError(f'"references": expected a list of paths, got {json.dumps(references)}')
        item.prompt, item.references = prompt.strip(), references
        item.seed = None if record.get("seed") is None else check_seed(record["seed"])
    except ValueError as exc:
        item.error = f"malformed JSONL line: {exc}"
        return item
    if not item.prompt:
        item.error = "empty prompt"
    return item


JSONL_SUFFIXES = (".jsonl", ".json")


def read_items(config: SamplingConfig, prompt: str | None, refs: list[str]) -> list[Item]:
    """The items of ``--prompt``/``--ref`` or of ``input_file`` (blank and ``#`` lines skipped; a
    UTF-8 byte-order mark removed; item indices are line numbers minus one)."""
    if prompt is None and refs:
        raise ValueError("--ref needs --prompt (references of an input_file go on its lines)")
    if prompt is not None:
        return [Item(0, prompt, prompt=prompt, references=list(refs), error=None if prompt.strip() else "empty prompt")]
    if not config.input_file:
        raise ValueError("no input: give input_file=... or --prompt")
    path = Path(config.input_file)
    if not path.is_file():
        raise ValueError(f"input_file: {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"input_file: {path} is not UTF-8 text (byte {exc.start})") from None
    lines = [
        (i, line) for i, line in enumerate(text.splitlines()) if line.strip() and not line.lstrip().startswith("#")
    ]
    if path.suffix.lower() in JSONL_SUFFIXES:
        return [parse_json_line(i, line) for i, line in lines]
    return [parse_line(i, line, config.release_prompt_compat) for i, line in lines]


def slug(text: str) -> str:
    """A safe folder name part: no separators, no '..', at most 120 characters and 180 UTF-8 bytes
    (file systems limit names to 255 bytes; a character of another script takes up to 4)."""
    text = re.sub(r"[^\w\-,.]+", "_", text.split("@@")[0].strip())
    text = re.sub(r"\.{2,}", ".", text).strip("._")[:SLUG_LENGTH]
    text = text.encode("utf-8")[:SLUG_BYTES].decode("utf-8", errors="ignore").strip("._")
    return text or "item"


def write_failures(path: Path, failures: list[dict]) -> None:
    """``failed_items.jsonl``: one JSON line per failed item (index, line, input, error), atomic."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures), encoding="utf-8")
    os.replace(tmp, path)


def file_identity(path: str | Path) -> list:
    """What identifies weights without reading them (hashing tens of GB on every run is too slow):
    every file under ``path`` with its size and modification time."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def content_digest(path: str) -> str:
    """sha256 of a reference's file (``clip.mp4#12`` hashes the clip and keeps the selector)."""
    file, _, _ = split_selector(path)
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{digest.hexdigest()}{path[len(file) :]}"


def item_fingerprint(item: Item, seed: int, config: SamplingConfig, weights: list) -> str:
    """A digest of everything that makes an item's outputs: prompt, reference contents, seed, the
    resolved config (less where outputs go and where items come from) and the weights' identity."""
    settings = dataclasses.asdict(config)
    for key in ("output_dir", "input_file"):
        settings.pop(key)
    record = {
        "prompt": item.prompt,
        "references": [content_digest(r) for r in item.references],
        "seed": seed,
        "config": settings,
        "weights": weights,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def finished_fingerprint(target: Path) -> str | None:
    try:
        return json.loads((target / "meta.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete temporary item folders (``.<name>.tmp<pid>``) left by killed runs; a live process's stay."""
    removed = 0
    for path in out_dir.glob(".*.tmp*"):
        pid = path.name.rpartition(".tmp")[2]
        if not pid.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (another data-parallel group of this run, or another run)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        except PermissionError:
            continue
    return removed


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
        old = target.parent / f".{target.name}.old{os.getpid()}"
        if target.exists():  # an earlier output of other inputs: moved aside, then removed
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        components = resolve_components(config)
        validate_sampling(config, components)
        items = read_items(config, args.prompt, args.ref)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")

    device = resolve_device(config.device)
    parallel = init_parallel(config.sequence_parallel_size, device)
    torch.manual_seed(config.seed)  # random weights (no checkpoint) are the same on every rank and run
    try:
        pipeline = KaleidoPipeline.from_config(config, device=device, parallel=parallel, components=components)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    height, width = config.sampling_image_size
    num_frames = components.geometry.video_frames(config.sampling_num_frames)
    out_dir = Path(config.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.exit(2, f"error: output_dir: cannot create {out_dir} ({exc.strerror or exc})\n")
    resolved = to_yaml(config)
    if parallel.is_sp_leader and (cleaned := remove_stale_temporaries(out_dir)):
        log.info("removed %d temporary folder(s) left by killed runs in %s", cleaned, out_dir)
    weights = [file_identity(p) for p in (config.load, components.vae_path, components.text_encoder_path) if p]
    weights += [file_identity(entry.path) for entry in config.lora]
    mine = [item for item in items if item.index % parallel.dp_size == parallel.dp_rank]
    done = skipped = failed = 0
    failures: list[dict] = []  # this process's failed items, for failed_items*.jsonl
    start = time.perf_counter()
    for item in tqdm(mine, desc="videos", disable=not parallel.is_sp_leader):
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
                if parallel.is_sp_leader:
                    log.info("item %d: its inputs changed since %s was written: regenerating", item.index, target)
        except (ValueError, ReferenceError, OSError) as exc:
            failed += 1
            if parallel.is_sp_leader:
                log.error("item %d (line %d): %s", item.index, item.index + 1, exc)
                failures.append({"index": item.index, "line": item.index + 1, "input": item.line, "error": str(exc)})
            continue
        timings = Timings()
        t0 = time.perf_counter()
        latents = pipeline.generate_latents(
            item.prompt,
            references=images,
            seed=seed,
            height=height,
            width=width,
            num_frames=num_frames,
            progress=parallel.is_sp_leader,
            timings=timings,
        )
        if parallel.is_sp_leader:
            video = None if config.only_save_latents else pipeline.decode(latents, timings=timings)
            meta = {
                "index": item.index,
                "prompt": item.prompt,
                "references": item.references,
                "seed": seed,
                "video": {
                    "frames": num_frames,
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
        counts //= parallel.sp_size
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
