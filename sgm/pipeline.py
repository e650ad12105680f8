"""The library under every script: components config, ``load_dit``, ``KaleidoPipeline``.

    from sgm.pipeline import KaleidoPipeline, SamplingConfig
    from sat.config import load_config

    config = load_config(SamplingConfig, ["configs/sampling/shapes.yaml"])
    pipe = KaleidoPipeline.from_config(config)
    video = pipe("the red circle moves left", references=[Image.open("ref.png")], seed=1)
    # video: [1, 3, frames, height, width] float32 in [-1, 1]

``ComponentsConfig`` names what to load (DiT architecture and weights, text encoder, VAE, device,
sequence parallelism); ``SamplingConfig`` adds the sampler and the sampling script's inputs and
outputs; the training config (``sgm.training.TrainingConfig``) adds data and optimizer.
``resolve_components`` reads only small files (the checkpoint's model card, the VAE's config) to
learn the architecture and the video geometry, so ``validate_sampling`` rejects bad sizes, frame
counts, reference counts and sequence-parallel layouts before any weight loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sat.parallel import (
    ParallelState,
    UlyssesAttention,
    check_heads,
    check_layout,
    gather,
    shard,
    split_dim,
    token_offset,
)
from sat.training import gib
from sgm.checkpoint import MODEL_CARD_FILE, find_model_card, load_dit_state_dict, read_dit_checkpoint, read_state_dict
from sgm.data.references import RELEASE_MAX_REFERENCES, fit_reference, image_to_tensor
from sgm.diffusion.sampling import KnownFrames, guided_denoiser, renoise, sample, start_index
from sgm.diffusion.schedules import SAMPLING_SHIFT, shifted_schedule
from sgm.diffusion.step_cache import StepCache, StepCacheConfig, check_step_cache
from sgm.geometry import VideoGeometry
from sgm.lora import LORA_FILE, LORA_INFO_FILE, AppliedLoras, LoraConfig, apply_loras, load_lora
from sgm.memory import (
    MEMORY_TIERS,
    UMT5_XXL,
    WEIGHT_FORMATS,
    BlockStreamer,
    MemoryConfig,
    MemoryPlan,
    TierSettings,
    block_activation_bytes,
    is_prequantized,
    load_prequantized,
    plan_tier,
    store_weights,
    stream_dit_blocks,
    tier_settings,
    umt5_encoder_parameters,
    vae_decode_bytes,
)
from sgm.models.wan_vae import VAEConfig, WanVAE, build_vae, default_vae_config, read_vae_strides, vae_strides
from sgm.modules.attention import attention_heads
from sgm.modules.dit import DiTConfig, KaleidoDiT
from sgm.modules.encoders.conditioner import WAN_NEGATIVE_PROMPT, TextConditioner
from sgm.modules.encoders.text import RELEASE_T5_FILE, TextEncoderConfig, build_text_encoder, infer_umt5_config
from sgm.prompt_extend import PromptExtendConfig, check_prompt_extend
from sgm.registry import ModelConfig, build_dit, model_dtype, resolve_device, resolve_dtype, resolve_model

log = logging.getLogger(__name__)

SP_SPLITS = ("auto", "height", "width")
LORA_MODES = ("merge", "adapter")
SAMPLERS = ("euler", "stochastic")


@dataclass
class ComponentsConfig:
    """What to load: the sections every script shares."""

    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    load: str | None = None  # DiT weights: SAT folder (latest + <iter>/...), .pt/.pth or .safetensors
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    sequence_parallel_size: int = 1
    sp_split: str = "auto"  # auto | height | width


@dataclass
class SamplingConfig(ComponentsConfig):
    """Sampling: components, sampler settings, and the inputs and outputs of ``sample_video.py``."""

    input_file: str | None = None  # prompt@@ref lines (.txt) or JSONL
    output_dir: str = "outputs/samples"
    seed: int = 1234  # item i without its own seed uses seed + i
    sampling_image_size: list[int] = field(default_factory=lambda: [512, 896])  # [height, width]
    sampling_num_frames: int = 21  # latent frames (the release's meaning): t(n-1)+1 video frames
    sampling_fps: int = 16
    num_steps: int = 50
    guidance_scale: float = 6.0
    shift: float = SAMPLING_SHIFT
    sampler: str = "euler"  # euler (the release) | stochastic: each step re-noises its clean prediction afresh
    sample_neg_prompt: str = WAN_NEGATIVE_PROMPT
    max_references: int = RELEASE_MAX_REFERENCES
    only_save_latents: bool = False
    contact_sheet: bool = True  # contact_sheet.png: the references beside a grid of the frames
    release_prompt_compat: bool = False  # True: T5 reads the whole line with its @@paths (release)
    lora: list[LoraConfig] = field(default_factory=list)  # [{path, scale}, ...]: Wan/ComfyUI, kohya, diffusers, ours
    lora_mode: str = "merge"  # merge (into the weights, exact unmerge) | adapter (switchable per call)
    segments: int = 1  # > 1: a longer video, each segment continuing the previous one's last `overlap` frames
    overlap: int = 1  # latent frames a segment shares with the previous one (held fixed, re-noised per step)
    prompt_extend: PromptExtendConfig = field(default_factory=PromptExtendConfig)  # an LLM rewrites the prompt
    reference_guidance_scale: float | None = None  # set: text and references guided apart (3 evaluations per step)
    reference_guidance_interval: list[float] | None = None  # [low, high]: reference guidance only at σ in it
    cfg_parallel_size: int = 1  # 2: a step's guidance evaluations on 2 ranks (world = data × cfg × sp)
    cache: StepCacheConfig = field(default_factory=StepCacheConfig)  # step caching (First Block Cache)
    compile: bool = False  # torch.compile the DiT's blocks (pays on GPUs; measured in benchmarks/sample_step.py)
    fsdp: bool = False  # shard the DiT's weights over the ranks of a video (CFG × SP group) with FSDP2
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # tier: full | balanced | low | lowest


@dataclass(frozen=True)
class Components:
    """What ``resolve_components`` learned without loading weights."""

    name: str
    arch: DiTConfig
    dtype: torch.dtype  # the DiT's weights (= compute) dtype
    geometry: VideoGeometry
    vae_path: str
    text_encoder_path: str
    text_max_length: int | None = None  # from the card, when the YAML leaves the default


def _pointer(given: str | None, card: dict | None, folder: Path | None, key: str) -> str:
    """The path of a component: the config's, else the card's (relative to the card's folder)."""
    from_card = ""
    if card and card.get(key):
        value = str(card[key])
        from_card = value if Path(value).is_absolute() else os.path.normpath(folder / value)
    if given and from_card and Path(given).resolve() != Path(from_card).resolve():
        log.warning(
            "%s.path=%s, but the checkpoint was trained with %s (%s.path= uses that)", key, given, from_card, key
        )
    return given or from_card


def resolve_components(config: ComponentsConfig, *, planning: bool = False) -> Components:
    """Architecture and geometry from the config and the checkpoint's model card (small files only).

    The card fills ``vae.path`` and ``text_encoder.path`` when the YAML leaves them empty; a
    ``model.name``/``model.arch`` in the YAML that contradicts the card is an error. ``planning``
    (memory plans, dry runs: no weights needed) assumes the Wan2.1 VAE when the file is absent.
    """
    if config.load:
        check_not_a_lora_run(config.load)
    found = find_model_card(config.load) if config.load else None
    card, folder = found if found else (None, None)
    if config.load and card is None and config.model.name is None:
        if not Path(config.load).exists():  # a mistyped path: say so, not that a card is missing
            raise ValueError(f"load: {config.load}: checkpoint not found")
        raise ValueError(
            f"model.name: {config.load} has no {MODEL_CARD_FILE} (written since by training, merges and exports); "
            "name the architecture, e.g. --config configs/model/kaleido_14b.yaml"
        )
    name, arch = resolve_model(config.model, card, str(folder / MODEL_CARD_FILE) if folder else "")
    vae_path = _pointer(config.vae.path, card, folder, "vae")
    text_path = _pointer(config.text_encoder.path, card, folder, "text_encoder")
    if planning and not (vae_path and Path(vae_path).exists()):
        log.warning("vae.path '%s' not found: planning with the Wan2.1 VAE's strides", vae_path or "")
        temporal, spatial = vae_strides(default_vae_config())
    else:
        if not vae_path:
            raise ValueError("vae.path: no VAE given (and no model card beside load= names one)")
        if not text_path:
            raise ValueError("text_encoder.path: no text encoder given (and no model card beside load= names one)")
        try:
            temporal, spatial = read_vae_strides(vae_path)
        except FileNotFoundError as exc:
            raise ValueError(f"vae.path: {exc}") from None
    max_length = card.get("text_max_length") if card else None
    geometry = VideoGeometry(temporal, spatial, arch.patch_size)
    return Components(name, arch, model_dtype(config.model, card), geometry, vae_path, text_path, max_length)


def check_device(name: str) -> None:
    """``device``: auto, cpu, or a CUDA device that this machine has."""
    try:
        device = resolve_device(name)
    except RuntimeError:
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name}, but this machine has no CUDA GPU (use cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got '{name}'")


def check_not_a_lora_run(load: str) -> None:
    """A LoRA run's folders hold adapters, not a DiT: say how to sample it instead."""
    path = Path(load)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder.parent):
        if (candidate / LORA_INFO_FILE).is_file():
            base = json.loads((candidate / LORA_INFO_FILE).read_text()).get("base", {}).get("weights")
            raise ValueError(
                f"load: {load} is a LoRA run (adapters only): sample its base model with "
                f"load={base} lora=[{{path: {candidate}/<iteration>/{LORA_FILE}}}]"
            )


def check_sequence_parallel(
    geometry: VideoGeometry, arch: DiTConfig, *, height: int, width: int, sp_size: int, sp_split: str, world: int
) -> None:
    """Raise ``ValueError`` unless ``sp_size`` ranks can share this video: the size divides the
    processes and the heads, and the latent splits into whole patches along the chosen axis."""
    if sp_size < 1 or world % sp_size:
        raise ValueError(
            f"sequence_parallel_size: {sp_size} must be at least 1 and divide the number of processes "
            f"({world}; start several with torchrun --nproc_per_node)"
        )
    if sp_split not in SP_SPLITS:
        raise ValueError(f"sp_split: expected one of {', '.join(SP_SPLITS)}, got '{sp_split}'")
    check_heads(arch.num_attention_heads, sp_size)
    if sp_size == 1:
        return
    patch = arch.patch_size[1:]
    h, w = geometry.latent_size(height, width)
    dim = split_dim(h, sp_size, sp_split, patch=patch)
    size, multiple = (h, patch[0]) if dim == 3 else (w, patch[1])
    if size % (multiple * sp_size):
        axis = "height" if dim == 3 else "width"
        raise ValueError(
            f"sequence_parallel_size: the latent {axis} {size} does not split into {sp_size} shards of whole "
            f"patches of {multiple} (choose another size, sp_split, or sequence_parallel_size)"
        )


def evaluations_per_step(guidance_scale: float, reference_guidance_scale: float | None) -> int:
    """Network evaluations of one sampler step (with references): 1 (guidance 1), 2 (CFG), 3 (+ reference guidance)."""
    if reference_guidance_scale is not None:
        return 3
    return 1 if guidance_scale == 1.0 else 2


def check_guidance(config: SamplingConfig) -> None:
    """Raise ``ValueError`` for guidance settings and a CFG × SP × data layout that cannot work."""
    ref = config.reference_guidance_scale
    if ref is not None and not math.isfinite(ref):
        raise ValueError(f"reference_guidance_scale: expected a finite number or null, got {ref}")
    evaluations = evaluations_per_step(config.guidance_scale, ref)
    check_reference_interval(config.reference_guidance_interval, reference_guidance_scale=ref)
    if not 1 <= config.cfg_parallel_size <= max(evaluations, 1) or (config.cfg_parallel_size > 1 and evaluations == 1):
        raise ValueError(
            f"cfg_parallel_size: {config.cfg_parallel_size} ranks for {evaluations} evaluation(s) per step "
            f"(guidance_scale {config.guidance_scale}, reference_guidance_scale {ref}); expected 1 to {evaluations}"
            + (" (guidance_scale 1 has one evaluation: nothing to split)" if evaluations == 1 else "")
        )
    check_layout(
        int(os.environ.get("WORLD_SIZE", "1")), sp_size=config.sequence_parallel_size, cfg_size=config.cfg_parallel_size
    )
    video_ranks = config.sequence_parallel_size * config.cfg_parallel_size
    if config.fsdp and video_ranks == 1:
        raise ValueError(
            "fsdp: shards the DiT over the ranks of one video: set sequence_parallel_size or cfg_parallel_size"
        )
    if config.fsdp and config.cfg_parallel_size > 1 and evaluations % config.cfg_parallel_size:
        raise ValueError(
            f"fsdp: every rank of a video must run the DiT equally often, and {evaluations} evaluations per step do "
            f"not split evenly over cfg_parallel_size {config.cfg_parallel_size}"
        )
    if config.fsdp and config.cfg_parallel_size > 1 and config.reference_guidance_interval is not None:
        raise ValueError(
            "reference_guidance_interval: steps inside the interval run 3 evaluations, the others 2, so with fsdp the "
            "ranks of a CFG group would run the DiT unequally often (cfg_parallel_size=1 or fsdp=false)"
        )
    if config.fsdp and config.cache.method != "none":
        raise ValueError(
            "fsdp: step caching decides per rank; the ranks sharing the weights would disagree (cache.method=none)"
        )


def check_reference_interval(interval: list[float] | None, *, reference_guidance_scale: float | None) -> None:
    """Raise ``ValueError`` unless ``interval`` is null or ``[low, high]`` noise levels, 0 ≤ low ≤ high,
    given with a reference guidance scale."""
    if interval is None:
        return
    if reference_guidance_scale is None:
        raise ValueError("reference_guidance_interval: limits reference guidance; set reference_guidance_scale too")
    if (
        not isinstance(interval, (list, tuple))
        or len(interval) != 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in interval)
        or not 0 <= interval[0] <= interval[1]
    ):
        raise ValueError(
            f"reference_guidance_interval: expected [low, high] noise levels with 0 <= low <= high (σ runs from 1 "
            f"to 0), got {interval}"
        )


def joined_latent_frames(latent_frames: int, *, segments: int, overlap: int) -> int:
    """Latent frames of ``segments`` segments of ``latent_frames`` each, consecutive ones sharing
    ``overlap`` (kept once)."""
    return latent_frames + (segments - 1) * (latent_frames - overlap)


def check_segments(*, segments: int, overlap: int, latent_frames: int) -> None:
    """Raise ``ValueError`` unless ``segments`` segments can share ``overlap`` latent frames."""
    if segments < 1:
        raise ValueError(f"segments: expected 1 or more, got {segments}")
    if segments > 1 and not 1 <= overlap < latent_frames:
        raise ValueError(
            f"overlap: expected 1 to {latent_frames - 1} latent frames (a segment has {latent_frames}), got {overlap}"
        )


def check_request(
    components: Components,
    *,
    height: int,
    width: int,
    num_frames: int,
    references: int,
    max_references: int,
    segments: int = 1,
    overlap: int = 1,
) -> None:
    """Raise ``ValueError`` for a video the model cannot make: size, frame count, reference count,
    segments."""
    components.geometry.check_size(height, width, "size [height, width]")
    latent_frames = components.geometry.latent_frames(num_frames)
    if references > max_references:
        raise ValueError(f"{references} references, max_references is {max_references}")
    check_segments(segments=segments, overlap=overlap, latent_frames=latent_frames)


def validate_sampling(config: SamplingConfig, components: Components) -> None:
    """Everything checkable before a model loads; raises ``ValueError`` naming the key."""
    size = config.sampling_image_size
    if len(size) != 2:
        raise ValueError(f"sampling_image_size: expected [height, width], got {size}")
    components.geometry.check_size(*size, "sampling_image_size")
    if config.sampling_num_frames < 1:
        raise ValueError(f"sampling_num_frames: expected at least 1 latent frame, got {config.sampling_num_frames}")
    if config.sampling_fps <= 0:
        raise ValueError(f"sampling_fps: expected a positive frame rate, got {config.sampling_fps}")
    if config.num_steps < 1:
        raise ValueError(f"num_steps: expected at least 1, got {config.num_steps}")
    if not math.isfinite(config.guidance_scale):
        raise ValueError(f"guidance_scale: expected a finite number, got {config.guidance_scale}")
    if not (math.isfinite(config.shift) and config.shift > 0):
        raise ValueError(f"shift: expected a finite number above 0, got {config.shift}")
    if config.sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got '{config.sampler}'")
    check_device(config.device)
    if config.max_references < 0:
        raise ValueError(f"max_references: expected 0 or more, got {config.max_references}")
    if config.max_references > RELEASE_MAX_REFERENCES:
        log.warning(
            "max_references=%d: the release was trained with at most %d", config.max_references, RELEASE_MAX_REFERENCES
        )
    check_segments(segments=config.segments, overlap=config.overlap, latent_frames=config.sampling_num_frames)
    check_prompt_extend(config.prompt_extend)
    check_guidance(config)
    check_step_cache(config.cache, sp_size=config.sequence_parallel_size)
    check_memory(config)
    if config.lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode: expected one of {', '.join(LORA_MODES)}, got '{config.lora_mode}'")
    for n, entry in enumerate(config.lora):
        if not Path(entry.path).is_file():
            raise ValueError(f"lora[{n}].path: {entry.path or '(empty)'} is not a file")
    check_sequence_parallel(
        components.geometry,
        components.arch,
        height=size[0],
        width=size[1],
        sp_size=config.sequence_parallel_size,
        sp_split=config.sp_split,
        world=int(os.environ.get("WORLD_SIZE", "1")),
    )


def load_dit(
    components: Components,
    load: str | None,
    device: torch.device | str,
    *,
    checkpoint_activations: bool = False,
) -> KaleidoDiT:
    """The DiT of ``components`` on ``device``: built on the meta device and given the checkpoint's
    tensors (strict, ``assign=True``: never an fp32 copy to cast later), or built and initialised on
    ``device`` when there is no checkpoint."""
    device = torch.device(device)
    dit = build_dit(
        components.arch,
        device="meta" if load else device,
        dtype=components.dtype,
        checkpoint_activations=checkpoint_activations,
    )
    if load:
        state = read_dit_checkpoint(load)
        if is_prequantized(state):  # the fp8 matrices stay fp8: the model is never held widened
            stored = load_prequantized(dit, state, device=device)
            log.info("loaded DiT weights from %s (%d matrices kept in float8 e4m3)", load, len(stored))
            return dit
        load_dit_state_dict(dit, state, assign=True)
        dit = dit.to(device)
        log.info("loaded DiT weights from %s", load)
    return dit


def text_encoder_shape(folder: Path) -> dict[str, int]:
    """The umT5 encoder's sizes (``UMT5_XXL``'s keys) as ``TextEncoder.from_folder`` would build it:
    read off the release ``.pth``'s shapes (memory-mapped: no tensor is read) or a Hugging Face
    ``config.json``; umT5-XXL when the folder holds neither (the card's encoder, not downloaded yet)."""
    release_file = folder / RELEASE_T5_FILE
    if release_file.is_file():
        config = infer_umt5_config(read_state_dict(release_file))
        return {key: getattr(config, key) for key in UMT5_XXL}
    if (folder / "config.json").is_file():
        raw = json.loads((folder / "config.json").read_text())
        return {key: raw.get(key, value) for key, value in UMT5_XXL.items()}
    return dict(UMT5_XXL)


def memory_plans(config: SamplingConfig, components: Components) -> list[MemoryPlan]:
    """The plan of every tier for ``config``'s model, size, frames, ``max_references`` references,
    guidance and parallel layout (weights, block, activations, attention, text encoder, VAE)."""
    arch, geometry = components.arch, components.geometry
    meta = build_dit(arch, device="meta", dtype=components.dtype)
    bytes_per_value = torch.empty(0, dtype=components.dtype).element_size()
    block = sum(p.numel() for p in meta.transformer.layers[0].parameters()) * bytes_per_value
    total = sum(p.numel() for p in meta.parameters()) * bytes_per_value
    shards = config.sequence_parallel_size * config.cfg_parallel_size if config.fsdp else 1
    height, width = config.sampling_image_size
    tokens = geometry.tokens(
        height=height, width=width, latent_frames=config.sampling_num_frames, references=config.max_references
    )
    local_tokens = math.ceil(tokens / config.sequence_parallel_size)
    evaluations = evaluations_per_step(config.guidance_scale, config.reference_guidance_scale)
    batch = min(2, math.ceil(evaluations / config.cfg_parallel_size))  # the largest batch of one network call
    latent_values = geometry.latent_shape(
        height=height, width=width, latent_frames=config.sampling_num_frames, channels=arch.in_channels
    )
    shape = text_encoder_shape(Path(components.text_encoder_path or ""))
    text_bytes = torch.empty(0, dtype=resolve_dtype(config.text_encoder.dtype)).element_size()
    vae_bytes = torch.empty(0, dtype=resolve_dtype(config.vae.dtype)).element_size()
    vae_file = Path(components.vae_path or "")
    vae_weights = vae_file.stat().st_size / 4 * vae_bytes if vae_file.is_file() else 127e6 * vae_bytes
    common = {
        "block_bytes": block / shards,
        "rest_bytes": (total - arch.num_layers * block) / shards,
        "num_layers": arch.num_layers,
        "blocks_resident": config.memory.blocks_resident,
        "prefetch": config.memory.prefetch,
        "activations": block_activation_bytes(
            tokens=local_tokens,
            batch=batch,
            hidden=arch.hidden_size,
            ffn=arch.inner_hidden_size,
            bytes_per_value=bytes_per_value,
        ),
        "attention": batch * arch.num_attention_heads * tokens * 4,  # fp32 softmax statistics per query
        "latents": 4 * 4 * batch * math.prod(latent_values),  # float32 state, velocity, their halves
        "text_encoder": umt5_encoder_parameters(**shape) * text_bytes,
        "vae": vae_weights,
        "vae_decode_full": vae_decode_bytes(
            height=height, width=width, temporal_stride=geometry.temporal_stride, tiled=False, bytes_per_value=vae_bytes
        ),
        "vae_decode_tiled": vae_decode_bytes(
            height=height, width=width, temporal_stride=geometry.temporal_stride, tiled=True, bytes_per_value=vae_bytes
        ),
    }
    return [plan_tier(tier, **common) for tier in MEMORY_TIERS]


def choose_tier(plans: list[MemoryPlan], vram_gib: float) -> MemoryPlan:
    """The fastest tier (the first of ``MEMORY_TIERS``) whose planned peak fits ``vram_gib``."""
    for plan in plans:
        if plan.peak <= vram_gib * 2**30:
            return plan
    lowest = plans[-1]
    raise ValueError(
        f"memory.vram_gib: no tier fits {vram_gib:g} GiB; the lowest needs about {lowest.peak / 2**30:.1f} GiB "
        "(fewer frames, a smaller size, fewer references or sequence parallelism lower it)"
    )


def plan_table(plans: list[MemoryPlan], chosen: str | None = None) -> list[str]:
    """Markdown rows of the plans (GiB), the chosen tier marked."""
    rows = [
        "| tier | DiT weights resident | of which blocks | block activations | attention | text encoder "
        "| VAE decode | encode / sample / decode peak | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        mark = " ←" if p.tier == chosen else ""
        rows.append(
            f"| {p.tier}{mark} | {gib(p.dit_resident)} | {gib(p.block_group)} | {gib(p.activations)} | "
            f"{gib(p.attention)} | {gib(p.text_encoder)} | {gib(p.vae_decode)} | "
            f"{gib(p.encode_peak)} / {gib(p.sample_peak)} / {gib(p.decode_peak)} | **{gib(p.peak)}** |"
        )
    return rows


def check_memory(config: SamplingConfig) -> None:
    """Raise ``ValueError`` for a memory tier that cannot work with the rest of the config."""
    if config.memory.tier == "auto":
        if config.memory.vram_gib is None or config.memory.vram_gib <= 0:
            raise ValueError("memory.tier=auto: set memory.vram_gib to the device memory to fit in (GiB)")
        return
    tier = tier_settings(config.memory)
    if config.memory.weights not in WEIGHT_FORMATS:
        raise ValueError(f"memory.weights: expected one of {', '.join(WEIGHT_FORMATS)}, got '{config.memory.weights}'")
    if config.memory.weights != "model":
        fp8_clashes = {"fsdp": config.fsdp, "lora_mode=adapter": bool(config.lora) and config.lora_mode == "adapter"}
        fp8_clashes["memory.tier=lowest"] = tier.from_disk  # the blocks are read from the file as they are
        for key, on in fp8_clashes.items():
            if on:
                raise ValueError(f"memory.weights={config.memory.weights} does not combine with {key}")
    if tier.blocks_resident is None:
        return
    clashes = {"fsdp": config.fsdp, "compile": config.compile}
    if tier.from_disk:
        clashes["lora"] = bool(config.lora)  # merged or adapted weights would be read back from disk unchanged
        if not config.load:
            raise ValueError("memory.tier=lowest streams the DiT's blocks from load=...: no checkpoint is set")
    for key, on in clashes.items():
        if on:
            raise ValueError(f"memory.tier={config.memory.tier} moves the DiT's blocks; it does not combine with {key}")


def offload_blocks(dit: KaleidoDiT, device: torch.device, tier: TierSettings, prefetch: bool) -> None:
    """Block swap from host memory with diffusers' group offloading: the blocks live on the CPU and
    are copied to ``device`` one at a time on a side stream, the next while one runs (``prefetch``),
    or ``tier.blocks_resident`` at a time without; the rest of the DiT stays on ``device``."""
    from diffusers.hooks import apply_group_offloading

    for name, child in dit.named_children():
        if name != "transformer":
            child.to(device)
    if device.type == "cpu":
        log.info("memory: block swap moves blocks between host and device memory: nothing to do on the CPU")
        return
    if prefetch and tier.blocks_resident != 1:
        log.info(
            "memory: prefetch streams one block at a time (the next one is copied in while one runs); "
            "memory.prefetch=false copies memory.blocks_resident=%d at a time",
            tier.blocks_resident,
        )
    apply_group_offloading(
        dit.transformer,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1 if prefetch else tier.blocks_resident,  # diffusers streams single blocks only
        use_stream=prefetch,
    )


def shard_dit(dit: KaleidoDiT, parallel: ParallelState, device: torch.device) -> None:
    """FSDP2 (``fully_shard``) over the ranks of one video: each rank keeps ``1/n`` of every block's
    weights and gathers a block's full weights just before running it (freed after). Every rank of
    the group runs the same network calls in the same order (SP ranks by construction, CFG ranks
    when the evaluations split evenly: ``check_guidance``), so the gathers match."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(parallel.video_group, device.type)
    for layer in dit.transformer.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(dit, mesh=mesh)  # the rest (embeddings, modulation, head): gathered for the whole call
    local = sum(p.to_local().numel() * p.element_size() for p in dit.parameters())
    full = sum(p.numel() * p.element_size() for p in dit.parameters())
    log.info("fsdp: %d of %d DiT weight bytes held by this rank (%d ranks)", local, full, mesh.size())


def compile_blocks(dit: KaleidoDiT) -> None:
    """``torch.compile`` each transformer block in place (one graph per block: the same code for
    every layer, so one compilation serves all)."""
    for layer in dit.transformer.layers:
        layer.compile(dynamic=False)


def enable_sequence_parallel(dit: KaleidoDiT, parallel: ParallelState) -> None:
    """Route the DiT's self-attention through Ulysses over ``parallel``'s SP group (public hook)."""
    if parallel.sp_size == 1:
        return
    check_heads(dit.config.num_attention_heads, parallel.sp_size)
    dit.set_self_attention(UlyssesAttention(parallel.sp_group, attention_heads))


@dataclass(frozen=True)
class SamplerSettings:
    """The defaults of a pipeline call (each can be given per call)."""

    num_steps: int = 50
    guidance_scale: float = 6.0
    shift: float = SAMPLING_SHIFT
    sampler: str = "euler"
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    height: int = 512
    width: int = 896
    num_frames: int = 81  # video frames of one segment
    segments: int = 1
    overlap: int = 1  # latent frames
    reference_guidance_scale: float | None = None
    reference_guidance_interval: tuple[float, float] | None = None  # None: every step


@dataclass
class Timings:
    references_s: float = 0.0
    text_s: float = 0.0
    sampling_s: float = 0.0
    decode_s: float = 0.0
    network_calls: int = 0


def prepare_references(images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
    """``[1, N, 3, H, W]`` in [-1, 1]: each image letterboxed on white to the video size."""
    return torch.stack([image_to_tensor(fit_reference(im, height, width)) for im in images])[None]


class KaleidoPipeline:
    """DiT + VAE + text conditioner on one device (and one SP group), called with keywords."""

    def __init__(
        self,
        *,
        dit: KaleidoDiT,
        vae: WanVAE,
        conditioner: TextConditioner,
        components: Components,
        device: torch.device,
        settings: SamplerSettings = SamplerSettings(),
        parallel: ParallelState | None = None,
        sp_split: str = "auto",
        max_references: int = RELEASE_MAX_REFERENCES,
    ):
        self.dit = dit.eval()
        self.vae = vae
        self.conditioner = conditioner
        self.components = components
        self.geometry = components.geometry
        self.device = device
        self.settings = settings
        self.parallel = parallel or ParallelState()
        self.sp_split = sp_split
        self.max_references = max_references
        self.loras: AppliedLoras | None = None  # the LoRAs of the config: .set_scale(), .remove()
        self.step_cache: StepCache | None = None  # the config's step cache: .full_evaluations, .remove()
        self.streamer: BlockStreamer | None = None  # memory.tier=lowest: the blocks read from disk as they run
        if (vae.temporal_stride, vae.spatial_stride) != (self.geometry.temporal_stride, self.geometry.spatial_stride):
            raise ValueError(
                f"the VAE's strides ({vae.temporal_stride}, {vae.spatial_stride}) differ from the geometry's "
                f"({self.geometry.temporal_stride}, {self.geometry.spatial_stride})"
            )

    @classmethod
    def from_config(
        cls,
        config: SamplingConfig,
        *,
        device: torch.device | str | None = None,
        parallel: ParallelState | None = None,
        components: Components | None = None,
    ) -> KaleidoPipeline:
        """Load every component named by ``config`` (validated first, before any weight loads)."""
        components = components or resolve_components(config)
        validate_sampling(config, components)
        device = resolve_device(device if device is not None else config.device)
        if device.type == "cpu" and components.dtype != torch.float32:
            log.warning("%s on CPU is several times slower than float32 on most processors", components.dtype)
        if not config.load:
            log.warning(
                "no DiT checkpoint (load=...): %s has RANDOM weights, the videos will be noise", components.name
            )
        parallel = parallel or ParallelState()
        if config.memory.tier == "auto":
            chosen = choose_tier(memory_plans(config, components), config.memory.vram_gib)
            log.info("memory.tier=auto: %s (planned peak %.1f GiB)", chosen.tier, chosen.peak / 2**30)
            config = dataclasses.replace(config, memory=dataclasses.replace(config.memory, tier=chosen.tier))
            check_memory(config)
        memory = tier_settings(config.memory)
        streamer = None
        if memory.from_disk:  # the blocks are read from the file when they run: never all in memory
            dit = build_dit(components.arch, device="meta", dtype=components.dtype)
            streamer = stream_dit_blocks(
                dit, config.load, device=device, resident=memory.blocks_resident, prefetch=config.memory.prefetch
            )
        else:  # block swap and fp8 storage start on the host: the device never holds more than they leave
            on_host = memory.blocks_resident is not None or config.memory.weights != "model"
            dit = load_dit(components, config.load, "cpu" if on_host else device)
        deltas = [d for entry in config.lora for d in load_lora(entry.path, dit, entry.scale)]
        loras = apply_loras(dit, deltas, config.lora_mode) if deltas else None
        stored = store_weights(dit, config.memory.weights)  # after a merge: the LoRA is quantised with the weights
        if stored:
            log.info("memory.weights=%s: %d weight matrices stored in float8 e4m3", config.memory.weights, len(stored))
        if memory.blocks_resident is not None and not memory.from_disk:
            offload_blocks(dit, device, memory, config.memory.prefetch)
        elif stored:
            dit.to(device)
        enable_sequence_parallel(dit, parallel)
        if config.fsdp:
            shard_dit(dit, parallel, device)
        text_config = dataclasses.replace(config.text_encoder, path=components.text_encoder_path)
        if config.memory.tier != "full":
            text_config.placement = memory.text_encoder
        if components.text_max_length and config.text_encoder.max_length == TextEncoderConfig.max_length:
            text_config.max_length = components.text_max_length
        text_encoder = build_text_encoder(text_config, device)
        vae = build_vae(
            dataclasses.replace(config.vae, path=components.vae_path, tiling=config.vae.tiling or memory.vae_tiling),
            device,
        )
        settings = SamplerSettings(
            num_steps=config.num_steps,
            guidance_scale=config.guidance_scale,
            shift=config.shift,
            sampler=config.sampler,
            negative_prompt=config.sample_neg_prompt,
            height=config.sampling_image_size[0],
            width=config.sampling_image_size[1],
            num_frames=components.geometry.video_frames(config.sampling_num_frames),
            segments=config.segments,
            overlap=config.overlap,
            reference_guidance_scale=config.reference_guidance_scale,
            reference_guidance_interval=(
                None if config.reference_guidance_interval is None else tuple(config.reference_guidance_interval)
            ),
        )
        pipe = cls(
            dit=dit,
            vae=vae,
            conditioner=TextConditioner(text_encoder, ucg_rate=0.0),
            components=components,
            device=device,
            settings=settings,
            parallel=parallel,
            sp_split=config.sp_split,
            max_references=config.max_references,
        )
        pipe.loras = loras
        pipe.streamer = streamer
        if config.compile:
            compile_blocks(dit)
        if config.cache.method != "none":
            pipe.step_cache = StepCache(dit, config.cache)
        return pipe

    def __call__(
        self,
        prompt: str,
        *,
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        sampler: str | None = None,
        negative_prompt: str | None = None,
        segments: int | None = None,
        overlap: int | None = None,
        reference_guidance_scale: float | None = None,
        init_latents: torch.Tensor | None = None,
        start_sigma: float = 1.0,
        progress: bool = False,
        on_step: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
    ) -> torch.Tensor:
        """The video ``[1, 3, F, height, width]`` float32 in [-1, 1]. ``num_frames``: video frames of
        one segment, ``t·k + 1`` for the VAE's temporal stride ``t``; with ``segments`` > 1 the video
        is longer (``output_frames``). ``on_step(done, total)`` after every sampler step (progress bars).
        Unset settings are the config's."""
        latents = self.generate_latents(
            prompt,
            references=references,
            seed=seed,
            height=height,
            width=width,
            num_frames=num_frames,
            steps=steps,
            guidance_scale=guidance_scale,
            shift=shift,
            sampler=sampler,
            negative_prompt=negative_prompt,
            segments=segments,
            overlap=overlap,
            reference_guidance_scale=reference_guidance_scale,
            init_latents=init_latents,
            start_sigma=start_sigma,
            progress=progress,
            on_step=on_step,
            timings=timings,
        )
        return self.decode(latents, timings=timings)

    def output_frames(
        self, num_frames: int | None = None, segments: int | None = None, overlap: int | None = None
    ) -> int:
        """Video frames of a call with these settings (unset: the config's)."""
        settings = self.settings
        latent_frames = self.geometry.latent_frames(settings.num_frames if num_frames is None else num_frames)
        joined = joined_latent_frames(
            latent_frames,
            segments=settings.segments if segments is None else segments,
            overlap=settings.overlap if overlap is None else overlap,
        )
        return self.geometry.video_frames(joined)

    def check(
        self,
        *,
        height: int,
        width: int,
        num_frames: int,
        references: int,
        segments: int | None = None,
        overlap: int | None = None,
    ) -> None:
        """Raise ``ValueError`` for a request this pipeline cannot make (before any work)."""
        check_request(
            self.components,
            height=height,
            width=width,
            num_frames=num_frames,
            references=references,
            max_references=self.max_references,
            segments=self.settings.segments if segments is None else segments,
            overlap=self.settings.overlap if overlap is None else overlap,
        )

    def reference_latents(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor | None:
        """``[1, N, C, h, w]`` latents of the references (each its own one-frame clip), or None."""
        if not images:
            return None
        return self.vae.encode_references(prepare_references(images, height, width).to(self.device))

    @torch.no_grad()
    def generate_latents(
        self,
        prompt: str,
        *,
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        sampler: str | None = None,
        negative_prompt: str | None = None,
        segments: int | None = None,
        overlap: int | None = None,
        reference_guidance_scale: float | None = None,
        init_latents: torch.Tensor | None = None,
        start_sigma: float = 1.0,
        progress: bool = False,
        on_step: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
    ) -> torch.Tensor:
        """The sampled latent ``[1, T, C, h, w]`` float32 (full size on every rank of the SP group).

        Segment ``s`` > 0 starts from fresh noise (drawn after the previous segment's from the one
        generator of ``seed``: the first segment is the one-segment video) with its first
        ``overlap`` latent frames held at the previous segment's last ones; the segments are joined
        keeping those frames once, so ``T = joined_latent_frames(...)``.

        ``init_latents`` (``[1, T, C, h, w]``, e.g. ``vae.encode`` of a video; one segment): sampling
        starts from them re-noised with the seed's noise to the first schedule level at or below
        ``start_sigma`` instead of from pure noise (SDEdit; ``start_sigma`` 1 is plain sampling). It
        shows at which noise levels a model decides what it draws.
        """
        settings = self.settings
        height = settings.height if height is None else height
        width = settings.width if width is None else width
        num_frames = settings.num_frames if num_frames is None else num_frames
        segments = settings.segments if segments is None else segments
        overlap = settings.overlap if overlap is None else overlap
        self.check(
            height=height,
            width=width,
            num_frames=num_frames,
            references=len(references),
            segments=segments,
            overlap=overlap,
        )
        timings = timings if timings is not None else Timings()
        start = time.perf_counter()
        subjects = self.reference_latents(references, height, width)
        timings.references_s += time.perf_counter() - start

        start = time.perf_counter()
        negative = settings.negative_prompt if negative_prompt is None else negative_prompt
        context = self.conditioner([prompt])[0]["crossattn"].to(self.device)
        uncond = self.conditioner.unconditional(negative, 1)["crossattn"].to(self.device)
        timings.text_s += time.perf_counter() - start

        shape = self.geometry.latent_shape(
            height=height,
            width=width,
            latent_frames=self.geometry.latent_frames(num_frames),
            channels=self.dit.config.in_channels,
        )
        generator = torch.Generator().manual_seed(seed)
        patch = self.dit.config.patch_size[1:]
        dim = split_dim(shape[2], self.parallel.sp_size, self.sp_split, patch=patch)
        if subjects is not None:
            subjects = shard(subjects, dim, self.parallel, patch=patch)

        local_shape = [1, *shape]
        local_shape[dim] //= self.parallel.sp_size  # this rank's slice: [1, T, C, h / sp, w] or [.., w / sp]
        offset = token_offset(tuple(local_shape), dim, self.parallel, patch=patch)

        def network(x, timesteps, ctx, subj):
            timings.network_calls += 1
            return self.dit(x, timesteps, ctx, subj, token_offset=offset)

        start = time.perf_counter()
        scale = settings.guidance_scale if guidance_scale is None else guidance_scale
        ref_scale = settings.reference_guidance_scale if reference_guidance_scale is None else reference_guidance_scale
        denoise = guided_denoiser(
            network,
            context,
            uncond,
            subjects,
            scale,
            reference_scale=ref_scale,
            reference_interval=settings.reference_guidance_interval,
            cfg_group=self.parallel.cfg_group,
        )
        sigmas = shifted_schedule(
            settings.num_steps if steps is None else steps, settings.shift if shift is None else shift
        )
        sampler = settings.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got '{sampler}'")

        def fresh_noise() -> torch.Tensor:
            """The stochastic sampler's noise: drawn whole from the one generator (the same on every
            rank), this rank's slice kept, as for the starting noise."""
            return shard(torch.randn((1, *shape), generator=generator).to(self.device), dim, self.parallel, patch=patch)

        if init_latents is None and start_sigma != 1.0:
            raise ValueError(f"start_sigma: {start_sigma} needs init_latents (the latent to start from)")
        if init_latents is not None:
            if segments != 1:
                raise ValueError(f"init_latents: sampling from a given latent needs segments=1, got {segments}")
            if tuple(init_latents.shape) != (1, *shape):
                raise ValueError(f"init_latents: expected shape {[1, *shape]}, got {list(init_latents.shape)}")
            sigmas = sigmas[start_index(sigmas, start_sigma) :]
            init_latents = shard(init_latents.to(self.device, torch.float32), dim, self.parallel, patch=patch)
        steps_per_segment = len(sigmas) - 1

        def step_done(segment: int) -> Callable | None:
            if on_step is None:
                return None
            return lambda k, x, sigma: on_step(segment * steps_per_segment + k + 1, segments * steps_per_segment)

        pieces, previous = [], None
        for segment in range(segments):
            if self.step_cache is not None:
                self.step_cache.start(f"segment{segment}")  # cached residuals never cross videos or segments
            noise = shard(
                torch.randn((1, *shape), generator=generator).to(self.device), dim, self.parallel, patch=patch
            )
            if init_latents is not None:
                noise = renoise(init_latents, noise, sigmas[0])
            known = None if previous is None else KnownFrames(previous[:, -overlap:], noise[:, :overlap])
            latents = sample(
                denoise,
                noise,
                sigmas,
                callback=step_done(segment),
                progress=progress,
                known=known,
                fresh_noise=fresh_noise if sampler == "stochastic" else None,
            )
            pieces.append(latents if previous is None else latents[:, overlap:])  # the shared frames once
            previous = latents
        timings.sampling_s += time.perf_counter() - start
        return gather(torch.cat(pieces, dim=1), dim, self.parallel)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, timings: Timings | None = None) -> torch.Tensor:
        """``[1, T, C, h, w]`` -> video ``[1, 3, F, H, W]`` in [-1, 1]; the latent is first cast to the
        model dtype as the release does."""
        start = time.perf_counter()
        video = self.vae.decode(latents.to(self.dit.dtype))
        if timings is not None:
            timings.decode_s += time.perf_counter() - start
        return video
