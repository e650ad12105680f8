"""Training, as a library: the config schema, the SAT engine wrapper, memory planning, model cards.

``train_video_concat.py`` keeps the DeepSpeed loop; ``tools/precompute_latents.py`` and tests use
the schema and helpers from here. The DiT is built by ``sgm.pipeline.load_dit`` exactly as for
sampling, and every checkpoint folder gets a model card (``kaleido_model.json``) so that
``sample_video.py load=<save>`` needs no model YAML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sat.training import OptimizerConfig, ScheduleConfig, estimate_memory, gib
from sgm.checkpoint import SAT_MODEL_FILE, write_model_card, write_sat_checkpoint
from sgm.data.video import DataConfig
from sgm.pipeline import Components, ComponentsConfig
from sgm.registry import architecture_card, build_dit, count_parameters


@dataclass
class TrainingConfig(ComponentsConfig):
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train_iters: int = 5000  # optimizer steps
    micro_batch_size: int = 1
    gradient_accumulation: int = 8
    zero_stage: int = 2
    ucg_rate: float = 0.1
    save: str = "checkpoints/kaleido"
    save_interval: int = 100
    keep_last: int = 3
    log_interval: int = 1
    seed: int = 0


class DiffusionEngine(nn.Module):
    """Holds the DiT at ``model.diffusion_model`` so saved keys read ``model.diffusion_model.*`` (SAT)."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = dit

    def forward(self, x, timesteps, context, subjects, token_offset=(0, 0)):
        return self.model.diffusion_model(x, timesteps, context, subjects, token_offset=token_offset)


def training_card(config: TrainingConfig, components: Components, save_dir: Path) -> dict:
    """The model card of a training run: architecture, dtype, and the VAE and text encoder it used."""
    return architecture_card(
        components.name,
        components.arch,
        components.dtype,
        vae=os.path.relpath(Path(components.vae_path).resolve(), save_dir.resolve()),
        text_encoder=os.path.relpath(Path(components.text_encoder_path).resolve(), save_dir.resolve()),
        text_max_length=config.text_encoder.max_length,
    )


def write_training_card(config: TrainingConfig, components: Components, save_dir: Path) -> Path:
    return write_model_card(save_dir, training_card(config, components, save_dir))


def save_consolidated(engine, folder: Path, rank: int) -> None:
    """ZeRO-3: write the full DiT as ``<folder>/mp_rank_00_model_states.pt`` (``module`` key, SAT layout)."""
    tmp_name = f".{SAT_MODEL_FILE}.gathered"
    engine.save_16bit_model(str(folder), tmp_name)
    if rank == 0:
        state = torch.load(folder / tmp_name, map_location="cpu", weights_only=True)
        write_sat_checkpoint(folder.parent, state, iteration=folder.name, move_latest=False)
        (folder / tmp_name).unlink()
    dist.barrier()


def memory_table(config: TrainingConfig, components: Components, world_sizes: list[int]) -> list[str]:
    """The ``--dry-run`` report: parameters, tokens per sample, per-GPU memory by ZeRO stage."""
    arch = components.arch
    params = count_parameters(build_dit(arch, device="meta"))
    geometry = components.geometry
    frames = geometry.latent_frames(config.data.num_frames)
    tokens = geometry.tokens(
        height=config.data.height, width=config.data.width, latent_frames=frames, references=config.data.max_references
    )
    lines = [
        f"{components.name}: {params:,} parameters, {arch.num_layers} layers x {arch.hidden_size}",
        f"sample: {config.data.height}x{config.data.width}, {config.data.num_frames} frames + "
        f"{config.data.max_references} references = {tokens:,} tokens; "
        f"sequence parallel {config.sequence_parallel_size}",
        "| GPUs | ZeRO | weights | gradients | optimizer | activations (ckpt) | activations (no ckpt) "
        "| total (ckpt) GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for world in world_sizes:
        for stage in (2, 3):
            m = estimate_memory(
                params,
                arch.num_layers,
                arch.hidden_size,
                arch.inner_hidden_size,
                tokens * config.micro_batch_size,
                world,
                config.sequence_parallel_size,
                stage,
            )
            total = m.weights + m.gradients + m.optimizer + m.activations_checkpointed
            lines.append(
                f"| {world} | {stage} | {gib(m.weights)} | {gib(m.gradients)} | {gib(m.optimizer)} | "
                f"{gib(m.activations_checkpointed)} | {gib(m.activations_full)} | {gib(total)} |"
            )
    return lines
