"""Training-loop pieces around DeepSpeed: optimizer groups, the release's learning-rate warm-up,
the DeepSpeed config, ZeRO-3 parameter registration, checkpoint housekeeping, memory estimates.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class OptimizerConfig:
    lr: float = 5e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 1e-4  # not on biases and norm parameters
    gradient_clipping: float = 0.1


@dataclass
class ScheduleConfig:
    style: str = "constant"  # constant | cosine (after the warm-up)
    warmup_fraction: float = 0.01  # of train_iters (SAT's default 1 %)
    release_warmup: bool = True  # the release's fine-tune warm-up: min(0.05, n / warmup) for n <= 2·warmup
    min_lr_fraction: float = 0.0  # cosine floor


def lr_factor(step: int, train_iters: int, schedule: ScheduleConfig) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (1-based).

    Release (SAT AnnealingLR "constant", warm-up 1 % = 50 of 5000, plus the fine-tune warm-up):
    ``min(0.05, n/50)`` for n <= 100 (0.02, 0.04, then 0.05), then 1.0.
    """
    warmup = max(1, int(schedule.warmup_fraction * train_iters)) if schedule.warmup_fraction > 0 else 0
    if schedule.release_warmup and warmup and step <= 2 * warmup:
        return min(0.05, step / warmup)
    if warmup and step <= warmup:
        return step / warmup
    if schedule.style == "constant":
        return 1.0
    if schedule.style == "cosine":
        progress = min(1.0, (step - warmup) / max(1, train_iters - warmup))
        floor = schedule.min_lr_fraction
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.style must be constant or cosine, got '{schedule.style}'")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices and higher-rank tensors (linear and conv weights, the
    DiT's ``[1, 6, D]`` modulation offsets), none on vectors (biases, norm gains)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]  # LoRA factors are all matrices: one group


def deepspeed_config(
    micro_batch_size: int,
    gradient_accumulation: int,
    world_size: int,
    zero_stage: int,
    gradient_clipping: float,
    bf16: bool,
) -> dict:
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage must be 1, 2 or 3, got {zero_stage}")
    zero = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation,
        "train_batch_size": micro_batch_size * gradient_accumulation * world_size,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def register_zero3_parameters(model: nn.Module, reads: Iterable[tuple[nn.Module, nn.Parameter]] = ()) -> None:
    """Tell ZeRO-3 which parameters a module's forward reads from its children directly.

    Modules that read the weights of a Linear/LayerNorm/ParameterList child without calling it
    (split projections, a bias added after the matmul) are found here; ``reads`` adds the
    ``(module, parameter)`` pairs a model declares beyond those (the DiT's per-layer modulation
    offsets, read by the top module: ``KaleidoDiT.external_parameter_reads``).
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for module in model.modules():
        for child in module.children():
            if isinstance(child, (nn.Linear, nn.LayerNorm, nn.ParameterList)):
                for param in child.parameters():
                    register_external_parameter(module, param)
    for module, param in reads:
        register_external_parameter(module, param)


DEEPSPEED_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def remove_recovery_scripts(save_dir: Path) -> list[Path]:
    """Delete the ZeRO recovery scripts DeepSpeed copies beside every checkpoint.

    Our checkpoints already hold the whole DiT in ``mp_rank_00_model_states.pt`` (ZeRO-3 runs write
    it consolidated), which ``sample_video.py`` and ``tools/convert.py`` read with
    ``weights_only=True``; the scripts are redundant and unpickle with ``weights_only=False``.
    """
    removed = [save_dir / name for name in DEEPSPEED_RECOVERY_SCRIPTS if (save_dir / name).is_file()]
    for path in removed:
        path.unlink()
    return removed


def prune_checkpoints(save_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` numbered checkpoint folders; returns what was removed.

    A folder that cannot be deleted (permissions, a file held open) is reported with a warning
    naming it and the error, and left in place; training goes on.
    """
    numbered = sorted((p for p in save_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    removed = []
    for path in numbered[:-keep_last] if keep_last > 0 else []:
        try:
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("could not remove old checkpoint %s: %s", path, exc)
            continue
        removed.append(path)
    return removed


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of one training setup (mixed bf16 / fp32 Adam, as the release)."""

    weights: float
    gradients: float
    optimizer: float
    activations_checkpointed: float
    activations_full: float


def estimate_memory(
    parameters: int,
    num_layers: int,
    hidden: int,
    ffn: int,
    tokens: int,
    world_size: int,
    sp_size: int,
    zero_stage: int,
) -> MemoryEstimate:
    """Rough per-GPU memory: bf16 weights (2 B), bf16 gradients (2 B), fp32 master + Adam m, v (12 B),
    partitioned by ZeRO over all ``world_size`` ranks; activations for ``tokens / sp_size`` tokens.

    Activations per layer kept for backward ≈ tokens × (16·D + 3·FFN) × 2 B (norm outputs, q/k/v,
    attention output, residuals, the MLP's hidden and GELU output); with checkpointing only each
    layer's input (tokens × D × 2 B) plus one layer's full set.
    """
    local = tokens / sp_size
    weights = 2 * parameters / (world_size if zero_stage == 3 else 1)
    gradients = 2 * parameters / (world_size if zero_stage >= 2 else 1)
    optimizer = 12 * parameters / world_size
    per_layer = local * (16 * hidden + 3 * ffn) * 2
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations_checkpointed=num_layers * local * hidden * 2 + per_layer,
        activations_full=num_layers * per_layer,
    )


@dataclass(frozen=True)
class LoraMemoryEstimate:
    """Per-GPU bytes of a LoRA run: a frozen base, small trainable adapters."""

    base: float
    adapters: float  # bf16 copies used in forward and their gradients
    optimizer: float  # fp32 master + Adam m, v of the adapters (ZeRO-partitioned)
    weight_gradient: float  # one adapted weight's dense gradient, alive during its backward
    activations_checkpointed: float


def estimate_lora_memory(
    parameters: int,
    adapter_parameters: int,
    largest_weight: int,
    base_bytes: float,
    num_layers: int,
    hidden: int,
    ffn: int,
    tokens: int,
    world_size: int,
    sp_size: int,
) -> LoraMemoryEstimate:
    """Rough per-GPU memory of LoRA training: the whole base in ``base_bytes`` per parameter on every
    GPU (ZeRO 1/2 do not partition weights), adapters in bf16 with bf16 gradients (4 B), their fp32
    master and Adam moments (12 B) partitioned over ``world_size``, the float32 gradient of the
    largest adapted weight (the delta is added in weight space, ``sgm.lora.TrainableLora``), and the
    activations of ``estimate_memory`` with checkpointing."""
    full = estimate_memory(parameters, num_layers, hidden, ffn, tokens, world_size, sp_size, 2)
    return LoraMemoryEstimate(
        base=base_bytes * parameters,
        adapters=4 * adapter_parameters,
        optimizer=12 * adapter_parameters / world_size,
        weight_gradient=4 * largest_weight,
        activations_checkpointed=full.activations_checkpointed,
    )


def gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def _deepspeed_checkpoint_globals() -> list:
    """The classes DeepSpeed's own checkpoint files hold besides tensors (its ZeRO stage enum, the loss
    scaler's and the fragment map's plain attributes; found by loading ZeRO-2 and ZeRO-3 checkpoints
    of this project). The weights-only unpickler rebuilds them from data without calling their code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19.8 loads every file of a checkpoint (model states, optimizer shards) with
    ``weights_only=False``, so a planted pickle in a resumed folder would run code. This wrapper
    keeps the engine's saving and commit logic and replaces only ``load``: anything beyond
    tensors, containers and DeepSpeed's plain data types raises ``pickle.UnpicklingError``.
    """

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loading(engine) -> None:
    """Make a DeepSpeed engine read checkpoints without executing pickled code."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
