"""Longer videos in segments: each continues the previous one's last latent frames (on the demo model)."""

from pathlib import Path

import pytest
import torch

from sat.config import load_config
from sgm.data.references import load_reference
from sgm.diffusion.sampling import KnownFrames, hold_known, renoise, sample
from sgm.diffusion.schedules import shifted_schedule
from sgm.pipeline import KaleidoPipeline, SamplingConfig, joined_latent_frames, resolve_components, validate_sampling

ROOT = Path(__file__).resolve().parents[1]
REFS = [ROOT / "assets/kaleido-shapes/examples/heldout_00009_ref1.png"]


@pytest.fixture(scope="module")
def pipe():
    config = load_config(SamplingConfig, [str(ROOT / "configs/sampling/shapes.yaml")], ["num_steps=6"])
    config.text_encoder.path = str(ROOT / config.text_encoder.path)
    config.vae.path = str(ROOT / config.vae.path)
    config.load = str(ROOT / config.load)
    return KaleidoPipeline.from_config(config, device="cpu")


def test_held_frames_are_the_known_latent_at_the_current_noise_level():
    x = torch.randn(1, 5, 2, 3, 3)
    known = KnownFrames(latents=torch.randn(1, 2, 2, 3, 3), noise=torch.randn(1, 2, 2, 3, 3))
    held = hold_known(x, known, torch.tensor(0.25))
    torch.testing.assert_close(held[:, :2], 0.75 * known.latents + 0.25 * known.noise, rtol=0, atol=1e-6)
    assert torch.equal(held[:, 2:], x[:, 2:])
    assert torch.equal(hold_known(x, known, 0.0)[:, :2], known.latents)  # the end: exactly the known frames
    assert torch.equal(renoise(known.latents, known.noise, 1.0), known.noise)  # σ = 1: pure noise
    assert hold_known(x, None, 0.5) is x


def test_two_segments_join_without_a_duplicated_or_dropped_frame(pipe):
    images = [load_reference(str(p)) for p in REFS]
    one = pipe.generate_latents("the first object moves left", references=images, seed=7)
    steps = []
    two = pipe.generate_latents(
        "the first object moves left",
        references=images,
        seed=7,
        segments=2,
        overlap=1,
        on_step=lambda done, total: steps.append((done, total)),
    )
    latent_frames = one.shape[1]  # 3 for the demo config
    assert two.shape[1] == 2 * latent_frames - 1 == joined_latent_frames(latent_frames, segments=2, overlap=1)
    assert steps == [(k, 12) for k in range(1, 13)]  # 6 steps per segment, counted across both
    assert torch.equal(two[:, :latent_frames], one)  # segment 1 is the one-segment video of the seed
    video_one, video_two = pipe.decode(one), pipe.decode(two)
    t = pipe.geometry.temporal_stride
    assert video_two.shape[2] == t * (two.shape[1] - 1) + 1 == pipe.output_frames(segments=2, overlap=1) == 17
    # The VAE is causal: the joined video's first frames are segment 1's video, frame for frame, so
    # nothing was duplicated or dropped at the seam; the continuation adds t frames per new latent frame.
    torch.testing.assert_close(video_two[:, :, : video_one.shape[2]], video_one, rtol=0, atol=1e-5)


def test_the_overlap_frames_of_a_segment_are_the_previous_segments_last():
    o = 2
    known = KnownFrames(latents=torch.randn(1, o, 4, 2, 2), noise=torch.randn(1, o, 4, 2, 2))
    seen = []

    def denoise(x, sigma):  # mixes frames, so the held frames shape the others
        seen.append((x.clone(), sigma.clone()))
        return x - torch.tanh(x.mean(dim=1, keepdim=True))

    start = torch.cat([known.noise, torch.randn(1, 3, 4, 2, 2)], dim=1)
    sigmas = shifted_schedule(8, 3.0)
    out = sample(denoise, start, sigmas, progress=False, known=known)
    assert torch.equal(out[:, :o], known.latents)  # the segment's overlap frames are the previous ones
    for x, sigma in seen:  # what the network saw at every step: the known frames at that σ
        torch.testing.assert_close(x[:, :o], renoise(known.latents, known.noise, sigma), rtol=0, atol=1e-6)
    other = KnownFrames(latents=known.latents + 1, noise=known.noise)
    assert not torch.allclose(sample(denoise, start, sigmas, progress=False, known=other)[:, o:], out[:, o:])


def test_three_segments_with_an_overlap_of_two(pipe):
    three = pipe.generate_latents("the first object bounces", seed=3, segments=3, overlap=2)
    t = pipe.geometry.latent_frames(pipe.settings.num_frames)  # latent frames per segment (3 for the demo)
    assert three.shape[1] == t + 2 * (t - 2) == joined_latent_frames(t, segments=3, overlap=2)
    assert torch.equal(three[:, :t], pipe.generate_latents("the first object bounces", seed=3))


def test_segments_off_is_plain_and_bad_settings_are_refused(pipe):
    plain = pipe.generate_latents("the first object moves up", seed=2)
    assert torch.equal(pipe.generate_latents("the first object moves up", seed=2, segments=1, overlap=2), plain)
    t = pipe.geometry.latent_frames(pipe.settings.num_frames)
    with pytest.raises(ValueError, match=f"overlap: expected 1 to {t - 1} latent frames"):
        pipe.generate_latents("x", seed=2, segments=2, overlap=t)
    with pytest.raises(ValueError, match="segments: expected 1 or more"):
        pipe.check(height=96, width=96, num_frames=9, references=0, segments=0)
    config = load_config(SamplingConfig, [str(ROOT / "configs/sampling/shapes.yaml")], ["segments=2", "overlap=0"])
    config.vae.path, config.load = str(ROOT / config.vae.path), str(ROOT / config.load)
    with pytest.raises(ValueError, match="overlap"):
        validate_sampling(config, resolve_components(config))
