"""Representation alignment (training key ``alignment``): targets, pooling, loss, the hooked layer, a run."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sgm.diffusion.alignment import AlignmentHead, alignment_loss, check_targets, head_outputs, pool_to_tokens
from sgm.modules.dit import DiTConfig, KaleidoDiT, init_weights
from sgm.training import DiffusionEngine
from tools.make_token_targets import clip_targets, latent_frame_groups
from tools.make_token_targets import main as make_targets
from tools.shapes_world import COLOURS, SHAPES, silhouette

ROOT = Path(__file__).resolve().parents[1]


def subject(shape: str, colour: str, x: float, y: float, size: int, frames: int = 9) -> dict:
    return {"shape": shape, "colour": colour, "motion": "still", "track": [[x, y, size]] * frames}


def test_latent_frames_encode_the_wan_vae_groups():
    assert latent_frame_groups(9, 1) == [[0]]
    assert latent_frame_groups(9, 3) == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert latent_frame_groups(9, 9) == [[k] for k in range(9)]
    with pytest.raises(ValueError, match="do not encode"):
        latent_frame_groups(9, 4)


def test_targets_are_the_drawn_silhouettes():
    # a triangle (apex up) whose 32-px box starts at pixel (16, 16), a red circle over part of it
    meta = {"subjects": [subject("triangle", "blue", 32.0, 32.0, 32), subject("circle", "red", 44.0, 44.0, 24)]}
    targets = clip_targets(meta, latent_frames=1, grid=(24, 24))  # 4-px cells
    check_targets(targets, "clip")
    assert head_outputs(targets) == (1 + len(SHAPES)) + (1 + len(COLOURS)) + 2
    shares = targets["class_shape"][0]  # [9, 24, 24]
    assert torch.allclose(shares.sum(0), torch.ones(24, 24))
    area = lambda shape, size: int((np.asarray(silhouette(shape, size)) > 127).sum())  # noqa: E731
    circle_pixels = shares[1 + SHAPES.index("circle")].sum().item() * 16
    triangle_pixels = shares[1 + SHAPES.index("triangle")].sum().item() * 16
    assert circle_pixels == pytest.approx(area("circle", 24))  # drawn last: all of it shows
    assert triangle_pixels < area("triangle", 32)  # the circle covers part of it
    colour = targets["class_colour"][0]
    assert torch.allclose(colour[1 + list(COLOURS).index("red")], shares[1 + SHAPES.index("circle")])
    # mean offsets over each subject's pixels: the circle's centroid is its centre; a lone triangle's
    # centroid lies 2/3 of the way down from its apex, i.e. 1/6 of its size below its box's centre
    weight, offset = targets["offset_weight"][0, 0], targets["offset"][0]
    circle = shares[1 + SHAPES.index("circle")]
    assert (offset * circle).sum((1, 2)).div(circle.sum()).abs().max() < 0.02
    alone = clip_targets({"subjects": [subject("triangle", "blue", 32.0, 32.0, 32)]}, 1, (24, 24))
    w = alone["offset_weight"][0, 0]
    row, column = (alone["offset"][0] * w).sum((1, 2)) / w.sum()
    assert row.item() == pytest.approx(1 / 6, abs=0.02) and abs(column.item()) < 0.02
    assert weight.max() <= 1 and (offset[:, weight == 0] == 0).all()
    rows = clip_targets(meta, 1, (24, 24), references=2)  # ref<k>.png shows subject k
    assert rows["reference_class_shape"].argmax(1).tolist() == [
        1 + SHAPES.index("triangle"),
        1 + SHAPES.index("circle"),
    ]
    assert rows["reference_class_colour"].argmax(1).tolist() == [1 + list(COLOURS).index(c) for c in ("blue", "red")]


def test_pooling_follows_the_dit_token_order():
    cells = torch.arange(2 * 4 * 3 * 4 * 6, dtype=torch.float32).view(2, 4, 3, 4, 6)  # [B, T, K, h, w]
    tokens = pool_to_tokens(cells, (2, 2, 3))  # [B, L, K], L = 2 frames x 2 rows x 2 columns
    assert tokens.shape == (2, 8, 3)
    for t in range(2):
        for r in range(2):
            for c in range(2):
                block = cells[:, 2 * t : 2 * t + 2, :, 2 * r : 2 * r + 2, 3 * c : 3 * c + 3]  # [B, 2, K, 2, 3]
                expected = block.mean(dim=(1, 3, 4))
                assert torch.allclose(tokens[:, t * 4 + r * 2 + c], expected)
    # the DiT's patch embedding orders its tokens the same way: a conv with the patch as stride, flattened
    conv = torch.nn.Conv3d(3, 3, (2, 2, 3), stride=(2, 2, 3), bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for k in range(3):
            conv.weight[k, k] = 1 / 12
    embedded = conv(cells.transpose(1, 2)).flatten(2).transpose(1, 2)
    assert torch.allclose(embedded, tokens, atol=1e-4)


def test_loss_is_soft_cross_entropy_plus_weighted_offset_error():
    # one frame, 2 x 1 cells, patch (1, 1, 1): two tokens
    targets = {
        "class_a": torch.tensor([[[[[1.0], [0.25]]], [[[0.0], [0.75]]]]]).view(1, 1, 2, 2, 1),
        "offset": torch.tensor([0.1, 0.0, -0.2, 0.0]).view(1, 1, 2, 2, 1),  # (row, column) per cell
        "offset_weight": torch.tensor([1.0, 0.5]).view(1, 1, 1, 2, 1),
    }
    check_targets({k: v[0] for k, v in targets.items()}, "batch")
    prediction = torch.tensor([[[0.0, 1.0, 0.3, 0.4], [2.0, -1.0, 0.0, 0.0]]])  # [B, L, 2 logits + 2 offsets]
    shares = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    ce = [-(shares[i] * F.log_softmax(prediction[0, i, :2], -1)).sum() for i in range(2)]
    errors = [(0.3 - 0.1) ** 2 + (0.4 + 0.2) ** 2, 0.0]
    expected = (ce[0] + ce[1]) / 2 + (1.0 * errors[0] + 0.5 * errors[1]) / 1.5
    assert alignment_loss(prediction, targets, (1, 1, 1)).item() == pytest.approx(expected.item(), rel=1e-6)
    # each reference's class, asked of every one of its tokens through the same logits
    targets["reference_class_a"] = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # [B, N = 2, K]
    references = torch.tensor([[[0.5, -0.5, 9, 9], [1.0, 1.0, 9, 9], [0.0, 2.0, 9, 9], [3.0, 0.0, 9, 9]]])
    ref_ce = [-F.log_softmax(references[0, i, :2], -1)[k] for i, k in ((0, 1), (1, 1), (2, 0), (3, 0))]
    with_references = expected + sum(ref_ce) / 4
    found = alignment_loss(prediction, targets, (1, 1, 1), references)  # 2 references of 2 tokens each
    assert found.item() == pytest.approx(with_references.item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs the references' predictions"):
        alignment_loss(prediction, targets, (1, 1, 1))


def test_bad_targets_name_what_is_wrong():
    good = {"class_a": torch.ones(1, 2, 4, 4)}
    for bad, message in (
        ({}, "no 'class_<name>'"),
        ({**good, "depth": torch.ones(1, 1, 4, 4)}, "unknown tensor 'depth'"),
        ({**good, "class_b": torch.ones(1, 2, 3, 4)}, "class_b has shape"),
        ({**good, "offset": torch.ones(1, 2, 4, 4)}, "come together"),
        ({**good, "reference_class_a": torch.ones(2, 3)}, "expected \\[N, K\\] with class_a's K"),
        ({**good, "reference_class_b": torch.ones(2, 2)}, "reference_class_b has shape"),
    ):
        with pytest.raises(ValueError, match=message):
            check_targets(bad, "f.safetensors")


def test_the_loss_reaches_the_hooked_layer_and_those_below_only():
    config = DiTConfig(
        num_layers=3, hidden_size=32, num_attention_heads=2, inner_hidden_size=64, time_freq_dim=16,
        time_embed_dim=32, text_dim=16, in_channels=4, out_channels=4, patch_size=(1, 2, 2),
    )  # fmt: skip
    torch.manual_seed(0)
    dit = KaleidoDiT(config)
    init_weights(dit, seed=0)
    engine = DiffusionEngine(dit, AlignmentHead(32, 3), alignment_layer=2)
    x, refs, context = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 1, 4, 4, 4), torch.randn(2, 5, 16)
    timesteps = torch.tensor([500.0, 900.0])
    shares = torch.softmax(torch.randn(2, 2, 3, 4, 4), dim=2)
    velocity, aux = engine(x, timesteps, context, refs, alignment_targets={"class_a": shares})
    with torch.no_grad():
        assert torch.allclose(velocity, dit(x, timesteps, context, refs))  # the hook leaves the output alone
    aux.backward()
    grads = [
        sum(p.grad.abs().sum().item() for p in layer.parameters() if p.grad is not None)
        for layer in dit.transformer.layers
    ]
    assert grads[0] > 0 and grads[1] > 0 and grads[2] == 0
    assert all(p.grad is None for p in dit.mixins["final_layer"].parameters())


def run_training(root: Path, save: Path, iters: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "train_video_concat.py", "--config", "configs/model/kaleido_tiny.yaml",
        "configs/training/tiny.yaml", f"data.root={root}", "data.latents=true", "micro_batch_size=2",
        "gradient_accumulation=1", f"train_iters={iters}", "save_interval=2", "alignment.layer=2", f"save={save}",
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def rows(save: Path) -> list[dict]:
    with open(save / "train_log.csv") as f:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(f)]  # not timing


def test_an_alignment_run_trains_resumes_exactly_and_samples(tmp_path):
    from tools.make_shapes_dataset import main as make_shapes

    assert make_shapes(["--out", str(tmp_path / "shapes"), "--count", "5"]) == 0
    root = tmp_path / "shapes" / "train"
    generator = torch.Generator().manual_seed(0)
    (root / "latents").mkdir()
    for label in sorted((root / "labels").iterdir()):  # random latents on the tiny VAE's grid (8x, 4x: 3 x 12 x 12)
        refs = len(list((root / "references" / label.stem).iterdir()))
        tensors = {
            "video": torch.randn(3, 16, 12, 12, generator=generator),
            "subjects": torch.randn(refs, 16, 12, 12, generator=generator),
        }
        save_file(tensors, str(root / "latents" / f"{label.stem}.safetensors"))
    assert make_targets(["--data", str(root)]) == 0
    one = load_file(str(next((root / "targets").iterdir())))
    assert one["class_shape"].shape == (3, 1 + len(SHAPES), 12, 12)

    whole = run_training(root, tmp_path / "whole", 4)
    assert whole.returncode == 0, whole.stderr[-2000:]
    first = run_training(root, tmp_path / "split", 2)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_training(root, tmp_path / "split", 4)
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-2000:]
    assert rows(tmp_path / "whole") == rows(tmp_path / "split")  # the head and its optimizer state resume too
    aux = [float(r["alignment_loss"]) for r in rows(tmp_path / "whole")]
    assert all(math.isfinite(a) and a > 0 for a in aux)

    # the samplers load the DiT of an alignment run: the head's keys are dropped
    from sgm.checkpoint import read_dit_checkpoint

    weights = read_dit_checkpoint(tmp_path / "whole")
    assert not any("alignment" in k for k in weights)
    card = json.loads((tmp_path / "whole" / "kaleido_model.json").read_text())
    assert card["name"] == "kaleido-tiny"
