"""Training-step throughput and peak memory on the CPU: activation checkpointing, ZeRO 2 vs 3.

A mid-size DiT (2 layers at the 1.3B width: hidden 1536, 12 heads, FFN 8960, text 512 × 4096)
takes DeepSpeed training steps (forward, backward, AdamW) on synthetic latents: 5 latent frames
plus 2 references at 16×32 latent pixels (896 tokens), micro-batch 1. Each configuration runs in
fresh processes and reports samples per second (median of the timed steps) and its peak
resident memory (``VmHWM``, per process):

- 1 process, ZeRO 2, without and with activation checkpointing;
- 1 process, ZeRO 2, LoRA (rank ``--lora-rank`` on attention, cross-attention and MLP) against full
  training;
- 2 processes (gloo, 1 thread each), ZeRO 2 and ZeRO 3.

Prints the ratios. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sat.parallel import free_port  # noqa: E402

log = logging.getLogger("train_step")
ARCH = {
    "num_layers": 2,
    "hidden_size": 1536,
    "num_attention_heads": 12,
    "inner_hidden_size": 8960,
    "text_dim": 4096,
}


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(zero_stage: int, checkpointing: bool, steps: int, lora_rank: int = 0) -> dict:
    import deepspeed
    import torch.distributed as dist

    from sat.training import deepspeed_config, parameter_groups, register_zero3_parameters
    from sgm.diffusion.loss import rf_loss
    from sgm.lora import LoraTrainConfig, add_trainable_lora
    from sgm.registry import build_dit

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    dit = build_dit(ARCH, checkpoint_activations=checkpointing)
    if lora_rank:
        add_trainable_lora(dit, LoraTrainConfig(rank=lora_rank))
    if zero_stage == 3:
        register_zero3_parameters(dit, dit.external_parameter_reads())
    optimizer = torch.optim.AdamW(parameter_groups(dit, 1e-4), lr=1e-5, betas=(0.9, 0.95))
    config = deepspeed_config(1, 1, world, zero_stage, 0.1, bf16=False)
    engine, _, _, _ = deepspeed.initialize(model=dit, optimizer=optimizer, config=config, dist_init_required=False)
    g = torch.Generator().manual_seed(dist.get_rank())
    x0 = torch.randn(1, 5, 16, 16, 32, generator=g)
    subjects = torch.randn(1, 2, 16, 16, 32, generator=g)
    context = torch.randn(1, 512, 4096, generator=g)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        noise = torch.randn(x0.shape, generator=g)
        loss = rf_loss(engine, x0, noise, torch.rand(1, generator=g), context, subjects)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
    result = {"samples_per_s": world / statistics.median(times[1:]), "peak_mib": vm_hwm_mib()}
    dist.barrier()
    dist.destroy_process_group()
    return result


def run(processes: int, zero_stage: int, checkpointing: bool, steps: int, lora_rank: int = 0) -> dict:
    args = [__file__, "--child", str(zero_stage), str(int(checkpointing)), "--steps", str(steps)]
    args += ["--lora-rank", str(lora_rank)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd += ["--master_port", str(free_port()), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    results = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not results:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return {"samples_per_s": results[0]["samples_per_s"], "peak_mib": max(r["peak_mib"] for r in results)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--lora-rank", type=int, default=64, help="rank of the LoRA measurement (0: skip it)")
    parser.add_argument("--child", nargs=2, metavar=("ZERO", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(int(args.child[0]), bool(int(args.child[1])), args.steps, args.lora_rank)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info(
        "CPU %s; 2 layers x 1536, 896 tokens, micro-batch 1, fp32, %d timed steps",
        torch.backends.cpu.get_cpu_capability(),
        args.steps,
    )
    plain = run(1, 2, False, args.steps)
    ckpt = run(1, 2, True, args.steps)
    if args.lora_rank:
        lora = run(1, 2, False, args.steps, args.lora_rank)
        log.info(
            "1 process, ZeRO 2, LoRA rank %d: %.3f samples/s, peak %.0f MiB (speed %.2fx, memory %.2fx of full)",
            args.lora_rank,
            lora["samples_per_s"],
            lora["peak_mib"],
            lora["samples_per_s"] / plain["samples_per_s"],
            lora["peak_mib"] / plain["peak_mib"],
        )
    log.info("1 process, ZeRO 2: %.3f samples/s, peak %.0f MiB", plain["samples_per_s"], plain["peak_mib"])
    log.info(
        "  + activation checkpointing: %.3f samples/s, peak %.0f MiB (speed %.2fx, memory %.2fx)",
        ckpt["samples_per_s"],
        ckpt["peak_mib"],
        ckpt["samples_per_s"] / plain["samples_per_s"],
        ckpt["peak_mib"] / plain["peak_mib"],
    )
    z2 = run(2, 2, False, args.steps)
    z3 = run(2, 3, False, args.steps)
    log.info("2 processes, ZeRO 2: %.3f samples/s, peak %.0f MiB per process", z2["samples_per_s"], z2["peak_mib"])
    log.info(
        "2 processes, ZeRO 3: %.3f samples/s, peak %.0f MiB per process (speed %.2fx, memory %.2fx of ZeRO 2)",
        z3["samples_per_s"],
        z3["peak_mib"],
        z3["samples_per_s"] / z2["samples_per_s"],
        z3["peak_mib"] / z2["peak_mib"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
