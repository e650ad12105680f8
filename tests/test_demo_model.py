"""The shipped demo model (assets/kaleido-shapes): it loads strictly and follows its references."""

import json
from pathlib import Path

import numpy as np
import pytest

from tools.eval_shapes import (
    DEFAULT_CONFIG,
    evaluate_model,
    ground_truth,
    load_clips,
    main,
    reconstruct,
    sample_and_score,
    score_clips,
)

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "assets" / "kaleido-shapes" / "README.md"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_shipped_weights_are_small_and_described():
    folder = ROOT / "assets" / "kaleido-shapes"
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 50 * 2**20
    training = json.loads((folder / "vae" / "training.json").read_text())
    card = CARD.read_text()
    assert f"{training['psnr_heldout_db']:.2f} dB" in card  # the card reports the shipped VAE's figure


@pytest.mark.slow
def test_held_out_examples_follow_their_references():
    """Held-out clips (each with a colour-shape pair never seen in training), ordinal captions.

    The shipped toy model gets colour from its references but rarely shape (colour 0.755, identity
    0.184 on the model card's 40 clips), so this guards what it does: colour follows the references
    and falls away with blank ones; identity is checked not to be better with blank references.
    Six clips (seven referenced subjects), the card's first six: on two clips a single miss moves
    the figures by a half. The shipped DiT gets 4 of the 7 colours (0 with blank references) and
    2 identities; the bound leaves one subject of margin (the previous DiT got 2 colours).
    """
    clips = load_clips(None, 6, seed=1, with_frames=False)
    figures = evaluate_model(clips, DEFAULT_CONFIG, [])
    assert figures["n_videos"] == 6
    assert figures["colour_accuracy"] >= 3 / 7, figures
    assert figures["colour_accuracy_blank_refs"] < figures["colour_accuracy"], figures
    assert figures["identity_accuracy_blank_refs"] <= figures["identity_accuracy"], figures


def test_shipped_vae_reconstructions_keep_the_subjects():
    """``eval_shapes --reconstruct``: the VAE alone, what any DiT sampling through it can reach."""
    clips = load_clips(None, 4, seed=1, with_frames=True)
    rebuilt = reconstruct(clips, DEFAULT_CONFIG, [])
    for clip, copy in zip(clips, rebuilt, strict=True):
        assert copy.frames.shape == clip.frames.shape and copy.subjects == clip.subjects
        mse = np.mean((copy.frames.astype(np.float64) - clip.frames) ** 2)
        assert 10 * np.log10(255**2 / mse) > 20  # the shipped VAE: ~25 dB on held-out clips
    figures = ground_truth(rebuilt)
    assert figures["n_videos"] == 4 and figures["colour"] >= 0.7 and figures["presence"] >= 0.6, figures


def test_next_vae_keeps_the_subjects_at_its_gate():
    """Issue 19's VAE (assets/kaleido-shapes-next/vae: 4x4 spatial, no temporal compression, the
    subjects' pixels weighted x10), the VAE alone: it passed the gate on 40 held-out clips (identity
    0.959, colour and motion 1.000, against 0.551 / 0.898 / 0.571 for the shipped VAE); on these
    8 clips (9 subjects) it scores 29.8-35.3 dB (the striped square lowest) and misses one shape (a
    striped square read as a circle). The bounds leave no room for a second miss of identity or any
    of colour, nor for a clip 0.8 dB worse; the card reports its training's held-out PSNR.
    """
    folder = ROOT / "assets" / "kaleido-shapes-next" / "vae"
    training = json.loads((folder / "training.json").read_text())
    assert f"{training['psnr_heldout_db']:.2f} dB" in CARD.read_text()
    clips = load_clips(None, 8, seed=1, with_frames=True)
    rebuilt = reconstruct(clips, DEFAULT_CONFIG, [f"vae.path={folder.relative_to(ROOT)}"])
    for clip, copy in zip(clips, rebuilt, strict=True):
        assert copy.frames.shape == clip.frames.shape and copy.subjects == clip.subjects
        mse = np.mean((copy.frames.astype(np.float64) - clip.frames) ** 2)
        assert 10 * np.log10(255**2 / mse) > 29, clip.id
    figures = ground_truth(rebuilt)
    assert figures["n_videos"] == 8 and figures["colour"] == 1.0 and figures["motion"] >= 8 / 9, figures
    assert figures["identity"] >= 8 / 9, figures


def test_next_vae_decoder_survives_latent_noise_and_keeps_shapes_at_the_finest_latent_scale(capsys):
    """``eval_shapes --reconstruct --latent-degrade``: the next VAE's decoder reads its latents plus
    Gaussian noise of 0.2 or 0.4 (normalised units; the latents' std is 0.69) as it reads them clean,
    so a DiT's small errors are not what breaks its shapes; averaging the latents over 2 x 2 or 4 x 4
    cells loses them, as the same grid does in pixels (40 held-out clips: identity 0.959 clean, 0.959 /
    0.939 with noise 0.2 / 0.4, 0.510 / 0.347 low-passed by 2 / 4, against 0.551 / 0.224 for frames
    downsampled by 8 / 16). These 8 clips (9 subjects): 8 identities clean and with either noise, 3
    low-passed by 2, 1 by 4."""
    clips = load_clips(None, 8, seed=1, with_frames=True)
    overrides = ["vae.path=assets/kaleido-shapes-next/vae"]
    clean = ground_truth(reconstruct(clips, DEFAULT_CONFIG, overrides))["identity"]
    noisy = ground_truth(reconstruct(clips, DEFAULT_CONFIG, overrides, {"noise": 0.4}))["identity"]
    coarse = ground_truth(reconstruct(clips, DEFAULT_CONFIG, overrides, {"lowpass": 2}))["identity"]
    assert noisy >= clean - 1 / 9 and clean >= 8 / 9, (clean, noisy)
    assert coarse <= 4 / 9, coarse
    capsys.readouterr()  # the progress bars
    for bad in (["--latent-degrade", "lowpass=2"], ["--reconstruct", "--latent-degrade", "lowpass=5", *overrides]):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and "--latent-degrade" in error, error


def test_sampling_from_the_clip_at_sigma_zero_scores_its_vae_reconstruction(capsys):
    """``eval_shapes --start-sigma``: a sample started from the clip's own video at σ = 0 is that video
    through the VAE, so it scores exactly what ``--reconstruct`` scores (references or blank ones)."""
    clips = load_clips(None, 3, seed=1, with_frames=True)
    expected = [score for _, score in score_clips(reconstruct(clips, DEFAULT_CONFIG, []))]
    scores = sample_and_score(clips, DEFAULT_CONFIG, ["num_steps=4"], start_sigma=0.0)
    assert [score for _, score in scores.normal] == expected
    assert [score for _, score in scores.blank] == expected
    capsys.readouterr()  # what sampling printed
    for bad in (["--start-sigma", "1.5"], ["--start-sigma", "0.5", "--reconstruct"]):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().count("\n") == 0  # one line
