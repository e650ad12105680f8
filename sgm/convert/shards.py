"""Reading checkpoint shards tensor by tensor and writing safetensors without holding a model.

Inputs: ``.safetensors`` (header parsed here, bytes copied straight from the file), ``.pt``/
``.pth``/``.bin`` state dicts (``torch.load(weights_only=True, mmap=True)``: no pickle code runs,
tensors stay memory-mapped), and files split into byte parts (``name.part_aa``, ``name.00`` …)
which are joined on disk first, checked against ``name.sha256`` / ``name.size`` when present.
Every error names the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sgm.checkpoint import read_state_dict

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_PART = re.compile(r"^(?P<base>.+)\.(?:part_?(?P<letters>[a-z]{2,})|(?P<digits>\d{2,3}))$")
COPY_CHUNK = 16 * 2**20


class ShardError(ValueError):
    """A download file that cannot be used, naming the file."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None = None  # safetensors: absolute byte range in the file

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, data start) of a safetensors file; ``ShardError`` when truncated or malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ShardError(f"{path}: truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ShardError(f"{path}: truncated (header of {length} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(length))
        except json.JSONDecodeError as exc:
            raise ShardError(f"{path}: malformed safetensors header ({exc})") from None
    start = 8 + length
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if start + end > size:
        raise ShardError(f"{path}: truncated ({size} bytes, the header needs {start + end})")
    return header, start


def list_tensors(path: Path) -> list[TensorInfo]:
    """Name, dtype and shape of every tensor of a weight file (nothing big is read)."""
    if path.suffix == ".safetensors":
        header, start = safetensors_header(path)
        out = []
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise ShardError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}")
            begin, end = meta["data_offsets"]
            info = TensorInfo(
                key, path, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]), (start + begin, start + end)
            )
            if info.nbytes != end - begin:
                raise ShardError(f"{path}: tensor {key} has {end - begin} bytes for shape {meta['shape']}")
            out.append(info)
        return out
    try:
        state = read_state_dict(path)
    except Exception as exc:  # pickle refusals, truncated zip archives, ...: report the file
        raise ShardError(f"{path}: cannot be read as a weights-only state dict ({str(exc).splitlines()[0]})") from None
    return [TensorInfo(k, path, v.dtype, tuple(v.shape)) for k, v in state.items()]


def tensor_bytes(info: TensorInfo, state: dict[str, torch.Tensor] | None) -> Iterator[memoryview | bytes]:
    """The raw little-endian bytes of one tensor, in chunks (safetensors: read from the file)."""
    if info.offsets is not None:
        begin, end = info.offsets
        with open(info.file, "rb") as f:
            f.seek(begin)
            remaining = end - begin
            while remaining:
                chunk = f.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise ShardError(f"{info.file}: truncated while reading {info.key}")
                remaining -= len(chunk)
                yield chunk
        return
    tensor = state[info.key].contiguous()
    yield memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else b""


def write_safetensors(
    path: Path,
    tensors: list[tuple[str, TensorInfo]],
    states: dict[Path, dict] | None = None,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``(output name, source)`` pairs as one safetensors file, streaming each tensor's bytes."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, info in tensors:
        header[name] = {
            "dtype": DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, info in tensors:
            for chunk in tensor_bytes(info, (states or {}).get(info.file)):
                f.write(chunk)
    return 8 + len(blob) + offset


def part_groups(files: list[Path]) -> dict[Path, list[Path]]:
    """``name.part_aa, name.part_ab`` / ``name.00, name.01`` -> {name: [parts in order]}."""
    groups: dict[Path, list[tuple[str, Path]]] = {}
    for path in files:
        match = _PART.match(path.name)
        if match:
            order = match.group("letters") or match.group("digits")
            groups.setdefault(path.with_name(match.group("base")), []).append((order, path))
    return {base: [p for _, p in sorted(parts)] for base, parts in groups.items()}


def join_parts(base: Path, parts: list[Path], target: Path) -> Path:
    """Concatenate ``parts`` into ``target``; check ``base.sha256`` / ``base.size`` when present."""
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(COPY_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
    size_file, sha_file = base.with_name(base.name + ".size"), base.with_name(base.name + ".sha256")
    if size_file.is_file() and int(size_file.read_text().split()[0]) != size:
        raise ShardError(
            f"{base}: the joined parts are {size} bytes, {size_file.name} says {size_file.read_text().strip()}"
        )
    if sha_file.is_file() and sha_file.read_text().split()[0].lower() != digest.hexdigest():
        raise ShardError(f"{base}: sha256 of the joined parts differs from {sha_file.name}")
    return target


def copy_file(source: Path, target: Path, link: bool) -> None:
    """Copy (or hard-link, falling back to a copy) ``source`` to ``target`` through a temporary name."""
    tmp = target.with_name(target.name + ".partial")
    if link:
        try:
            tmp.unlink(missing_ok=True)
            tmp.hardlink_to(source)
        except OSError:
            shutil.copyfile(source, tmp)
    else:
        shutil.copyfile(source, tmp)
    tmp.replace(target)
