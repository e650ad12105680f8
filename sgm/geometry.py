"""The one place that turns pixel sizes and frame counts into latent shapes and token counts.

A video of ``F`` frames of ``H × W`` pixels becomes, through a VAE of temporal stride ``t`` and
spatial stride ``s``, a latent of ``1 + (F − 1)/t`` frames of ``H/s × W/s``; the DiT then cuts each
latent frame into patches of ``(1, ph, pw)``. Both factors come from configs: the strides from
the VAE's own configuration (``sgm.models.wan_vae.vae_strides``), the patch from the DiT's
architecture. Wan2.1's VAE is ``t = 4, s = 8`` and Kaleido's patch ``(1, 2, 2)``, so a 512 × 896
video of 81 frames is a 21 × 64 × 112 latent and 21 × 32 × 56 video tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoGeometry:
    """VAE strides and DiT patch: every shape and count derived from them."""

    temporal_stride: int
    spatial_stride: int
    patch_size: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.temporal_stride < 1 or self.spatial_stride < 1 or len(self.patch_size) != 3:
            raise ValueError(
                f"bad geometry: strides ({self.temporal_stride}, {self.spatial_stride}), {self.patch_size}"
            )

    @property
    def pixel_multiple(self) -> tuple[int, int]:
        """(height, width) multiples a video must have: whole latent pixels and whole patches."""
        return self.spatial_stride * self.patch_size[1], self.spatial_stride * self.patch_size[2]

    def video_frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames`` latent frames (the first latent frame is one frame)."""
        return self.temporal_stride * (latent_frames - 1) + 1

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames of a ``video_frames``-frame clip; raises unless it is ``t·k + 1`` frames."""
        if video_frames < 1 or (video_frames - 1) % self.temporal_stride:
            raise ValueError(
                f"{video_frames} frames: expected {self.temporal_stride}k+1 frames "
                f"(the VAE's temporal stride is {self.temporal_stride})"
            )
        return (video_frames - 1) // self.temporal_stride + 1

    def largest_video_frames(self, available: int) -> int:
        """The largest valid frame count (``t·k + 1``) not above ``available``."""
        return self.video_frames((available - 1) // self.temporal_stride + 1)

    def check_size(self, height: int, width: int, what: str = "video size") -> None:
        mh, mw = self.pixel_multiple
        if height <= 0 or width <= 0 or height % mh or width % mw:
            raise ValueError(f"{what}: expected height a multiple of {mh} and width of {mw}, got {height}x{width}")

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the latent of a ``height × width`` frame."""
        self.check_size(height, width)
        return height // self.spatial_stride, width // self.spatial_stride

    def latent_shape(self, *, height: int, width: int, latent_frames: int, channels: int) -> tuple[int, int, int, int]:
        """``(T, C, h, w)`` of the latent of a ``height × width`` video with ``latent_frames`` frames."""
        return (latent_frames, channels, *self.latent_size(height, width))

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Video tokens of one latent frame: what the training shift is a function of."""
        return (latent_height // self.patch_size[1]) * (latent_width // self.patch_size[2])

    def tokens(self, *, height: int, width: int, latent_frames: int, references: int) -> int:
        """Sequence length of the DiT: video tokens plus one frame of tokens per reference."""
        h, w = self.latent_size(height, width)
        return (latent_frames + references) * self.tokens_per_frame(h, w)
