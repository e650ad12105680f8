"""Strict loading of DiT weights in the release's layout.

A released or trained checkpoint holds the engine's state dict: DiT keys under
``model.diffusion_model.`` and possibly the frozen text encoder under ``conditioner.``. The DiT
part is loaded strictly: any missing, unexpected or wrongly shaped key is an error that lists
them all, sorted (the release loads with ``strict=False`` and silently re-initialises).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

ENGINE_PREFIX = "model.diffusion_model."
# The architecture card beside weights the project writes (SAT folders, exports, the demo model).
MODEL_CARD_FILE = "kaleido_model.json"
MODEL_CARD_FORMAT = "kaleido-dit/1"
IGNORED_PREFIXES = ("conditioner.", "alignment_head.")  # training-only parts of an engine state dict


class StateDictMismatchError(ValueError):
    """Raised when a state dict does not match a model's parameters exactly."""


@dataclass
class StateDictDiff:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def report(self, limit: int = 50) -> str:
        """Human-readable listing, sorted, at most ``limit`` entries per kind."""
        lines = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"{len(items)} {title} key(s):")
                lines += [f"  {k}" for k in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} key(s) with the wrong shape (checkpoint vs model):")
            lines += [f"  {k}: {list(got)} vs {list(want)}" for k, got, want in self.mismatched[:limit]]
            if len(self.mismatched) > limit:
                lines.append(f"  ... and {len(self.mismatched) - limit} more")
        return "\n".join(lines)


def diff_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> StateDictDiff:
    """Compare two ``key -> shape`` tables."""
    return StateDictDiff(
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        mismatched=sorted(
            (k, tuple(found[k]), tuple(expected[k]))
            for k in set(expected) & set(found)
            if tuple(found[k]) != tuple(expected[k])
        ),
    )


def shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def extract_dit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DiT's own keys from a bare DiT state dict or a full engine state dict.

    With any ``model.diffusion_model.`` key present, that prefix is stripped and ``conditioner.*``
    and ``alignment_head.*`` (a training-only head) keys are dropped; every other key is kept so
    that a strict load reports it as unexpected.
    """
    if not any(k.startswith(ENGINE_PREFIX) for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.startswith(ENGINE_PREFIX):
            out[key[len(ENGINE_PREFIX) :]] = value
        elif not key.startswith(IGNORED_PREFIXES):
            out[key] = value
    return out


def load_strict(
    module: nn.Module,
    weights: Mapping[str, torch.Tensor],
    what: str,
    assign: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """Load ``weights`` into ``module`` with every key and shape checked first.

    One ``StateDictMismatchError`` lists all missing, unexpected and wrongly shaped keys, sorted.
    With ``assign=True`` (modules built on the meta device) the tensors become the parameters,
    cast to ``dtype`` (default: the module's) one at a time; a tensor already in that dtype is
    used as is, so a memory-mapped file is not copied.
    """
    expected = module.state_dict()
    diff = diff_shapes(shapes(expected), shapes(weights))
    if diff:
        raise StateDictMismatchError(f"{what} does not match the model:\n" + diff.report())
    if assign:
        weights = {k: v.to(dtype=dtype or expected[k].dtype) for k, v in weights.items()}
    module.load_state_dict(weights, strict=True, assign=assign)


def load_dit_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> None:
    """Strictly load DiT weights (bare or engine-prefixed) into ``model``, cast to its dtype."""
    load_strict(model, extract_dit_state_dict(state_dict), "DiT state dict", assign=assign)


# SAT/DeepSpeed checkpoints carry numpy RNG states next to the weights: plain data, allowed.
_NUMPY_DATA_TYPES = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]
SAT_MODEL_FILE = "mp_rank_00_model_states.pt"
LATEST_FILE = "latest"  # a SAT folder's pointer to its newest iteration folder
SAFETENSORS_INDEX = "model.safetensors.index.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights file of a checkpoint path: a file, or a SAT folder (``latest`` names the iteration).

    The folder's ``latest`` file itself (a path a shell completes to) reads as its folder: it is a
    pointer, never weights.
    """
    path = Path(path)
    if path.is_file() and path.name == LATEST_FILE:
        path = path.parent
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    latest = path / LATEST_FILE
    if latest.is_file():
        path = path / latest.read_text().strip()
    for name in (SAT_MODEL_FILE, SAFETENSORS_INDEX, "model.safetensors"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no {SAT_MODEL_FILE}, {SAFETENSORS_INDEX} or model.safetensors")


def read_dit_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """DiT weights (engine prefix stripped, conditioner keys dropped) from a file or SAT folder."""
    return extract_dit_state_dict(read_state_dict(resolve_checkpoint(path)))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pt/.pth/.bin`` state dict, memory-mapped, no pickle code.

    ``torch.load`` runs with ``weights_only=True``: a file that needs anything but tensors and
    plain containers is refused. A checkpoint with its state dict under ``module`` or
    ``state_dict`` (SAT / DeepSpeed layouts) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.name.endswith(".safetensors.index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a safetensors index (a JSON object with a weight_map): {exc}") from None
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(_read_safetensors(path.parent / shard))
        return out
    with torch.serialization.safe_globals(_NUMPY_DATA_TYPES):
        try:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as exc:
            if NOT_A_PICKLE.search(str(exc)):  # e.g. a text file: no code in it, just not a checkpoint
                raise ValueError(f"{path}: not a checkpoint (neither a torch file nor safetensors)") from None
            raise PickledCodeError(refusal(path, exc)) from None
        except (RuntimeError, EOFError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt ({first})") from None
    if isinstance(loaded, dict):
        for key in ("module", "state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return loaded


# What the unpickler says of bytes that are no pickle at all (the first byte is not an opcode).
NOT_A_PICKLE = re.compile(r"Unsupported operand|invalid load key")


class PickledCodeError(ValueError):
    """A checkpoint that needs code to load: refused, never executed."""


def refusal(path: str | Path, exc: Exception) -> str:
    """One line for a file the weights-only unpickler refused, naming what it wanted to run (and not
    repeating torch's advice to load it with ``weights_only=False``)."""
    wanted = re.search(r"(?:global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
    what = f" ({wanted.group(1)})" if wanted else ""
    return f"{path}: the file contains code{what} and was refused: only tensors and plain data are read"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint file not found") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated or corrupt files
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from None


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary name in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_model_card(folder: Path, card: Mapping) -> Path:
    """``folder/kaleido_model.json``: registry name, architecture fields, dtype and, where known, the
    VAE and text encoder (paths relative to ``folder``), so ``load=folder`` needs no model YAML."""
    path = Path(folder) / MODEL_CARD_FILE
    write_atomic(path, json.dumps({"format": MODEL_CARD_FORMAT, **card}, indent=2) + "\n")
    return path


def find_model_card(load: str | Path) -> tuple[dict, Path] | None:
    """The card that describes a checkpoint path and the folder it lies in, or None.

    Looked for in the folder itself (or a file's folder) and one level up, so a SAT folder, one
    of its iteration folders and the weights file inside both find the card of the run.
    """
    path = Path(load)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder.parent):
        card_file = candidate / MODEL_CARD_FILE
        if card_file.is_file():
            try:
                card = json.loads(card_file.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{card_file}: not valid JSON ({exc})") from None
            if not isinstance(card, dict) or card.get("format") != MODEL_CARD_FORMAT:
                raise ValueError(f"{card_file}: expected a JSON object with format '{MODEL_CARD_FORMAT}'")
            return card, candidate
    return None


def write_sat_checkpoint(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    card: Mapping | None = None,
    iteration: str = "1",
    move_latest: bool = True,
) -> Path:
    """The one writer of SAT checkpoint folders: ``folder/<iteration>/mp_rank_00_model_states.pt``
    (the DiT under ``module`` as ``model.diffusion_model.*``), then ``folder/latest``, then the card.

    ``state_dict`` holds DiT keys, bare or already engine-prefixed. Each file goes through a
    temporary name, and ``latest`` moves only after the weights are complete (``move_latest=False``
    when DeepSpeed writes it after its own states).
    """
    folder = Path(folder)
    target = folder / iteration / SAT_MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    module = {k if k.startswith(ENGINE_PREFIX) else ENGINE_PREFIX + k: v for k, v in state_dict.items()}
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    torch.save({"module": module}, tmp)
    os.replace(tmp, target)
    if move_latest:
        write_atomic(folder / LATEST_FILE, f"{iteration}\n")
    if card is not None:
        write_model_card(folder, card)
    return target
