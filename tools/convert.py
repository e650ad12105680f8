"""Weight converters between the Kaleido (SAT) layout, Wan2.1's and diffusers'.

    python tools/convert.py wan2kaleido --input Wan2.1-T2V-14B --output ckpt_14b [--model kaleido-14b]
    python tools/convert.py diffusers2kaleido --input wan_diffusers/transformer --output ckpt_14b
    python tools/convert.py kaleido2safetensors --input Kaleido-14B-S2V/model --output kaleido.safetensors
    python tools/convert.py kaleido2diffusers --input Kaleido-14B-S2V/model --output kaleido_diffusers/
    python tools/convert.py kaleido2comfyui --input Kaleido-14B-S2V/model --output kaleido_comfyui.safetensors \
        [--format bf16 | fp8 | fp8_scaled]
    python tools/convert.py comfyui2kaleido --input wan2.1_t2v_14B_fp8_e4m3fn.safetensors --output kaleido.safetensors

Inputs are a file, a SAT folder (``latest``), or a folder of (sharded, indexed) safetensors/.bin
files. Every conversion keeps dtypes, refuses to drop or invent tensors, and checks the result
against the registry architecture (``--model``), printing a key/shape diff on mismatch.
Outputs: ``*2kaleido`` write a SAT checkpoint folder (``latest``, ``1/mp_rank_00_model_states.pt``
with the DiT under ``module`` as ``model.diffusion_model.*``) that training loads with ``load=``;
``kaleido2safetensors`` one safetensors file with our keys; ``kaleido2diffusers`` a folder with
``diffusion_pytorch_model.safetensors`` and ``config.json`` for ``WanTransformer3DModel``. The
diffusers export covers the video tokens only: reference tokens need our RoPE positions
(subject k at (k, 80 + row, 80 + column)), which diffusers' Wan model does not have.
``kaleido2comfyui`` writes the Wan2.1 layout ComfyUI loads (``diffusion_model.blocks.N...``; bf16,
fp8 or ComfyUI's scaled fp8), ``comfyui2kaleido`` reads such files (any prefix, community fp8
conversions included, dequantised) into one safetensors file with our keys; ComfyUI's Wan model
still lacks the reference tokens (``sgm/convert/comfyui.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgm.checkpoint import (  # noqa: E402
    LATEST_FILE,
    SAT_MODEL_FILE,
    extract_dit_state_dict,
    read_state_dict,
    resolve_checkpoint,
    shapes,
    write_atomic,
    write_model_card,
    write_sat_checkpoint,
)
from sgm.convert.comfyui import COMFYUI_FORMATS, comfyui_to_kaleido, kaleido_to_comfyui  # noqa: E402
from sgm.convert.diffusers_wan import diffusers_config, diffusers_to_kaleido, kaleido_to_diffusers  # noqa: E402
from sgm.convert.wan_official import wan_to_kaleido  # noqa: E402
from sgm.memory import SCALE_KEY, quantize_state_dict  # noqa: E402
from sgm.registry import ARCHITECTURES, architecture_card, check_dit_shapes, resolve_arch  # noqa: E402

log = logging.getLogger("convert")
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def read_any(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, a SAT folder (or one iteration's folder of it: its model file only,
    not the optimizer's), or a folder of weight shards (all merged)."""
    if path.is_dir() and not (path / LATEST_FILE).is_file() and not (path / SAT_MODEL_FILE).is_file():
        shards = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_FILES)
        if not shards:
            raise FileNotFoundError(f"{path}: no weight files")
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            part = read_state_dict(shard)
            duplicated = sorted(set(part) & set(out))
            if duplicated:
                raise ValueError(f"{shard}: keys already seen in another shard, e.g. {duplicated[:3]}")
            out.update(part)
        return out
    return read_state_dict(resolve_checkpoint(path))


def save_safetensors(tensors: dict[str, torch.Tensor], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out)


def convert(kind: str, source: Path, out: Path, model: str, fmt: str | None = None, keep_fp8: bool = False) -> int:
    state = read_any(source)
    if kind == "wan2kaleido":
        kaleido = wan_to_kaleido(state)
    elif kind == "diffusers2kaleido":
        kaleido = diffusers_to_kaleido(state)
    elif kind == "comfyui2kaleido":
        kaleido = comfyui_to_kaleido(state, keep_fp8=keep_fp8)
    else:
        kaleido = extract_dit_state_dict(state)
    scales = {k: v for k, v in kaleido.items() if k.endswith(SCALE_KEY)}  # fp8 scales: not model tensors
    check_dit_shapes(shapes({k: v for k, v in kaleido.items() if k not in scales}), model, "the converted weights")
    dtype = next(v.dtype for k, v in kaleido.items() if k not in scales and v.dtype.itemsize > 1)  # not fp8
    card = architecture_card(model, resolve_arch(model), dtype)
    if kind in ("wan2kaleido", "diffusers2kaleido"):
        write_sat_checkpoint(out, kaleido, card)
    elif kind in ("kaleido2safetensors", "comfyui2kaleido"):
        if kind == "kaleido2safetensors" and fmt in ("fp8", "fp8_scaled"):  # pre-quantised: our loader keeps fp8
            kaleido = quantize_state_dict(kaleido, weights=fmt)
        save_safetensors(kaleido, out)
        write_model_card(out.parent, card)
    elif kind == "kaleido2comfyui":
        save_safetensors(kaleido_to_comfyui(kaleido, fmt=fmt or "bf16"), out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".diffusion_pytorch_model.safetensors.partial"
        save_file(kaleido_to_diffusers(kaleido), str(tmp))
        os.replace(tmp, out / "diffusion_pytorch_model.safetensors")
        config = {"_class_name": "WanTransformer3DModel", **diffusers_config(resolve_arch(model))}
        write_atomic(out / "config.json", json.dumps(config, indent=2))
        write_model_card(out, card)
    count = sum(v.numel() for v in kaleido.values())
    log.info("%s: %d tensors, %s parameters -> %s", kind, len(kaleido), f"{count:,}", out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "kind",
        choices=[
            "wan2kaleido",
            "diffusers2kaleido",
            "kaleido2safetensors",
            "kaleido2diffusers",
            "kaleido2comfyui",
            "comfyui2kaleido",
        ],
    )
    parser.add_argument(
        "--format", choices=COMFYUI_FORMATS, help="kaleido2comfyui (default bf16), kaleido2safetensors (default: as is)"
    )
    parser.add_argument(
        "--keep-fp8", action="store_true", help="comfyui2kaleido: keep fp8 weights (pre-quantised, with scales)"
    )
    parser.add_argument("--input", required=True, help="file, SAT folder, or folder of weight shards")
    parser.add_argument("--output", required=True, help="output folder (or .safetensors file)")
    parser.add_argument("--model", default="kaleido-14b", choices=sorted(ARCHITECTURES), help="architecture to check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return convert(args.kind, Path(args.input), Path(args.output), args.model, args.format, args.keep_fp8)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
