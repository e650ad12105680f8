"""umT5: release checkpoint layout, tokenisation, truncation warning, zeroed padding, conditioner."""

import logging

import pytest
import torch

from sgm.checkpoint import StateDictMismatchError
from sgm.modules.encoders.conditioner import WAN_NEGATIVE_PROMPT, TextConditioner, dropout_decisions
from sgm.modules.encoders.text import (
    RELEASE_T5_FILE,
    Placement,
    TextEncoder,
    clean_text,
    hf_to_release_umt5,
    release_to_hf_umt5,
)
from tests.helpers import make_tokenizer_folder, tiny_umt5


@pytest.fixture(scope="module")
def release_folder(tmp_path_factory):
    folder = make_tokenizer_folder(tmp_path_factory.mktemp("t5"))
    from transformers import AutoTokenizer

    reference = tiny_umt5(len(AutoTokenizer.from_pretrained(str(folder))))
    torch.save(hf_to_release_umt5(reference.state_dict()), folder / RELEASE_T5_FILE)
    return folder, reference


def test_release_checkpoint_gives_the_original_outputs(release_folder):
    folder, reference = release_folder
    encoder = TextEncoder.from_folder(folder, max_length=16)
    prompts = ["a red fox jumps", "two people walk along a beach at sunset"]
    out = encoder.encode(prompts)
    ids, mask = encoder.tokenize(prompts)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    assert out.shape == (2, 16, 32) and out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert (out[0, mask[0] == 0] == 0).all() and (mask[0] == 0).any()


def test_release_key_table_round_trips(release_folder):
    _, reference = release_folder
    sd = reference.state_dict()
    release = hf_to_release_umt5(sd)
    assert "token_embedding.weight" in release and "blocks.1.pos_embedding.embedding.weight" in release
    assert len(release) == 2 + 2 * 10  # 242 for the 24-layer release file
    back = release_to_hf_umt5(release)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_strict_loading_of_a_damaged_checkpoint(release_folder, tmp_path):
    folder, reference = release_folder
    damaged = tmp_path / "umt5"
    damaged.mkdir()
    for f in folder.iterdir():
        if f.is_file() and f.name != RELEASE_T5_FILE:
            (damaged / f.name).write_bytes(f.read_bytes())
    release = hf_to_release_umt5(reference.state_dict())
    del release["blocks.1.norm2.weight"]
    torch.save(release, damaged / RELEASE_T5_FILE)
    with pytest.raises(StateDictMismatchError, match=r"encoder\.block\.1\.layer\.1\.layer_norm\.weight"):
        TextEncoder.from_folder(damaged)


def test_tokenisation_pads_truncates_and_warns(release_folder, caplog):
    folder, _ = release_folder
    encoder = TextEncoder.from_folder(folder, max_length=8)
    with caplog.at_level(logging.WARNING):
        ids, mask = encoder.tokenize(["a red fox", "the first object moves left while the second bounces"])
    assert ids.shape == (2, 8) and mask.shape == (2, 8)
    full = encoder.tokenizer(["the first object moves left while the second bounces"])["input_ids"][0]
    assert f"the last {len(full) - 8} are dropped" in caplog.text
    assert ids[0, mask[0].sum() - 1] == 1  # EOS closes the prompt
    assert (ids[0, mask[0] == 0] == 0).all()  # pad id 0 after it
    empty, empty_mask = encoder.tokenize([""])
    assert empty[0, 0] == 1 and empty_mask[0].tolist() == [1] + [0] * 7


def test_clean_text():
    assert clean_text("  a &amp;amp; b \n\t c  ") == "a & b c"
    assert clean_text("caf\u00c3\u00a9") == "café"


def test_offload_placement_keeps_the_encoder_on_cpu(release_folder):
    folder, _ = release_folder
    encoder = TextEncoder.from_folder(folder, max_length=8, placement=Placement.offload)
    out = encoder.encode(["a red fox"])
    assert next(encoder.model.parameters()).device.type == "cpu" and out.shape == (1, 8, 32)


def test_caption_dropout_rate_ranks_and_zero_rate():
    draws = [d for step in range(400) for d in dropout_decisions(25, 0.1, seed=7, step=step, data_rank=0)]
    rate = sum(draws) / len(draws)
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / len(draws)) ** 0.5  # within 4 standard errors
    # two ranks of one sequence-parallel group: same (seed, step, data rank) -> same decisions
    assert dropout_decisions(64, 0.3, 1, 5, 2) == dropout_decisions(64, 0.3, 1, 5, 2)
    assert dropout_decisions(64, 0.3, 1, 5, 2) != dropout_decisions(64, 0.3, 1, 5, 3)
    assert not any(dropout_decisions(1000, 0.0, 1, 5))


def test_conditioner_drops_captions_before_encoding():
    seen = []

    def encoder(captions):
        seen.append(list(captions))
        return torch.zeros(len(captions), 4, 8)

    conditioner = TextConditioner(encoder, ucg_rate=1.0)
    captions = ["a", "b"]
    cond, used = conditioner(captions, step=3)
    assert used == ["", ""] and captions == ["a", "b"] and cond["crossattn"].shape == (2, 4, 8)
    cond, used = conditioner(captions)  # sampling: no dropout
    assert used == ["a", "b"]
    conditioner.unconditional(WAN_NEGATIVE_PROMPT, 2)
    assert seen[-1] == [WAN_NEGATIVE_PROMPT] * 2 and WAN_NEGATIVE_PROMPT.startswith("色调艳丽")


def test_build_from_config_section(release_folder):
    from sat.config import load_config
    from sgm.modules.encoders.text import TextEncoderConfig, build_text_encoder

    config = load_config(TextEncoderConfig, [], [f"path={release_folder[0]}", "dtype=float32", "placement=cpu"])
    encoder = build_text_encoder(config, "cpu")
    assert encoder.placement is Placement.cpu and encoder.encode(["a"]).shape == (1, 512, 32)


def test_hugging_face_folder_loads_too(release_folder, tmp_path):
    folder, reference = release_folder
    hf = tmp_path / "hf_umt5"
    reference.save_pretrained(str(hf))
    for f in folder.iterdir():
        if f.is_file() and f.name != RELEASE_T5_FILE:
            (hf / f.name).write_bytes(f.read_bytes())
    prompts = ["a blue circle"]
    torch.testing.assert_close(
        TextEncoder.from_folder(hf, max_length=8).encode(prompts),
        TextEncoder.from_folder(folder, max_length=8).encode(prompts),
        rtol=0,
        atol=0,
    )


def test_rename_table_is_pinned_to_the_spec():
    """The release's 242 keys with their shapes (spec-vae-t5-data.md §2.3), renamed by the spec's
    §2.7 list written out here, and the shapes of transformers' umT5-XXL encoder (meta device)."""
    from transformers import UMT5EncoderModel

    from sgm.modules.encoders.text import infer_umt5_config

    release = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    expected = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
    per_layer = {  # spec §2.3 shape, spec §2.7 name
        "norm1.weight": ((4096,), "layer.0.layer_norm.weight"),
        "attn.q.weight": ((4096, 4096), "layer.0.SelfAttention.q.weight"),
        "attn.k.weight": ((4096, 4096), "layer.0.SelfAttention.k.weight"),
        "attn.v.weight": ((4096, 4096), "layer.0.SelfAttention.v.weight"),
        "attn.o.weight": ((4096, 4096), "layer.0.SelfAttention.o.weight"),
        "pos_embedding.embedding.weight": ((32, 64), "layer.0.SelfAttention.relative_attention_bias.weight"),
        "norm2.weight": ((4096,), "layer.1.layer_norm.weight"),
        "ffn.gate.0.weight": ((10240, 4096), "layer.1.DenseReluDense.wi_0.weight"),
        "ffn.fc1.weight": ((10240, 4096), "layer.1.DenseReluDense.wi_1.weight"),
        "ffn.fc2.weight": ((4096, 10240), "layer.1.DenseReluDense.wo.weight"),
    }
    for i in range(24):
        for leaf, (shape, hf_leaf) in per_layer.items():
            release[f"blocks.{i}.{leaf}"] = shape
            expected[f"blocks.{i}.{leaf}"] = f"encoder.block.{i}.{hf_leaf}"
    assert len(release) == 242
    tensors = {k: torch.empty(s, device="meta") for k, s in release.items()}
    ours = release_to_hf_umt5(tensors)
    for key, tensor in tensors.items():
        assert ours[expected[key]] is tensor, f"{key}: the spec says {expected[key]}"
    assert ours["encoder.embed_tokens.weight"] is tensors["token_embedding.weight"]  # tied
    with torch.device("meta"):
        model = UMT5EncoderModel(infer_umt5_config(tensors))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    back = hf_to_release_umt5(ours)
    assert len(back) == 242 and all(back[k] is tensors[k] for k in tensors)
