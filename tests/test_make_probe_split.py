"""tools/make_probe_split.py: the model card's probe splits (a few clips, latents cut to the first frame)."""

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sgm.models.wan_vae import VAEConfig, build_vae
from tools.make_probe_split import main

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def make_split(root: Path, ids: list[str], caption: str = "the first object moves left", latents: bool = True) -> None:
    """A split in the layout of make_shapes_dataset.py + precompute_latents.py (random latents)."""
    for sub in ("videos", "labels", "meta", "references", "latents"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(len(ids))
    for clip_id in ids:
        (root / "videos" / f"{clip_id}.mp4").write_bytes(clip_id.encode())
        (root / "labels" / f"{clip_id}.txt").write_text(f"{caption} ({clip_id})\n")
        (root / "meta" / f"{clip_id}.json").write_text("{}\n")
        (root / "references" / clip_id).mkdir(exist_ok=True)
        (root / "references" / clip_id / "0.png").write_bytes(b"png")
        if latents:
            tensors = {
                "video": torch.randn(9, 16, 6, 6, generator=generator),
                "subjects": torch.randn(2, 16, 6, 6, generator=generator),
                "subject_mask": (torch.rand(9, 6, 6, generator=generator) > 0.8).to(torch.uint8),
            }
            save_file(tensors, str(root / "latents" / f"{clip_id}.safetensors"), metadata={"source": clip_id})


def test_first_frame_cut_links_and_reports_clips_without_latents(tmp_path, caplog):
    source, out = tmp_path / "train", tmp_path / "probe" / "train"
    make_split(source, ["c0", "c1", "c3"])
    make_split(source, ["c2"], latents=False)
    assert main(["--source", str(source), "--out", str(out), "--count", "3", "--first-frame"]) == 1
    assert "c2: missing" in caplog.text and str(source / "latents" / "c2.safetensors") in caplog.text
    assert sorted(p.name for p in (out / "latents").iterdir()) == ["c0.safetensors", "c1.safetensors"]
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["c0.mp4", "c1.mp4"]  # c3 is beyond --count
    for clip_id in ("c0", "c1"):
        full, _ = read(source / "latents" / f"{clip_id}.safetensors")
        cut, metadata = read(out / "latents" / f"{clip_id}.safetensors")
        assert cut["video"].shape == (1, 16, 6, 6) and torch.equal(cut["video"][0], full["video"][0])
        assert torch.equal(cut["subject_mask"][0], full["subject_mask"][0]) and cut["subject_mask"].shape[0] == 1
        assert torch.equal(cut["subjects"], full["subjects"])  # references are not cut
        assert metadata["source"] == clip_id and metadata["probe_cut"] == "first frame"
        assert (out / "labels" / f"{clip_id}.txt").read_text() == f"the first object moves left ({clip_id})\n"
        assert (out / "references" / clip_id).resolve() == (source / "references" / clip_id).resolve()
        assert os.path.islink(out / "videos" / f"{clip_id}.mp4")


def test_rerun_keeps_what_matches_and_recuts_what_changed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="make_probe_split")
    source, out = tmp_path / "train", tmp_path / "probe"
    make_split(source, ["a", "b"])
    assert main(["--source", str(source), "--out", str(out)]) == 0
    whole, _ = read(out / "latents" / "a.safetensors")
    assert torch.equal(whole["video"], read(source / "latents" / "a.safetensors")[0]["video"])  # no cut
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "latents").iterdir()}
    caplog.clear()
    assert main(["--source", str(source), "--out", str(out)]) == 0
    assert "0 clips written, 2 already there" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (out / "latents").iterdir()} == stamps
    # a re-encoded source clip is cut again; so is every clip when the cut changes
    tensors, metadata = read(source / "latents" / "b.safetensors")
    tensors["video"] = tensors["video"] + 1
    save_file(tensors, str(source / "latents" / "b.safetensors"), metadata=metadata)
    caplog.clear()
    assert main(["--source", str(source), "--out", str(out)]) == 0
    assert "1 clips written, 1 already there" in caplog.text
    assert torch.equal(read(out / "latents" / "b.safetensors")[0]["video"], tensors["video"])
    caplog.clear()
    assert main(["--source", str(source), "--out", str(out), "--first-frame"]) == 0
    assert "2 clips written, 0 already there" in caplog.text
    assert read(out / "latents" / "b.safetensors")[0]["video"].shape[0] == 1
    assert not list(out.rglob("*.partial"))


def test_captions_from_another_split(tmp_path):
    source, placed, out = tmp_path / "train", tmp_path / "placed", tmp_path / "probe"
    make_split(source, ["x"])
    make_split(placed, ["x"], caption="the first object at the top left moves left", latents=False)
    assert main(["--source", str(source), "--out", str(out), "--captions-from", str(placed)]) == 0
    assert (out / "labels" / "x.txt").read_text() == "the first object at the top left moves left (x)\n"
    assert (out / "meta" / "x.json").resolve() == (placed / "meta" / "x.json").resolve()
    assert (out / "videos" / "x.mp4").resolve() == (source / "videos" / "x.mp4").resolve()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "{tmp}/nowhere", "--out", "{tmp}/p"], "nowhere/videos: no such folder"),
        (["--source", "{tmp}/train", "--out", "{tmp}/train"], "is a source split"),
        (["--source", "{tmp}/train", "--out", "{tmp}/p", "--count", "0"], "--count: expected"),
        (["--source", "{tmp}/train", "--out", "{tmp}/old"], "already holds 1 clips outside this selection"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    make_split(tmp_path / "train", ["a"])
    make_split(tmp_path / "old", ["z"], latents=False)
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("vae", ["kaleido-shapes/vae", "kaleido-shapes-next/vae"])
def test_first_latent_frame_is_the_first_frame_encoded_alone(vae):
    """The premise of --first-frame: the causal Wan VAE (4x temporal compression or none) encodes a
    clip's first frame alone, so the first latent frame of a clip is the latent of its first frame."""
    model = build_vae(VAEConfig(path=str(ROOT / "assets" / vae), dtype="float32"), "cpu")
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = model.encode(video)
    alone = model.encode(video[:, :, :1])
    assert whole.shape[1] > 1 and alone.shape[1] == 1
    torch.testing.assert_close(whole[:, :1], alone, rtol=0, atol=1e-5)
    assert (whole[:, 1:2] - alone).abs().max() > 1e-2  # later latent frames do differ
