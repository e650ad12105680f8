"""Merging the Kaleido-14B-S2V download into the layout the sampler and trainer read (the library
under ``merge_kaleido.py``, which documents the accepted inputs and the written layout).

``merge(checkpoint_dir, output_dir, model=..., fmt=...)`` classifies the download (DiT shards, the
VAE file, the text-encoder folder), joins byte-split parts, checks every DiT tensor against the
registry's architecture before anything is written, streams the shards into ``OUT/model/1``
(safetensors or the release's single ``.pt``), copies or links the VAE and text encoder, and
writes the model card and a manifest; everything is staged and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from sgm.checkpoint import (
    ENGINE_PREFIX,
    IGNORED_PREFIXES,
    LATEST_FILE,
    SAFETENSORS_INDEX,
    SAT_MODEL_FILE,
    StateDictMismatchError,
    read_state_dict,
    write_atomic,
    write_model_card,
    write_sat_checkpoint,
)
from sgm.convert.shards import (
    WEIGHT_SUFFIXES,
    TensorInfo,
    copy_file,
    join_parts,
    list_tensors,
    part_groups,
    write_safetensors,
)
from sgm.models.wan_vae import RELEASE_VAE_FILE as VAE_FILE
from sgm.modules.encoders.text import RELEASE_T5_FILE
from sgm.registry import ARCHITECTURES, architecture_card, check_dit_shapes, resolve_arch

log = logging.getLogger(__name__)
T5_FOLDER = "umt5-xxl"
ITERATION = "1"
INFO_FILE = "merge_info.json"
WRAPPER_PREFIXES = ("module.",)


class MergeError(ValueError):
    """The download cannot be merged; the message says why and names the file."""


def strip_name(key: str) -> str | None:
    """The DiT key of a download key, or None for keys to ignore (the frozen text encoder)."""
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key.startswith(IGNORED_PREFIXES):
        return None
    return key[len(ENGINE_PREFIX) :] if key.startswith(ENGINE_PREFIX) else key


class Download:
    """The download folder, classified into DiT shards, the VAE file and the text-encoder folder."""

    def __init__(self, root: Path, scratch: Path):
        if not root.is_dir():
            raise MergeError(f"{root}: checkpoint_dir is not a folder")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        groups = part_groups(files)
        in_parts = {p for parts in groups.values() for p in parts}
        files = [p for p in files if p not in in_parts]
        for base, parts in groups.items():
            target = scratch / base.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            log.info("joining %d parts of %s", len(parts), base.relative_to(root))
            files.append(join_parts(base, parts, target))
        self.root, self.scratch = root, scratch
        self.vae = next((p for p in files if p.name == VAE_FILE), None)
        t5_file = next((p for p in files if p.name == RELEASE_T5_FILE), None)
        self.t5_dir = t5_file.parent if t5_file else None
        self.t5_files = [
            p for p in files if self.t5_dir and p.parent == self.t5_dir and p.suffix not in (".sha256", ".size")
        ]
        self.indexes = [p for p in files if p.name.endswith(".index.json")]
        self.dit = [p for p in files if p.suffix in WEIGHT_SUFFIXES and p != self.vae and p not in self.t5_files]

    def relative(self, path: Path) -> str:
        for base in (self.root, self.scratch):
            if path.is_relative_to(base):
                return str(path.relative_to(base))
        return str(path)


def collect_dit(download: Download) -> tuple[dict[str, TensorInfo], int]:
    """Every DiT tensor by its Kaleido key; duplicates, dtype changes and index gaps are errors."""
    if not download.dit:
        raise MergeError(f"{download.root}: no DiT weight files (.safetensors, .bin, .pt, .pth) found")
    by_name = {download.relative(p): p for p in download.dit}
    for index in download.indexes:
        weight_map = read_index(index)
        for shard in sorted(set(weight_map.values())):
            if not (index.parent / shard).is_file() and shard not in by_name:
                raise MergeError(f"{index}: lists shard {shard}, which is not in the download")
    tensors: dict[str, TensorInfo] = {}
    ignored = 0
    dtype = None
    for path in download.dit:
        for info in list_tensors(path):
            key = strip_name(info.key)
            if key is None:
                ignored += 1
                continue
            if key in tensors:
                raise MergeError(f"{key} is in two shards: {tensors[key].file} and {path}")
            if dtype is None:
                dtype = info.dtype
            elif info.dtype != dtype:
                raise MergeError(f"{path}: tensor {info.key} is {info.dtype}, the shards before it are {dtype}")
            tensors[key] = info
    for index in download.indexes:
        weight_map = read_index(index)
        missing = sorted(k for k in weight_map if strip_name(k) is not None and strip_name(k) not in tensors)
        if missing:
            raise MergeError(f"{index}: {len(missing)} indexed tensor(s) are in no shard, e.g. {missing[:3]}")
    return tensors, ignored


def validate(tensors: dict[str, TensorInfo], model: str) -> int:
    found = {k: v.shape for k, v in tensors.items()}
    try:
        check_dit_shapes(found, model, "the merged DiT's tensors")
    except StateDictMismatchError as exc:
        hint = ""
        for other in sorted(set(ARCHITECTURES) - {model}):
            try:
                check_dit_shapes(found, other)
            except StateDictMismatchError:
                continue
            hint = f"\nthese tensors are exactly {other}: merge with --model {other}"
            break
        raise MergeError(f"{exc}{hint}") from None
    return sum(v.nbytes // v.dtype.itemsize for v in tensors.values())


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``*.index.json``, or ``MergeError`` naming the file."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise MergeError(f"{index}: not a valid index JSON (expected an object with a weight_map): {exc}") from None
    if not isinstance(weight_map, dict):
        raise MergeError(f"{index}: weight_map must map tensor names to shard files")
    return weight_map


def download_identity(root: Path) -> list:
    """Every file of the download with its size and modification time (reading tens of GB to prove
    a rerun has nothing to do would cost what the merge costs)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".merge-tmp"))
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def finished(out: Path, model: str, fmt: str, source: list) -> bool:
    """Whether ``out`` holds a complete merge of this download, for this model, in this format;
    a merge of other files or in the other format is said and done again."""
    info = out / "model" / INFO_FILE
    if not ((out / "model" / LATEST_FILE).is_file() and info.is_file()):
        return False
    try:
        record = json.loads(info.read_text())
    except ValueError:
        return False
    complete = all(
        (out / name).is_file() and (out / name).stat().st_size == size for name, size in record.get("files", {}).items()
    )
    same = (record.get("model"), record.get("format"), record.get("source")) == (model, fmt, source)
    if complete and not same:
        log.info("%s holds a merge of other files, another model or format: merging again", out)
    return complete and same


def write_dit(tensors: dict[str, TensorInfo], folder: Path, fmt: str) -> dict[str, int]:
    """Write ``folder/1/...`` and ``folder/latest``; returns written file sizes (relative to folder)."""
    iteration = folder / ITERATION
    iteration.mkdir(parents=True)
    sizes: dict[str, int] = {}
    if fmt == "pt":
        states: dict[Path, dict] = {}
        module = {}
        for key, info in sorted(tensors.items()):
            if info.offsets is None:
                states.setdefault(info.file, read_state_dict(info.file))
                module[key] = states[info.file][info.key]
            else:
                import safetensors

                with safetensors.safe_open(str(info.file), "pt") as f:
                    module[key] = f.get_tensor(info.key)
        written = write_sat_checkpoint(folder, module, iteration=ITERATION)
        sizes[f"{ITERATION}/{SAT_MODEL_FILE}"] = written.stat().st_size
    else:
        by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
        for key, info in sorted(tensors.items()):
            by_file.setdefault(info.file, []).append((ENGINE_PREFIX + key, info))
        weight_map = {}
        total = len(by_file)
        for number, (source, items) in enumerate(sorted(by_file.items()), start=1):
            name = f"model-{number:05d}-of-{total:05d}.safetensors"
            states = None if items[0][1].offsets is not None else {source: read_state_dict(source)}
            sizes[f"{ITERATION}/{name}"] = write_safetensors(iteration / name, items, states)
            weight_map.update(dict.fromkeys((n for n, _ in items), name))
            log.info("wrote %s (%d tensors from %s)", name, len(items), source.name)
            del states
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        write_atomic(iteration / SAFETENSORS_INDEX, json.dumps(index, indent=1))
        write_atomic(folder / LATEST_FILE, ITERATION + "\n")
    return {f"model/{k}": v for k, v in sizes.items()}


def merge(
    checkpoint_dir: str | Path,
    output_dir: str | Path | None,
    *,
    model: str = "kaleido-14b",
    fmt: str = "safetensors",
    link: bool = False,
    dit_only: bool = False,
    verify_only: bool = False,
) -> int:
    """Merge ``checkpoint_dir`` into ``output_dir`` (or only verify it); 0 when done, ``MergeError`` /
    ``ShardError`` naming the file when the download cannot be merged."""
    root = Path(checkpoint_dir)
    out = Path(output_dir) if output_dir else None
    source = download_identity(root) if root.is_dir() else []
    if out is not None and finished(out, model, fmt, source):
        log.info("%s is already a finished merge of this download for %s (%s): nothing to do", out, model, fmt)
        return 0
    if not root.is_dir():
        raise MergeError(f"{root}: checkpoint_dir is not a folder")
    created_out = out is not None and not out.exists()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        scratch = out / f".merge-tmp-{os.getpid()}"  # beside the output: the rename into place stays cheap
        scratch.mkdir()
    else:  # --verify-only writes nothing into the download: joined parts go to the system's temp folder
        scratch = Path(tempfile.mkdtemp(prefix="kaleido-verify-"))
    start = time.perf_counter()
    try:
        download = Download(root, scratch / "joined")
        tensors, ignored = collect_dit(download)
        params = validate(tensors, model)
        missing = [n for n, p in ((VAE_FILE, download.vae), (RELEASE_T5_FILE, download.t5_dir)) if p is None]
        if missing and not dit_only:
            raise MergeError(f"{root}: {', '.join(missing)} not found (--dit-only merges the DiT alone)")
        for path in [download.vae, *download.t5_files]:
            if path is not None and path.suffix in WEIGHT_SUFFIXES:
                list_tensors(path)  # readable, weights only, not truncated
        log.info(
            "DiT: %d tensors, %s parameters, %s, in %d file(s)%s; VAE: %s; text encoder: %s",
            len(tensors),
            f"{params:,}",
            next(iter(tensors.values())).dtype,
            len(download.dit),
            f"; {ignored} conditioner tensor(s) ignored" if ignored else "",
            download.relative(download.vae) if download.vae else "absent",
            download.relative(download.t5_dir) if download.t5_dir else "absent",
        )
        if verify_only:
            log.info("verified %s in %.1f s: ready to merge", root, time.perf_counter() - start)
            return 0
        staged = scratch / "out"
        sizes = write_dit(tensors, staged / "model", fmt)
        if download.vae is not None:
            copy_file(download.vae, staged / VAE_FILE, link)
            sizes[VAE_FILE] = (staged / VAE_FILE).stat().st_size
        if download.t5_dir is not None:
            (staged / T5_FOLDER).mkdir()
            for path in download.t5_files:
                copy_file(path, staged / T5_FOLDER / path.name, link)
                sizes[f"{T5_FOLDER}/{path.name}"] = path.stat().st_size
        info = {"model": model, "parameters": params, "format": fmt, "files": sizes, "source": source}
        (staged / "model" / INFO_FILE).write_text(json.dumps(info, indent=1))
        card = architecture_card(
            model,
            resolve_arch(model),
            next(iter(tensors.values())).dtype,
            **{"vae": f"../{VAE_FILE}"} if download.vae is not None else {},
            **{"text_encoder": f"../{T5_FOLDER}"} if download.t5_dir is not None else {},
        )
        write_model_card(staged / "model", card)
        for name in ("model", VAE_FILE, T5_FOLDER):
            if (staged / name).exists():
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
                os.replace(staged / name, target)
        total = sum(sizes.values())
        seconds = time.perf_counter() - start
        log.info(
            "merged %s parameters into %s: %d files, %.1f GB in %.1f s (%.0f MB/s)",
            f"{params:,}",
            out,
            len(sizes),
            total / 1e9,
            seconds,
            total / 1e6 / max(seconds, 1e-9),
        )
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed merge leaves no empty output folder behind
