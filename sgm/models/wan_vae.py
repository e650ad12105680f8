"""The Wan2.1 video VAE: diffusers' ``AutoencoderKLWan`` behind the release's interface.

spec-vae-t5-data.md §1. The network is diffusers' (verified bit-exact with the release in
float64); this module adds what the release's wrapper does around it:

- loading the release's ``Wan2.1_VAE.pth`` (rename table of spec §1.9) or a diffusers folder,
  built on the meta device and loaded strictly with ``assign=True``;
- encoding to the posterior mean (never a sample), normalised per channel with the constants the
  release effectively uses (bf16-rounded, §1.6), laid out time-before-channel for the DiT;
- decoding with the inverse normalisation, clamped to [-1, 1];
- encoding each reference image as its own one-frame clip (the release's training path encodes
  the stack of references as one clip and keeps only the first, spec §4.3).

The VAE is frozen: no gradients, eval mode. On CUDA in bf16 it runs under autocast like the
release; on CPU in float32.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
from torch import nn

from sgm.checkpoint import StateDictMismatchError, load_strict, read_state_dict
from sgm.convert.keymap import KeyMap

RELEASE_VAE_FILE = "Wan2.1_VAE.pth"  # the release's file name (merge output, tiny assets)
# Wan2.1's per-channel latent statistics as declared (= diffusers' defaults).
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def normalization_constants(
    mean: tuple[float, ...] = LATENT_MEAN, std: tuple[float, ...] = LATENT_STD, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, multiplier)`` float32 such that ``z = (mu − shift)·multiplier``.

    The release holds mean and std in bf16 and computes ``1/std`` in bf16, so the constants the
    trained DiT saw are ``bf16(mean)`` and ``bf16(1/bf16(std))`` (up to 0.4 % off the declared
    values). ``exact=True`` uses the declared float32 values instead.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)
    if exact:
        return mean_t, 1.0 / std_t
    return mean_t.bfloat16().float(), torch.reciprocal(std_t.bfloat16()).float()


def vae_strides(config: Mapping) -> tuple[int, int]:
    """``(temporal, spatial)`` compression of an ``AutoencoderKLWan`` configuration.

    Every encoder level but the last halves H and W (``dim_mult`` has one entry per level) and,
    where ``temperal_downsample`` says so, the time axis; a ``patch_size`` (Wan2.2's VAE)
    patchifies the frames by that factor first. Wan2.1: ``(4, 8)``; Wan2.2's 16x VAE: ``(4, 16)``.
    """
    levels = len(config["dim_mult"]) - 1
    temporal = 2 ** sum(bool(t) for t in config["temperal_downsample"][:levels])
    spatial = 2**levels * int(config.get("patch_size") or 1)
    return temporal, spatial


def default_vae_config() -> dict:
    """``AutoencoderKLWan``'s constructor defaults: Wan2.1's VAE (spec-vae §1.9), 4x in time, 8x in space."""
    signature = inspect.signature(AutoencoderKLWan.__init__)
    return {name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def read_vae_strides(path: str | Path) -> tuple[int, int]:
    """``vae_strides`` of a VAE on disk without building it: a diffusers folder's ``config.json``,
    or the key shapes of a release ``.pth`` (memory-mapped)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a diffusers AutoencoderKLWan folder)")
        return vae_strides({**default_vae_config(), **json.loads(config_file.read_text())})
    try:
        return vae_strides(infer_vae_config(read_state_dict(path)))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a Wan VAE checkpoint ({exc})") from None


# diffusers' AutoencoderKLWan encodes the first frame, then chunks of 4 frames, whatever its temporal
# stride; frames after the last whole chunk are dropped silently (spec-vae §1.1, §1.4).
ENCODER_CHUNK_FRAMES = 4


def frame_multiple(temporal_stride: int) -> int:
    """A video the VAE encodes whole has ``m·k + 1`` frames: whole encoder chunks and whole strides."""
    return math.lcm(ENCODER_CHUNK_FRAMES, temporal_stride)


def check_video_shape(shape: tuple[int, ...], frames_multiple: int, spatial_stride: int, name: str = "video") -> None:
    """Videos are ``[B, 3, F, H, W]`` with ``F = m·k + 1`` and ``H, W`` multiples of the spatial stride."""
    ok = len(shape) == 5 and shape[1] == 3
    if ok:
        frames, height, width = shape[2:]
        ok = (frames - 1) % frames_multiple == 0 and height % spatial_stride == 0 and width % spatial_stride == 0
    if not ok:
        raise ValueError(
            f"{name}: expected [B, 3, F, H, W] with F = {frames_multiple}k+1 frames and H, W multiples of "
            f"{spatial_stride}, got {list(shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Wan2.1_VAE.pth <-> diffusers key names (spec §1.9), as a KeyMap per architecture

# Leaves inside a residual block or resampler (rule 7); resampler leaves keep their names.
_BLOCK_LEAVES = {
    "residual.0": "norm1",
    "residual.2": "conv1",
    "residual.3": "norm2",
    "residual.6": "conv2",
    "shortcut": "conv_shortcut",
    "resample.1": "resample.1",
    "time_conv": "time_conv",
}
_ATTENTION_LEAVES = ("norm", "to_qkv", "proj")


def vae_keymap(num_res_blocks: int, levels: int) -> KeyMap:
    """The release -> diffusers ``KeyMap`` of a Wan VAE with ``levels`` levels of ``num_res_blocks``.

    The decoder's flat ``upsamples`` list holds ``num_res_blocks + 1`` residual blocks and one
    upsampler per level (rule 6 with Wan2.1's stride 4): its entries are listed one by one.
    """
    renames = {"conv1": "quant_conv", "conv2": "post_quant_conv"}  # rule 1
    for part in ("encoder", "decoder"):
        renames[f"{part}.conv1"] = f"{part}.conv_in"  # rule 2
        renames[f"{part}.head.0"] = f"{part}.norm_out"  # rule 3
        renames[f"{part}.head.2"] = f"{part}.conv_out"
        for old, new in (("0", "resnets.0"), ("2", "resnets.1")):  # rule 4
            for leaf, leaf_new in _BLOCK_LEAVES.items():
                renames[f"{part}.middle.{old}.{leaf}"] = f"{part}.mid_block.{new}.{leaf_new}"
        for leaf in _ATTENTION_LEAVES:
            renames[f"{part}.middle.1.{leaf}"] = f"{part}.mid_block.attentions.0.{leaf}"
    for leaf, leaf_new in _BLOCK_LEAVES.items():  # rule 5
        renames[f"encoder.downsamples.{{i}}.{leaf}"] = f"encoder.down_blocks.{{i}}.{leaf_new}"
    stride = num_res_blocks + 2
    for index in range(levels * stride):  # rule 6
        block, slot = divmod(index, stride)
        inner = "upsamplers.0" if slot == stride - 1 else f"resnets.{slot}"
        for leaf, leaf_new in _BLOCK_LEAVES.items():
            renames[f"decoder.upsamples.{index}.{leaf}"] = f"decoder.up_blocks.{block}.{inner}.{leaf_new}"
    return KeyMap("Wan VAE release", "diffusers AutoencoderKLWan", renames)


def upsample_stride(release_keys: list[str] | set[str]) -> int:
    """Entries per decoder up-block in the release's flat ``decoder.upsamples`` list (resnets + upsampler)."""
    indices = [int(m.group(1)) for k in release_keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))]
    if not indices:
        raise ValueError("not a Wan VAE state dict: no decoder.upsamples.*.resample keys")
    return min(indices) + 1


def release_to_diffusers_vae(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``Wan2.1_VAE.pth`` keys to ``AutoencoderKLWan`` keys (1:1, no reshapes)."""
    arch = infer_vae_config(state_dict)
    return vae_keymap(arch["num_res_blocks"], len(arch["dim_mult"])).apply(state_dict)


def diffusers_to_release_vae(state_dict: Mapping[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """Inverse of ``release_to_diffusers_vae`` (writes files in the release's layout)."""
    levels = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    return vae_keymap(num_res_blocks, levels).invert(state_dict)


def infer_vae_config(release_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """``AutoencoderKLWan`` arguments read off a release state dict's shapes (Wan2.1: 96, 16, [1, 2, 4, 4], 2).

    The encoder's flat ``downsamples`` list holds, per level, ``num_res_blocks`` residual blocks
    and (except the last level) one downsampler; the decoder's ``upsamples`` list holds
    ``num_res_blocks + 1`` blocks and (except the last) one upsampler per level.
    """
    keys = set(release_state_dict)
    base_dim = release_state_dict["encoder.conv1.weight"].shape[0]
    z_dim = release_state_dict["conv2.weight"].shape[0]
    num_res_blocks = upsample_stride(keys) - 2
    per_level = num_res_blocks + 1
    entries = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k)))
    levels = (entries + 1) // per_level
    dim_mult = [
        release_state_dict[f"encoder.downsamples.{level * per_level}.residual.2.weight"].shape[0] // base_dim
        for level in range(levels)
    ]
    temporal = [
        f"encoder.downsamples.{level * per_level + num_res_blocks}.time_conv.weight" in keys
        for level in range(levels - 1)
    ]
    return {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temporal,
    }


class WanVAE(nn.Module):
    """Frozen Wan VAE. ``encode``: video -> normalised latents ``[B, T', 16, h, w]``; ``decode``: back."""

    def __init__(self, model: AutoencoderKLWan, exact_constants: bool = False):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        z_dim = model.config.z_dim
        mean, std = model.config.latents_mean, model.config.latents_std
        if len(mean) != z_dim or len(std) != z_dim:
            raise ValueError(
                f"VAE config: latents_mean/latents_std hold {len(mean)}/{len(std)} values for z_dim {z_dim}; "
                "measure the latent statistics of this VAE and write them into its config.json"
            )
        self.temporal_stride, self.spatial_stride = vae_strides(model.config)
        shift, multiplier = normalization_constants(tuple(mean), tuple(std), exact=exact_constants)
        self.register_buffer("shift", shift.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("multiplier", multiplier.view(1, -1, 1, 1, 1), persistent=False)

    @classmethod
    def from_release_checkpoint(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        exact_constants: bool = False,
        config: dict | None = None,
    ) -> WanVAE:
        """Load ``Wan2.1_VAE.pth`` (release key names); the architecture is read off its shapes."""
        release = read_state_dict(path)
        try:
            arch = config or infer_vae_config(release)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a Wan VAE checkpoint ({exc})") from None
        with torch.device("meta"):
            model = AutoencoderKLWan(**arch)
        try:
            renamed = release_to_diffusers_vae(release)
        except KeyError as exc:
            raise StateDictMismatchError(f"{path} (Wan VAE): {exc.args[0]}") from None
        load_strict(model, renamed, f"{path} (Wan VAE)", assign=True, dtype=dtype)
        return cls(model, exact_constants=exact_constants).to(device)

    @classmethod
    def from_diffusers(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **kwargs
    ) -> WanVAE:
        """Load a diffusers ``AutoencoderKLWan`` folder (``config.json`` + weights), offline: built on
        the meta device from its config and loaded strictly with ``assign=True``. (diffusers'
        ``from_pretrained`` does that only with accelerate installed; without it, it builds the whole
        model in float32 on the CPU first.)"""
        folder = Path(folder)
        weights = diffusers_weights_file(folder)
        with torch.device("meta"):
            model = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(str(folder)))
        load_strict(model, read_state_dict(weights), f"{weights} (Wan VAE)", assign=True, dtype=dtype)
        return cls(model, **kwargs).to(device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _autocast(self):
        if self.multiplier.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> float32 ``[B, 1 + (F−1)/t, z, H/s, W/s]`` (time before channel)."""
        check_video_shape(tuple(video.shape), frame_multiple(self.temporal_stride), self.spatial_stride)
        with self._autocast():
            mu = self.model.encode(video.to(device=self.multiplier.device, dtype=self.dtype)).latent_dist.mode()
        z = (mu.float() - self.shift) * self.multiplier  # [B, z, T', h, w]
        return z.transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """float ``[B, T', z, h, w]`` -> float32 video ``[B, 3, 1 + t(T'−1), s·h, s·w]`` clamped to [-1, 1]."""
        z = latents.transpose(1, 2).float() / self.multiplier + self.shift  # [B, z, T', h, w]
        with self._autocast():
            video = self.model.decode(z.to(self.dtype)).sample
        return video.float().clamp_(-1.0, 1.0)

    @torch.no_grad()
    def encode_references(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, N, 3, H, W]`` in [-1, 1] -> ``[B, N, z, H/s, W/s]``: each image its own one-frame clip."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"references: expected [B, N, 3, H, W], got {list(images.shape)}")
        batch, count = images.shape[:2]
        clips = images.reshape(batch * count, 3, 1, *images.shape[3:])  # [B·N, 3, 1, H, W]
        latents = self.encode(clips)  # [B·N, 1, z, h, w]
        return latents.view(batch, count, *latents.shape[2:])

    def enable_tiling(self, tile_size: int = 256, tile_stride: int = 192) -> None:
        """Decode and encode large frames in overlapping spatial tiles (less memory).

        Tiles are blended at their seams, so results are **not** bit-equal to the plain path.
        """
        self.model.enable_tiling(
            tile_sample_min_height=tile_size,
            tile_sample_min_width=tile_size,
            tile_sample_stride_height=tile_stride,
            tile_sample_stride_width=tile_stride,
        )

    def enable_slicing(self) -> None:
        """Process one batch element at a time (less memory). The release also encodes sample by
        sample; with batched kernels the results may still differ from the plain path in the last bits."""
        self.model.enable_slicing()

    def disable_memory_savers(self) -> None:
        self.model.disable_tiling()
        self.model.disable_slicing()


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | float, scale: float) -> torch.Tensor:
    """Wan's RMS norm over channels (dim 1): ``x / max(‖x‖, 1e-12) · √C · gamma + bias``.

    The same values as diffusers' ``F.normalize`` form (to float32 rounding), but a sum of squares
    and ``rsqrt`` instead of ``linalg.vector_norm`` over a strided dim, which was a fifth of a CPU
    training step of the tiny VAE (steps 1.25× faster: ``benchmarks/vae_train_step.py``).
    """
    inv = torch.rsqrt(x.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-24))  # [B, 1, ...]: 1e-24 = (1e-12)²
    return x * inv * scale * gamma + bias


class _FastChannelRMSNorm(WanRMS_norm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_rms_norm(x, self.gamma, self.bias, self.scale)


def use_fast_rms_norms(model: nn.Module) -> int:
    """Switch ``model``'s float32 channel-first Wan RMS norms to :func:`channel_rms_norm`, in place
    (same parameters and state dict). For training on CPU; the frozen :class:`WanVAE` keeps
    diffusers' form, which is the one verified bit-exact against the release. Returns the count."""
    count = 0
    for module in model.modules():
        if type(module) is WanRMS_norm and module.channel_first and module.gamma.dtype == torch.float32:
            module.__class__ = _FastChannelRMSNorm
            count += 1
    return count


@dataclass
class VAEConfig:
    """The ``vae:`` config section."""

    path: str | None = None  # Wan2.1_VAE.pth (release layout) or a diffusers folder; unset: the checkpoint card's
    dtype: str = "bfloat16"  # float32 on CPU
    exact_constants: bool = False  # True: declared mean/std instead of the release's bf16-rounded ones
    tiling: bool = False  # spatial tiles: less memory, not bit-equal
    slicing: bool = False  # one sample at a time: less memory


DIFFUSERS_WEIGHT_FILES = (  # what diffusers' save_pretrained writes, in the order it prefers them
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)


def diffusers_weights_file(folder: Path) -> Path:
    """The weights of a diffusers model folder (one file, or a shard index), after its ``config.json``."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a diffusers AutoencoderKLWan folder)")
    for name in DIFFUSERS_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: none of {', '.join(DIFFUSERS_WEIGHT_FILES)}")


def build_vae(config: VAEConfig, device: str | torch.device) -> WanVAE:
    from sgm.registry import resolve_dtype

    dtype = resolve_dtype(config.dtype)
    path = Path(config.path)
    if path.is_dir():
        vae = WanVAE.from_diffusers(path, dtype=dtype, device=device, exact_constants=config.exact_constants)
    else:
        vae = WanVAE.from_release_checkpoint(path, dtype=dtype, device=device, exact_constants=config.exact_constants)
    if config.tiling:
        vae.enable_tiling()
    if config.slicing:
        vae.enable_slicing()
    return vae
