"""The subjects' mask on the latent grid and the subject-weighted training loss."""

import pytest
import torch

from sgm.data.subject_mask import foreground, latent_mask, subject_loss_weights, to_uint8
from sgm.diffusion.loss import rf_loss
from sgm.geometry import VideoGeometry
from sgm.models.engine import batch_subject_mask


def _pooled_by_loops(mask: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """The latent mask cell by cell: frame 0 alone, then ``temporal`` frames per latent frame."""
    n, frames, height, width = mask.shape
    spans = [(0, 1)] + [(1 + (k - 1) * temporal, 1 + k * temporal) for k in range(1, (frames - 1) // temporal + 1)]
    out = torch.zeros(n, len(spans), height // spatial, width // spatial, dtype=torch.bool)
    for b in range(n):
        for k, (start, stop) in enumerate(spans):
            for i in range(height // spatial):
                for j in range(width // spatial):
                    cell = mask[b, start:stop, i * spatial : (i + 1) * spatial, j * spatial : (j + 1) * spatial]
                    out[b, k, i, j] = bool(cell.any())
    return out


@pytest.mark.parametrize(("temporal", "spatial"), [(1, 4), (4, 8), (2, 2)])
def test_latent_mask_marks_every_cell_that_encodes_a_subject_pixel(temporal, spatial):
    generator = torch.Generator().manual_seed(temporal * 10 + spatial)
    mask = torch.rand(2, 9, 16, 24, generator=generator) > 0.97  # scattered single subject pixels
    pooled = latent_mask(mask, temporal_stride=temporal, spatial_stride=spatial)
    assert pooled.shape == (2, 8 // temporal + 1, 16 // spatial, 24 // spatial)
    assert torch.equal(pooled, _pooled_by_loops(mask, temporal, spatial))


def test_latent_mask_refuses_a_clip_the_vae_would_not_encode_whole():
    with pytest.raises(ValueError, match="expected 4k\\+1 frames"):
        latent_mask(torch.zeros(1, 8, 16, 16, dtype=torch.bool), temporal_stride=4, spatial_stride=8)


def test_a_red_square_in_a_video_in_unit_range_lands_on_its_latent_cells():
    video = torch.full((9, 3, 32, 32), (90 - 127.5) / 127.5)  # [F, 3, H, W] in [-1, 1], grey
    video[:, 0, 8:16, 4:12] = (220 - 127.5) / 127.5  # a red 8 x 8 square, still
    assert torch.equal(to_uint8(video)[0, :, 0, 0], torch.tensor([90, 90, 90], dtype=torch.uint8))
    cells = batch_subject_mask(
        {"mp4": video[None]}, VideoGeometry(temporal_stride=4, spatial_stride=4, patch_size=(1, 2, 2))
    )
    expected = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    expected[:, :, 2:4, 1:3] = True  # rows 8-15 -> cells 2, 3; columns 4-11 -> cells 1, 2
    assert torch.equal(cells, expected)
    assert torch.equal(
        foreground(to_uint8(video).transpose(0, 1)[None])[0, 0, 8:16, 4:12], torch.ones(8, 8, dtype=torch.bool)
    )


def test_precomputed_latents_without_a_mask_are_named_not_guessed():
    with pytest.raises(ValueError, match="no subject_mask; run tools/precompute_latents.py again"):
        batch_subject_mask({"latents": torch.zeros(1, 2, 4, 4, 4)}, VideoGeometry(1, 4, (1, 2, 2)))


def test_subject_weighted_loss_matches_its_closed_form():
    """Error only on the background: the weighted loss is the background's share of the weights."""
    x0 = torch.zeros(2, 3, 4, 8, 8)
    noise = torch.ones_like(x0)  # target velocity: noise - x0 = 1 everywhere
    mask = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    mask[:, :, :2, :4] = True  # a subject on p = 8 of 64 cells of every frame
    error = 0.5

    def network(x, t, c, s):  # exact on the subject, off by `error` on the background
        return torch.where(mask[:, :, None].expand_as(x), 1.0, 1.0 + error)

    sigmas = torch.full((2,), 0.5)
    weights = subject_loss_weights(mask, 10.0)[:, :, None]  # [B, T, 1, h, w]
    p, w = 8 / 64, 10.0
    background_weight = 1 / (p * w + 1 - p)
    expected = (1 - p) * background_weight * error**2
    assert rf_loss(network, x0, noise, sigmas, None, None, weights).item() == pytest.approx(expected, rel=1e-6)
    assert rf_loss(network, x0, noise, sigmas, None, None).item() == pytest.approx((1 - p) * error**2, rel=1e-6)
    assert weights.mean(dim=(1, 2, 3, 4)).tolist() == pytest.approx([1.0, 1.0])
