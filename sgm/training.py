"""Training, as a library: the config schema, the SAT engine wrapper, memory planning, model cards.

``train_video_concat.py`` keeps the DeepSpeed loop; ``tools/precompute_latents.py`` and tests use
the schema and helpers from here. The DiT is built by ``sgm.pipeline.load_dit`` exactly as for
sampling, and every checkpoint folder gets a model card (``kaleido_model.json``) so that
``sample_video.py load=<save>`` needs no model YAML.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from sat.parallel import ParallelState, free_port, init_parallel
from sat.training import (
    OptimizerConfig,
    ScheduleConfig,
    deepspeed_config,
    estimate_lora_memory,
    estimate_memory,
    gib,
    lr_factor,
    parameter_groups,
    prune_checkpoints,
    register_zero3_parameters,
    remove_recovery_scripts,
    use_weights_only_loading,
)
from sgm.checkpoint import LATEST_FILE, SAT_MODEL_FILE, write_atomic, write_model_card, write_sat_checkpoint
from sgm.data.video import DataConfig, VideoDataset
from sgm.diffusion.alignment import TARGETS_FOLDER, AlignmentHead, alignment_loss, head_outputs
from sgm.lora import (
    LORA_FILE,
    LORA_INFO_FILE,
    LoraTrainConfig,
    add_trainable_lora,
    lora_modules,
    restore_fp8_storage,
    trainable_lora_state_dict,
)
from sgm.models.wan_vae import WanVAE, build_vae, frame_multiple
from sgm.modules.encoders.conditioner import TextConditioner
from sgm.modules.encoders.text import build_text_encoder
from sgm.pipeline import (
    Components,
    ComponentsConfig,
    check_device,
    check_sequence_parallel,
    enable_sequence_parallel,
    load_dit,
)
from sgm.registry import architecture_card, build_dit, count_parameters, resolve_device

log = logging.getLogger(__name__)


@dataclass
class AlignmentConfig:
    """The ``alignment:`` section: an auxiliary loss on the hidden states after ``layer`` DiT layers,
    through a training-only head, against per-token targets from ``<data.root>/targets/``
    (``sgm.diffusion.alignment``; REPA-style, not in the release). ``layer: 0`` is off (the release)."""

    layer: int = 0
    weight: float = 0.5  # REPA's lambda


@dataclass
class TrainingConfig(ComponentsConfig):
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)  # rank > 0: train adapters on a frozen base
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train_iters: int = 5000  # optimizer steps
    micro_batch_size: int = 1
    gradient_accumulation: int = 8
    zero_stage: int = 2
    ucg_rate: float = 0.1
    subject_loss_weight: float = 1.0  # > 1: the loss leans toward the subjects' latent cells (1: the release's)
    training_shift: float | None = None  # shift of the logit-normal noise levels; unset: the release's resolution shift
    ema_decay: float | None = None  # keep an exponential moving average of the DiT's weights (e.g. 0.999); unset: none
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    save: str = "checkpoints/kaleido"
    save_interval: int = 100
    keep_last: int = 3
    log_interval: int = 1
    seed: int = 0


def validate_training(config: TrainingConfig, components: Components) -> None:
    """Everything checkable before a process group starts or a weight loads: the sequence-parallel
    layout at the data's size, and a dataset root with videos at a frame count the VAE encodes."""
    for key in ("train_iters", "micro_batch_size", "gradient_accumulation", "save_interval", "log_interval"):
        if getattr(config, key) < 1:
            raise ValueError(f"{key}: expected at least 1, got {getattr(config, key)}")
    if not config.subject_loss_weight > 0:
        raise ValueError(f"subject_loss_weight: expected a number > 0, got {config.subject_loss_weight}")
    if config.training_shift is not None and not config.training_shift > 0:
        raise ValueError(
            f"training_shift: expected a number > 0 (or unset: the resolution shift), got {config.training_shift}"
        )
    if config.ema_decay is not None and not 0 < config.ema_decay < 1:
        raise ValueError(f"ema_decay: expected a number between 0 and 1 (or unset: no average), got {config.ema_decay}")
    if config.ema_decay is not None and (config.lora.rank > 0 or config.zero_stage == 3):
        raise ValueError(
            "ema_decay: the weight average is kept for full training with zero_stage 1 or 2 "
            "(every rank then holds the whole DiT), not for LoRA or ZeRO-3"
        )
    check_alignment(config, components)
    check_device(config.device)
    components.geometry.check_size(config.data.height, config.data.width, "data.height, data.width")
    if config.lora.rank > 0 and config.zero_stage == 3:
        raise ValueError(
            "lora.rank: LoRA training runs with zero_stage 1 or 2 (the adapters are small; ZeRO-3 is not needed)"
        )
    if config.lora.rank > 0 and not config.load:
        raise ValueError("lora.rank: LoRA training needs base weights to adapt (load=...)")
    if config.lora.rank > 0:
        lora_modules(build_dit(components.arch, device="meta"), config.lora.targets)  # valid targets
    check_sequence_parallel(
        components.geometry,
        components.arch,
        height=config.data.height,
        width=config.data.width,
        sp_size=config.sequence_parallel_size,
        sp_split=config.sp_split,
        world=int(os.environ.get("WORLD_SIZE", "1")),
    )
    VideoDataset(config.data, frames_multiple=frame_multiple(components.geometry.temporal_stride))


def check_alignment(config: TrainingConfig, components: Components) -> None:
    """The ``alignment`` section against the DiT and the run: a layer the DiT has, a positive weight,
    one process per replica holding the whole DiT (no sequence parallelism, no ZeRO-3, no LoRA: the
    head's weights must be trained and saved with the DiT's), and targets beside the data."""
    layer, layers = config.alignment.layer, components.arch.num_layers
    if not 0 <= layer <= layers:
        raise ValueError(f"alignment.layer: expected 0 (off) to {layers} (the DiT's layers), got {layer}")
    if layer == 0:
        return
    if not config.alignment.weight > 0:
        raise ValueError(f"alignment.weight: expected a number > 0, got {config.alignment.weight}")
    if config.sequence_parallel_size > 1 or config.zero_stage == 3 or config.lora.rank > 0:
        raise ValueError(
            "alignment.layer: the alignment loss trains a full DiT without sequence parallelism or ZeRO-3 "
            "(sequence_parallel_size 1, zero_stage 1 or 2, lora.rank 0)"
        )
    folder = Path(config.data.root) / TARGETS_FOLDER
    if not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"alignment.layer: {folder} holds no target files (tools/make_token_targets.py --data {config.data.root})"
        )


def alignment_head_for(config: TrainingConfig, components: Components) -> AlignmentHead | None:
    """The training-only head of an alignment run, sized by the first target file; else None."""
    if config.alignment.layer == 0:
        return None
    first = min((Path(config.data.root) / TARGETS_FOLDER).glob("*.safetensors"))
    return AlignmentHead(components.arch.hidden_size, head_outputs(safetensors.torch.load_file(str(first))))


def init_distributed(config: TrainingConfig) -> tuple[torch.device, ParallelState]:
    """The device, the sequence-parallel groups, and a process group even for one process
    (DeepSpeed needs one): a free loopback port so that two single-process jobs do not clash."""
    device = resolve_device(config.device)
    parallel = init_parallel(config.sequence_parallel_size, device)
    if not dist.is_initialized():
        for key, value in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(free_port())),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
        ):
            os.environ.setdefault(key, value)
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=0, world_size=1)
    return device, parallel


@dataclass
class TrainingRun:
    """What the loop needs: the DeepSpeed engine (the DiT inside), its scheduler, the frozen parts."""

    engine: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    vae: WanVAE
    conditioner: TextConditioner
    lora_modules: list[str] = field(default_factory=list)  # adapted layers of a LoRA run (else empty)
    lora_info: dict = field(default_factory=dict)  # lora.json of a LoRA run
    ema: WeightAverage | None = None  # with ema_decay: the average of the DiT's weights


EMA_FILE = "ema.safetensors"  # in a checkpoint folder: the averaged DiT, loadable as load=<folder>/ema.safetensors


def ema_rate(updates: int, decay: float) -> float:
    """The decay of update number ``updates`` (from 1): ``min(decay, (1 + n) / (10 + n))``, as SGM's
    ``LitEma`` (spec-vae-t5-data §6): early updates move the average fast, so a short run's
    average is not dominated by its random initial weights."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """An exponential moving average of a module's floating-point weights, in float32 beside them.

    ``update`` after every optimizer step: ``avg ← avg − (1 − d)·(avg − w)`` with ``d = ema_rate``.
    ``state_dict`` is the module's state dict with the float32 averages in place of its parameters
    (buffers as they are): it loads wherever the module's weights load (a loader casts to the
    model's dtype), and a resumed run continues the average exactly.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay, self.updates = module, decay, 0
        self.average = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        rate = 1 - ema_rate(self.updates, self.decay)
        for name, param in self.module.named_parameters():
            average = self.average[name]
            average.sub_(rate * (average - param.detach().float()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in self.module.state_dict().items():
            out[name] = self.average.get(name, value).contiguous()
        return out

    def save(self, path: Path) -> None:
        """The averaged weights and the update count, through a temporary name."""
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tensors = {name: t.detach().cpu() for name, t in self.state_dict().items()}
        safetensors.torch.save_file(tensors, str(tmp), metadata={"ema_updates": str(self.updates)})
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Continue from a saved average (its parameters and update count)."""
        with safetensors.safe_open(str(path), framework="pt") as handle:
            self.updates = int(handle.metadata()["ema_updates"])
            for name, average in self.average.items():
                average.copy_(handle.get_tensor(name).float())

    def restart(self) -> None:
        """Start the average afresh at the module's current weights."""
        self.updates = 0
        for name, param in self.module.named_parameters():
            self.average[name].copy_(param.detach().float())


def build_training(
    config: TrainingConfig, components: Components, device: torch.device, parallel: ParallelState
) -> TrainingRun:
    """The DiT (``load_dit``, sequence parallel, ZeRO-3 registration), the frozen VAE and text
    conditioner, AdamW with its groups and the learning-rate schedule, inside DeepSpeed; checkpoint
    reads are weights-only."""
    import deepspeed

    dit = load_dit(components, config.load, device, checkpoint_activations=config.model.checkpoint_activations)
    adapted = add_trainable_lora(dit, config.lora) if config.lora.rank > 0 else []
    enable_sequence_parallel(dit, parallel)
    if config.zero_stage == 3:
        register_zero3_parameters(dit, dit.external_parameter_reads())
    vae = build_vae(dataclasses.replace(config.vae, path=components.vae_path), device)
    text_config = dataclasses.replace(config.text_encoder, path=components.text_encoder_path)
    conditioner = TextConditioner(build_text_encoder(text_config, device), config.ucg_rate, config.seed)
    head = alignment_head_for(config, components)
    if head is not None:
        head.to(device=device, dtype=components.dtype)
    optimizer = torch.optim.AdamW(
        parameter_groups(dit, config.optimizer.weight_decay)
        + ([] if head is None else [{"params": list(head.parameters()), "weight_decay": 0.0}]),
        lr=config.optimizer.lr,
        betas=tuple(config.optimizer.betas),
        eps=config.optimizer.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k + 1, config.train_iters, config.schedule)
    )
    ds_config = deepspeed_config(
        config.micro_batch_size,
        config.gradient_accumulation,
        parallel.world_size,
        config.zero_stage,
        config.optimizer.gradient_clipping,
        bf16=components.dtype == torch.bfloat16,
    )
    model = DiffusionEngine(dit, head, config.alignment.layer)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    use_weights_only_loading(engine)
    restore_fp8_storage(dit)
    if adapted:
        trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
        log.info("LoRA rank %d on %d layers: %s trainable parameters", config.lora.rank, len(adapted), f"{trainable:,}")
    info = lora_info(config, components, adapted) if adapted else {}
    ema = WeightAverage(dit, config.ema_decay) if config.ema_decay is not None else None
    return TrainingRun(engine, scheduler, vae, conditioner, adapted, info, ema)


COMPLETE_FILE = "complete.json"  # written in a checkpoint folder once every rank has finished it
FAULT_ENV = "KALEIDO_TEST_KILL_AT"  # tests only: "<point>:<iteration>[:<rank>]" kills a rank mid-save


def _fault(point: str, iteration: int, rank: int) -> None:
    """Fault injection for the resume tests: die like a killed process at ``point`` of a save."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) >= 2 and spec[0] == point and int(spec[1]) == iteration and int((spec + ["0"])[2]) == rank:
        os._exit(137)


def complete_checkpoints(save_dir: Path) -> list[str]:
    """Tags of the checkpoint folders every rank finished (``complete.json`` and its file sizes hold),
    newest first."""
    tags = []
    for folder in save_dir.iterdir() if save_dir.is_dir() else []:
        marker = folder / COMPLETE_FILE
        if not (folder.name.isdigit() and marker.is_file()):
            continue
        try:
            files = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            continue
        if all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items()):
            tags.append(folder.name)
    return sorted(tags, key=int, reverse=True)


def resume_position(run: TrainingRun, save_dir: Path) -> tuple[int, int, int]:
    """``(iteration, data epoch, data chunk)`` to start from: the newest complete checkpoint of
    ``save_dir`` (weights, optimizer, schedule; ``pickle.UnpicklingError`` for a file that needs
    code), else the start. A damaged or unfinished newest checkpoint (a run killed while saving)
    falls back to the previous complete one with a warning. A LoRA run's checkpoints hold the
    adapters only: the base comes from ``load``."""
    if not (save_dir / LATEST_FILE).is_file():
        return 0, 0, 0
    latest = (save_dir / LATEST_FILE).read_text().strip()
    complete = complete_checkpoints(save_dir)
    has_markers = any((folder / COMPLETE_FILE).is_file() for folder in save_dir.iterdir() if folder.is_dir())
    candidates = complete if has_markers else [latest]  # runs from before the markers: trust latest
    if has_markers and latest not in complete:
        fallback = complete[0] if complete else "none, starting over"
        log.warning(
            "%s: checkpoint %s is incomplete (a run stopped while saving): using %s", save_dir, latest, fallback
        )
    for tag in candidates:
        try:
            _, client = run.engine.load_checkpoint(str(save_dir), tag=tag, load_module_strict=not run.lora_modules)
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            log.warning("%s: checkpoint %s cannot be read (%s): trying the one before", save_dir, tag, exc)
            continue
        if client is None:
            continue
        if run.ema is not None:
            average = save_dir / tag / EMA_FILE
            if average.is_file():
                run.ema.load(average)
            else:
                run.ema.restart()
                log.warning("%s: checkpoint %s has no %s: the weight average starts here", save_dir, tag, EMA_FILE)
        log.info("resumed from %s at iteration %d", save_dir, client["iteration"])
        return client["iteration"], client["data_epoch"], client["data_chunk"] + 1
    return 0, 0, 0


def save_checkpoint(run: TrainingRun, config: TrainingConfig, save_dir: Path, iteration: int, client: dict, rank: int):
    """One checkpoint: ``<save>/<iteration>/`` with DeepSpeed's states (adapters only for a LoRA run,
    plus ``lora.safetensors`` in our LoRA layout for ``sample_video.py lora=[...]``; the whole DiT
    consolidated for ZeRO-3). ``latest`` moves only after every rank has finished writing and
    ``complete.json`` (the folder's files and sizes) is in place; then old checkpoints are pruned."""
    folder = save_dir / str(iteration)
    _fault("before", iteration, rank)
    if run.lora_modules and rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{LORA_FILE}.tmp{os.getpid()}"
        safetensors.torch.save_file(trainable_lora_state_dict(run.engine.module.model.diffusion_model), str(tmp))
        os.replace(tmp, folder / LORA_FILE)
        write_atomic(folder / LORA_INFO_FILE, json.dumps(run.lora_info, indent=2) + "\n")  # self-contained
    if run.ema is not None and rank == 0:  # every rank holds the same average (ZeRO-1/2 replicate the weights)
        folder.mkdir(parents=True, exist_ok=True)
        run.ema.save(folder / EMA_FILE)
    if config.zero_stage == 3:  # gather the partitioned weights into the file samplers read
        save_consolidated(run.engine, folder, rank)
    run.engine.save_checkpoint(
        str(save_dir),
        tag=str(iteration),
        client_state=client,
        save_latest=False,  # DeepSpeed's rank 0 would write it before the other ranks are done
        exclude_frozen_parameters=bool(run.lora_modules),
    )
    _fault("shards", iteration, rank)
    dist.barrier()  # every rank's files are complete
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE_FILE}
        write_atomic(folder / COMPLETE_FILE, json.dumps({"iteration": iteration, "files": files}, indent=1) + "\n")
        _fault("complete", iteration, rank)
        write_atomic(save_dir / LATEST_FILE, f"{iteration}\n")
        _fault("latest", iteration, rank)
        remove_recovery_scripts(save_dir)
        prune_checkpoints(save_dir, config.keep_last)
    dist.barrier()


def truncate_log(csv_file: Path, iteration: int) -> None:
    """Keep the rows of ``train_log.csv`` up to ``iteration`` (a resumed run rewrites the rest)."""
    if not csv_file.is_file():
        return
    lines = csv_file.read_text().splitlines(keepends=True)
    numbers = [line.split(",", 1)[0] for line in lines[1:]]
    kept = lines[:1] + [line for line, n in zip(lines[1:], numbers, strict=True) if n.isdigit() and int(n) <= iteration]
    if kept != lines:
        write_atomic(csv_file, "".join(kept))


def lock_save_dir(save_dir: Path):
    """An exclusive lock on ``<save>/.train.lock`` for this process's lifetime, or ``RuntimeError``
    naming the holder: two trainings never write into one folder. The kernel drops it on exit."""
    import fcntl

    save_dir.mkdir(parents=True, exist_ok=True)
    handle = open(save_dir / ".train.lock", "a+")  # noqa: SIM115 (held open for the lock's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RuntimeError(f"save: another training ({holder}) is writing into {save_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


class DiffusionEngine(nn.Module):
    """Holds the DiT at ``model.diffusion_model`` so saved keys read ``model.diffusion_model.*`` (SAT),
    and an alignment run's training-only head at ``alignment_head`` (dropped by every DiT loader)."""

    def __init__(self, dit: nn.Module, alignment_head: nn.Module | None = None, alignment_layer: int = 0):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = dit
        if alignment_head is not None:
            self.alignment_head = alignment_head
        self.alignment_layer = alignment_layer

    def forward(self, x, timesteps, context, subjects, token_offset=(0, 0), alignment_targets=None):
        """The DiT's velocity; with ``alignment_targets`` (batch targets, ``sgm.diffusion.alignment``)
        ``(velocity, alignment loss)`` of the hidden states after ``alignment_layer`` layers."""
        dit = self.model.diffusion_model
        if alignment_targets is None:
            return dit(x, timesteps, context, subjects, token_offset=token_offset)
        captured = []
        layer = dit.transformer.layers[self.alignment_layer - 1]
        hook = layer.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            velocity = dit(x, timesteps, context, subjects, token_offset=token_offset)
        finally:
            hook.remove()
        patch = tuple(dit.config.patch_size)
        video_tokens = math.prod(n // p for n, p in zip((x.shape[1], *x.shape[3:]), patch, strict=True))
        hidden = captured[-1]  # [B, L_subjects + L_video, D]: the subject tokens come first
        video = self.alignment_head(hidden[:, -video_tokens:])
        references = self.alignment_head(hidden[:, :-video_tokens]) if hidden.shape[1] > video_tokens else None
        return velocity, alignment_loss(video, alignment_targets, patch, references)


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


def lora_info(config: TrainingConfig, components: Components, modules: list[str]) -> dict:
    """``lora.json`` of a LoRA run: rank, alpha, targets, adapted layers, and the base model's card
    and weights (its paths relative to the save folder, like the model card's)."""
    return {
        "format": "kaleido-lora/1",
        "rank": config.lora.rank,
        "alpha": float(config.lora.alpha if config.lora.alpha is not None else config.lora.rank),
        "targets": list(config.lora.targets),
        "base_storage": config.lora.base_storage,
        "modules": modules,
        "base": {**training_card(config, components, Path(config.save)), "weights": config.load},
        "file": f"<iteration>/{LORA_FILE}",
    }


def write_training_card(config: TrainingConfig, components: Components, run: TrainingRun) -> Path:
    """The run's card: ``kaleido_model.json`` for a full run; ``lora.json`` for a LoRA run, whose
    folders hold no whole DiT (``sample_video.py`` then says how to sample it)."""
    save_dir = Path(config.save)
    if not run.lora_info:
        return write_model_card(save_dir, training_card(config, components, save_dir))
    write_atomic(save_dir / LORA_INFO_FILE, json.dumps(run.lora_info, indent=2) + "\n")
    return save_dir / LORA_INFO_FILE


def save_consolidated(engine, folder: Path, rank: int) -> None:
    """ZeRO-3: write the full DiT as ``<folder>/mp_rank_00_model_states.pt`` (``module`` key, SAT layout)."""
    tmp_name = f".{SAT_MODEL_FILE}.gathered"
    engine.save_16bit_model(str(folder), tmp_name)
    if rank == 0:
        state = torch.load(folder / tmp_name, map_location="cpu", weights_only=True)
        write_sat_checkpoint(folder.parent, state, iteration=folder.name, move_latest=False)
        (folder / tmp_name).unlink()
    dist.barrier()


def sample_tokens(config: TrainingConfig, components: Components) -> int:
    """DiT tokens of one training sample: its latent frames plus the most references."""
    geometry = components.geometry
    return geometry.tokens(
        height=config.data.height,
        width=config.data.width,
        latent_frames=geometry.latent_frames(config.data.num_frames),
        references=config.data.max_references,
    )


def lora_memory_table(config: TrainingConfig, components: Components, world_sizes: list[int]) -> list[str]:
    """The ``--dry-run`` report of a LoRA run: per-GPU memory with a bf16 or fp8 base."""
    arch = components.arch
    model = build_dit(arch, device="meta")
    params = count_parameters(model)
    adapted = add_trainable_lora(model, config.lora)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = [model.get_submodule(name).in_features * model.get_submodule(name).out_features for name in adapted]
    largest, adapted_weights = max(sizes), sum(sizes)
    tokens = sample_tokens(config, components)
    lines = [
        f"LoRA rank {config.lora.rank} on {', '.join(config.lora.targets)} ({len(adapted)} layers): "
        f"{adapters:,} trainable of {params:,} parameters ({100 * adapters / params:.2f} %)",
        "| GPUs | base | base GiB | adapters + grads | optimizer | weight gradient | activations (ckpt) | total GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fp8_bytes = (adapted_weights + 2 * (params - adapted_weights)) / params  # adapted weights 1 B, the rest 2 B
    for world in world_sizes:
        for base_name, base_bytes in (("bf16", 2.0), ("fp8", fp8_bytes)):
            m = estimate_lora_memory(
                params,
                adapters,
                largest,
                base_bytes,
                arch.num_layers,
                arch.hidden_size,
                arch.inner_hidden_size,
                tokens * config.micro_batch_size,
                world,
                config.sequence_parallel_size,
            )
            total = m.base + m.adapters + m.optimizer + m.weight_gradient + m.activations_checkpointed
            lines.append(
                f"| {world} | {base_name} | {gib(m.base)} | {gib(m.adapters)} | {gib(m.optimizer)} | "
                f"{gib(m.weight_gradient)} | {gib(m.activations_checkpointed)} | {gib(total)} |"
            )
    return lines


def memory_table(config: TrainingConfig, components: Components, world_sizes: list[int]) -> list[str]:
    """The ``--dry-run`` report: parameters, tokens per sample, per-GPU memory by ZeRO stage."""
    arch = components.arch
    params = count_parameters(build_dit(arch, device="meta"))
    tokens = sample_tokens(config, components)
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
