"""Forward speed, build time and build memory: our Kaleido DiT vs diffusers' WanTransformer3DModel.

Both networks get identical weights (converted by sgm.convert.diffusers_wan) and the same number
of tokens: ours sees ``frames`` video latents plus ``refs`` subject latents; diffusers, which has
no subject input, sees ``frames + refs`` video latents. Repeats are interleaved (ours, theirs,
ours, ...) and medians reported. Our achieved GFLOP/s is compared with an fp32 GEMM of the
FFN's shape measured in the same run. Build time and peak resident memory of building each
model are measured in fresh subprocesses.

Prints ratios (ours / diffusers: > 1 means we are faster). Not a test: nothing is asserted.
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

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgm.convert.diffusers_wan import diffusers_config, kaleido_to_diffusers  # noqa: E402
from sgm.modules.dit import DiTConfig  # noqa: E402
from sgm.registry import build_dit  # noqa: E402

log = logging.getLogger("dit_forward")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--frames", type=int, default=5, help="video latent frames")
    parser.add_argument("--height", type=int, default=32, help="latent height")
    parser.add_argument("--width", type=int, default=48, help="latent width")
    parser.add_argument("--refs", type=int, default=2, help="subject latents")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=["float32", "bfloat16"],
        help="default: float32, plus bfloat16 when the CPU has bf16 instructions (or on CUDA)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--build-only", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def architecture(args) -> DiTConfig:
    return DiTConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        inner_hidden_size=args.ffn,
        text_dim=args.text_dim,
    )


def forward_flops(arch: DiTConfig, tokens: int, video_tokens: int, text_len: int) -> float:
    """Multiply-adds x 2 of one forward (GEMMs and attention; elementwise work not counted)."""
    d, f, lt = arch.hidden_size, arch.inner_hidden_size, text_len
    patch = 2 * tokens * arch.in_channels * 4 * d
    text = 2 * lt * (arch.text_dim * d + d * d)
    per_layer = (
        2 * tokens * d * 3 * d  # fused QKV
        + 4 * tokens * tokens * d  # QK^T and AV
        + 2 * tokens * d * d * 3  # self dense, cross query, cross dense
        + 2 * lt * d * 2 * d  # cross KV on the text
        + 4 * tokens * lt * d  # cross attention
        + 4 * tokens * d * f  # MLP
    )
    head = 2 * video_tokens * d * 4 * arch.out_channels
    return patch + text + arch.num_layers * per_layer + head


def has_bf16_instructions() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def rss_mib() -> float:
    """Current resident set size. (``ru_maxrss`` is not usable in a child process: Linux carries
    the parent's peak over ``fork``/``exec``, so a child's own peak is hidden below it.)"""
    return psutil.Process().memory_info().rss / 2**20


def build_only(which: str, args) -> None:
    """Child process: build one model in float32 on CPU, print build time and memory as JSON.

    Memory is the growth of the resident set during the build (both libraries are imported
    before the measurement starts).
    """
    from diffusers import WanTransformer3DModel

    arch = architecture(args)
    before = rss_mib()
    start = time.perf_counter()
    if which == "ours":
        model = build_dit(arch)
    else:
        model = WanTransformer3DModel(**diffusers_config(arch))
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"build_s": seconds, "rss_delta_mib": rss_mib() - before, "params": params}))


def measure_build(which: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--build-only", which, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_builds(arch_argv: list[str], repeats: int = 3) -> None:
    """Build each model ``repeats`` times in fresh processes (interleaved) and log the medians."""
    runs = {"ours": [], "diffusers": []}
    for _ in range(repeats):
        for which in runs:
            runs[which].append(measure_build(which, arch_argv))
    o, d = ({key: statistics.median(r[key] for r in runs[w]) for key in runs[w][0]} for w in ("ours", "diffusers"))
    log.info(
        "build (fp32, CPU, fresh process, median of %d): ours %.2f s / %.0f MiB RSS growth, diffusers %.2f s / "
        "%.0f MiB; ratios ours/diffusers: time %.2f, memory %.2f (%d parameters each)",
        repeats,
        o["build_s"],
        o["rss_delta_mib"],
        d["build_s"],
        d["rss_delta_mib"],
        o["build_s"] / d["build_s"],
        o["rss_delta_mib"] / d["rss_delta_mib"],
        o["params"],
    )


def gemm_gflops(m: int, k: int, n: int, device: str, repeats: int = 7) -> float:
    """fp32 rate of ``[m, k] x [k, n]`` into a preallocated output: the best of ``repeats``."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(n, k, device=device)
    out = torch.empty(m, n, device=device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(a, b.t(), out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / min(times[1:]) / 1e9


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_forward(args, dtype: torch.dtype) -> dict:
    from diffusers import WanTransformer3DModel

    arch = architecture(args)
    device = args.device
    ours = build_dit(arch, device=device, dtype=dtype).eval()
    theirs = WanTransformer3DModel(**diffusers_config(arch)).to(device=device, dtype=dtype).eval()
    theirs.load_state_dict(kaleido_to_diffusers(ours.state_dict()), strict=True)

    g = torch.Generator().manual_seed(0)
    c, h, w = arch.in_channels, args.height, args.width
    video = torch.randn(1, args.frames, c, h, w, generator=g).to(device, dtype)
    refs = torch.randn(1, args.refs, c, h, w, generator=g).to(device, dtype)
    context = torch.randn(1, args.text_len, args.text_dim, generator=g).to(device, dtype)
    timesteps = torch.tensor([700.0], device=device)
    # diffusers: the references become extra leading frames, [B, C, refs + frames, H, W]
    joint = torch.cat([refs, video], dim=1).transpose(1, 2).contiguous()

    runs = {
        "ours": lambda: ours(video, timesteps, context, refs),
        "diffusers": lambda: theirs(joint, timesteps, context),
    }
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up (allocator, kernels, RoPE cache)
        timed(fn, device)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    tokens = (args.frames + args.refs) * (h // 2) * (w // 2)
    video_tokens = args.frames * (h // 2) * (w // 2)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "tokens": tokens,
        "medians": medians,
        "flops": forward_flops(arch, tokens, video_tokens, args.text_len),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.build_only:
        build_only(args.build_only, args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    arch_argv = [
        f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("layers", "hidden", "heads", "ffn", "text-dim")
    ]
    dtypes = args.dtypes or (
        ["float32", "bfloat16"] if args.device == "cuda" or has_bf16_instructions() else ["float32"]
    )
    capability = torch.cuda.get_device_name() if args.device == "cuda" else torch.backends.cpu.get_cpu_capability()
    log.info(
        "device %s (%s), %d threads; %d layers x hidden %d, %d heads, FFN %d, text %d x %d",
        args.device,
        capability,
        torch.get_num_threads(),
        args.layers,
        args.hidden,
        args.heads,
        args.ffn,
        args.text_len,
        args.text_dim,
    )
    if args.device == "cpu":
        report_builds(arch_argv)
    tokens_per_frame = (args.height // 2) * (args.width // 2)
    gemm = gemm_gflops(args.frames * tokens_per_frame, args.hidden, args.ffn, args.device)
    log.info(
        "fp32 GEMM [%d x %d] x [%d x %d]: %.1f GFLOP/s",
        args.frames * tokens_per_frame,
        args.hidden,
        args.hidden,
        args.ffn,
        gemm,
    )

    for name in dtypes:
        result = compare_forward(args, getattr(torch, name))
        ours, theirs = result["medians"]["ours"], result["medians"]["diffusers"]
        achieved = result["flops"] / ours / 1e9
        log.info(
            "%s forward, %d tokens (%d video + %d reference), median of %d: ours %.3f s (%.0f tokens/s), "
            "diffusers %.3f s (%.0f tokens/s), speed ratio ours/diffusers %.3f; ours %.1f GFLOP/s = %.2f of fp32 GEMM",
            name,
            result["tokens"],
            args.frames * tokens_per_frame,
            args.refs * tokens_per_frame,
            args.repeats,
            ours,
            result["tokens"] / ours,
            theirs,
            result["tokens"] / theirs,
            theirs / ours,
            achieved,
            achieved / gemm,
        )

    return 0


if __name__ == "__main__":
    sys.exit(main())
