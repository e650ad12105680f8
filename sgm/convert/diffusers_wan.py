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

from collections.abc import Mapping

import torch

from sgm.convert.keymap import KeyMap
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

DIFFUSERS = KeyMap("Kaleido", "diffusers", _RENAMES, _FUSED)


def kaleido_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Kaleido DiT state dict (no engine prefix) to diffusers ``WanTransformer3DModel`` keys."""
    return DIFFUSERS.apply(state_dict)


def diffusers_to_kaleido(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``kaleido_to_diffusers``: fused tensors are rebuilt from their row blocks."""
    return DIFFUSERS.invert(state_dict)


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
