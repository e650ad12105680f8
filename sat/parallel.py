"""Process groups and sequence parallelism, kept at the boundary of the model.

Layout: ``world = data_parallel × cfg_parallel × sequence_parallel`` (the release: CFG-parallel 1);
a sequence-parallel (SP) group is a block of consecutive ranks, a video group (the ranks that make
one video: CFG × SP) a block of consecutive SP groups, and a CFG group the ranks of one video group
at the same SP position (rank = ((dp · cfg) + cfg_rank) · sp + sp_rank). Within an SP group every
rank holds one slice of the latent and of every reference latent along H or W (spec-dit §3.5); the
DiT runs on its slice with the slice's RoPE offset, and self-attention is wrapped in a Ulysses
all-to-all (scatter heads, gather tokens, attend, scatter tokens back, gather heads).
Cross-attention needs no communication: each rank's queries attend to the full text, which every
rank has. The model itself never calls a collective: the caller passes a ``UlyssesAttention`` to
the model's public attention hook (``KaleidoDiT.set_self_attention``;
``sgm.pipeline.enable_sequence_parallel``). CFG-parallel lives in the sampler's denoiser
(``sgm.diffusion.sampling.guided_denoiser``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous that must not clash with other jobs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits: data-parallel index, CFG rank, rank inside its SP group."""

    world_size: int = 1
    rank: int = 0
    sp_size: int = 1
    sp_group: object | None = None  # torch.distributed ProcessGroup, None without SP
    cfg_size: int = 1
    cfg_group: object | None = None  # the ranks that split one step's guidance evaluations, None without
    video_group: object | None = None  # the CFG × SP ranks of one video, None when that is one rank

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def cfg_rank(self) -> int:
        return (self.rank // self.sp_size) % self.cfg_size

    @property
    def video_size(self) -> int:
        return self.sp_size * self.cfg_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.video_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.video_size

    @property
    def is_sp_leader(self) -> bool:
        return self.sp_rank == 0

    @property
    def is_video_leader(self) -> bool:
        """The one rank of a video group that decodes, writes and logs."""
        return self.rank % self.video_size == 0


def check_layout(world: int, *, sp_size: int, cfg_size: int) -> None:
    """Raise ``ValueError`` unless ``world`` processes split into data × CFG × SP."""
    if sp_size < 1 or cfg_size < 1:
        raise ValueError(f"sequence_parallel_size ({sp_size}) and cfg_parallel_size ({cfg_size}) must be 1 or more")
    if world % (sp_size * cfg_size):
        raise ValueError(
            f"{world} process(es) do not split into cfg_parallel_size {cfg_size} × sequence_parallel_size {sp_size}"
            f" (world = data × cfg × sp: launch a multiple of {sp_size * cfg_size} processes)"
        )


def init_parallel(sp_size: int, device: torch.device, cfg_size: int = 1) -> ParallelState:
    """Initialise torch.distributed when launched by torchrun and build the SP, CFG and video groups.

    Without torchrun (no ``WORLD_SIZE``) this is a single process and both sizes must be 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world, sp_size=sp_size, cfg_size=cfg_size)
    if world == 1:
        return ParallelState()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    video = sp_size * cfg_size
    layouts = {  # every rank must create every group, in the same order
        "sp": [list(range(s, s + sp_size)) for s in range(0, world, sp_size)],
        "cfg": [[v + c * sp_size + s for c in range(cfg_size)] for v in range(0, world, video) for s in range(sp_size)],
        "video": [list(range(v, v + video)) for v in range(0, world, video)],
    }
    groups = {}
    for kind, all_ranks in layouts.items():
        for ranks in all_ranks:
            created = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                groups[kind] = created
    return ParallelState(
        world_size=world,
        rank=rank,
        sp_size=sp_size,
        sp_group=groups["sp"],
        cfg_size=cfg_size,
        cfg_group=groups["cfg"],
        video_group=groups["video"],
    )


def split_dim(latent_height: int, sp_size: int, preference: str = "auto", *, patch: tuple[int, int]) -> int:
    """Latent axis to split: 3 (H) or 4 (W) of ``[B, T, C, H, W]``.

    ``auto`` follows the release: H when every shard keeps a whole number of patch rows
    (``patch`` = the DiT's ``(ph, pw)``), else W.
    """
    if preference == "height":
        return 3
    if preference == "width":
        return 4
    if preference != "auto":
        raise ValueError(f"sp_split must be auto, height or width, got '{preference}'")
    return 3 if latent_height % (patch[0] * sp_size) == 0 else 4


def shard(x: torch.Tensor, dim: int, state: ParallelState, *, patch: tuple[int, int]) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (sizes must divide evenly into whole patches)."""
    if state.sp_size == 1:
        return x
    multiple = patch[dim - 3]
    if x.shape[dim] % (multiple * state.sp_size):
        raise ValueError(
            f"latent size {x.shape[dim]} along dim {dim} does not split into {state.sp_size} shards "
            f"of whole {patch[0]}x{patch[1]} patches"
        )
    return x.chunk(state.sp_size, dim=dim)[state.sp_rank].contiguous()


def gather(x: torch.Tensor, dim: int, state: ParallelState) -> torch.Tensor:
    """Concatenate the SP group's slices along ``dim`` (on every rank)."""
    if state.sp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.sp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.sp_group)
    return torch.cat(parts, dim=dim)


def token_offset(
    local_shape: tuple[int, ...], dim: int, state: ParallelState, *, patch: tuple[int, int]
) -> tuple[int, int]:
    """(row, column) token offset of this rank's slice: RoPE positions of the full latent."""
    tokens = local_shape[dim] // patch[dim - 3] * state.sp_rank
    return (tokens, 0) if dim == 3 else (0, tokens)


def _exchange_chunks(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    inputs = [t.contiguous() for t in x.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(size)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all with its gradient: the inverse all-to-all (scatter and gather dims swapped)."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _exchange_chunks(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange_chunks(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


class UlyssesAttention:
    """``attention(q, k, v)`` over the tokens of a whole SP group, each rank holding a slice.

    ``[B, L_local, heads, d]`` -> all-to-all -> ``[B, L_group, heads/P, d]`` -> ``inner`` ->
    all-to-all back -> ``[B, L_local, heads·d]``. Attention is permutation-equivariant and RoPE
    is applied before, so the rank-ordered token concatenation needs no reordering. ``inner`` is
    the model's attention on unmerged heads (``[B, L, heads, d]`` in and out).
    """

    def __init__(self, group, inner: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        self.group = group
        self.inner = inner
        self.communication_s = 0.0  # wall time spent in the all-to-alls (for benchmarks)

    def _exchange(self, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        start = time.perf_counter()
        out = _all_to_all(x, scatter_dim, gather_dim, self.group)
        self.communication_s += time.perf_counter() - start
        return out

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._exchange(t, scatter_dim=2, gather_dim=1) for t in (q, k, v))
        out = self.inner(q, k, v)  # [B, L_group, heads/P, d]
        return self._exchange(out, scatter_dim=1, gather_dim=2).flatten(2)


def check_heads(num_heads: int, sp_size: int) -> None:
    """Ulysses scatters attention heads: every rank of a group needs the same whole number."""
    if num_heads % sp_size:
        raise ValueError(f"sequence_parallel_size={sp_size} must divide the number of attention heads ({num_heads})")
