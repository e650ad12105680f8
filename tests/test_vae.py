"""Wan VAE: the release's key layout, encode/decode against diffusers, normalisation, shapes."""

import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from sgm.checkpoint import StateDictMismatchError
from sgm.models.wan_vae import (
    LATENT_MEAN,
    LATENT_STD,
    WanVAE,
    default_vae_config,
    diffusers_to_release_vae,
    infer_vae_config,
    normalization_constants,
    read_vae_strides,
    release_to_diffusers_vae,
    vae_strides,
)

TINY = {"base_dim": 8, "z_dim": 16, "num_res_blocks": 1, "dim_mult": [1, 2, 2, 2]}

# spec-vae-t5-data.md §1.6: bf16(mean) and the effective multiplier bf16(1/bf16(std)).
SPEC_MEAN = [
    -0.7578125, -0.70703125, -0.91015625, 0.10742188, -0.17480469, 0.96484375, -0.15136719, 1.5546875,
    0.4140625, -0.071289062, 0.55078125, -0.36328125, -0.19238281, -0.94921875, 0.25, -0.29296875,
]  # fmt: skip
SPEC_MULTIPLIER = [
    0.35546875, 0.6875, 0.4296875, 0.37695312, 0.8203125, 0.5625, 0.3828125, 0.48046875,
    0.30664062, 0.46289062, 0.34960938, 0.64453125, 0.609375, 0.890625, 0.35351562, 0.5234375,
]  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY).eval()


@pytest.fixture(scope="module")
def release_file(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(diffusers_to_release_vae(reference.state_dict(), TINY["num_res_blocks"]), path)
    return path


def test_release_key_names_and_round_trip(reference):
    sd = reference.state_dict()
    release = diffusers_to_release_vae(sd, TINY["num_res_blocks"])
    assert {"conv1.weight", "conv2.weight", "encoder.conv1.weight", "encoder.head.2.weight"} <= set(release)
    assert "decoder.upsamples.2.resample.1.weight" in release  # 2 resnets + upsampler per level
    assert "encoder.middle.1.to_qkv.weight" in release and "decoder.upsamples.0.residual.0.gamma" in release
    back = release_to_diffusers_vae(release)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert infer_vae_config(release) == {**TINY, "temperal_downsample": [False, True, True]}


def test_full_size_layout_matches_the_spec():
    with torch.device("meta"):
        full = AutoencoderKLWan()
    release = diffusers_to_release_vae(full.state_dict(), 2)
    assert len(release) == 194
    assert tuple(release["decoder.upsamples.3.time_conv.weight"].shape) == (768, 384, 3, 1, 1)
    assert tuple(release["decoder.upsamples.4.shortcut.weight"].shape) == (384, 192, 1, 1, 1)
    assert tuple(release["encoder.downsamples.8.time_conv.weight"].shape) == (384, 384, 3, 1, 1)
    assert "decoder.upsamples.14.residual.6.weight" in release
    assert infer_vae_config(release)["dim_mult"] == [1, 2, 4, 4]


def test_encode_and_decode_equal_the_original_module(reference, release_file):
    vae = WanVAE.from_release_checkpoint(release_file)
    video = torch.rand(2, 3, 5, 32, 48) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, 2, 16, 4, 6) and latents.dtype == torch.float32
    shift, multiplier = normalization_constants()
    with torch.no_grad():
        mu = reference.encode(video).latent_dist.mode()
        expected = ((mu - shift.view(1, -1, 1, 1, 1)) * multiplier.view(1, -1, 1, 1, 1)).transpose(1, 2)
        assert torch.equal(latents, expected)
        decoded = vae.decode(latents)
        raw = latents.transpose(1, 2) / multiplier.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1)
        assert torch.equal(decoded, reference.decode(raw).sample.clamp(-1, 1))
    assert decoded.shape == video.shape and decoded.abs().max() <= 1.0


def test_references_are_encoded_one_frame_each(release_file):
    vae = WanVAE.from_release_checkpoint(release_file)
    images = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    latents = vae.encode_references(images)
    assert latents.shape == (2, 3, 16, 4, 4)
    alone = vae.encode(images[1, 2][:, None][None])  # [1, 3, 1, H, W]: the third reference of sample 1
    torch.testing.assert_close(latents[1, 2], alone[0, 0], rtol=1e-5, atol=1e-5)


def test_normalisation_constants_match_the_spec_table():
    shift, multiplier = normalization_constants()
    assert shift.tolist() == pytest.approx(SPEC_MEAN, abs=1e-8)
    assert multiplier.tolist() == pytest.approx(SPEC_MULTIPLIER, abs=1e-8)
    exact_shift, exact_multiplier = normalization_constants(exact=True)
    assert exact_shift.tolist() == pytest.approx(LATENT_MEAN, abs=1e-7)
    assert exact_multiplier.tolist() == pytest.approx([1 / s for s in LATENT_STD], rel=1e-6)
    z = torch.randn(3, 16)
    assert torch.allclose((z / multiplier + shift - shift) * multiplier, z, atol=1e-6)


def test_bad_video_shapes(release_file):
    vae = WanVAE.from_release_checkpoint(release_file)
    for shape in [(1, 3, 4, 32, 32), (1, 3, 5, 20, 32), (1, 4, 5, 32, 32), (3, 5, 32, 32)]:
        with pytest.raises(ValueError, match=r"F = 4k\+1 frames and H, W multiples of 8"):
            vae.encode(torch.zeros(shape))


def test_damaged_checkpoint_is_refused(reference, tmp_path):
    release = diffusers_to_release_vae(reference.state_dict(), TINY["num_res_blocks"])
    release["encoder.extra.weight"] = torch.zeros(1)
    torch.save(release, tmp_path / "bad.pth")
    with pytest.raises(StateDictMismatchError, match=r"encoder\.extra\.weight"):
        WanVAE.from_release_checkpoint(tmp_path / "bad.pth")


def test_tiling_and_slicing_switches_keep_shapes(release_file):
    vae = WanVAE.from_release_checkpoint(release_file)
    latents = torch.randn(2, 2, 16, 8, 8)
    plain = vae.decode(latents)
    vae.enable_tiling(tile_size=32, tile_stride=16)
    vae.enable_slicing()
    tiled = vae.decode(latents)
    vae.disable_memory_savers()
    assert tiled.shape == plain.shape and (tiled - plain).abs().mean() < 0.5


def test_build_from_config_sections(release_file, tmp_path, reference):
    from sat.config import load_config
    from sgm.models.wan_vae import VAEConfig, build_vae

    config = load_config(VAEConfig, [], [f"path={release_file}", "dtype=float32", "exact_constants=true"])
    vae = build_vae(config, "cpu")
    assert torch.allclose(vae.multiplier.flatten(), 1 / torch.tensor(LATENT_STD))
    reference.save_pretrained(tmp_path / "diffusers_vae")
    folder = build_vae(load_config(VAEConfig, [], [f"path={tmp_path / 'diffusers_vae'}", "dtype=float32"]), "cpu")
    video = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    assert torch.equal(folder.encode(video), WanVAE.from_release_checkpoint(release_file).encode(video))


def test_a_diffusers_folder_loads_as_diffusers_loads_it_in_one_file_or_shards(tmp_path, reference, monkeypatch):
    """Our load of a diffusers folder builds the network on the meta device (never a float32 copy
    to cast) and gives diffusers' own ``from_pretrained`` weights and encoding, from one file or
    from shards, in float32 and bfloat16; a folder without weights is refused naming what it looked for."""
    import functools

    from sgm.models.wan_vae import VAEConfig, build_vae

    built_on = []
    init = AutoencoderKLWan.__init__

    @functools.wraps(init)
    def spy(self, *args, **kwargs):
        built_on.append(torch.empty(0).device.type)  # the default device while the layers are made
        init(self, *args, **kwargs)

    reference.save_pretrained(tmp_path / "one")
    reference.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    for dtype in (torch.float32, torch.bfloat16):
        peer = AutoencoderKLWan.from_pretrained(str(tmp_path / "one"), torch_dtype=dtype)
        for folder in ("one", "shards"):
            with monkeypatch.context() as patch:
                patch.setattr(AutoencoderKLWan, "__init__", spy)
                ours = WanVAE.from_diffusers(tmp_path / folder, dtype=dtype)
            state = ours.model.state_dict()
            assert all(t.dtype == dtype and torch.equal(t, peer.state_dict()[k]) for k, t in state.items())
            assert set(state) == set(peer.state_dict())
        if dtype == torch.float32:
            assert torch.equal(ours.encode(video), WanVAE(peer).encode(video))
    assert built_on == ["meta"] * 4
    (tmp_path / "empty").mkdir()
    (tmp_path / "one" / "config.json").rename(tmp_path / "empty" / "config.json")
    with pytest.raises(FileNotFoundError, match="none of diffusion_pytorch_model.safetensors"):
        build_vae(VAEConfig(path=str(tmp_path / "empty")), "cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        WanVAE.from_diffusers(tmp_path / "one")


def test_fast_rms_norms_give_the_same_training_forward_and_gradients():
    import copy

    from sgm.models.wan_vae import use_fast_rms_norms

    torch.manual_seed(1)
    slow = AutoencoderKLWan(**TINY)
    with torch.no_grad():  # non-trivial gains, so a wrong scale or axis would show
        for name, param in slow.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    fast = copy.deepcopy(slow)
    assert use_fast_rms_norms(fast) > 10
    assert fast.state_dict().keys() == slow.state_dict().keys()
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    outputs, grads = [], []
    for model in (slow, fast):
        out = model(video, sample_posterior=False).sample
        out.pow(2).mean().backward()
        outputs.append(out.detach())
        grads.append(model.decoder.conv_out.weight.grad.clone())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)
    assert outputs[0].abs().mean() > 1e-3  # not a trivially zero comparison


def spec_release_vae_shapes() -> dict[str, tuple[int, ...]]:
    """``Wan2.1_VAE.pth``'s 194 keys and shapes, written out from spec-vae-t5-data.md §1.3 and §1.7."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, o, i, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i, *k), (o,)

    def rb(name, i, o):  # ResidualBlock in -> out
        out[f"{name}.residual.0.gamma"] = (i, 1, 1, 1)
        conv(f"{name}.residual.2", o, i, (3, 3, 3))
        out[f"{name}.residual.3.gamma"] = (o, 1, 1, 1)
        conv(f"{name}.residual.6", o, o, (3, 3, 3))
        if i != o:
            conv(f"{name}.shortcut", o, i, (1, 1, 1))

    def attention(name, d):
        out[f"{name}.norm.gamma"] = (d, 1, 1)
        conv(f"{name}.to_qkv", 3 * d, d, (1, 1))
        conv(f"{name}.proj", d, d, (1, 1))

    conv("conv1", 32, 32, (1, 1, 1))
    conv("conv2", 16, 16, (1, 1, 1))
    conv("encoder.conv1", 96, 3, (3, 3, 3))
    for index, (i, o) in {0: (96, 96), 1: (96, 96), 3: (96, 192), 4: (192, 192), 6: (192, 384), 7: (384, 384)}.items():
        rb(f"encoder.downsamples.{index}", i, o)
    rb("encoder.downsamples.9", 384, 384)
    rb("encoder.downsamples.10", 384, 384)
    conv("encoder.downsamples.2.resample.1", 96, 96, (3, 3))
    for index, d in ((5, 192), (8, 384)):
        conv(f"encoder.downsamples.{index}.resample.1", d, d, (3, 3))
        conv(f"encoder.downsamples.{index}.time_conv", d, d, (3, 1, 1))
    out["encoder.head.0.gamma"] = (384, 1, 1, 1)
    conv("encoder.head.2", 32, 384, (3, 3, 3))
    conv("decoder.conv1", 384, 16, (3, 3, 3))
    for part in ("encoder", "decoder"):
        rb(f"{part}.middle.0", 384, 384)
        attention(f"{part}.middle.1", 384)
        rb(f"{part}.middle.2", 384, 384)
    blocks = {0: (384, 384), 1: (384, 384), 2: (384, 384), 4: (192, 384), 5: (384, 384), 6: (384, 384)}
    blocks |= {8: (192, 192), 9: (192, 192), 10: (192, 192), 12: (96, 96), 13: (96, 96), 14: (96, 96)}
    for index, (i, o) in blocks.items():
        rb(f"decoder.upsamples.{index}", i, o)
    for index in (3, 7):
        conv(f"decoder.upsamples.{index}.resample.1", 192, 384, (3, 3))
        conv(f"decoder.upsamples.{index}.time_conv", 768, 384, (3, 1, 1))
    conv("decoder.upsamples.11.resample.1", 96, 192, (3, 3))
    out["decoder.head.0.gamma"] = (96, 1, 1, 1)
    conv("decoder.head.2", 3, 96, (3, 3, 3))
    return out


def spec_vae_rename(key: str) -> str:
    """spec-vae-t5-data.md §1.9, rules 1-7, applied literally (independent of sgm.models.wan_vae)."""
    for old, new in (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")):  # rule 1
        if key.startswith(old):
            return new + key[len(old) :]
    part, rest = key.split(".", 1)
    rest = re.sub(r"^conv1\.", "conv_in.", rest)  # rule 2
    rest = re.sub(r"^head\.0\.gamma$", "norm_out.gamma", rest)  # rule 3
    rest = re.sub(r"^head\.2\.", "conv_out.", rest)
    rest = re.sub(r"^middle\.0\.", "mid_block.resnets.0.", rest)  # rule 4
    rest = re.sub(r"^middle\.2\.", "mid_block.resnets.1.", rest)
    rest = re.sub(r"^middle\.1\.", "mid_block.attentions.0.", rest)
    rest = re.sub(r"^downsamples\.(\d+)\.", r"down_blocks.\1.", rest)  # rule 5
    if m := re.match(r"^upsamples\.(\d+)\.(.*)$", rest):  # rule 6
        b, j = divmod(int(m.group(1)), 4)
        rest = f"up_blocks.{b}.{'upsamplers.0' if j == 3 else f'resnets.{j}'}.{m.group(2)}"
    for old, new in (  # rule 7
        ("residual.0.gamma", "norm1.gamma"),
        ("residual.2.", "conv1."),
        ("residual.3.gamma", "norm2.gamma"),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ):
        rest = rest.replace(old, new)
    return f"{part}.{rest}"


def test_rename_table_is_pinned_to_the_spec():
    """Key by key against the spec's rules on the spec's key list, and shape by shape against
    diffusers' module: swapping two same-shaped entries of the table fails here."""
    release = {k: torch.empty(s, device="meta") for k, s in spec_release_vae_shapes().items()}
    assert len(release) == 194  # spec §1.7
    ours = release_to_diffusers_vae(release)
    assert len(ours) == 194
    for key, tensor in release.items():
        expected = spec_vae_rename(key)
        assert expected in ours, f"{key}: the spec says {expected}"
        assert ours[expected] is tensor, f"{key} -> {expected}: another tensor"
    with torch.device("meta"):
        module = AutoencoderKLWan()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in module.state_dict().items()}
    back = diffusers_to_release_vae(ours, num_res_blocks=2)
    assert all(back[k] is release[k] for k in release) and len(back) == 194


def test_strides_come_from_the_vae_config(tmp_path):
    assert vae_strides(default_vae_config()) == (4, 8)  # Wan2.1 (spec §1.1)
    wan22 = {"dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True], "patch_size": 2}
    assert vae_strides(wan22) == (4, 16)  # Wan2.2's 16x VAE
    assert vae_strides({"dim_mult": [1, 2, 2], "temperal_downsample": [False, False]}) == (1, 4)
    assert read_vae_strides(Path(__file__).resolve().parents[1] / "assets/kaleido-tiny/Wan2.1_VAE.pth") == (4, 8)
    small = AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True])
    small.save_pretrained(tmp_path / "small")
    assert read_vae_strides(tmp_path / "small") == (2, 4)
    vae = WanVAE(small)
    assert (vae.temporal_stride, vae.spatial_stride) == (2, 4)
    assert vae.encode(torch.zeros(1, 3, 5, 16, 24)).shape == (1, 3, 16, 4, 6)
    with pytest.raises(ValueError, match="F = 4k\\+1 frames and H, W multiples of 4"):  # diffusers' 4-frame chunks
        vae.encode(torch.zeros(1, 3, 4, 16, 24))


def test_latent_statistics_must_match_z_dim():
    model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
    with pytest.raises(ValueError, match="latents_mean/latents_std hold 16/16 values for z_dim 4"):
        WanVAE(model)
