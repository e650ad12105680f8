"""The synthetic shapes world: deterministic clips, held-out split, a detector that reads ground truth."""

import json

import numpy as np
import pytest

from tools.eval_shapes import (
    LATENT_DEGRADATIONS,
    Clip,
    confusion,
    degrade,
    degrade_latents,
    ground_truth,
    load_clips,
    parse_degradation,
    score_subject,
    table,
)
from tools.make_shapes_dataset import main as make_dataset_main
from tools.make_shapes_dataset import make_clip, write_clip
from tools.shapes_world import (
    BACKGROUND_NAMES,
    BACKGROUNDS,
    COLOURS,
    FRAME,
    SHAPES,
    SPRITE,
    Subject,
    colour_masks,
    count_pieces,
    detect,
    is_held_out,
    render,
)


def test_clips_are_deterministic_for_a_seed():
    a, b, c = make_clip(3, 17), make_clip(3, 17), make_clip(4, 17)
    assert np.array_equal(a["frames"], b["frames"]) and a["caption"] == b["caption"]
    assert a["subjects"] == b["subjects"]
    assert [np.asarray(r).tobytes() for r in a["references"]] == [np.asarray(r).tobytes() for r in b["references"]]
    assert not np.array_equal(a["frames"], c["frames"])
    assert a["frames"].shape == (9, 96, 96, 3)


@pytest.mark.parametrize("grid", [16, 32])
def test_aligned_world_puts_each_reference_into_the_clip_by_whole_tokens(grid):
    """``make_shapes_dataset.py --aligned 16`` (or 32): still subjects of the sprite size whose boxes
    start on the lattice; each reference is the same sprite in the middle of a white frame, so the
    clip's pixels under the sprite are the reference's, shifted by whole tokens. Held-out clips keep
    a pair training never shows, and the detector reads the clips."""
    from tools.shapes_world import silhouette

    clips = [make_clip(0, index, aligned=grid) for index in range(9, 60, 10)] + [make_clip(0, 3, aligned=grid)]
    centre = (FRAME - SPRITE) // 2
    assert centre % grid == 0  # the reference's sprite box is on the lattice too
    for clip in clips:
        for subject, reference in zip(clip["subjects"], clip["references"], strict=True):
            x, y, size = subject["track"][0]
            left, top = int(x) - SPRITE // 2, int(y) - SPRITE // 2
            assert subject["motion"] == "still" and size == SPRITE and left % grid == 0 and top % grid == 0
            assert all(point == subject["track"][0] for point in subject["track"])
            inside = np.asarray(silhouette(subject["shape"], SPRITE)) == 255
            in_clip = clip["frames"][0][top : top + SPRITE, left : left + SPRITE][inside]
            in_reference = np.asarray(reference)[centre : centre + SPRITE, centre : centre + SPRITE][inside]
            assert reference.size == (FRAME, FRAME) and np.array_equal(in_clip, in_reference)
        assert clip["split"] == "heldout" or clip["id"] == "train_00003"
    assert all(is_held_out(c["subjects"][0]["shape"], c["subjects"][0]["colour"]) for c in clips[:-1])
    figures = ground_truth([Clip(c["id"], c["subjects"], c["references"], c["frames"]) for c in clips])
    assert figures["identity"] == 1.0, figures
    with pytest.raises(SystemExit) as exit_info:
        make_dataset_main(["--out", "unused", "--aligned", "0"])
    assert exit_info.value.code == 2


def test_upright_world_keeps_the_demo_layout_with_references_at_the_clip_size():
    """``--upright``: the demo world's subjects, starts and motions (so sub-token offsets), each at
    the sprite size, its reference the aligned world's (upright, that size); the detector reads it."""
    from tools.shapes_world import aligned_reference_image

    pairs = [(make_clip(0, index), make_clip(0, index, upright=True)) for index in (3, 9, 19, 27)]
    for demo, upright in pairs:
        assert len(demo["subjects"]) == len(upright["subjects"])
        for a, b, reference in zip(demo["subjects"], upright["subjects"], upright["references"], strict=True):
            assert (a["shape"], a["colour"], a["motion"]) == (b["shape"], b["colour"], b["motion"])
            assert a["track"][0][:2] == b["track"][0][:2]
            sizes = [size for _, _, size in b["track"]]
            if b["motion"] in ("grow", "shrink"):  # scaled from the sprite size, 0.6x to 1.2x
                assert int(0.6 * SPRITE) in sizes and int(1.2 * SPRITE) in sizes
            else:
                assert set(sizes) == {SPRITE}
            expected = np.asarray(aligned_reference_image(b["shape"], b["colour"]))
            assert np.array_equal(np.asarray(reference), expected)
    figures = ground_truth([Clip(u["id"], u["subjects"], u["references"], u["frames"]) for _, u in pairs])
    assert figures["identity"] == 1.0, figures
    with pytest.raises(SystemExit) as exit_info:
        make_dataset_main(["--out", "unused", "--aligned", "16", "--upright"])
    assert exit_info.value.code == 2


def test_placed_captions_say_where_each_subject_is_drawn_and_on_what():
    words = {0: ("top", "left"), 2: ("bottom", "right")}  # grid third -> (row word, column word)
    checked = 0
    for index in range(80):
        plain, placed = make_clip(0, index), make_clip(0, index, placed=True)
        assert np.array_equal(plain["frames"], placed["frames"]) and plain["subjects"] == placed["subjects"]
        # the background named is the one drawn: the frame's median colour
        text, background = placed["caption"].rsplit(" on a ", 1)
        name = background.removesuffix(" background")
        drawn = np.median(placed["frames"][0].reshape(-1, 3), axis=0)
        assert np.array_equal(drawn, BACKGROUNDS[BACKGROUND_NAMES.index(name)]) and name == placed["background"]
        phrases = text.split(" while ")
        assert len(phrases) == len(placed["subjects"])
        for phrase, subject in zip(phrases, placed["subjects"], strict=True):
            # where the subject is in the first frame, read from the pixels: the centre of its colour's box
            ys, xs = np.nonzero(colour_masks(placed["frames"][0])[subject["colour"]])
            centre = [(v.min() + v.max()) / 2 for v in (ys, xs)]
            if any(abs(v - line) < 3 for v in centre for line in (FRAME / 3, 2 * FRAME / 3)):
                continue  # too close to a grid line to say from the pixels
            checked += 1
            row, column = (min(int(v * 3 // FRAME), 2) for v in centre)
            expected = " ".join(w for w in (words.get(row, ("",))[0], words.get(column, ("", ""))[1]) if w)
            assert (f"at the {expected} " if expected else "in the centre ") in phrase, (phrase, row, column)
        # without the place phrases the caption is the plain one
        stripped = text
        for place in ("at the top left ", "at the top right ", "at the bottom left ", "at the bottom right "):
            stripped = stripped.replace(place, "")
        for place in ("at the top ", "at the bottom ", "at the left ", "at the right ", "in the centre "):
            stripped = stripped.replace(place, "")
        assert stripped == plain["caption"]
    assert checked >= 60


def test_held_out_pairs_never_appear_in_training_clips():
    held = [(s, c) for s in SHAPES for c in COLOURS if is_held_out(s, c)]
    assert len(held) == 6 and len({c for _, c in held}) == 6
    for index in range(60):
        clip = make_clip(0, index)
        pairs = [(s["shape"], s["colour"]) for s in clip["subjects"]]
        assert len({c for _, c in pairs}) == len(pairs)  # distinct colours
        if clip["split"] == "train":
            assert not any(is_held_out(*p) for p in pairs)
        else:
            assert any(is_held_out(*p) for p in pairs)


def test_detector_scores_ground_truth_clips(tmp_path):
    for index in range(40):
        write_clip(tmp_path, make_clip(1, index))
    figures = ground_truth(load_clips(tmp_path / "train", 40, seed=0, with_frames=True))
    assert figures["identity"] >= 0.95 and figures["motion"] >= 0.95 and figures["presence"] >= 0.95
    generated = ground_truth(load_clips(None, 12, seed=1, with_frames=True))  # held-out clips, made in memory
    assert generated["identity"] >= 0.95 and generated["n_videos"] == 12
    meta = json.loads(next((tmp_path / "train" / "meta").glob("*.json")).read_text())
    assert meta["caption"] and (tmp_path / "train" / "references" / meta["id"] / "ref1.png").is_file()
    blank = np.full((9, 96, 96, 3), 255, dtype=np.uint8)
    assert score_subject(blank, "circle", "red", "left") == {
        "colour": False,
        "shape": False,
        "identity": False,
        "presence": 0.0,
        "one_piece": False,
        "motion": False,
        "detected_shape": None,
        "detected_motion": None,
    }


def test_detector_reads_mildly_degraded_ground_truth():
    clips = load_clips(None, 20, seed=2, with_frames=True)
    for blur, noise in ((1.5, 0.0), (0.0, 16.0), (1.0, 8.0)):
        degraded = [Clip(c.id, c.subjects, c.references, degrade(c.frames, blur=blur, noise=noise)) for c in clips]
        assert not np.array_equal(degraded[0].frames, clips[0].frames)
        figures = ground_truth(degraded)
        assert figures["identity"] >= 0.95 and figures["motion"] >= 0.95, (blur, noise, figures)
    noisy_blank = degrade(np.full((1, 96, 96, 3), 110, dtype=np.uint8), blur=1.5, noise=16.0)[0]
    assert detect(noisy_blank) == []


def _alone(shape: str, colour: str, background=BACKGROUNDS[0]) -> np.ndarray:
    subject = Subject(shape, colour, "still", (48.0, 48.0), track=[(48.0, 48.0, SPRITE)])
    return render([subject], background, frames=1)


@pytest.mark.parametrize("blur", [0.0, 1.5])
def test_detector_names_every_shape_and_no_other(blur):
    """Each catalogue shape, alone, sharp or blurred, is read as itself: a blurred striped square is
    a square (the strict detector read it as a circle), and no two shapes are read the same."""
    for colour in ("red", "blue"):
        seen = {}
        for shape in SHAPES:
            found = detect(degrade(_alone(shape, colour), blur=blur)[0])
            assert [d.colour for d in found] == [colour], (shape, found)
            seen[shape] = found[0].shape
        assert seen == {shape: shape for shape in SHAPES}, seen


def test_degradation_settings_are_checked():
    assert parse_degradation("blur=1.5,noise=16") == {"blur": 1.5, "noise": 16.0}
    assert parse_degradation("") == {}
    for bad in ("blur=x", "sharpen=1", "blur=-1", "blur=1,blur=2", "downsample=1.5", "downsample=0", "lowpass=2"):
        with pytest.raises(ValueError, match="--degrade"):
            parse_degradation(bad)
    assert parse_degradation("downsample=4") == {"downsample": 4}
    latent = {"flag": "--latent-degrade", "keys": LATENT_DEGRADATIONS}
    assert parse_degradation("lowpass=2,noise=0.2", **latent) == {"lowpass": 2, "noise": 0.2}
    for bad in ("blur=1", "lowpass=0", "lowpass=2.5", "noise=-0.1"):
        with pytest.raises(ValueError, match="--latent-degrade"):
            parse_degradation(bad, **latent)


def test_shapes_survive_a_coarser_grid_down_to_a_quarter():
    """``--degrade downsample=K``: the sprites (32 px) keep their shapes on a 24 x 24 grid and lose
    them on 6 x 6 (`eval_shapes.py --ground-truth`, 40 held-out clips: identity 1.000 / 0.959 / 0.551 /
    0.224 at K = 2 / 4 / 8 / 16; these 20 clips: 0.862 at K = 4): the scale at which the evaluation's
    shapes live, to compare with a VAE's latent grid."""
    clips = load_clips(None, 20, seed=2, with_frames=True)
    for factor, low, high in ((2, 0.95, 1.0), (4, 0.8, 1.0), (16, 0.0, 0.5)):
        coarse = [Clip(c.id, c.subjects, c.references, degrade(c.frames, downsample=factor)) for c in clips]
        assert coarse[0].frames.shape == clips[0].frames.shape
        assert low <= ground_truth(coarse)["identity"] <= high, factor


def test_latent_degradation_low_passes_and_noises():
    import torch

    latents = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # [B, T, C, h, w]
    constant = torch.full_like(latents, 0.7)
    assert torch.allclose(degrade_latents(constant, lowpass=4), constant)
    # a checkerboard of period 2 is pure high frequency: its 2 x 2 average is its mean everywhere
    board = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 0.5  # -0.5 / 1.5
    smooth = degrade_latents(board.expand_as(latents).clone(), lowpass=2)
    assert torch.allclose(smooth, torch.full_like(smooth, 0.5))
    # a linear ramp is kept inside the grid (block means sit on the ramp and bilinear spreading of a
    # linear function is exact); the edge cells take their block's mean (0.5 and 6.5)
    ramp = torch.arange(8.0).expand(2, 3, 4, 8, 8)
    kept = degrade_latents(ramp.clone(), lowpass=2)
    assert torch.allclose(kept[..., 1:7], ramp[..., 1:7], atol=1e-6)
    assert torch.allclose(kept[..., 0], torch.full_like(kept[..., 0], 0.5))
    assert torch.allclose(kept[..., 7], torch.full_like(kept[..., 7], 6.5))
    noisy = degrade_latents(latents, noise=0.2, seed=3)
    residual = noisy - latents
    assert abs(float(residual.std()) - 0.2) < 0.02 and abs(float(residual.mean())) < 0.02
    assert torch.equal(noisy, degrade_latents(latents, noise=0.2, seed=3))
    assert not torch.equal(noisy, degrade_latents(latents, noise=0.2, seed=4))
    with pytest.raises(ValueError, match="lowpass=3"):
        degrade_latents(latents, lowpass=3)


def test_confusion_counts_asked_against_detected():
    asked_seen = [("circle", "circle"), ("circle", "star"), ("star", None), ("circle", "circle")]
    header, *rows = (line.split() for line in confusion(asked_seen, SHAPES).splitlines())
    assert header == [*SHAPES, "-"]
    assert rows == [
        ["circle", "2", ".", ".", "1", ".", ".", ".", ".", "."],
        ["star", ".", ".", ".", ".", ".", ".", ".", ".", "1"],
    ]


def test_vae_training_tool_writes_a_loadable_vae(tmp_path):
    import torch
    from safetensors.torch import load_file

    from sgm.models.wan_vae import WanVAE
    from tools.train_vae import main as train_vae

    for index in range(10):
        write_clip(tmp_path / "data", make_clip(5, index))
    out = tmp_path / "vae"
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--minutes", "0.01", "--base-dim", "8"]
    assert train_vae([*args, "--clips", "6", "--batch", "1"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] >= 1 and 0 < record["psnr_heldout_db"] < 60
    vae = WanVAE.from_diffusers(out)
    latents = vae.encode(torch.zeros(1, 3, 9, 96, 96))
    assert latents.shape == (1, 3, 16, 12, 12)
    assert vae.shift.flatten().tolist() != [0.0] * 16  # measured latent statistics, not Wan's defaults

    # decoder-only fine-tuning from it keeps the encoder, hence the latents a DiT was trained on
    tuned = tmp_path / "tuned"
    assert (
        train_vae(
            [
                *args[:3],
                str(tuned),
                "--minutes",
                "0.01",
                "--clips",
                "6",
                "--batch",
                "1",
                "--init",
                str(out),
                "--freeze-encoder",
            ]
        )
        == 0
    )
    before, after = (load_file(str(d / "diffusion_pytorch_model.safetensors")) for d in (out, tuned))
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_evaluation_table_marks_goals():
    text = table({"identity_accuracy": 0.85, "shape_accuracy": 0.5, "presence": 0.9, "n_videos": 4})
    lines = text.splitlines()
    assert lines[1].split()[1:] == ["0.850", ">=", "0.80", "met"]
    assert lines[2].split()[1:] == ["0.500", ">=", "0.80", "NOT", "met"]
    assert lines[3].split()[1:] == ["0.900"] and lines[4].split()[1:] == ["4"]


def test_vae_learning_rate_follows_the_time_budget():
    from sat.training import ScheduleConfig
    from tools.train_vae import budget_lr

    cosine = ScheduleConfig(style="cosine", warmup_fraction=0.1, release_warmup=False, min_lr_fraction=0.05)
    assert budget_lr(1e-3, 0.0, cosine) == pytest.approx(1e-3 / 100)  # first tick of a 100-tick warm-up
    assert budget_lr(1e-3, 0.0999, cosine) == pytest.approx(1e-3)  # end of the warm-up
    assert budget_lr(1e-3, 0.55, cosine) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5), rel=1e-2)  # half-way down
    assert budget_lr(1e-3, 1.0, cosine) == pytest.approx(1e-3 * 0.05)  # the floor at the deadline
    assert budget_lr(1e-3, 1.7, cosine) == pytest.approx(1e-3 * 0.05)  # past it (the last step overruns)
    constant = ScheduleConfig(style="constant", warmup_fraction=0.0, release_warmup=False)
    assert budget_lr(1e-3, 0.3, constant) == budget_lr(1e-3, 0.9, constant) == 1e-3


def test_vae_foreground_is_the_subjects_pixels():
    import torch

    from sgm.data.subject_mask import foreground

    x = torch.full((2, 3, 5, 96, 96), 110, dtype=torch.uint8)  # plain grey clips
    x[:, 0, :, 38:58, 30:50] = 220  # a 20 × 20 reddish subject in every frame
    x[1, :, 3, 0:4, 0:4] = 255  # a white 4 × 4 one in frame 3 of the second clip
    mask = foreground(x)
    assert mask.shape == (2, 5, 96, 96) and int(mask.sum()) == 2 * 5 * 400 + 16
    assert bool(mask[:, :, 38:58, 30:50].all()) and bool(mask[1, 3, :4, :4].all())
    assert not bool(mask[0, 3, :4, :4].any())


def test_vae_psnr_reports_all_pixels_and_the_subjects_pixels():
    import math
    from types import SimpleNamespace

    import torch

    from tools.train_vae import psnr

    clips = torch.full((1, 3, 1, 16, 16), 128, dtype=torch.uint8)
    clips[:, 2, :, :4, :4] = 255  # a 4 × 4 subject: 16 of 256 pixels

    def model(x, sample_posterior):  # reconstructs the background exactly, the subject 0.2 off
        out = x.clone()
        out[:, :, :, :4, :4] -= 0.2
        return SimpleNamespace(sample=out)

    everything, subjects = psnr(model, clips)
    mse_subject = (0.2 / 2) ** 2  # images in [-1, 1], PSNR on [0, 1]
    assert subjects == pytest.approx(-10 * math.log10(mse_subject), abs=1e-3)
    assert everything == pytest.approx(-10 * math.log10(mse_subject * 16 / 256), abs=1e-3)


def test_vae_training_tool_takes_the_architecture_and_resumes(tmp_path):
    import torch

    from sgm.models.wan_vae import WanVAE, read_vae_strides
    from tools.train_vae import main as train_vae

    for index in range(10):
        write_clip(tmp_path / "data", make_clip(5, index))
    out, state = tmp_path / "vae", tmp_path / "state.pt"
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--base-dim", "8", "--clips", "6", "--batch", "1"]
    args += ["--dim-mult", "1,2,2", "--temporal-downsample", "false,false", "--foreground-weight", "10"]
    args += ["--crop", "16", "--frames", "5", "--checkpoint", str(state), "--checkpoint-minutes", "0"]
    assert train_vae([*args, "--minutes", "0.01"]) == 0
    first = json.loads((out / "training.json").read_text())["steps"]
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == first and saved["elapsed"] >= 0.6
    assert read_vae_strides(out) == (1, 4)  # the config's stored scale factors match the levels
    config = json.loads((out / "config.json").read_text())
    assert (config["scale_factor_temporal"], config["scale_factor_spatial"]) == (1, 4)
    assert WanVAE.from_diffusers(out).encode(torch.zeros(1, 3, 9, 96, 96)).shape == (1, 9, 16, 24, 24)

    longer = saved["elapsed"] / 60 + 0.01  # a longer budget: the saved clock continues to it
    assert train_vae([*args, "--minutes", str(longer)]) == 0
    assert json.loads((out / "training.json").read_text())["steps"] > first
    assert torch.load(state, weights_only=True)["elapsed"] >= 60 * longer

    with pytest.raises(SystemExit):
        train_vae([*args[:-4], "--dim-mult", "1,2,2", "--temporal-downsample", "false"])


def test_vae_loss_weights_favour_the_subjects_and_average_one():
    import torch

    from sgm.data.subject_mask import subject_loss_weights as loss_weights

    mask = torch.zeros(2, 1, 1, 10, 10, dtype=torch.uint8)
    mask[0, :, :, :2, :5] = 1  # 10 of 100 pixels
    weights = loss_weights(mask, 10.0)
    assert weights[0].mean().item() == pytest.approx(1.0) and weights[1].mean().item() == pytest.approx(1.0)
    assert weights[0, 0, 0, 0, 0].item() == pytest.approx(10 * weights[0, 0, 0, 9, 9].item())
    assert torch.equal(weights[1], torch.ones(1, 1, 10, 10))  # no subject: plain mean


def test_count_pieces_is_eight_connected_and_drops_specks():
    mask = np.zeros((40, 40), dtype=bool)
    mask[2:9, 2:9] = True  # 49 pixels
    assert count_pieces(mask) == 1
    mask[9:16, 9:16] = True  # touches the first block at one corner only: still one piece
    assert count_pieces(mask) == 1
    mask[30:37, 2:9] = True  # apart
    assert count_pieces(mask) == 2
    mask[30:35, 30:35] = True  # 25 pixels: below the detector's minimum area
    assert count_pieces(mask) == 2 and count_pieces(mask, min_area=20) == 3


def test_a_subject_drawn_twice_is_not_one_piece():
    def still(x, y):
        subject = Subject("star", "red", "still", (x, y))
        subject.track = [(x, y, SPRITE)] * 3
        return subject

    once = render([still(24, 24)], BACKGROUNDS[0], frames=3)
    twice = render([still(24, 24), still(72, 70)], BACKGROUNDS[0], frames=3)
    assert [d.pieces for d in detect(twice[0])] == [2] and [d.pieces for d in detect(once[0])] == [1]
    assert score_subject(once, "star", "red", "still")["one_piece"]
    assert not score_subject(twice, "star", "red", "still")["one_piece"]


def test_one_frame_scores_no_motion_and_no_swap():
    """A first-frame sample shows no motion: scored, every found subject would read as "still" (a
    still subject right, every other wrong) and swap-following would count stills; they are not
    scored (None, printed "-", an empty CSV cell), while the shape is read as from a video."""
    from tools.eval_shapes import ModelScores, csv_value, model_figures, summarise

    def moving(motion):
        subject = Subject("star", "red", motion, (48, 48))
        subject.track = [(48 + 7 * t * (motion == "right"), 48, SPRITE) for t in range(5)]
        return subject

    video = render([moving("right")], BACKGROUNDS[0], frames=5)
    whole, first = score_subject(video, "star", "red", "right"), score_subject(video[:1], "star", "red", "right")
    assert whole["motion"] is True and whole["identity"] and first["identity"] and first["motion"] is None
    still = render([moving("still")], BACKGROUNDS[0], frames=1)
    assert score_subject(still, "star", "red", "still")["motion"] is None  # not a free point for "still"
    assert summarise([whole, whole])["motion"] == 1.0 and summarise([first, whole])["motion"] is None
    subject = {"shape": "star", "colour": "red", "motion": "right"}
    figures = model_figures(ModelScores([(subject, first)], [(subject, first)], [None, None]), 1)
    assert figures["identity_accuracy"] == 1.0 and figures["motion_accuracy"] is None
    assert figures["swap_following"] is None and csv_value(None) == "" and csv_value(0.5) == "0.500000"
    lines = {line.split()[0]: line for line in table(figures).splitlines()}
    assert "NOT met" not in lines["motion_accuracy"] and "no motion" in lines["swap_following"]
    assert lines["identity_accuracy"].split()[1] == "1.000"
