"""Train or fine-tune the Kaleido DiT with DeepSpeed.

    torchrun --nproc_per_node N train_video_concat.py \
        --config configs/model/X.yaml configs/training/Y.yaml [key=value ...]
    python train_video_concat.py --config ... --dry-run --world-size 8 16 64

Each micro-batch: the video and every reference are VAE-encoded (references one frame each),
captions encoded with 10 % dropped to "" (the decision seeded by step and data rank, identical on
a sequence-parallel group); σ logit-normal with the resolution shift and ε drawn from a generator
seeded by (seed, step, data rank), so every rank of a group draws the same; the rectified-flow
MSE on the velocity. VAE and text encoder are frozen and outside the optimizer.

Checkpoints: ``<save>/<iteration>/mp_rank_00_model_states.pt`` with the DiT under ``module`` as
``model.diffusion_model.*`` (what ``sample_video.py load=<save>`` reads) plus DeepSpeed's optimizer
and scheduler states, and ``<save>/latest`` written last; ``<save>/kaleido_model.json`` (the
architecture, dtype, VAE and text encoder) lets ``sample_video.py load=<save>`` work without a model
YAML. A run resumes from ``<save>/latest`` when present (data position included; every file is read
weights-only, a checkpoint that needs code to load is refused); otherwise it starts from ``load``
(strict) or from scratch. The schema and helpers are in ``sgm.training``; this file is the loop.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sat.arguments import config_parser, parse_config
from sat.config import to_yaml
from sgm.checkpoint import refusal, write_atomic
from sgm.data.video import BadDataError, VideoDataset, next_usable_batch
from sgm.models.engine import training_loss
from sgm.models.wan_vae import frame_multiple
from sgm.pipeline import resolve_components
from sgm.training import (
    TrainingConfig,
    build_training,
    init_distributed,
    lock_save_dir,
    lora_memory_table,
    memory_table,
    resume_position,
    save_checkpoint,
    truncate_log,
    validate_training,
    write_training_card,
)

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="build on the meta device, print sizes and memory")
    parser.add_argument("--world-size", type=int, nargs="+", default=[8, 16, 64], help="GPU counts for --dry-run")
    parser.add_argument("--lora-world-size", type=int, nargs="+", default=[1, 2, 8], help="GPU counts, LoRA table")
    args, config = parse_config(parser, TrainingConfig, argv)
    try:
        components = resolve_components(config, planning=args.dry_run)
        if args.dry_run:
            print("\n".join(memory_table(config, components, args.world_size)))
            if config.lora.rank > 0:
                print("\n".join(lora_memory_table(config, components, args.lora_world_size)))
            return 0
        validate_training(config, components)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")

    device, parallel = init_distributed(config)
    save_dir = Path(config.save)
    if parallel.rank == 0:
        try:
            lock = lock_save_dir(save_dir)  # noqa: F841 (held until the process ends)
        except RuntimeError as exc:
            log.error("%s", exc)
            return 2
    # Under torchrun, a launcher that died leaves this process to a new parent: stop, do not write on.
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
    torch.manual_seed(config.seed)
    run = build_training(config, components, device, parallel)
    try:
        iteration, data_epoch, data_chunk = resume_position(run, save_dir)
    except pickle.UnpicklingError as exc:
        log.error("refusing to resume from %s: %s", save_dir, refusal("a checkpoint file", exc))
        return 2
    except (RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("cannot resume from %s: a checkpoint file is truncated or corrupt (%s)", save_dir, first)
        return 2
    engine, scheduler = run.engine, run.scheduler
    if parallel.rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(save_dir / "config.yaml", to_yaml(config))
        write_training_card(config, components, run)

    dataset = VideoDataset(
        config.data,
        config.micro_batch_size,
        parallel.dp_rank,
        parallel.dp_size,
        data_epoch,
        data_chunk,
        frames_multiple=frame_multiple(components.geometry.temporal_stride),
        targets=config.alignment.layer > 0,
    )
    batches_per_epoch = len(dataset.chunks(0))
    loader = iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=config.data.num_workers,
            persistent_workers=config.data.num_workers > 0,
        )
    )
    csv_file = save_dir / "train_log.csv"
    writer = None
    if parallel.rank == 0:
        truncate_log(csv_file, iteration)  # rows past the checkpoint are written again
        new = not csv_file.exists()
        handle = open(csv_file, "a", newline="")  # noqa: SIM115 (closed at the end)
        writer = csv.writer(handle)
        if new:
            # with alignment, "loss" stays the diffusion loss (comparable across runs); the auxiliary one has a column
            writer.writerow(
                ["iteration", "loss", "lr", "grad_norm", "samples_per_s", "skipped"]
                + (["alignment_loss"] if config.alignment.layer > 0 else [])
            )
    bad_samples: set[str] = set()  # distinct bad samples seen by this rank
    start_time = time.perf_counter()
    bar = tqdm(
        range(iteration, config.train_iters),
        desc="train",
        disable=parallel.rank != 0,
        initial=iteration,
        total=config.train_iters,
    )
    for iteration in bar:
        if launcher is not None and os.getppid() != launcher:
            log.error(
                "the launcher (pid %d) is gone: stopping at iteration %d without writing more", launcher, iteration
            )
            return 3
        losses, aligns, samples = [], [], 0
        step_start = time.perf_counter()
        for micro in range(config.gradient_accumulation):
            try:
                batch, bad = next_usable_batch(loader, batches_per_epoch)
            except BadDataError as exc:
                log.error("data.root: %s", exc)
                return 2
            bad_samples.update(sample_id for sample_id, _ in bad)
            data_epoch, data_chunk = batch["epoch"], batch["chunk"]
            step = iteration * config.gradient_accumulation + micro
            parts = {}
            loss = training_loss(
                engine,
                run.vae,
                run.conditioner,
                batch,
                step=step,
                seed=config.seed,
                parallel=parallel,
                geometry=components.geometry,
                sp_split=config.sp_split,
                subject_weight=config.subject_loss_weight,
                shift=config.training_shift,
                alignment_weight=config.alignment.weight if config.alignment.layer > 0 else 0.0,
                parts=parts,
            )
            engine.backward(loss)
            engine.step()
            losses.append(parts["diffusion"])
            if "alignment" in parts:
                aligns.append(parts["alignment"])
            samples += batch["size"]
        if run.ema is not None:
            run.ema.update()
        mean_loss = torch.stack(losses).mean()
        mean_align = torch.stack(aligns).mean() if aligns else None
        if parallel.world_size > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= parallel.world_size
            if mean_align is not None:
                dist.all_reduce(mean_align)
                mean_align /= parallel.world_size
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        lr = scheduler.get_last_lr()[0]
        rate = samples * parallel.dp_size / (time.perf_counter() - step_start)
        if writer is not None and (iteration + 1) % config.log_interval == 0:
            writer.writerow(
                [
                    iteration + 1,
                    f"{mean_loss.item():.6f}",
                    f"{lr:.3e}",
                    f"{grad_norm:.4f}",
                    f"{rate:.3f}",
                    len(bad_samples),
                ]
                + ([f"{mean_align.item():.6f}"] if mean_align is not None else [])
            )
            handle.flush()
            bar.set_postfix(
                loss=f"{mean_loss.item():.4f}", lr=f"{lr:.2e}", grad=f"{grad_norm:.3f}", samples_s=f"{rate:.2f}"
            )
        if (iteration + 1) % config.save_interval == 0 or iteration + 1 == config.train_iters:
            client = {"iteration": iteration + 1, "data_epoch": data_epoch, "data_chunk": data_chunk}
            save_checkpoint(run, config, save_dir, iteration + 1, client, parallel.rank)
    if parallel.rank == 0:
        log.info(
            "trained to iteration %d in %.1f s; %d bad samples skipped; checkpoints in %s",
            config.train_iters,
            time.perf_counter() - start_time,
            len(bad_samples),
            save_dir,
        )
        handle.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Ends the process without interpreter teardown: DeepSpeed ZeRO-3 threads occasionally abort
    # at exit otherwise (environment.md §3).
    os._exit(code)
