"""The 14B architecture built on the meta device, against the key table of spec-dit §1.2."""

import pytest

from sgm.registry import build_dit, count_parameters


def spec_key_table(layers=40, d=5120, ffn=13824, text=4096, freq=256):
    """Key -> shape, written from spec-dit-diffusion.md §1.2 (engine prefix removed)."""
    table = {
        "time_embed.0.weight": (d, freq),
        "time_embed.0.bias": (d,),
        "time_embed.2.weight": (d, d),
        "time_embed.2.bias": (d,),
        "adaln_projection.1.weight": (6 * d, d),
        "adaln_projection.1.bias": (6 * d,),
        "text_embedding.0.weight": (d, text),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "mixins.patch_embed.proj.weight": (d, 16, 1, 2, 2),
        "mixins.patch_embed.proj.bias": (d,),
        "mixins.final_layer.linear.weight": (64, d),
        "mixins.final_layer.linear.bias": (64,),
        "mixins.final_layer.adaLN_modulation": (1, 2, d),
    }
    for i in range(layers):
        p = f"transformer.layers.{i}."
        table.update(
            {
                p + "attention.query_key_value.weight": (3 * d, d),
                p + "attention.query_key_value.bias": (3 * d,),
                p + "attention.dense.weight": (d, d),
                p + "attention.dense.bias": (d,),
                p + "cross_attention.query.weight": (d, d),
                p + "cross_attention.query.bias": (d,),
                p + "cross_attention.key_value.weight": (2 * d, d),
                p + "cross_attention.key_value.bias": (2 * d,),
                p + "cross_attention.dense.weight": (d, d),
                p + "cross_attention.dense.bias": (d,),
                p + "post_cross_attention_layernorm.weight": (d,),
                p + "post_cross_attention_layernorm.bias": (d,),
                p + "mlp.dense_h_to_4h.weight": (ffn, d),
                p + "mlp.dense_h_to_4h.bias": (ffn,),
                p + "mlp.dense_4h_to_h.weight": (d, ffn),
                p + "mlp.dense_4h_to_h.bias": (d,),
            }
        )
        m = "mixins.adaln_layer."
        table[f"{m}adaLN_modulations.{i}"] = (1, 6, d)
        for norm in ("query", "key", "cross_query", "cross_key"):
            table[f"{m}{norm}_layernorm_list.{i}.weight"] = (d,)
    return table


@pytest.fixture(scope="module")
def meta_14b():
    return build_dit("kaleido-14b", device="meta")


def test_14b_keys_and_shapes_match_the_release(meta_14b):
    ours = {k: tuple(v.shape) for k, v in meta_14b.state_dict().items()}
    expected = spec_key_table()
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_14b_parameter_count(meta_14b):
    assert count_parameters(meta_14b) == 14_288_491_584
    per_layer = sum(p.numel() for p in meta_14b.transformer.layers[0].parameters())
    per_layer += sum(p.numel() for n, p in meta_14b.mixins["adaln_layer"].named_parameters() if n.split(".")[1] == "0")
    assert per_layer == 351_394_304
    assert count_parameters(meta_14b) - 40 * per_layer == 232_719_424
    assert all(p.is_meta for p in meta_14b.parameters())
