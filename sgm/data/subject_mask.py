"""Where the subjects are: a pixel mask of a clip with a plain background, pooled to the latent grid.

Used to weight training losses toward the subjects (the VAE's in ``tools/train_vae.py``, the DiT's
through ``subject_loss_weight``): in the demo world the flat background covers most of every clip
and otherwise dominates the loss. The rule assumes a plain background (the demo world's); for real
footage a segmentation model's masks would take its place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOREGROUND_THRESHOLD = 30  # summed |RGB - background| (of 765) above which a pixel is a subject's


def foreground(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, F, H, W]`` uint8 -> bool ``[N, F, H, W]``: the pixels of subjects.

    A pixel is foreground when it differs from its item's background (the per-channel median of the
    first frame: the world's backgrounds are plain and cover most of every frame) by more than
    ``FOREGROUND_THRESHOLD`` in summed absolute RGB.
    """
    background = x[:, :, 0].flatten(2).median(dim=2).values  # [N, 3]
    difference = (x.int() - background[:, :, None, None, None].int()).abs().sum(dim=1)  # [N, F, H, W]
    return difference > FOREGROUND_THRESHOLD


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """A video in [-1, 1] (``sgm.data.video.read_video``'s ``(v - 127.5) / 127.5``) back to its uint8 values."""
    return (video.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def latent_mask(mask: torch.Tensor, *, temporal_stride: int, spatial_stride: int) -> torch.Tensor:
    """Pool a pixel mask ``[N, F, H, W]`` (bool) onto the VAE's latent grid ``[N, T, h, w]`` (bool).

    A latent cell is a subject's when any pixel it encodes is. The Wan VAE encodes frame 0 alone
    and then ``temporal_stride`` frames per latent frame, so latent frame ``k ≥ 1`` covers frames
    ``1 + (k − 1)·s … k·s``; ``F`` must be ``s·(T − 1) + 1`` and ``H, W`` multiples of the spatial stride.
    """
    n, frames, height, width = mask.shape
    if (frames - 1) % temporal_stride or height % spatial_stride or width % spatial_stride:
        raise ValueError(
            f"mask of {frames} frames of {height}x{width}: expected {temporal_stride}k+1 frames and a size "
            f"that is a multiple of {spatial_stride}"
        )
    pooled = F.max_pool2d(mask.float().flatten(0, 1)[:, None], spatial_stride)  # [N*F, 1, h, w]
    pooled = pooled.view(n, frames, *pooled.shape[-2:])  # [N, F, h, w]
    first = pooled[:, :1]
    rest = pooled[:, 1:].unflatten(1, (-1, temporal_stride)).amax(dim=2)  # [N, T - 1, h, w]
    return torch.cat([first, rest], dim=1) > 0


def subject_loss_weights(mask: torch.Tensor, subject_weight: float) -> torch.Tensor:
    """Per-element loss weights of a subjects' mask ``[N, ...]`` (same shape, float32):
    ``subject_weight`` on the subjects' elements, 1 elsewhere, scaled so that every item's weights
    average 1 (the loss keeps its scale whatever share of an item the subjects cover)."""
    weights = 1 + (subject_weight - 1) * mask.float()
    return weights / weights.mean(dim=tuple(range(1, weights.dim())), keepdim=True)
