"""The sampling script's inputs and outputs: item lines, folder names, fingerprints, atomic writes.

Items come from ``prompt@@ref1@@ref2`` lines (the release's format) or JSONL lines; every field is
checked, and a bad line is that item's error, never the batch's. Each finished item folder holds a
``meta.json`` with a fingerprint of its inputs (prompt, reference file contents, seed, settings,
weight files' identity), so a rerun skips exactly the items the same inputs made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sgm.data.contact_sheet import contact_sheet
from sgm.data.references import split_selector, video_to_uint8
from sgm.pipeline import SamplingConfig

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
