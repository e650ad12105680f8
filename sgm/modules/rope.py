"""3D rotary position embedding of the Kaleido DiT (spec-dit-diffusion.md §3).

Every token has a position ``(t, h, w)``. The head dimension is split into a time part and two
equal spatial parts (44/42/42 for head dim 128), each rotated by its own axis' angle, with
*interleaved* pairs (dims ``2j, 2j+1`` form one complex number, as in Wan).

Positions (release flags shiftT/H/W True, overloop True, rope_continue False, front concat):
- video frame ``f``, token row ``r``, column ``c``: ``(f, r, c)`` (exactly Wan's RoPE);
- subject ``k``, token ``(r, c)``: ``(k, 80 + r, 80 + c)``. All subjects share one spatial window
  and differ only by the temporal index, which coincides with video frames 0, 1, 2 (what the
  released checkpoint was trained with).

The release precomputes ``[27, 400, 400, 128]`` cos/sin tables (4 GiB); here angles are computed
for the positions in use only, in float32 like the release's tables.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Rotary dims for (time, height, width): ``2·⌊d/6⌋`` for each spatial axis, the rest for time."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(2j/dim)`` for ``j < dim/2``, in float32 as the release computes them."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    return 1.0 / (theta**exponents)


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one forward come from: subject blocks first, then the video.

    ``video_grid`` is the video token grid ``(T, h, w)``; ``subject_grids`` the token grid
    ``(h_k, w_k)`` of each single-frame subject, in sequence order.
    """

    video_grid: tuple[int, int, int]
    subject_grids: tuple[tuple[int, int], ...] = ()

    @property
    def num_subject_tokens(self) -> int:
        return sum(h * w for h, w in self.subject_grids)

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.video_grid
        return t * h * w


def grid_positions(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """All ``(t, h, w)`` combinations in row-major order (t slowest): ``[len(t)·len(h)·len(w), 3]``."""
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)], dim=1)


def token_positions(
    layout: TokenLayout,
    subject_origin: tuple[int, int],
    spatial_shift: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Integer positions ``[L, 3]`` of every token of ``layout``, in sequence order.

    ``spatial_shift`` is the (row, column) token offset of a sequence-parallel shard; it moves
    the video tokens and the subjects' origin alike, as the release does (spec §3.5).
    """
    shift_h, shift_w = spatial_shift
    blocks = []
    for k, (h, w) in enumerate(layout.subject_grids):
        blocks.append(
            grid_positions(
                torch.tensor([k]),
                torch.arange(h) + subject_origin[0] + shift_h,
                torch.arange(w) + subject_origin[1] + shift_w,
            )
        )
    t, h, w = layout.video_grid
    blocks.append(grid_positions(torch.arange(t), torch.arange(h) + shift_h, torch.arange(w) + shift_w))
    return torch.cat(blocks, dim=0)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angle of each interleaved pair: ``[L, head_dim/2]`` float32, ordered t | h | w."""
    dims = rope_axis_dims(head_dim)
    parts = [
        positions[:, axis, None].to(torch.float32) * inverse_frequencies(dim, theta)[None, :]
        for axis, dim in enumerate(dims)
    ]
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, L, heads, head_dim]`` by angles with ``cos/sin [L, head_dim/2]``.

    ``(x0, x1) -> (x0·cos − x1·sin, x1·cos + x0·sin)``, computed in ``x.dtype`` with ``cos/sin``
    already in that dtype: the release rounds its tables to bf16 and rotates in bf16, one rounding
    per product and per sum, which the explicit formula reproduces. In float32 the same product
    is one complex multiplication (one pass instead of seven; equal up to float32 rounding).
    """
    if x.dtype == torch.float32:
        rotation = torch.complex(cos, sin)[:, None, :]  # [L, 1, head_dim/2], shared by all heads
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # [B, L, heads, head_dim/2]
        return torch.view_as_real(pairs * rotation).flatten(-2)
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, heads, head_dim/2] each
    cos = cos[:, None, :]  # [L, 1, head_dim/2], shared by all heads
    sin = sin[:, None, :]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


class RopeCache:
    """cos/sin of the angles of a token layout, per device and dtype (a few layouts at most).

    Sampling calls the network 100 times on one layout; training sees a handful of sizes.
    """

    def __init__(self, head_dim: int, theta: float, subject_origin: tuple[int, int], max_entries: int = 8):
        self.head_dim = head_dim
        self.theta = theta
        self.subject_origin = subject_origin
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()

    def get(
        self,
        layout: TokenLayout,
        device: torch.device,
        dtype: torch.dtype,
        spatial_shift: tuple[int, int] = (0, 0),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layout, spatial_shift, str(device), dtype)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        positions = token_positions(layout, self.subject_origin, spatial_shift)
        angles = rope_angles(positions, self.head_dim, self.theta)
        value = (angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype))
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value
