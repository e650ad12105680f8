"""Memory tiers for sampling: what stays on the device, what waits on the host or on disk.

    memory:
      tier: balanced        # full | balanced | low | lowest
      blocks_resident: 4    # expert: DiT blocks on the device at once (low without prefetch, lowest)

| tier     | text encoder                    | VAE decode | DiT blocks                                           |
|----------|---------------------------------|------------|------------------------------------------------------|
| full     | on the device                   | whole      | all on the device                                    |
| balanced | on the device only to encode    | tiled      | all on the device                                    |
| low      | on the device only to encode    | tiled      | one and the next one arriving, from host memory (*)  |
| lowest   | on the CPU                      | tiled      | one at a time (and the next one read ahead), from disk |

``low`` uses diffusers' ``apply_group_offloading`` (block level, with a side stream for prefetch
on CUDA) on the DiT's blocks: it works on any ``nn.Module``. (*) diffusers streams one block per
group, so with ``prefetch`` (the default) one block runs while the next is copied in; with
``prefetch: false`` ``blocks_resident`` blocks are copied in at a time, with no overlap.
``lowest`` is ours: diffusers' disk offload writes each group's tensors from a model that is
already in memory, so the whole model would be held once; here the blocks never are. The DiT is
built on the meta device, the weights outside the blocks are read from the checkpoint's
safetensors file, and each block's tensors are read just before the block runs and dropped after
it (``BlockStreamer``), so the process holds a block or two and never the model. The maths is
unchanged: every tier samples the same latent (bit for bit in float32: tested).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sgm.checkpoint import ENGINE_PREFIX, IGNORED_PREFIXES, resolve_checkpoint

log = logging.getLogger(__name__)

MEMORY_TIERS = ("full", "balanced", "low", "lowest")
BLOCKS_PREFIX = "transformer.layers."


@dataclass
class MemoryConfig:
    """The ``memory:`` section of a sampling config."""

    tier: str = "full"  # full | balanced | low | lowest | auto (the fastest whose planned peak fits vram_gib)
    vram_gib: float | None = None  # auto: the device memory to fit in
    blocks_resident: int | None = None  # blocks per copy (low without prefetch: 4, lowest: 1); None: the tier's
    prefetch: bool = True  # read / copy the next block while one runs
    weights: str = "model"  # model | fp8 | fp8_scaled: the blocks' weight matrices stored in float8 e4m3


@dataclass(frozen=True)
class TierSettings:
    text_encoder: str  # a text_encoder.placement
    vae_tiling: bool
    blocks_resident: int | None  # None: every block stays on the device
    from_disk: bool


def tier_settings(config: MemoryConfig) -> TierSettings:
    """What ``config.tier`` moves where (``blocks_resident`` overrides the tier's block count)."""
    tier = config.tier
    if tier not in MEMORY_TIERS:
        raise ValueError(f"memory.tier: expected one of {', '.join(MEMORY_TIERS)}, got '{tier}'")
    if config.blocks_resident is not None and config.blocks_resident < 1:
        raise ValueError(f"memory.blocks_resident: expected 1 or more, got {config.blocks_resident}")
    default_blocks = {"full": None, "balanced": None, "low": 4, "lowest": 1}[tier]
    blocks = config.blocks_resident if tier in ("low", "lowest") and config.blocks_resident else default_blocks
    return TierSettings(
        text_encoder={"full": "device", "balanced": "offload", "low": "offload", "lowest": "cpu"}[tier],
        vae_tiling=tier != "full",
        blocks_resident=blocks,
        from_disk=tier == "lowest",
    )


def safetensors_files(load: str) -> dict[str, Path]:
    """Tensor name -> file of a ``.safetensors`` checkpoint (one file or a sharded index); ValueError otherwise."""
    path = resolve_checkpoint(load)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return dict.fromkeys(handle.keys(), path)
    if path.name.endswith(".safetensors.index.json"):
        index = json.loads(path.read_text())["weight_map"]
        return {name: path.parent / file for name, file in index.items()}
    raise ValueError(
        f"memory.tier=lowest streams the DiT's blocks from a .safetensors file, and {load} is {path.name} "
        "(write one with merge_kaleido.py --format safetensors or tools/convert.py)"
    )


def _bare(name: str) -> str | None:
    """A checkpoint key as a DiT parameter name (engine prefix stripped), None for keys that are not the DiT's."""
    if name.startswith(ENGINE_PREFIX):
        return name[len(ENGINE_PREFIX) :]
    return None if name.startswith(IGNORED_PREFIXES) else name


def read_tensors(files: dict[str, Path], wanted: Callable[[str], bool], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors whose bare names ``wanted`` accepts, read file by file and cast to ``dtype``.

    Each file is opened, read and closed: a mapping left open would keep the file's pages counted
    in the process's memory after they were read."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        bare = _bare(name)
        if bare is not None and wanted(bare):
            by_file.setdefault(file, []).append(name)
    out = {}
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as handle:
            for name in names:
                out[_bare(name)] = handle.get_tensor(name).to(dtype)
    return out


class BlockStreamer:
    """Keeps the DiT's blocks out of memory and brings each in just before it runs.

    ``load(i)`` returns block ``i``'s tensors (names relative to the block). At most
    ``resident`` blocks hold weights at once (plus one being read ahead with ``prefetch``);
    ``max_resident`` records the most seen, for tests and benchmarks.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        load: Callable[[int], dict[str, torch.Tensor]],
        *,
        device: torch.device,
        resident: int = 1,
        prefetch: bool = True,
    ):
        self.layers, self.load_block, self.device = layers, load, device
        self.resident, self.prefetch = resident, prefetch
        self.loaded: list[int] = []  # oldest first
        self.max_resident = 0
        self.reads = 0
        self._pool = ThreadPoolExecutor(1) if prefetch else None
        self._ahead: dict[int, object] = {}  # block index -> Future of its tensors
        self._hooks = []
        for i, layer in enumerate(layers):
            layer.to("meta")
            self._hooks.append(layer.register_forward_pre_hook(self._before(i)))
            self._hooks.append(layer.register_forward_hook(self._after(i)))

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        return {k: v.to(self.device, non_blocking=True) for k, v in self.load_block(i).items()}

    def _before(self, i: int):
        def hook(module, args):
            if i not in self.loaded:
                future = self._ahead.pop(i, None)
                tensors = future.result() if future is not None else self._read(i)
                module.load_state_dict(tensors, strict=True, assign=True)
                self.loaded.append(i)
                self.max_resident = max(self.max_resident, len(self.loaded))
            following = (i + 1) % len(self.layers)  # after the last block: the first, for the next step
            if self._pool is not None and following not in self.loaded and following not in self._ahead:
                self._ahead[following] = self._pool.submit(self._read, following)

        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            while len(self.loaded) >= self.resident:  # the oldest go back to the meta device (memory freed)
                self.layers[self.loaded.pop(0)].to("meta")
            return output

        return hook

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def stream_dit_blocks(
    dit: nn.Module, load: str, *, device: torch.device, resident: int, prefetch: bool
) -> BlockStreamer:
    """Fill a meta-device ``dit`` from the safetensors checkpoint ``load``: the weights outside the
    blocks now (strict: every one must be there), the blocks' when they run."""
    files = safetensors_files(load)
    dtype = next(iter(dit.parameters())).dtype
    rest = read_tensors(files, lambda name: not name.startswith(BLOCKS_PREFIX), dtype)
    expected = {n for n, _ in dit.named_parameters() if not n.startswith(BLOCKS_PREFIX)}
    expected |= {n for n, _ in dit.named_buffers(remove_duplicate=True) if not n.startswith(BLOCKS_PREFIX)}
    missing = sorted(n for n, p in dit.named_parameters() if not n.startswith(BLOCKS_PREFIX) and n not in rest)
    if missing:
        raise ValueError(f"{load}: missing DiT weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(rest) - expected)
    if unexpected:
        raise ValueError(f"{load}: unexpected keys {', '.join(unexpected[:5])}")
    layers = dit.transformer.layers
    for name, tensor in rest.items():  # the modules outside the blocks get their real tensors
        owner, _, leaf = name.rpartition(".")
        module = dit.get_submodule(owner)
        if isinstance(getattr(module, leaf), nn.Parameter):
            setattr(module, leaf, nn.Parameter(tensor.to(device), requires_grad=False))
        else:
            setattr(module, leaf, tensor.to(device))
    block_names = [{n for n, _ in layer.named_parameters()} for layer in layers]
    stored = [set() for _ in layers]  # from the files' key lists (no tensor read): refused now, not mid-video
    for name in files:
        bare = _bare(name)
        if bare is not None and bare.startswith(BLOCKS_PREFIX):
            index, _, rest_of_name = bare[len(BLOCKS_PREFIX) :].partition(".")
            if int(index) < len(stored):
                stored[int(index)].add(rest_of_name)
    for i, names in enumerate(stored):
        if names != block_names[i]:
            odd = sorted(names ^ block_names[i])[:5]
            raise ValueError(f"{load}: block {i}: {', '.join(odd)} missing or unexpected")

    def load_block(i: int) -> dict[str, torch.Tensor]:
        prefix = f"{BLOCKS_PREFIX}{i}."
        tensors = read_tensors(files, lambda name: name.startswith(prefix), dtype)
        tensors = {name[len(prefix) :]: t for name, t in tensors.items()}
        return tensors

    return BlockStreamer(layers, load_block, device=device, resident=resident, prefetch=prefetch)


# ---------------------------------------------------------------------------------------------
# The memory plan: peak device memory per tier, from the architecture and the request alone

UMT5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "vocab_size": 256384, "num_heads": 64, "d_kv": 64}
VAE_DECODE_TENSORS = 8  # live full-resolution feature maps while decoding a chunk (rough, see vae_decode_bytes)
VAE_TOP_CHANNELS = 96  # the Wan VAE decoder's channels at full resolution
VAE_TILE = 256  # diffusers' AutoencoderKLWan tile size in pixels (tile_sample_min_height/width)


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak device bytes of one tier, by phase and by what takes the memory."""

    tier: str
    dit_resident: float  # DiT weights on the device while sampling (the streamed tiers: the rest + their blocks)
    block_group: float  # the blocks on the device at once (streamed tiers; included in dit_resident)
    activations: float  # one block's working set at this token count (inference)
    attention: float  # fused attention's workspace (softmax statistics)
    text_encoder: float  # while encoding (0: on the CPU)
    vae_decode: float  # decoder working set (tiled for every tier but full)
    encode_peak: float
    sample_peak: float
    decode_peak: float

    @property
    def peak(self) -> float:
        return max(self.encode_peak, self.sample_peak, self.decode_peak)


def umt5_encoder_parameters(
    *, d_model: int, d_ff: int, num_layers: int, vocab_size: int, num_heads: int, d_kv: int, buckets: int = 32
) -> int:
    """Parameters of a umT5 encoder: embeddings, per layer attention (q, k, v, o), gated FFN (3
    matrices), two norms and a relative-position bias (``buckets`` per head), and the final norm."""
    inner = num_heads * d_kv
    per_layer = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model + buckets * num_heads
    return vocab_size * d_model + num_layers * per_layer + d_model


# One block's inference working set in tensors of the block's width D, its input included, as a
# live-tensor tracker measures it on the block's code (tests/test_memory.py holds the two to each
# other): the attention half keeps 7 in float32 and 11 in bf16/fp16 (there the q/k RMS norms work
# in float32 and the release's RoPE rounding keeps the halves apart); the MLP half keeps 5 and one
# FFN-wide buffer (GELU and the residual additions run in place without gradients).
ATTENTION_HALF_WIDTHS = {4: 7, 2: 11}  # by bytes per value of the model dtype
MLP_HALF_WIDTHS = 5


def block_activation_bytes(*, tokens: int, batch: int, hidden: int, ffn: int, bytes_per_value: int) -> float:
    """One block's peak working set without gradients: the larger of its attention half and its
    MLP half (``ATTENTION_HALF_WIDTHS``, ``MLP_HALF_WIDTHS``)."""
    attention = ATTENTION_HALF_WIDTHS[bytes_per_value] * hidden
    mlp = MLP_HALF_WIDTHS * hidden + ffn
    return batch * tokens * max(attention, mlp) * bytes_per_value


def vae_decode_bytes(*, height: int, width: int, temporal_stride: int, tiled: bool, bytes_per_value: int) -> float:
    """A rough working set of the Wan VAE decoder: it decodes one latent frame at a time into
    ``temporal_stride`` frames, holding about ``VAE_DECODE_TENSORS`` feature maps of
    ``VAE_TOP_CHANNELS`` channels at full resolution (with its causal caches); tiled, a tile of
    ``VAE_TILE`` pixels (plus its overlap) instead of the frame."""
    h, w = (min(height, VAE_TILE * 1.25), min(width, VAE_TILE * 1.25)) if tiled else (height, width)
    return VAE_DECODE_TENSORS * VAE_TOP_CHANNELS * temporal_stride * h * w * bytes_per_value


def blocks_on_device(tier: str, *, blocks_resident: int, prefetch: bool) -> int:
    """DiT blocks holding weights on the device at once in a block-swap tier: ``low`` with prefetch,
    the running block and the next one (diffusers' streamed group offloading takes one block per
    group, whatever count it is given), without it ``blocks_resident``; ``lowest`` (``BlockStreamer``)
    ``blocks_resident`` plus the one being read ahead with prefetch."""
    if tier == "low":
        return 2 if prefetch else blocks_resident
    return blocks_resident + int(prefetch)


def plan_tier(
    tier: str,
    *,
    block_bytes: float,
    rest_bytes: float,
    num_layers: int,
    blocks_resident: int | None,
    prefetch: bool,
    activations: float,
    attention: float,
    latents: float,
    text_encoder: float,
    vae: float,
    vae_decode_full: float,
    vae_decode_tiled: float,
) -> MemoryPlan:
    """Phase peaks of ``tier`` (see the module's table): the text encoder is on the device only
    while encoding from ``balanced`` on, and on the CPU in ``lowest``; block swap keeps
    ``blocks_on_device`` blocks."""
    settings = tier_settings(MemoryConfig(tier, blocks_resident=blocks_resident))
    if settings.blocks_resident is None:
        group, dit = 0.0, rest_bytes + num_layers * block_bytes
    else:
        blocks = blocks_on_device(tier, blocks_resident=settings.blocks_resident, prefetch=prefetch)
        group = min(num_layers, blocks) * block_bytes
        dit = rest_bytes + group
    text = 0.0 if settings.text_encoder == "cpu" else text_encoder
    text_while_sampling = text if settings.text_encoder == "device" else 0.0
    decode = vae_decode_tiled if settings.vae_tiling else vae_decode_full
    return MemoryPlan(
        tier=tier,
        dit_resident=dit,
        block_group=group,
        activations=activations,
        attention=attention,
        text_encoder=text,
        vae_decode=decode,
        encode_peak=dit + text + vae,
        sample_peak=dit + text_while_sampling + vae + activations + attention + latents,
        decode_peak=dit + text_while_sampling + vae + decode + latents,
    )


# ---------------------------------------------------------------------------------------------
# Weight storage: float8 e4m3 (plain or scaled per output channel), computed in the model dtype

WEIGHT_FORMATS = ("model", "fp8", "fp8_scaled")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: e4m3fn has no infinity, a larger value would become NaN


def quantize_fp8(weight: torch.Tensor, *, scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(stored, scale)``: plain, the weight clamped to ±448 and rounded to e4m3 (scale None);
    scaled, each output row divided by its largest magnitude / 448 first (float32 scales
    ``[out, 1]``), so every row uses the format's whole range."""
    if not scaled:
        return weight.float().clamp(-FP8_MAX, FP8_MAX).to(FP8), None
    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (weight.float() / scale).to(FP8), scale


def dequantize_fp8(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return (stored.float() * scale if scale is not None else stored.float()).to(dtype)


class Fp8Weight(nn.Module):
    """Parametrization: the weight is stored in fp8 and read in ``dtype``.

    diffusers' ``apply_layerwise_casting`` does the same by hooking ``nn.Linear.forward``, but the
    DiT reads most weights directly (fused QKV split by rows, the MLP's ``addmm``, output
    projections with the bias after the matmul), so a hooked forward would not run; a
    parametrization changes every read of the weight."""

    def __init__(self, scale: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale", scale, persistent=False)
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return dequantize_fp8(stored, self.scale, self.dtype)


def store_weights(dit: nn.Module, weights: str) -> list[str]:
    """Store the weight matrices of the DiT's blocks in ``weights`` (``fp8`` or ``fp8_scaled``);
    returns their names. Norms, biases, modulation, embeddings and the head keep the model dtype
    (1–3 % of the parameters, and the most sensitive)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"memory.weights: expected one of {', '.join(WEIGHT_FORMATS)}, got '{weights}'")
    if weights == "model":
        return []
    from torch.nn.utils import parametrize

    names = []
    for name, module in dit.transformer.layers.named_modules():
        if isinstance(module, nn.Linear) and not parametrize.is_parametrized(module, "weight"):  # not pre-quantised
            dtype = module.weight.dtype
            stored, scale = quantize_fp8(module.weight.detach(), scaled=weights == "fp8_scaled")
            module.weight = nn.Parameter(stored, requires_grad=False)
            parametrize.register_parametrization(module, "weight", Fp8Weight(scale, dtype), unsafe=True)
            names.append(f"transformer.layers.{name}")
    return names


def resident_weight_bytes(module: nn.Module) -> int:
    """Bytes of the tensors a module holds (parameters as stored, fp8 scales included)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# Pre-quantised checkpoints (our layout): a block's fp8 ``<module>.weight`` with an optional float32
# ``<module>.weight_scale`` of shape [out, 1]; every other tensor in any floating dtype.
SCALE_KEY = ".weight_scale"


def is_prequantized(state: dict[str, torch.Tensor]) -> bool:
    return any(t.dtype in (FP8, torch.float8_e5m2) for t in state.values())


def quantize_state_dict(state: dict[str, torch.Tensor], *, weights: str) -> dict[str, torch.Tensor]:
    """Our DiT state dict with the blocks' weight matrices in fp8 (``weights``: fp8 | fp8_scaled),
    the layout ``load_prequantized`` reads: what ``tools/convert.py kaleido2safetensors --format``
    writes."""
    if weights not in WEIGHT_FORMATS[1:]:
        raise ValueError(f"format: expected fp8 or fp8_scaled, got '{weights}'")
    out = {}
    for name, tensor in state.items():
        if name.startswith(BLOCKS_PREFIX) and name.endswith(".weight") and tensor.ndim == 2:
            stored, scale = quantize_fp8(tensor, scaled=weights == "fp8_scaled")
            out[name] = stored
            if scale is not None:
                out[name[: -len(".weight")] + SCALE_KEY] = scale
        else:
            out[name] = tensor
    return out


def load_prequantized(dit: nn.Module, state: dict[str, torch.Tensor], *, device: torch.device) -> list[str]:
    """Fill a meta-device ``dit`` from a pre-quantised state dict without widening it: the blocks'
    fp8 matrices stay fp8 (read through ``Fp8Weight``), the rest is cast to the model dtype. Every
    key and shape is checked first (one error listing all). Returns the fp8-stored names."""
    from torch.nn.utils import parametrize

    from sgm.checkpoint import StateDictMismatchError, diff_shapes, shapes

    dtype = next(iter(dit.parameters())).dtype
    scales = {k[: -len(SCALE_KEY)] + ".weight": v for k, v in state.items() if k.endswith(SCALE_KEY)}
    weights = {k: v for k, v in state.items() if not k.endswith(SCALE_KEY)}
    diff = diff_shapes(shapes(dit.state_dict()), shapes(weights))
    if diff:
        raise StateDictMismatchError("the pre-quantised DiT state dict does not match the model:\n" + diff.report())
    fp8_names, widened = [], {}
    for name, tensor in weights.items():
        owner = dit.get_submodule(name.rpartition(".")[0])
        stored_fp8 = tensor.dtype in (FP8, torch.float8_e5m2)
        if stored_fp8 and name.startswith(BLOCKS_PREFIX) and isinstance(owner, nn.Linear) and name.endswith(".weight"):
            owner.weight = nn.Parameter(tensor.to(FP8).to(device), requires_grad=False)
            scale = scales.get(name)
            fp8_weight = Fp8Weight(None if scale is None else scale.float().to(device), dtype)
            parametrize.register_parametrization(owner, "weight", fp8_weight, unsafe=True)
            fp8_names.append(name)
        elif stored_fp8:  # fp8 outside the blocks' matrices: small, widened now
            widened[name] = dequantize_fp8(tensor, scales.get(name), dtype)
        else:
            widened[name] = tensor.to(dtype)
    rest = {k: v.to(device) for k, v in widened.items()}
    missing, unexpected = dit.load_state_dict(rest, strict=False, assign=True)
    expected_missing = {f"{n.rpartition('.')[0]}.parametrizations.weight.original" for n in fp8_names}
    if set(missing) - expected_missing or unexpected:
        raise StateDictMismatchError(f"pre-quantised load left {sorted(set(missing) - expected_missing)[:5]}")
    return fp8_names
