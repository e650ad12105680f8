"""Train a small Wan-architecture VAE (``AutoencoderKLWan``, same 4×8×8 compression) on shapes clips.

    python tools/train_vae.py --data data/shapes --out assets/kaleido-shapes/vae --minutes 60

Clips and reference images (as one-frame clips, the way references are encoded) are reconstructed
with an L1 + MSE loss plus a small KL term. The decoder reads the posterior mean, which is what
Kaleido encodes (``--sample-posterior`` decodes a sample instead; on this data it converged no
faster). The network is convolutional, so it is trained on random crops (``--crop`` pixels,
``--frames`` frames): per clip about six times cheaper than whole 96×96×9 clips. The last
``--full-fraction`` of the budget trains on whole clips, so borders are seen as at sampling time.
``--init`` continues from a saved VAE; ``--freeze-encoder`` trains the decoder only, which keeps
the latent space (and a DiT trained on it) valid while the reconstructions improve. Training stops
at the time budget; the model is saved as a diffusers folder (``config.json`` with the latent
mean/std measured on training clips, so the wrapper normalises them like Wan's, and the weights),
written to a temporary folder and renamed. The held-out clips' reconstruction PSNR is printed.

The learning rate is constant by default; ``--schedule cosine`` (the shipped VAE's recipe) makes it
follow the elapsed share of the time budget, a linear warm-up (``--warmup-fraction``) then a
cosine decay to ``--min-lr-fraction``, with the DiT's schedule function (``sat.training.lr_factor``)
on a 1,000-tick clock of the budget. Measured on one 2-core CPU (about 1.7× slower than the one
the previous VAE was trained on): 45 minutes, 40-px crops, lr 1.5e-3, 2 % warm-up, cosine gave
22.64 dB held out, no better than the previous constant-lr recipe (22.95 dB after 25 minutes).

The Wan RMS norms are switched to their sum-of-squares form while training
(``sgm.models.wan_vae.use_fast_rms_norms``: same values, a step of batch 8 × 40-px × 5-frame crops
0.98 → 0.78 s on that CPU, ``benchmarks/vae_train_step.py``). Besides the PSNR over all pixels, the
PSNR over the subjects' pixels (``foreground``) is printed: it is what the shapes detector reads,
and the plain backgrounds flatter the first figure. The previous VAE (constant lr, 25 minutes, then
35 of the decoder alone): 23.68 dB in all, 13.82 dB on the subjects; per frame on the subjects 18.9
dB for the first frame (encoded alone) and 12.1–16.1 dB for the eight frames held by the two 4-frame
latent chunks, while any of those frames encoded alone scores 18.9 dB: the temporal compression of
7-px-per-frame motion costs the subjects 3–7 dB. Six-minute probes (batch 8, 40-px crops, lr 1e-3,
held out: all / subjects): uniform crops 19.10 / 11.50 dB; each crop the window with the most
subject pixels of four random ones 17.29 / 11.34 dB (not kept); a world moving 4 px per frame
instead of 7, 20.75 / 11.73 dB. Sixty minutes with the faster steps (``--schedule cosine
--warmup-fraction 0.02 --crop 48 --batch 8 --full-fraction 0.1``, lr 1e-3, ``--clips 800``): 2,598
steps, 25.01 / 15.14 dB, the shipped VAE.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sat.training import ScheduleConfig, lr_factor  # noqa: E402
from sgm.data.subject_mask import foreground, subject_loss_weights  # noqa: E402
from sgm.models.wan_vae import WanVAE, frame_multiple, use_fast_rms_norms, vae_strides  # noqa: E402

log = logging.getLogger("train_vae")
KL_WEIGHT = 1e-6
SCHEDULE_TICKS = 1000  # the time budget as a clock of this many ticks for sat.training.lr_factor


def load_clips(folder: Path, limit: int) -> torch.Tensor:
    """``[N, 3, F, H, W]`` uint8 clips of a split."""
    import imageio.v2 as imageio

    paths = sorted((folder / "videos").glob("*.mp4"))[:limit]
    clips = [np.stack([f for f in imageio.get_reader(p)]) for p in paths]  # [F, H, W, 3]
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).contiguous()


def load_references(folder: Path, size: int, limit: int) -> torch.Tensor:
    """``[N, 3, 1, size, size]`` uint8: references letterboxed like at sampling time."""
    from sgm.data.references import fit_reference, load_reference

    paths = sorted((folder / "references").glob("*/*.png"))[:limit]
    images = [np.asarray(fit_reference(load_reference(str(p)), size, size)) for p in paths]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)[:, :, None].contiguous()


def parse_architecture(dim_mult: str, temporal_downsample: str) -> dict:
    """``--dim-mult 1,2,2`` and ``--temporal-downsample false,false`` -> ``AutoencoderKLWan`` kwargs."""
    try:
        mult = [int(v) for v in dim_mult.split(",")]
    except ValueError:
        raise ValueError(f"--dim-mult: expected comma-separated integers, got {dim_mult!r}") from None
    flags = [v.strip().lower() for v in temporal_downsample.split(",")]
    if any(f not in ("true", "false") for f in flags):
        raise ValueError(f"--temporal-downsample: expected comma-separated true/false, got {temporal_downsample!r}")
    if len(mult) < 2 or len(flags) != len(mult) - 1:
        raise ValueError(
            f"--temporal-downsample needs one flag per halving (len(--dim-mult) - 1 = {len(mult) - 1}), "
            f"got {len(flags)}"
        )
    return {"dim_mult": mult, "temperal_downsample": [f == "true" for f in flags]}


def save_state(path: Path, model, optimizer, generator: torch.Generator, step: int, elapsed: float) -> None:
    """The training state (weights, optimiser, sampler, clock), written under a temporary name and
    renamed so that a kill leaves the previous state whole."""
    tmp = path.with_name(path.name + ".partial")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "step": step,
        "elapsed": elapsed,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted L1 + MSE over pixels (``weights`` broadcast over the RGB channels)."""
    error = out - x
    return (weights * (error.abs() + error.pow(2))).mean()


def random_crop(x: torch.Tensor, size: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """The same random ``frames × size × size`` window of every item of ``[N, C, F, H, W]``."""
    f0 = int(torch.randint(x.shape[2] - frames + 1, (1,), generator=generator))
    y0, x0 = (int(torch.randint(n - size + 1, (1,), generator=generator)) for n in x.shape[-2:])
    return x[:, :, f0 : f0 + frames, y0 : y0 + size, x0 : x0 + size]


def budget_lr(base_lr: float, elapsed_fraction: float, schedule: ScheduleConfig) -> float:
    """The learning rate after ``elapsed_fraction`` of the time budget (``sat.training.lr_factor``
    on a clock of ``SCHEDULE_TICKS`` ticks)."""
    tick = min(SCHEDULE_TICKS, 1 + int(SCHEDULE_TICKS * max(0.0, elapsed_fraction)))
    return base_lr * lr_factor(tick, SCHEDULE_TICKS, schedule)


def psnr(model, clips: torch.Tensor) -> tuple[float, float]:
    """Reconstruction PSNR (dB) of ``[N, 3, F, H, W]`` uint8 clips: over all pixels, and over the
    subjects' pixels alone (:func:`foreground`), which is what the shapes detector reads."""
    with torch.no_grad():
        x = to_unit(clips)
        out = model(x, sample_posterior=False).sample.clamp(-1, 1)
        error = ((out - x) / 2).pow(2).mean(dim=1)  # [N, F, H, W]
        mask = foreground(clips)
    return decibels(error.mean().item()), decibels(error[mask].mean().item())


def decibels(mse: float) -> float:
    return 10 * math.log10(1 / max(mse, 1e-12))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shapes dataset root (train/ and heldout/)")
    parser.add_argument("--out", required=True, help="output diffusers folder")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    parser.add_argument("--base-dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="clips per step (plus as many references)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clips", type=int, default=800, help="training clips held in memory")
    parser.add_argument("--crop", type=int, default=32, help="side of the random training crops (multiple of 8)")
    parser.add_argument("--frames", type=int, default=5, help="frames of the random crops (1 + 4k)")
    parser.add_argument("--full-fraction", type=float, default=0.15, help="last share of the budget on whole clips")
    parser.add_argument("--init", help="continue from this saved VAE (diffusers folder)")
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (keeps the latents)")
    parser.add_argument(
        "--sample-posterior",
        action="store_true",
        help="decode a posterior sample (a VAE's usual objective) instead of the mean, which Kaleido uses",
    )
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="lr over the budget")
    parser.add_argument("--warmup-fraction", type=float, default=0.0, help="share of the budget warming up")
    parser.add_argument("--min-lr-fraction", type=float, default=0.05, help="cosine floor, as a share of --lr")
    parser.add_argument(
        "--foreground-weight", type=float, default=1.0, help="loss weight of the subjects' pixels (background 1)"
    )
    parser.add_argument("--z-dim", type=int, default=16)
    parser.add_argument("--dim-mult", default="1,2,2,2", help="width multiples per level: levels - 1 halvings of H, W")
    parser.add_argument(
        "--temporal-downsample", default="false,true,true", help="per halving of H, W: whether time is halved too"
    )
    parser.add_argument(
        "--checkpoint", help="training state file: saved every --checkpoint-minutes, resumed when present"
    )
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from diffusers import AutoencoderKLWan

    root = Path(args.data)
    train, held = load_clips(root / "train", args.clips), load_clips(root / "heldout", 16)
    refs = load_references(root / "train", train.shape[-1], 4 * args.clips)
    log.info(
        "%d training clips %s, %d references, %d held-out clips",
        len(train),
        list(train.shape[1:]),
        len(refs),
        len(held),
    )
    torch.manual_seed(args.seed)
    if args.init:
        model = WanVAE.from_diffusers(args.init).model.requires_grad_(True)  # float32; the wrapper freezes it
    else:
        try:
            architecture = parse_architecture(args.dim_mult, args.temporal_downsample)
        except ValueError as error:
            parser.error(str(error))
        temporal, spatial = vae_strides(architecture)
        # diffusers stores the scale factors rather than deriving them: set them from the levels.
        model = AutoencoderKLWan(
            base_dim=args.base_dim,
            z_dim=args.z_dim,
            num_res_blocks=1,
            scale_factor_temporal=temporal,
            scale_factor_spatial=spatial,
            **architecture,
        )
    temporal, spatial = vae_strides(model.config)
    if args.crop % spatial or (args.frames - 1) % frame_multiple(temporal):
        parser.error(
            f"--crop must be a multiple of {spatial} and --frames {frame_multiple(temporal)}k + 1 for this VAE, "
            f"got {args.crop} and {args.frames}"
        )
    use_fast_rms_norms(model)
    encoder_parts = (model.encoder, model.quant_conv)
    if args.freeze_encoder:
        for part in encoder_parts:
            part.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    step, elapsed = 0, 0.0
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log.info("resumed %s: step %d, %.1f of %.1f minutes done", checkpoint, step, elapsed / 60, args.minutes)
    budget = 60 * args.minutes
    full_from = budget * (1 - args.full_fraction)
    schedule = ScheduleConfig(
        style=args.schedule,
        warmup_fraction=args.warmup_fraction,
        release_warmup=False,
        min_lr_fraction=args.min_lr_fraction,
    )
    # The budget is a clock of training time that a resume continues (time between sittings does not count).
    started, elapsed_before = time.time(), elapsed
    saved_at = elapsed
    bar = tqdm(desc="vae", unit="step", initial=step)
    while (elapsed := elapsed_before + time.time() - started) < budget:
        for group in optimizer.param_groups:
            group["lr"] = budget_lr(args.lr, elapsed / budget, schedule)
        clip_idx = torch.randint(len(train), (args.batch,), generator=generator)
        ref_idx = torch.randint(len(refs), (args.batch,), generator=generator)
        # the subjects' mask travels with the pixels as a 4th channel, so a crop keeps them aligned
        clips = torch.cat([train[clip_idx], foreground(train[clip_idx])[:, None].to(torch.uint8)], dim=1)
        images = torch.cat([refs[ref_idx], foreground(refs[ref_idx])[:, None].to(torch.uint8)], dim=1)
        if elapsed < full_from:
            clips = random_crop(clips, args.crop, args.frames, generator)
            images = random_crop(images, args.crop, 1, generator)
        loss = 0.0
        for batch in (clips, images):
            x = to_unit(batch[:, :3])  # [N, 3, F, H, W]
            weights = subject_loss_weights(batch[:, 3:], args.foreground_weight)  # [N, 1, F, H, W]
            posterior = model.encode(x).latent_dist
            z = posterior.sample(generator=None) if args.sample_posterior else posterior.mode()
            out = model.decode(z).sample
            loss = loss + reconstruction_loss(out, x, weights) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        elapsed = elapsed_before + time.time() - started
        if checkpoint and elapsed - saved_at >= 60 * args.checkpoint_minutes:
            save_state(checkpoint, model, optimizer, generator, step, elapsed)
            saved_at = elapsed
    bar.close()
    if checkpoint:
        save_state(checkpoint, model, optimizer, generator, step, elapsed)
    model.eval()
    with torch.no_grad():
        latents = torch.cat(
            [model.encode(to_unit(train[i : i + 8])).latent_dist.mode() for i in range(0, min(64, len(train)), 8)]
        )
    mean = latents.mean(dim=(0, 2, 3, 4)).tolist()
    std = latents.std(dim=(0, 2, 3, 4)).tolist()
    model.register_to_config(latents_mean=mean, latents_std=std)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    score, score_subjects = psnr(model, held)
    record = {
        "steps": step,
        "minutes": args.minutes,
        "batch": args.batch,
        "crop": args.crop,
        "frames": args.frames,
        "full_fraction": args.full_fraction,
        "init": args.init,
        "freeze_encoder": args.freeze_encoder,
        "sample_posterior": args.sample_posterior,
        "lr": args.lr,
        "schedule": args.schedule,
        "min_lr_fraction": args.min_lr_fraction,
        "foreground_weight": args.foreground_weight,
        "psnr_heldout_db": score,
        "psnr_heldout_subjects_db": score_subjects,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info(
        "trained %d steps in %.1f min; held-out reconstruction PSNR %.2f dB (subjects' pixels %.2f dB) -> %s",
        step,
        args.minutes,
        score,
        score_subjects,
        out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
