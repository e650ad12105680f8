"""Where sampling time goes: seconds per step, network evaluations per step, DiT / VAE / text shares.

Two configurations on the CPU, both with the committed tiny text encoder and VAE and random DiT
weights (speed does not depend on the values):

- tiny: ``kaleido-tiny`` at 64×96, 3 latent frames, 2 references;
- mid: 2 layers at the 1.3B width (hidden 1536, 12 heads, FFN 8960) at 256×384, 5 latent frames
  (17 video frames), 2 references: 2,688 tokens per evaluation.

Then the tiny configuration with ``sequence_parallel_size=2`` on 2 gloo processes, reporting the
share of sampling time spent in the Ulysses all-to-alls.

Then the sampling options on the shipped demo model (trained weights, ``configs/sampling/shapes.yaml``,
its six examples): plain, First Block Cache at each ``--cache-thresholds``, reference guidance at
``--reference-scales``, and compiled blocks: seconds per video, network evaluations per video
(batch elements through the DiT; for the cache, those that ran every block), ratios to plain, and
the PSNR of the decoded videos against plain. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sat.config import load_config  # noqa: E402
from sat.parallel import UlyssesAttention, free_port, init_parallel  # noqa: E402

log = logging.getLogger("sample_step")
CONFIGS = {
    "tiny": {"overrides": [], "size": (64, 96), "frames": 3},
    "mid": {
        "overrides": [
            "model.arch.num_layers=2",
            "model.arch.hidden_size=1536",
            "model.arch.num_attention_heads=12",
            "model.arch.inner_hidden_size=8960",
            "model.arch.time_freq_dim=256",
        ],
        "size": (256, 384),
        "frames": 5,
    },
}


def measure(name: str, steps: int, sp_size: int = 1) -> dict:
    from sgm.pipeline import KaleidoPipeline, SamplingConfig, Timings

    spec = CONFIGS[name]
    files = [ROOT / "configs/model/kaleido_tiny.yaml", ROOT / "configs/sampling/tiny.yaml"]
    overrides = [*spec["overrides"], f"num_steps={steps}", f"sequence_parallel_size={sp_size}"]
    config = load_config(SamplingConfig, files, overrides)
    os.chdir(ROOT)
    parallel = init_parallel(sp_size, torch.device("cpu"))
    torch.manual_seed(0)
    pipe = KaleidoPipeline.from_config(config, device=torch.device("cpu"), parallel=parallel)
    images = [Image.new("RGB", (60, 40), (200, 40, 40)), Image.new("RGB", (40, 60), (40, 40, 200))]
    height, width = spec["size"]
    request = {"height": height, "width": width, "num_frames": pipe.geometry.video_frames(spec["frames"])}
    pipe("warm up", references=images, seed=0, **request)  # allocator, caches
    ulysses = {id(m.attention_fn): m.attention_fn for m in pipe.dit.modules() if hasattr(m, "attention_fn")}
    ulysses = [fn for fn in ulysses.values() if isinstance(fn, UlyssesAttention)]  # one, shared by the layers
    for fn in ulysses:
        fn.communication_s = 0.0
    timings = Timings()
    start = time.perf_counter()
    pipe("a red ball and a blue cube", references=images, seed=1, timings=timings, **request)
    total = time.perf_counter() - start
    communication = sum(fn.communication_s for fn in ulysses)
    tokens = pipe.geometry.tokens(height=height, width=width, latent_frames=spec["frames"], references=len(images))
    return {
        "name": name,
        "tokens": tokens,
        "steps": steps,
        "step_s": timings.sampling_s / steps,
        "evaluations_per_step": 2 * timings.network_calls / steps,  # the tiny config's CFG: batch 2 per call
        "total_s": total,
        "dit_s": timings.sampling_s,
        "vae_s": timings.references_s + timings.decode_s,
        "text_s": timings.text_s,
        "communication_s": communication,
    }


def report(result: dict) -> None:
    total = result["total_s"]
    log.info(
        "%s (%d tokens per evaluation): %.3f s per step, %.0f network evaluations per step; of %.2f s: "
        "DiT %.1f%%, VAE %.1f%%, text encoder %.1f%%",
        result["name"],
        result["tokens"],
        result["step_s"],
        result["evaluations_per_step"],
        total,
        100 * result["dit_s"] / total,
        100 * result["vae_s"] / total,
        100 * result["text_s"] / total,
    )


def batch_counter(counts: Counter, key: str):
    """A forward pre-hook adding its input's batch size to ``counts[key]`` (evaluations through a module)."""

    def hook(module, args) -> None:
        counts[key] += args[0].shape[0]

    return hook


def demo_options(thresholds: list[float], reference_scales: list[float], compile_blocks: bool) -> None:
    """The sampling options on the demo model, each against plain in the same run."""
    from sgm.data.items import parse_line
    from sgm.data.references import load_reference
    from sgm.diffusion.step_cache import psnr
    from sgm.pipeline import KaleidoPipeline, SamplingConfig, Timings

    os.chdir(ROOT)
    base = ["configs/sampling/shapes.yaml"]
    lines = (ROOT / "assets/kaleido-shapes/examples/examples.txt").read_text().splitlines()
    items = [parse_line(n, line, False) for n, line in enumerate(lines) if line.strip()]
    examples = [(item.prompt, [load_reference(r) for r in item.references]) for item in items]
    runs = [("plain", [], {})]
    runs += [(f"cache first_block {t:g}", ["cache.method=first_block", f"cache.threshold={t}"], {}) for t in thresholds]
    runs += [(f"reference guidance {r:g}", [], {"reference_guidance_scale": r}) for r in reference_scales]
    if compile_blocks:
        runs.append(("compile", ["compile=true"], {}))
    results, plain_videos = [], None
    for name, overrides, kwargs in runs:
        pipe = KaleidoPipeline.from_config(load_config(SamplingConfig, base, overrides), device=torch.device("cpu"))
        counts = Counter()
        pipe.dit.register_forward_pre_hook(batch_counter(counts, "evaluations"))
        pipe.dit.transformer.layers[-1].mlp.register_forward_pre_hook(batch_counter(counts, "full"))
        for n, (prompt, refs) in enumerate(examples):  # warm-up: allocator, and compilation for each token count
            pipe(prompt, references=refs, seed=1234 + n, **kwargs)
        counts.clear()
        videos, timings, start = [], Timings(), time.perf_counter()
        for n, (prompt, refs) in enumerate(examples):
            videos.append(pipe(prompt, references=refs, seed=1234 + n, timings=timings, **kwargs))
        seconds = (time.perf_counter() - start) / len(examples)
        sampling = timings.sampling_s / len(examples)
        plain_videos = plain_videos or videos
        quality = min(psnr(v, p) for v, p in zip(videos, plain_videos, strict=True))
        # compiled blocks run the MLP inside their graph (no hook fires): without a cache every evaluation is full
        full = counts["full"] if pipe.step_cache is not None else counts["evaluations"]
        results.append((name, seconds, sampling, counts["evaluations"] / len(examples), full / len(examples), quality))
    log.info("demo model, %d examples, %d steps: per video", len(examples), pipe.settings.num_steps)
    log.info(
        "| option | s / video | × plain | sampling s / video | × plain | evaluations | full evaluations "
        "| PSNR vs plain (worst) |"
    )
    log.info("|---|---|---|---|---|---|---|---|")
    plain_s, plain_sampling = results[0][1], results[0][2]
    for name, seconds, sampling, evaluations, full, quality in results:
        log.info(
            "| %s | %.3f | %.2f | %.3f | %.2f | %.0f | %.0f | %s |",
            name,
            seconds,
            seconds / plain_s,
            sampling,
            sampling / plain_sampling,
            evaluations,
            full,
            "identical" if quality == float("inf") else f"{quality:.1f} dB",
        )


def large_options(thresholds: list[float], steps: int) -> None:
    """First Block Cache on the ``kaleido-1.3b`` architecture (30 blocks of width 1536; random weights,
    the committed tiny text encoder, so the text projection is narrower than the release's) at
    64×64, 3 latent frames, 1 reference: network evaluations, sampling seconds, latent PSNR against
    the uncached latent, all on one loaded model."""
    from sgm.diffusion.step_cache import StepCache, StepCacheConfig, psnr
    from sgm.pipeline import KaleidoPipeline, SamplingConfig, Timings

    os.chdir(ROOT)
    files = [ROOT / "configs/model/kaleido_tiny.yaml", ROOT / "configs/sampling/tiny.yaml"]
    from sgm.registry import ARCHITECTURES

    overrides = [  # kaleido-1.3b reading the committed tiny text encoder's features
        "model.name=kaleido-1.3b",
        f"model.arch.text_dim={ARCHITECTURES['kaleido-tiny'].text_dim}",
        f"num_steps={steps}",
    ]
    torch.manual_seed(0)
    pipe = KaleidoPipeline.from_config(load_config(SamplingConfig, files, overrides), device=torch.device("cpu"))
    million = sum(p.numel() for p in pipe.dit.parameters()) / 1e6
    refs = [Image.new("RGB", (60, 40), (200, 40, 40))]
    request = {"references": refs, "seed": 3, "height": 64, "width": 64, "num_frames": pipe.geometry.video_frames(3)}
    pipe.generate_latents("warm up", **request)
    rows, plain = [], None
    for threshold in [None, *thresholds]:
        cache = None if threshold is None else StepCache(pipe.dit, StepCacheConfig("first_block", threshold))
        pipe.step_cache = cache
        timings = Timings()
        latents = pipe.generate_latents("a red ball", timings=timings, **request)
        plain = latents if plain is None else plain
        full = timings.network_calls if cache is None else cache.full_evaluations
        rows.append(
            (
                "plain" if cache is None else f"cache first_block {threshold:g}",
                timings,
                full,
                psnr(latents, plain, peak=float(plain.abs().max() * 2)),
            )
        )
        if cache is not None:
            cache.remove()
    pipe.step_cache = None
    tokens = pipe.geometry.tokens(height=64, width=64, latent_frames=3, references=1)
    log.info(
        "kaleido-1.3b architecture (%.0f M parameters, random weights), %d steps, %d tokens:", million, steps, tokens
    )
    log.info("| option | sampling s | × plain | network calls (batch 2) | full | latent PSNR vs plain |")
    log.info("|---|---|---|---|---|---|")
    for name, timings, full, quality in rows:
        log.info(
            "| %s | %.2f | %.2f | %d | %d | %s |",
            name,
            timings.sampling_s,
            timings.sampling_s / rows[0][1].sampling_s,
            timings.network_calls,
            full,
            "identical" if quality == float("inf") else f"{quality:.1f} dB",
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per measurement")
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    parser.add_argument("--sp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-thresholds", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    parser.add_argument("--reference-scales", type=float, nargs="*", default=[2.0])
    parser.add_argument("--no-compile", action="store_true", help="leave compiled blocks out of the options table")
    parser.add_argument("--only-options", action="store_true", help="only the demo model's sampling options")
    parser.add_argument("--large", action="store_true", help="also First Block Cache on the kaleido-1.3b architecture")
    parser.add_argument("--large-steps", type=int, default=12)
    parser.add_argument("--only-large", action="store_true", help="only the kaleido-1.3b cache measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sgm.pipeline").setLevel(logging.ERROR)
    if args.sp_child:
        result = measure("tiny", args.steps, sp_size=2)
        if int(os.environ["RANK"]) == 0:
            print("RESULT " + json.dumps(result))
        torch.distributed.destroy_process_group()
        return 0

    log.info("CPU %s, %d threads", torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    if args.only_large:
        large_options(args.cache_thresholds, args.large_steps)
        return 0
    if args.only_options:
        demo_options(args.cache_thresholds, args.reference_scales, not args.no_compile)
        if args.large:
            large_options(args.cache_thresholds, args.large_steps)
        return 0
    single = {}
    for name in args.configs:
        single[name] = measure(name, args.steps)
        report(single[name])

    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*launch, __file__, "--sp-child", "--steps", str(args.steps)], capture_output=True, text=True, env=env
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        log.error("SP=2 run failed:\n%s", out.stderr[-3000:])
        return 1
    sp = json.loads(lines[-1][len("RESULT ") :])
    sp["name"] = "tiny, SP=2 (gloo, 1 thread per process)"
    report(sp)
    log.info(
        "SP=2 all-to-all: %.3f s of %.3f s sampling (%.1f%%)",
        sp["communication_s"],
        sp["dit_s"],
        100 * sp["communication_s"] / sp["dit_s"],
    )
    demo_options(args.cache_thresholds, args.reference_scales, not args.no_compile)
    if args.large:
        large_options(args.cache_thresholds, args.large_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
