"""Strides and patch sizes come from the configs: a 4x-spatial, 1x-temporal VAE and a (1, 4, 4)
patch through sampling, a training step and sequence-parallel offsets, against hand-computed values."""

import json
import math
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch
from diffusers import AutoencoderKLWan
from PIL import Image
from safetensors.torch import load_file

import sample_video
from sat.config import load_config
from sat.parallel import ParallelState, split_dim, token_offset
from sgm.geometry import VideoGeometry
from sgm.models.engine import step_generator, training_loss
from sgm.models.wan_vae import WanVAE
from sgm.modules.encoders.conditioner import TextConditioner
from sgm.modules.encoders.text import TextEncoderConfig, build_text_encoder
from sgm.pipeline import KaleidoPipeline, SamplingConfig, check_sequence_parallel
from sgm.registry import resolve_arch
from tools.make_toy_videos import make_video_dataset

ROOT = Path(__file__).resolve().parents[1]
# 4x spatial (two halving levels), no temporal downsampling: a 32x48 frame is an 8x12 latent.
SMALL_VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False, False],
}
PATCH = ["model.arch.patch_size=[1,4,4]", "model.arch.num_layers=2"]


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "small_vae"
    torch.manual_seed(0)
    AutoencoderKLWan(**SMALL_VAE).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_release_geometry_by_hand():
    wan = VideoGeometry(temporal_stride=4, spatial_stride=8, patch_size=(1, 2, 2))
    assert wan.latent_frames(81) == 21 and wan.video_frames(21) == 81
    assert wan.latent_shape(height=512, width=896, latent_frames=21, channels=16) == (21, 16, 64, 112)
    assert wan.tokens(height=512, width=896, latent_frames=21, references=3) == 43_008  # 24 frames x 32 x 56
    assert wan.pixel_multiple == (16, 16) and wan.largest_video_frames(7) == 5
    with pytest.raises(ValueError, match="expected 4k\\+1 frames"):
        wan.latent_frames(80)
    with pytest.raises(ValueError, match="height a multiple of 16 and width of 16, got 500x896"):
        wan.latent_size(500, 896)
    small = VideoGeometry(temporal_stride=1, spatial_stride=4, patch_size=(1, 4, 4))
    assert small.latent_frames(6) == 6 and small.pixel_multiple == (16, 16)
    assert small.tokens(height=32, width=48, latent_frames=3, references=1) == 4 * 2 * 3


def test_split_dim_auto_and_offsets_follow_the_patch():
    assert split_dim(8, 2, "auto", patch=(2, 2)) == 3  # 8 rows = 2 shards of 2 whole patch rows
    assert split_dim(6, 2, "auto", patch=(2, 2)) == 4  # 6 rows: shards of 3 rows cut patches
    assert split_dim(8, 2, "auto", patch=(4, 4)) == 3 and split_dim(8, 4, "auto", patch=(4, 4)) == 4
    assert split_dim(8, 4, "height", patch=(4, 4)) == 3 and split_dim(8, 2, "width", patch=(2, 2)) == 4
    with pytest.raises(ValueError, match="sp_split must be auto, height or width"):
        split_dim(8, 2, "rows", patch=(2, 2))
    second = ParallelState(world_size=2, rank=1, sp_size=2)
    assert token_offset((1, 3, 16, 4, 12), 3, second, patch=(2, 2)) == (2, 0)
    assert token_offset((1, 3, 16, 4, 12), 3, second, patch=(4, 4)) == (1, 0)
    assert token_offset((1, 3, 16, 8, 8), 4, second, patch=(4, 4)) == (0, 2)


def test_sequence_parallel_layouts_are_checked_before_loading(monkeypatch, tmp_path):
    wan = VideoGeometry(4, 8, (1, 2, 2))
    tiny = resolve_arch("kaleido-tiny")  # 4 heads
    check_sequence_parallel(wan, tiny, height=64, width=96, sp_size=2, sp_split="auto", world=2)
    with pytest.raises(ValueError, match="divide the number of processes \\(3"):
        check_sequence_parallel(wan, tiny, height=64, width=96, sp_size=2, sp_split="auto", world=3)
    with pytest.raises(ValueError, match="must divide the number of attention heads \\(4\\)"):
        check_sequence_parallel(wan, tiny, height=64, width=96, sp_size=3, sp_split="auto", world=3)
    with pytest.raises(ValueError, match="latent width 12 does not split into 4 shards"):
        check_sequence_parallel(wan, tiny, height=48, width=96, sp_size=4, sp_split="auto", world=4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = ["--config", "configs/model/kaleido_tiny.yaml", "configs/sampling/tiny.yaml", f"output_dir={tmp_path}"]
    argv += ["sampling_image_size=[48,96]", "sequence_parallel_size=4", "--prompt", "x"]
    with pytest.raises(SystemExit) as exit_info:
        sample_video.main(argv)  # would need torchrun to load anything: the error comes first
    assert exit_info.value.code == 2


def test_sampling_with_a_4x_1x_vae_and_a_4x4_patch(small_vae, tmp_path):
    base = ["--config", "configs/model/kaleido_tiny.yaml", "configs/sampling/tiny.yaml", *PATCH, "num_steps=2"]
    base += [f"vae.path={small_vae}", "sampling_image_size=[32,48]", "sampling_num_frames=3"]
    ref = ["--prompt", "a red ball", "--ref", "assets/examples/red_ball.png"]
    assert sample_video.main([*base, f"output_dir={tmp_path / 'video'}", *ref]) == 0
    item = next((tmp_path / "video").iterdir())
    frames = [f for f in imageio.get_reader(item / "output.mp4")]
    assert len(frames) == 3 and frames[0].shape == (32, 48, 3)  # 1x temporal: 3 latent frames = 3 frames
    assert json.loads((item / "meta.json").read_text())["video"]["frames"] == 3
    assert sample_video.main([*base, f"output_dir={tmp_path / 'latents'}", "only_save_latents=true", *ref]) == 0
    latents = load_file(next((tmp_path / "latents").iterdir()) / "latents.safetensors")["latents"]
    assert latents.shape == (1, 3, 16, 8, 12)  # 32/4 x 48/4

    config = load_config(SamplingConfig, base[1:3], [*PATCH, f"vae.path={small_vae}"])
    pipe = KaleidoPipeline.from_config(config, device="cpu")
    tokens = []
    embed = pipe.dit.embed_tokens
    pipe.dit.embed_tokens = lambda x, s: tokens.append(embed(x, s)[0].shape[1]) or embed(x, s)
    video = pipe("a", references=[Image.new("RGB", (8, 8))], height=32, width=48, num_frames=3, steps=1)
    assert video.shape == (1, 3, 3, 32, 48)
    assert tokens == [(3 + 1) * (8 // 4) * (12 // 4)]  # (frames + 1 reference) x 2 x 3 patches


def test_training_step_uses_the_vae_strides_and_the_patch_for_the_shift(small_vae):
    torch.manual_seed(0)
    vae = WanVAE(AutoencoderKLWan.from_pretrained(str(small_vae), local_files_only=True))
    text = build_text_encoder(TextEncoderConfig(path="assets/kaleido-tiny/umt5", dtype="float32"), "cpu")
    seen = {}

    def network(x, timesteps, context, subjects, token_offset=(0, 0)):
        seen.update(x=tuple(x.shape), subjects=tuple(subjects.shape), timesteps=timesteps.clone())
        return torch.zeros_like(x)

    batch = {"mp4": torch.zeros(1, 5, 3, 32, 32), "subject_images": torch.zeros(1, 2, 3, 32, 32), "txt": ["a"]}
    geometry = VideoGeometry(temporal_stride=1, spatial_stride=4, patch_size=(1, 4, 4))
    training_loss(
        network, vae, TextConditioner(text, 0.0), batch, step=5, seed=3, parallel=ParallelState(), geometry=geometry
    )
    assert seen["x"] == (1, 5, 16, 8, 8) and seen["subjects"] == (1, 2, 16, 8, 8)  # 1x in time, 4x in space
    # spec-dit §5.2 by hand: L = (8/4)·(8/4) = 4 tokens per frame, mu = 0.5 + 0.65·(4 − 256)/3840
    shift = math.exp(0.5 + 0.65 * (4 - 256) / 3840)
    sigma = torch.sigmoid(torch.randn(1, generator=step_generator(3, 5, 0))).double()
    expected = 1000 * shift * sigma / (shift * sigma + 1 - sigma)
    assert torch.allclose(seen["timesteps"].double(), expected, rtol=1e-6)
    patch2_shift = math.exp(0.5 + 0.65 * (16 - 256) / 3840)  # what a hard-coded 2x2 patch would give
    assert not torch.allclose(
        seen["timesteps"].double(), 1000 * patch2_shift * sigma / (patch2_shift * sigma + 1 - sigma)
    )


def test_train_then_sample_with_the_small_vae_and_patch_without_a_model_yaml(small_vae, tmp_path, capsys):
    data = make_video_dataset(tmp_path / "data", count=2, frames=6, size=32)
    save = tmp_path / "run"
    train = [sys.executable, "train_video_concat.py", "--config", "configs/model/kaleido_tiny.yaml"]
    train += ["configs/training/tiny.yaml", *PATCH, f"vae.path={small_vae}", f"data.root={data}", f"save={save}"]
    train += ["data.height=32", "data.width=32", "data.num_frames=5", "train_iters=1", "save_interval=1"]
    result = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads((save / "kaleido_model.json").read_text())
    assert card["name"] == "kaleido-tiny" and card["architecture"]["patch_size"] == [1, 4, 4]
    assert card["architecture"]["num_layers"] == 2 and Path(save, card["vae"]).resolve() == small_vae.resolve()
    out = tmp_path / "samples"
    argv = ["--config", "configs/sampling/tiny.yaml", f"load={save}", "vae.path=", "sampling_image_size=[32,48]"]
    argv += [f"output_dir={out}", "num_steps=2", "only_save_latents=true", "--prompt", "a square"]
    assert sample_video.main(argv) == 0
    assert load_file(next(out.iterdir()) / "latents.safetensors")["latents"].shape == (1, 3, 16, 8, 12)
    with pytest.raises(SystemExit) as exit_info:
        sample_video.main([*argv, "model.arch.patch_size=[1,2,2]", f"output_dir={tmp_path / 'bad'}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "model.arch.patch_size: the config says [1, 2, 2]" in error and "says (1, 4, 4)" in error
