"""Kaleido (SAT layout) <-> the official Wan2.1 ``WanModel`` key layout (spec-dit §1.3, §10 item 6).

The release fine-tunes from Wan2.1-T2V-14B converted this way; Kaleido adds no parameters.

| Kaleido (SAT) | Wan2.1 |
|---|---|
| ``mixins.patch_embed.proj`` | ``patch_embedding`` |
| ``time_embed.{0,2}`` / ``adaln_projection.1`` | ``time_embedding.{0,2}`` / ``time_projection.1`` |
| ``text_embedding.{0,2}`` | ``text_embedding.{0,2}`` |
| ``transformer.layers.i.attention.query_key_value`` (rows q, k, v) | ``blocks.i.self_attn.{q,k,v}`` |
| ``transformer.layers.i.attention.dense`` | ``blocks.i.self_attn.o`` |
| ``transformer.layers.i.cross_attention.query`` | ``blocks.i.cross_attn.q`` |
| ``transformer.layers.i.cross_attention.key_value`` (rows k, v) | ``blocks.i.cross_attn.{k,v}`` |
| ``transformer.layers.i.cross_attention.dense`` | ``blocks.i.cross_attn.o`` |
| ``transformer.layers.i.post_cross_attention_layernorm`` | ``blocks.i.norm3`` |
| ``transformer.layers.i.mlp.dense_h_to_4h`` / ``dense_4h_to_h`` | ``blocks.i.ffn.0`` / ``blocks.i.ffn.2`` |
| ``mixins.adaln_layer.adaLN_modulations.i`` | ``blocks.i.modulation`` |
| ``mixins.adaln_layer.{query,key}_layernorm_list.i`` | ``blocks.i.self_attn.norm_{q,k}`` |
| ``mixins.adaln_layer.cross_{query,key}_layernorm_list.i`` | ``blocks.i.cross_attn.norm_{q,k}`` |
| ``mixins.final_layer.linear`` / ``adaLN_modulation`` | ``head.head`` / ``head.modulation`` |
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sgm.checkpoint import ENGINE_PREFIX
from sgm.convert.keymap import KeyMap

WAN_OFFICIAL = KeyMap(
    "Kaleido",
    "Wan2.1",
    renames={
        "mixins.patch_embed.proj": "patch_embedding",
        "time_embed.0": "time_embedding.0",
        "time_embed.2": "time_embedding.2",
        "adaln_projection.1": "time_projection.1",
        "text_embedding.0": "text_embedding.0",
        "text_embedding.2": "text_embedding.2",
        "mixins.final_layer.linear": "head.head",
        "mixins.final_layer.adaLN_modulation": "head.modulation",
        "transformer.layers.{i}.attention.dense": "blocks.{i}.self_attn.o",
        "transformer.layers.{i}.cross_attention.query": "blocks.{i}.cross_attn.q",
        "transformer.layers.{i}.cross_attention.dense": "blocks.{i}.cross_attn.o",
        "transformer.layers.{i}.post_cross_attention_layernorm": "blocks.{i}.norm3",
        "transformer.layers.{i}.mlp.dense_h_to_4h": "blocks.{i}.ffn.0",
        "transformer.layers.{i}.mlp.dense_4h_to_h": "blocks.{i}.ffn.2",
        "mixins.adaln_layer.adaLN_modulations.{i}": "blocks.{i}.modulation",
        "mixins.adaln_layer.query_layernorm_list.{i}": "blocks.{i}.self_attn.norm_q",
        "mixins.adaln_layer.key_layernorm_list.{i}": "blocks.{i}.self_attn.norm_k",
        "mixins.adaln_layer.cross_query_layernorm_list.{i}": "blocks.{i}.cross_attn.norm_q",
        "mixins.adaln_layer.cross_key_layernorm_list.{i}": "blocks.{i}.cross_attn.norm_k",
    },
    fused={
        "transformer.layers.{i}.attention.query_key_value": (
            "blocks.{i}.self_attn.q",
            "blocks.{i}.self_attn.k",
            "blocks.{i}.self_attn.v",
        ),
        "transformer.layers.{i}.cross_attention.key_value": ("blocks.{i}.cross_attn.k", "blocks.{i}.cross_attn.v"),
    },
)


def wan_to_kaleido(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Some Wan exports carry the engine prefix too: stripped first, as the release's converter does.
    stripped = {(k[len(ENGINE_PREFIX) :] if k.startswith(ENGINE_PREFIX) else k): v for k, v in state_dict.items()}
    return WAN_OFFICIAL.invert(stripped)


def kaleido_to_wan(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return WAN_OFFICIAL.apply(state_dict)
