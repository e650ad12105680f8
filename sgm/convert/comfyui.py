"""Kaleido <-> the layout ComfyUI loads for Wan2.1 diffusion models (bf16, fp8, scaled fp8).

ComfyUI (and ComfyUI-WanVideoWrapper) read the official Wan2.1 key layout (``blocks.N.self_attn.q``,
...; ``sgm.convert.wan_official``) under ``model.diffusion_model.``, or bare, or under
``diffusion_model.``; this module writes ``diffusion_model.`` and reads all three. Community fp8
files store the weight matrices as ``float8_e4m3fn``, either plainly cast or "scaled": each weight
divided by a per-tensor ``<name>.scale_weight`` and a ``scaled_fp8`` marker tensor in the file
(ComfyUI's convention). Reading dequantises to ``dtype``: ``weight.float() * scale_weight``.

What ComfyUI still lacks for Kaleido: the weights load as a Wan2.1 T2V model and generate from text,
but its Wan model has no reference tokens. Kaleido puts each reference's VAE latent, patchified, in
front of the video tokens, with its own 3D RoPE positions (subject k at frame index k, rows and
columns offset by ``subject_rope_origin`` = (80, 80)), and drops those tokens before the head; a
ComfyUI node would need to add both (``sgm.modules.dit.KaleidoDiT.embed_tokens`` and
``sgm.modules.rope``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sgm.convert.wan_official import kaleido_to_wan, wan_to_kaleido

COMFYUI_PREFIX = "diffusion_model."
READ_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
SCALE_SUFFIX = ".scale_weight"
SCALED_FP8_MARKER = "scaled_fp8"
COMFYUI_FORMATS = ("bf16", "fp8", "fp8_scaled")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def _is_quantised(name: str, tensor: torch.Tensor) -> bool:
    """The tensors fp8 files store in fp8: the blocks' weight matrices (norms, biases, modulation,
    embeddings and the head stay in bf16, as community fp8 Wan files keep them)."""
    return name.startswith("blocks.") and name.endswith(".weight") and tensor.ndim == 2


def kaleido_to_comfyui(state_dict: Mapping[str, torch.Tensor], *, fmt: str = "bf16") -> dict[str, torch.Tensor]:
    """Our DiT weights -> ComfyUI's Wan2.1 layout under ``diffusion_model.`` in ``fmt``."""
    if fmt not in COMFYUI_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(COMFYUI_FORMATS)}, got '{fmt}'")
    out = {}
    for name, tensor in kaleido_to_wan(state_dict).items():
        tensor = tensor.to(torch.bfloat16)
        if fmt != "bf16" and _is_quantised(name, tensor):
            if fmt == "fp8_scaled":
                scale = tensor.float().abs().amax().clamp_min(1e-12) / FP8_MAX
                out[COMFYUI_PREFIX + name[: -len(".weight")] + SCALE_SUFFIX] = scale.reshape(1)
                tensor = tensor.float() / scale
            tensor = tensor.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out[COMFYUI_PREFIX + name] = tensor.contiguous()
    if fmt == "fp8_scaled":
        out[SCALED_FP8_MARKER] = torch.empty(0, dtype=FP8)
    return out


def comfyui_to_kaleido(
    state_dict: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.bfloat16, keep_fp8: bool = False
) -> dict[str, torch.Tensor]:
    """A ComfyUI / community Wan2.1 file (any of the prefixes; bf16, fp8 or scaled fp8) -> our keys
    in ``dtype``, fp8 weights dequantised with their ``scale_weight`` where the file has one.

    ``keep_fp8``: fp8 weights stay fp8, each with a float32 ``<module>.weight_scale`` of one value
    per output row (the file's per-tensor scale, or 1), the pre-quantised layout our loader reads
    (``sgm.memory.load_prequantized``); Wan's separate q, k, v become our fused rows, scales too."""
    bare = {}
    for name, tensor in state_dict.items():
        if name == SCALED_FP8_MARKER:
            continue
        for prefix in READ_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        bare[name] = tensor
    scales = {name[: -len(SCALE_SUFFIX)] + ".weight": t for name, t in bare.items() if name.endswith(SCALE_SUFFIX)}
    weights = {}
    for name, tensor in bare.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if tensor.dtype in (FP8, torch.float8_e5m2):
            scale = scales[name].float().reshape(()) if name in scales else torch.tensor(1.0)
            if keep_fp8 and tensor.ndim == 2:
                weights[name] = tensor.to(FP8)  # e5m2 files are rare; e4m3 holds their values' range here
                weights[name[: -len(".weight")] + ".weight_scale"] = scale.expand(tensor.shape[0], 1).contiguous()
                continue
            tensor = tensor.float() * scale
        weights[name] = tensor.to(dtype)
    orphans = sorted(set(scales) - set(weights))
    if orphans:
        raise ValueError(f"scale_weight without its weight: {', '.join(orphans[:3])}")
    return wan_to_kaleido(weights)
