"""Finite Scalar Quantization (Mentzer et al. 2023), as the release's regulariser (spec-vae §5.1).

Each code dimension ``j`` has ``L_j`` levels. ``bound`` squashes a value into the range of
``L_j`` integers (``tanh`` with a half-level offset for even ``L_j``), rounding is straight-through,
and codes are the rounded values divided by ``⌊L_j/2⌋``. A code vector maps to one integer index in
``[0, ∏ L_j)`` (mixed radix, first dimension least significant) and back. Kaleido's DiT training
does not use it; it is here for tokenizer and VAE research.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

BOUND_EPS = 1e-3


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    """``forward(z [..., dim]) -> (quantized [..., dim], indices [...] or [..., num_codebooks])``.

    Inputs with 4 or more dimensions are channel-first (``[B, C, ...]``) like images and videos.
    With ``dim != len(levels)·num_codebooks`` linear projections map in and out of code space.
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
    ):
        super().__init__()
        if any(level < 2 for level in levels):
            raise ValueError(f"every FSQ level must be at least 2, got {list(levels)}")
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), dim=0)
        self.register_buffer("basis", basis, persistent=False)
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        self.codebook_size = math.prod(levels)
        effective = self.codebook_dim * num_codebooks
        self.dim = effective if dim is None else dim
        needs_projection = self.dim != effective
        self.project_in = nn.Linear(self.dim, effective) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(effective, self.dim) if needs_projection else nn.Identity()

    @property
    def half_width(self) -> torch.Tensor:
        return self.levels // 2

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z [..., d]`` into ``(−⌊L/2⌋ − ε', ⌊(L−1)/2⌋ + ε')`` per dimension."""
        levels = self.levels.to(z.dtype)
        half = (levels - 1) * (1 + BOUND_EPS) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Codes on the grid ``{−⌊L/2⌋, …, ⌊(L−1)/2⌋} / ⌊L/2⌋`` (straight-through gradients)."""
        return round_ste(self.bound(z)) / self.half_width.to(z.dtype)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` codes -> ``[...]`` integer indices."""
        level_index = (codes * self.half_width + self.half_width).round().to(torch.int64)
        return (level_index * self.basis).sum(dim=-1)

    def indices_to_level_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """``[...]`` indices -> ``[..., d]`` codes (no projection)."""
        level_index = (indices[..., None] // self.basis) % self.levels
        return (level_index - self.half_width).to(torch.float32) / self.half_width

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (``[...]`` or ``[..., num_codebooks]``) -> features in the input space."""
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        codes = self.indices_to_level_codes(indices).flatten(-2)  # [..., num_codebooks·d]
        return self.project_out(codes)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channel_first = z.ndim >= 4
        if channel_first:  # [B, C, *spatial] -> [B, N, C]
            spatial = z.shape[2:]
            z = z.flatten(2).transpose(1, 2)
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ: expected {self.dim} features, got {z.shape[-1]}")
        with torch.autocast(z.device.type, enabled=False):
            z = self.project_in(z.float())
            z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))  # [..., c, d]
            codes = self.quantize(z)
            indices = self.codes_to_indices(codes)  # [..., c]
            out = self.project_out(codes.flatten(-2))
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        if channel_first:
            out = out.transpose(1, 2).unflatten(2, spatial)
            indices = indices.unflatten(1, spatial)
        return out, indices
