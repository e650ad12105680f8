"""The Kaleido DiT: Wan2.1's diffusion transformer with subject tokens, in the SAT key layout.

spec-dit-diffusion.md §1–4 is the numerical truth. One forward:

1. Subject latents (one frame each) are placed in front of the video latents along time and
   patch-embedded by the same Conv3d: ``[subject 0 | subject 1 | ... | frame 0 | ... | frame T-1]``.
2. Timestep ``1000·σ`` -> sinusoid (cos first, float64) -> MLP -> ``emb``; one shared projection
   gives six modulation vectors, to which each layer adds its learned offsets. They apply to
   every token, subjects included (``subject_timestep``, not in the release, gives the subjects
   their own).
3. Each layer: modulated LN -> self-attention (q/k RMSNorm over the full width, 3D RoPE) ->
   gated residual; affine LN -> cross-attention of every token to the text -> residual;
   modulated LN -> GELU(tanh) MLP -> gated residual.
4. The final layer drops the subject tokens; unpatchify to ``[B, T, C, H, W]``.

Numerics: the weights' dtype is the compute dtype. The release runs in bf16 with these float32
islands, kept here so that released weights give the release's numbers: LayerNorm/RMSNorm
internals (RMSNorm gain applied in float32, then one rounding), the timestep sinusoid (float64,
then rounded), RoPE tables (float32, rounded to the activation dtype before use). The three
"row-parallel" linears of SAT add their bias after the matmul, as a separate op (spec §2.3).

State-dict keys (without the engine prefix ``model.diffusion_model.``):

| key | module |
|---|---|
| ``time_embed.{0,2}`` | Linear(freq -> D), SiLU, Linear(D -> D) |
| ``adaln_projection.1`` | SiLU, Linear(D -> 6D), shared by all layers |
| ``text_embedding.{0,2}`` | Linear(text -> D), GELU(tanh), Linear(D -> D) |
| ``transformer.layers.i.attention.{query_key_value,dense}`` | fused QKV (rows q, k, v), output |
| ``transformer.layers.i.cross_attention.{query,key_value,dense}`` | cross-attention (kv rows k, v) |
| ``transformer.layers.i.post_cross_attention_layernorm`` | affine LN before cross-attention |
| ``transformer.layers.i.mlp.{dense_h_to_4h,dense_4h_to_h}`` | FFN |
| ``mixins.adaln_layer.adaLN_modulations.i`` | ``[1, 6, D]`` per-layer modulation offsets |
| ``mixins.adaln_layer.{query,key,cross_query,cross_key}_layernorm_list.i.weight`` | q/k RMSNorm gains |
| ``mixins.patch_embed.proj`` | Conv3d(C -> D, kernel = stride = patch) |
| ``mixins.final_layer.{linear,adaLN_modulation}`` | head and its ``[1, 2, D]`` offsets |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sgm.modules.attention import attention
from sgm.modules.rope import RopeCache, TokenLayout, apply_rope

# The release adds 80 (its config's max_h / max_w) to subject token rows and columns.
SUBJECT_ROPE_ORIGIN = (80, 80)


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the DiT; field names follow the release's model YAML."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    inner_hidden_size: int
    time_freq_dim: int = 256
    time_embed_dim: int | None = None  # None: equal to hidden_size (the only value the release supports)
    text_dim: int = 4096
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    layernorm_epsilon: float = 1e-6
    rope_theta: float = 10000.0
    subject_rope_origin: tuple[int, int] = SUBJECT_ROPE_ORIGIN
    # None (the release): subject tokens are modulated with the sample's timestep, like the video.
    # A number: the timestep (1000·σ) their modulation is computed from instead, e.g. 0 for the
    # clean latents they are (Wan2.2 TI2V's per-token timesteps give its clean first frame t = 0).
    subject_timestep: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "subject_rope_origin", tuple(self.subject_rope_origin))
        if self.time_embed_dim is None:
            object.__setattr__(self, "time_embed_dim", self.hidden_size)
        problems = []
        for name in ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "text_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid DiT architecture: " + "; ".join(problems))
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by num_attention_heads")
        elif self.head_dim % 2 or self.head_dim < 6:
            problems.append(f"head dim {self.head_dim} must be even and at least 6 for 3D RoPE")
        if self.time_embed_dim != self.hidden_size:
            problems.append(
                "time_embed_dim must equal hidden_size (shared adaLN and final layer add it to D-wide offsets)"
            )
        if self.time_freq_dim % 2:
            problems.append(f"time_freq_dim {self.time_freq_dim} must be even")
        if self.subject_timestep is not None and not 0 <= self.subject_timestep <= 1000:
            problems.append(f"subject_timestep {self.subject_timestep} must be in [0, 1000] (1000·σ) or unset")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            problems.append(f"patch_size {self.patch_size} must be (1, ph, pw): subjects are single latent frames")
        if problems:
            raise ValueError("invalid DiT architecture: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# ---------------------------------------------------------------------------------------------
# Maths as pure functions


def timestep_sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t·f_j), sin(t·f_j)]`` with ``f_j = exp(-ln(max_period)·j/(dim/2))``: ``[B, dim]`` float64.

    The frequencies are float64 and the timesteps float32, so the products are float64 (release).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    args = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm computed in float32 and rounded once to ``x.dtype``."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the gain applied in float32 before the one rounding to ``x.dtype`` (Kaleido, not Wan)."""
    return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def token_modulation(
    video: torch.Tensor, subjects: torch.Tensor | None, num_subject_tokens: int, num_tokens: int
) -> torch.Tensor:
    """Modulation vectors ``[B, K, D]`` -> per-token ``[B, K, L, D]`` for a layer to ``unbind``.

    Without ``subjects`` every token shares ``video`` (a broadcast view ``[B, K, 1, D]``, no copy);
    with them the first ``num_subject_tokens`` tokens take ``subjects`` and the rest ``video``.
    """
    video = video[:, :, None, :]  # [B, K, 1, D]
    if subjects is None or num_subject_tokens == 0:
        return video
    batch, parts, _, dim = video.shape
    return torch.cat(
        [
            subjects[:, :, None, :].expand(batch, parts, num_subject_tokens, dim),
            video.expand(batch, parts, num_tokens - num_subject_tokens, dim),
        ],
        dim=2,
    )  # [B, K, L, D]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation), in place when no gradient is needed: same values, no new buffer
    (on CPU a fresh ``[L, FFN]`` buffer costs more in page faults than the GELU itself)."""
    if x.requires_grad:
        return F.gelu(x, approximate="tanh")
    return torch.ops.aten.gelu_(x, approximate="tanh")


def gated_residual(h: torch.Tensor, gate: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    """``h + gate·update`` (``h + update`` without a gate), rounding as the release does.

    Without gradients the sum is written into ``h`` (identical values, one buffer less).
    """
    if gate is not None:
        update = gate * update
    if h.requires_grad or update.requires_grad:
        return h + update
    return h.add_(update)


def split_projection(x: torch.Tensor, layer: nn.Linear, parts: int) -> list[torch.Tensor]:
    """A fused projection (rows q, k, v or k, v) as ``parts`` matmuls on row blocks of its weight.

    Same values as one matmul then ``chunk``, but each output is contiguous, so the norms and
    attention that follow need no copies.
    """
    weights = layer.weight.chunk(parts, dim=0)
    biases = layer.bias.chunk(parts, dim=0)
    return [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]


def linear_bias_after(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """SAT's row-parallel linear: matmul, then the bias as a separate addition.

    In float32 this is ``F.linear`` up to the order of one addition, so the fused call is used;
    in bf16 the separate rounding of the matmul result is part of the release's numbers.
    """
    if x.dtype == torch.float32:
        return F.linear(x, layer.weight, layer.bias)
    out = F.linear(x, layer.weight)
    if out.requires_grad:
        return out + layer.bias
    return out.add_(layer.bias)  # same rounding, no second [B, L, D] buffer


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """``[B, T·h·w, pt·ph·pw·C]`` (channel innermost, as Wan's head) -> ``[B, T·pt, C, h·ph, w·pw]``."""
    t, h, w = grid
    pt, ph, pw = patch
    x = tokens.view(tokens.shape[0], t, h, w, pt, ph, pw, channels)
    x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)  # [B, t, pt, C, h, ph, w, pw]
    return x.reshape(tokens.shape[0], t * pt, channels, h * ph, w * pw)


# ---------------------------------------------------------------------------------------------
# Modules (names follow the SAT checkpoint layout)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class QKNorms(NamedTuple):
    """The four RMSNorms of one layer (stored in the adaLN mixin by the SAT layout)."""

    query: RMSNorm
    key: RMSNorm
    cross_query: RMSNorm
    cross_key: RMSNorm


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        # Replaced through KaleidoDiT.set_self_attention (sequence parallelism, caching, offload).
        self.attention_fn = attention
        self.query_key_value = nn.Linear(dim, 3 * dim, device=device, dtype=dtype)
        self.dense = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, norms: QKNorms, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = split_projection(x, self.query_key_value, 3)  # [B, L, D] each
        q = apply_rope(norms.query(q).unflatten(-1, (self.heads, -1)), cos, sin)  # [B, L, heads, d]
        k = apply_rope(norms.key(k).unflatten(-1, (self.heads, -1)), cos, sin)
        v = v.unflatten(-1, (self.heads, -1))
        return linear_bias_after(self.attention_fn(q, k, v), self.dense)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.key_value = nn.Linear(dim, 2 * dim, device=device, dtype=dtype)
        self.dense = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, norms: QKNorms) -> torch.Tensor:
        q = norms.cross_query(self.query(x)).unflatten(-1, (self.heads, -1))  # [B, L, heads, d]
        k, v = split_projection(context, self.key_value, 2)  # [B, Lt, D] each
        k = norms.cross_key(k).unflatten(-1, (self.heads, -1))
        v = v.unflatten(-1, (self.heads, -1))
        return linear_bias_after(attention(q, k, v), self.dense)


class Scratch:
    """One reusable buffer per dtype for the MLP's ``[L, FFN]`` activation during CPU inference.

    On CPU every fresh large tensor is paid for in page faults (about 25 ms per 100 MB here, a
    few percent of a forward); the CUDA caching allocator needs no such help, and autograd needs
    its own tensors, so the buffer is only used on CPU without gradients. It lives as long as the
    model (``clear()`` frees it).
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        if like.device.type != "cpu" or torch.is_grad_enabled():
            return None
        numel = math.prod(shape)
        buffer = self._buffers.get(like.dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[like.dtype] = torch.empty(numel, dtype=like.dtype)
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


class MLP(nn.Module):
    def __init__(self, dim: int, inner: int, scratch: Scratch | None = None, device=None, dtype=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(dim, inner, device=device, dtype=dtype)
        self.dense_4h_to_h = nn.Linear(inner, dim, device=device, dtype=dtype)
        self.scratch = scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.dense_h_to_4h
        rows = x.reshape(-1, x.shape[-1])  # [B·L, D]
        out = None if self.scratch is None else self.scratch.get((rows.shape[0], fc1.out_features), x)
        if out is None:
            hidden = fc1(x)
        else:  # the same addmm as F.linear, written into the reused buffer
            hidden = torch.addmm(fc1.bias, rows, fc1.weight.t(), out=out).view(*x.shape[:-1], -1)
        return linear_bias_after(gelu_tanh(hidden), self.dense_4h_to_h)


class TransformerLayer(nn.Module):
    """One block: self-attention -> cross-attention -> MLP (Wan order). The pre-norms have no parameters."""

    def __init__(self, config: DiTConfig, scratch: Scratch | None = None, device=None, dtype=None):
        super().__init__()
        dim, heads = config.hidden_size, config.num_attention_heads
        self.eps = config.layernorm_epsilon
        self.attention = SelfAttention(dim, heads, device=device, dtype=dtype)
        self.post_cross_attention_layernorm = nn.LayerNorm(dim, eps=self.eps, device=device, dtype=dtype)
        self.cross_attention = CrossAttention(dim, heads, device=device, dtype=dtype)
        self.mlp = MLP(dim, config.inner_hidden_size, scratch, device=device, dtype=dtype)
        # Without gradients the residuals are added into the input in place (one buffer for the whole
        # network). A step cache compares a block's output with its input and keeps outputs across
        # blocks, so it sets this: the block then works on a copy and leaves its input untouched.
        self.keep_input = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        modulation: torch.Tensor,
        norms: QKNorms,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """``hidden_states [B, L, D]`` (subjects and video), ``context [B, Lt, D]``, ``modulation [B, 6, 1
        or L, D]`` (shared or per token: ``token_modulation``). (The first argument's name is what
        diffusers' cache hooks look for: ``sgm.diffusion.step_cache``.)"""
        h = hidden_states if not self.keep_input else hidden_states.clone()
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.unbind(1)  # [B, 1 or L, D]

        a = modulate(layer_norm(h, None, None, self.eps), shift_msa, scale_msa)
        h = gated_residual(h, gate_msa, self.attention(a, norms, cos, sin))

        norm = self.post_cross_attention_layernorm
        c = layer_norm(h, norm.weight, norm.bias, self.eps)
        h = gated_residual(h, None, self.cross_attention(c, context, norms))

        m = modulate(layer_norm(h, None, None, self.eps), shift_mlp, scale_mlp)
        return gated_residual(h, gate_mlp, self.mlp(m))


class Transformer(nn.Module):
    def __init__(self, config: DiTConfig, scratch: Scratch | None = None, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(
            [TransformerLayer(config, scratch, device, dtype) for _ in range(config.num_layers)]
        )


class AdaLNMixin(nn.Module):
    """Per-layer parameters that the SAT layout keeps outside the layers."""

    def __init__(self, config: DiTConfig, device=None, dtype=None):
        super().__init__()
        dim, n, eps = config.hidden_size, config.num_layers, config.layernorm_epsilon
        self.adaLN_modulations = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, 6, dim, device=device, dtype=dtype)) for _ in range(n)]
        )
        self.query_layernorm_list = nn.ModuleList([RMSNorm(dim, eps, device, dtype) for _ in range(n)])
        self.key_layernorm_list = nn.ModuleList([RMSNorm(dim, eps, device, dtype) for _ in range(n)])
        self.cross_query_layernorm_list = nn.ModuleList([RMSNorm(dim, eps, device, dtype) for _ in range(n)])
        self.cross_key_layernorm_list = nn.ModuleList([RMSNorm(dim, eps, device, dtype) for _ in range(n)])

    def norms(self, i: int) -> QKNorms:
        return QKNorms(
            self.query_layernorm_list[i],
            self.key_layernorm_list[i],
            self.cross_query_layernorm_list[i],
            self.cross_key_layernorm_list[i],
        )


class PatchEmbedMixin(nn.Module):
    def __init__(self, config: DiTConfig, device=None, dtype=None):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, p, stride=p, device=device, dtype=dtype)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, F, C, H, W]`` (time before channel) -> tokens ``[B, F·h·w, D]`` in (f, row, col) order."""
        x = self.proj(latents.transpose(1, 2))  # [B, D, F, h, w]
        return x.flatten(2).transpose(1, 2)


class FinalLayerMixin(nn.Module):
    def __init__(self, config: DiTConfig, device=None, dtype=None):
        super().__init__()
        dim = config.hidden_size
        self.eps = config.layernorm_epsilon
        self.linear = nn.Linear(dim, math.prod(config.patch_size) * config.out_channels, device=device, dtype=dtype)
        self.adaLN_modulation = nn.Parameter(torch.zeros(1, 2, dim, device=device, dtype=dtype))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``h [B, L_video, D]``, ``emb [B, D]`` (no SiLU) -> ``[B, L_video, pt·ph·pw·C]``."""
        shift, scale = (emb[:, None, :] + self.adaLN_modulation).chunk(2, dim=1)  # [B, 1, D] each
        return self.linear(modulate(layer_norm(h, None, None, self.eps), shift, scale))


Subjects = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] | None


class KaleidoDiT(nn.Module):
    """``dit(x, timesteps, context, subjects=None) -> velocity`` (ARCHITECTURE.md "Contracts -> DiT").

    - ``x``: ``[B, T, C, H, W]`` noisy latents, time before channel.
    - ``timesteps``: ``[B]``, ``1000·σ`` (continuous).
    - ``context``: ``[B, L_text, text_dim]`` text embeddings (padded positions are attended to).
    - ``subjects``: ``None`` (text-to-video, then exactly Wan2.1's network), one tensor
      ``[B, N, C, H, W]`` with the video's size, or a list of ``[B, 1, C, h_k, w_k]`` latents of
      their own sizes. CFG batching is the caller's job: the batch must equal ``x``'s.
    - returns ``[B, T, C_out, H, W]`` in the weights' dtype; subject tokens never reach the output.
    """

    def __init__(self, config: DiTConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        kw = {"device": device, "dtype": dtype}
        self.time_embed = nn.Sequential(
            nn.Linear(config.time_freq_dim, dim, **kw), nn.SiLU(), nn.Linear(dim, dim, **kw)
        )
        self.adaln_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, **kw))
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim, **kw), nn.GELU(approximate="tanh"), nn.Linear(dim, dim, **kw)
        )
        self.scratch = Scratch()
        self.transformer = Transformer(config, self.scratch, **kw)
        self.mixins = nn.ModuleDict(
            {
                "adaln_layer": AdaLNMixin(config, **kw),
                "patch_embed": PatchEmbedMixin(config, **kw),
                "final_layer": FinalLayerMixin(config, **kw),
            }
        )
        self.checkpoint_activations = False
        self.rope = RopeCache(config.head_dim, config.rope_theta, config.subject_rope_origin)

    @property
    def dtype(self) -> torch.dtype:
        return self.mixins["patch_embed"].proj.weight.dtype

    def set_self_attention(
        self, attention_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        """Replace every layer's self-attention function (the public hook for sequence parallelism,
        caching and offload): ``attention_fn(q, k, v)`` takes ``[B, L, heads, head_dim]`` each and
        returns ``[B, L, heads·head_dim]``, like ``sgm.modules.attention.attention`` (the default)."""
        for layer in self.transformer.layers:
            layer.attention.attention_fn = attention_fn

    def external_parameter_reads(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """``(module, parameter)`` pairs read by a module that does not own them, beyond children's
        weights read directly (ZeRO-3 must gather them for that module): the per-layer modulation
        offsets, added in ``forward``."""
        return [(self, offsets) for offsets in self.mixins["adaln_layer"].adaLN_modulations]

    def _check_latent(self, name: str, latent: torch.Tensor, batch: int) -> tuple[int, int]:
        _, ph, pw = self.config.patch_size
        if latent.ndim != 5 or latent.shape[0] != batch or latent.shape[2] != self.config.in_channels:
            raise ValueError(
                f"{name}: expected [B={batch}, frames, C={self.config.in_channels}, H, W], got {list(latent.shape)}"
            )
        if latent.shape[3] % ph or latent.shape[4] % pw:
            raise ValueError(f"{name}: H, W = {latent.shape[3]}, {latent.shape[4]} must be multiples of ({ph}, {pw})")
        return latent.shape[3] // ph, latent.shape[4] // pw

    def embed_tokens(self, x: torch.Tensor, subjects: Subjects) -> tuple[torch.Tensor, TokenLayout]:
        """Patch-embed subjects and video into one sequence ``[B, L_subjects + L_video, D]``."""
        batch, frames = x.shape[:2]
        h, w = self._check_latent("x", x, batch)
        embed = self.mixins["patch_embed"]
        x = x.to(self.dtype)
        if subjects is None or (isinstance(subjects, (list, tuple)) and len(subjects) == 0):
            return embed(x), TokenLayout((frames, h, w))
        if isinstance(subjects, torch.Tensor):
            if self._check_latent("subjects", subjects, batch) != (h, w):
                raise ValueError(
                    f"subjects: a [B, N, C, H, W] tensor must match the video's H, W = {tuple(x.shape[3:])}, "
                    f"got {tuple(subjects.shape[3:])}; pass a list for subjects of other sizes"
                )
            tokens = embed(torch.cat([subjects.to(self.dtype), x], dim=1))  # [B, (N+T)·h·w, D]
            return tokens, TokenLayout((frames, h, w), ((h, w),) * subjects.shape[1])
        blocks, grids = [], []
        for k, subject in enumerate(subjects):
            grid = self._check_latent(f"subjects[{k}]", subject, batch)
            if subject.shape[1] != 1:
                raise ValueError(f"subjects[{k}]: each subject is one latent frame, got {subject.shape[1]}")
            blocks.append(embed(subject.to(self.dtype)))
            grids.append(grid)
        blocks.append(embed(x))
        return torch.cat(blocks, dim=1), TokenLayout((frames, h, w), tuple(grids))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        subjects: Subjects = None,
        token_offset: tuple[int, int] = (0, 0),
    ) -> torch.Tensor:
        """``token_offset``: (row, column) of this input's first token in the full latent, for a
        sequence-parallel slice (RoPE positions of the video and the subjects' origin move with it)."""
        dtype, dim = self.dtype, self.config.hidden_size
        h, layout = self.embed_tokens(x, subjects)
        batch = h.shape[0]

        emb = self.time_embed(timestep_sinusoid(timesteps, self.config.time_freq_dim).to(dtype))  # [B, D]
        adaln = self.adaln_projection(emb).view(batch, 6, dim)
        subject_adaln = None
        if self.config.subject_timestep is not None and layout.num_subject_tokens:
            clean = torch.full_like(timesteps, self.config.subject_timestep, dtype=torch.float32)
            subject_emb = self.time_embed(timestep_sinusoid(clean, self.config.time_freq_dim).to(dtype))
            subject_adaln = self.adaln_projection(subject_emb).view(batch, 6, dim)
        context = self.text_embedding(context.to(dtype))  # [B, Lt, D]
        cos, sin = self.rope.get(layout, h.device, dtype, tuple(token_offset))

        adaln_mixin = self.mixins["adaln_layer"]
        for i, layer in enumerate(self.transformer.layers):
            offsets = adaln_mixin.adaLN_modulations[i]
            modulation = token_modulation(
                adaln + offsets,
                None if subject_adaln is None else subject_adaln + offsets,
                layout.num_subject_tokens,
                h.shape[1],
            )
            norms = adaln_mixin.norms(i)
            if self.checkpoint_activations and torch.is_grad_enabled():
                h = checkpoint(layer, h, context, modulation, norms, cos, sin, use_reentrant=False)
            else:
                h = layer(h, context, modulation, norms, cos, sin)

        h = h[:, layout.num_subject_tokens :]  # [B, T·h·w, D]: subject tokens never reach the head
        out = self.mixins["final_layer"](h, emb)
        return unpatchify(out, layout.video_grid, self.config.patch_size, self.config.out_channels)


def _linear_default(linear: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` init (kaiming-uniform weight, uniform bias), seeded."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(linear.in_features)
    nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


def _initializers(model: KaleidoDiT) -> list[Callable[[torch.Generator], None]]:
    """One initialiser per tensor group (spec §1.4); together they cover every parameter once."""
    config = model.config
    row_std = 0.02 / math.sqrt(2 * config.num_layers)
    jobs: list[Callable[[torch.Generator], None]] = []
    for linear in (*model.time_embed[::2], model.adaln_projection[1], *model.text_embedding[::2]):
        jobs.append(partial(_linear_default, linear))
    for layer in model.transformer.layers:
        column = (
            layer.attention.query_key_value,
            layer.cross_attention.query,
            layer.cross_attention.key_value,
            layer.mlp.dense_h_to_4h,
        )
        row = (layer.attention.dense, layer.cross_attention.dense, layer.mlp.dense_4h_to_h)
        for linear, std in [(m, 0.02) for m in column] + [(m, row_std) for m in row]:
            jobs.append(partial(nn.init.normal_, linear.weight, std=std))
            nn.init.zeros_(linear.bias)
        layer.post_cross_attention_layernorm.reset_parameters()
    adaln = model.mixins["adaln_layer"]
    norm_lists = (
        adaln.query_layernorm_list,
        adaln.key_layernorm_list,
        adaln.cross_query_layernorm_list,
        adaln.cross_key_layernorm_list,
    )
    for norm in (n for norms in norm_lists for n in norms):
        nn.init.ones_(norm.weight)
    proj = model.mixins["patch_embed"].proj
    jobs.append(partial(nn.init.xavier_uniform_, proj.weight.view(proj.weight.shape[0], -1)))
    nn.init.zeros_(proj.bias)
    final = model.mixins["final_layer"]
    jobs.append(partial(nn.init.xavier_uniform_, final.linear.weight))
    nn.init.zeros_(final.linear.bias)
    for offsets in [*adaln.adaLN_modulations, final.adaLN_modulation]:
        jobs.append(partial(nn.init.normal_, offsets, std=1 / math.sqrt(config.hidden_size)))
    return jobs


def init_weights(model: KaleidoDiT, seed: int | None = None) -> None:
    """Initialise every parameter once, as the release does for training from scratch (spec §1.4).

    Column-parallel linears (QKV, cross Q/KV, FFN-in) N(0, 0.02); row-parallel (outputs)
    N(0, 0.02/sqrt(2·layers)); those biases 0; patch conv and final linear Xavier-uniform on the
    2D view, bias 0; modulation offsets N(0, 1)/sqrt(D); time/text/adaLN projections PyTorch's
    default Linear init; norm gains 1 and the affine LayerNorm bias 0.

    Each tensor draws from its own generator, seeded from ``seed`` (default: the global torch
    RNG), so the tensors can be filled by parallel threads and the result is still deterministic:
    random fills are single-threaded in PyTorch and dominate the build time of large models.
    """
    jobs = _initializers(model)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    seeds = torch.randint(0, 2**62, (len(jobs),), generator=torch.Generator().manual_seed(seed)).tolist()
    device = next(model.parameters()).device

    def run(job_and_seed) -> None:
        job, job_seed = job_and_seed
        job(generator=torch.Generator(device=device).manual_seed(job_seed))

    with torch.no_grad(), ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        list(pool.map(run, zip(jobs, seeds, strict=True)))
