"""Kaleido (SAT layout) <-> diffusers ``WanTransformer3DModel`` key layout.

| Kaleido (SAT) | diffusers |
|---|---|
| ``mixins.patch_embed.proj`` | ``patch_embedding`` |
| ``time_embed.{0,2}`` | ``condition_embedder.time_embedder.linear_{1,2}`` |
| ``adaln_projection.1`` | ``condition_embedder.time_proj`` |
| ``text_embedding.{0,2}`` | ``condition_embedder.text_embedder.linear_{1,2}`` |
| ``transformer.layers.i.attention.query_key_value`` (rows q, k, v) | ``blocks.i.attn1.to_{q,k,v}`` |
| ``transformer.layers.i.attention.dense`` | ``blocks.i.attn1.to_out.0`` |
| ``transformer.layers.i.cross_attention.query`` | ``blocks.i.attn2.to_q`` |
| ``transformer.layers.i.cross_attention.key_value`` (rows k, v) | ``blocks.i.attn2.to_{k,v}`` |
| ``transformer.layers.i.cross_attention.dense`` | ``blocks.i.attn2.to_out.0`` |
| ``transformer.layers.i.post_cross_attention_layernorm`` | ``blocks.i.norm2`` |
| ``transformer.layers.i.mlp.dense_h_to_4h`` | ``blocks.i.ffn.net.0.proj`` |
| ``transformer.layers.i.mlp.dense_4h_to_h`` | ``blocks.i.ffn.net.2`` |
| ``mixins.adaln_layer.adaLN_modulations.i`` | ``blocks.i.scale_shift_table`` |
| ``mixins.adaln_layer.{query,key}_layernorm_list.i`` | ``blocks.i.attn1.norm_{q,k}`` |
| ``mixins.adaln_layer.cross_{query,key}_layernorm_list.i`` | ``blocks.i.attn2.norm_{q,k}`` |
| ``mixins.final_layer.linear`` / ``adaLN_modulation`` | ``proj_out`` / ``scale_shift_table`` |

Fused tensors (QKV, cross KV) are split and joined by rows. Both directions refuse to drop or
invent tensors: every input key must be consumed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import torch

from sgm.modules.dit import DiTConfig

# Plain one-to-one renames (Kaleido name -> diffusers name); "{i}" is a layer index.
_RENAMES: dict[str, str] = {
    "mixins.patch_embed.proj": "patch_embedding",
    "time_embed.0": "condition_embedder.time_embedder.linear_1",
    "time_embed.2": "condition_embedder.time_embedder.linear_2",
    "adaln_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "mixins.final_layer.linear": "proj_out",
    "mixins.final_layer.adaLN_modulation": "scale_shift_table",
    "transformer.layers.{i}.attention.dense": "blocks.{i}.attn1.to_out.0",
    "transformer.layers.{i}.cross_attention.query": "blocks.{i}.attn2.to_q",
    "transformer.layers.{i}.cross_attention.dense": "blocks.{i}.attn2.to_out.0",
    "transformer.layers.{i}.post_cross_attention_layernorm": "blocks.{i}.norm2",
    "transformer.layers.{i}.mlp.dense_h_to_4h": "blocks.{i}.ffn.net.0.proj",
    "transformer.layers.{i}.mlp.dense_4h_to_h": "blocks.{i}.ffn.net.2",
    "mixins.adaln_layer.adaLN_modulations.{i}": "blocks.{i}.scale_shift_table",
    "mixins.adaln_layer.query_layernorm_list.{i}": "blocks.{i}.attn1.norm_q",
    "mixins.adaln_layer.key_layernorm_list.{i}": "blocks.{i}.attn1.norm_k",
    "mixins.adaln_layer.cross_query_layernorm_list.{i}": "blocks.{i}.attn2.norm_q",
    "mixins.adaln_layer.cross_key_layernorm_list.{i}": "blocks.{i}.attn2.norm_k",
}

# Fused Kaleido tensors <-> row blocks of diffusers tensors, in row order.
_FUSED: dict[str, tuple[str, ...]] = {
    "transformer.layers.{i}.attention.query_key_value": (
        "blocks.{i}.attn1.to_q",
        "blocks.{i}.attn1.to_k",
        "blocks.{i}.attn1.to_v",
    ),
    "transformer.layers.{i}.cross_attention.key_value": ("blocks.{i}.attn2.to_k", "blocks.{i}.attn2.to_v"),
}


@functools.cache
def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^" + body + r"(?P<suffix>\.weight|\.bias)?$")


def _split_key(key: str, templates: Mapping[str, object]) -> tuple[str, str | None, str] | None:
    """(template, layer index or None, ``.weight``/``.bias``/"") of the template matching ``key``."""
    for template in templates:
        match = _pattern(template).match(key)
        if match:
            groups = match.groupdict()
            return template, groups.get("i"), groups["suffix"] or ""
    return None


def _fill(template: str, index: str | None) -> str:
    return template if index is None else template.replace("{i}", index)


def kaleido_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Kaleido DiT state dict (no engine prefix) to diffusers ``WanTransformer3DModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        found = _split_key(key, _RENAMES)
        if found:
            template, index, suffix = found
            out[_fill(_RENAMES[template], index) + suffix] = tensor
            continue
        found = _split_key(key, _FUSED)
        if found:
            template, index, suffix = found
            targets = _FUSED[template]
            for target, part in zip(targets, tensor.chunk(len(targets), dim=0), strict=True):
                out[_fill(target, index) + suffix] = part.clone()
            continue
        unknown.append(key)
    if unknown:
        raise KeyError(f"no diffusers name for Kaleido key(s): {sorted(unknown)}")
    return out


def diffusers_to_kaleido(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``kaleido_to_diffusers``: fused tensors are rebuilt from their row blocks."""
    reverse = {v: k for k, v in _RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    part_of = {part: (fused, n) for fused, parts in _FUSED.items() for n, part in enumerate(parts)}
    for key, tensor in state_dict.items():
        found = _split_key(key, reverse)
        if found:
            template, index, suffix = found
            out[_fill(reverse[template], index) + suffix] = tensor
            continue
        found = _split_key(key, part_of)
        if found:
            template, index, suffix = found
            fused, position = part_of[template]
            pending.setdefault(_fill(fused, index) + suffix, {})[position] = tensor
            continue
        unknown.append(key)
    if unknown:
        raise KeyError(f"no Kaleido name for diffusers key(s): {sorted(unknown)}")
    for key, parts in pending.items():
        template = _split_key(key, _FUSED)[0]
        count = len(_FUSED[template])
        if sorted(parts) != list(range(count)):
            raise KeyError(f"{key}: found {len(parts)} of the {count} row blocks it is fused from")
        out[key] = torch.cat([parts[n] for n in range(count)], dim=0)
    return out


def diffusers_config(config: DiTConfig) -> dict:
    """``WanTransformer3DModel`` constructor arguments for a Kaleido architecture (its config.json)."""
    return {
        "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "text_dim": config.text_dim,
        "freq_dim": config.time_freq_dim,
        "ffn_dim": config.inner_hidden_size,
        "num_layers": config.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": config.layernorm_epsilon,
    }
