"""Peak host memory of sampling per memory tier, against the plain (full) run, on the CPU.

    python benchmarks/memory_tiers.py [--workdir DIR] [--steps 2]

The ``kaleido-1.3b`` architecture (30 blocks of width 1536; random weights, the committed tiny text
encoder and VAE) is written once to a float32 safetensors file; then each tier samples the same
64×64, 3-latent-frame video with 1 reference in a fresh process, which reports its peak resident
set size (``ru_maxrss``) and its latent. Printed: peak RSS, its ratio to the weight file, and
whether the latent is bit-identical to the full tier's. On the CPU the tiers that move blocks
between host and device memory (balanced, low) change nothing: the one that matters here is
``lowest`` (blocks read from disk as they run). Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sgm.registry import ARCHITECTURES  # noqa: E402

log = logging.getLogger("memory_tiers")
FILES = [str(ROOT / "configs/model/kaleido_tiny.yaml"), str(ROOT / "configs/sampling/tiny.yaml")]
ARCH_1P3B = [  # kaleido-1.3b (the registry's) reading the committed tiny text encoder's features
    "model.name=kaleido-1.3b",
    f"model.arch.text_dim={ARCHITECTURES['kaleido-tiny'].text_dim}",
]


def write_weights(path: Path) -> int:
    """A random float32 DiT of the 1.3B shape at ``path``; returns the file's size in bytes."""
    from safetensors.torch import save_file

    from sat.config import load_config
    from sgm.pipeline import SamplingConfig, resolve_components
    from sgm.registry import build_dit

    components = resolve_components(load_config(SamplingConfig, FILES, ARCH_1P3B))
    torch.manual_seed(0)
    dit = build_dit(components.arch, device="cpu", dtype=torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path.stat().st_size


def child(tier: str, load: str, steps: int, out: str) -> None:
    """Sample once with ``tier`` and print the peak RSS; the latent goes to ``out``."""
    from PIL import Image
    from safetensors.torch import save_file

    from sat.config import load_config
    from sgm.pipeline import KaleidoPipeline, SamplingConfig

    os.chdir(ROOT)
    overrides = [*ARCH_1P3B, f"load={load}", f"memory.tier={tier}", f"num_steps={steps}"]
    pipe = KaleidoPipeline.from_config(load_config(SamplingConfig, FILES, overrides), device=torch.device("cpu"))
    start = time.perf_counter()
    latents = pipe.generate_latents(
        "a red ball",
        references=[Image.new("RGB", (60, 40), (200, 40, 40))],
        seed=3,
        height=64,
        width=64,
        num_frames=pipe.geometry.video_frames(3),
    )
    seconds = time.perf_counter() - start
    save_file({"latents": latents.contiguous()}, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    resident = pipe.streamer.max_resident if pipe.streamer else len(pipe.dit.transformer.layers)
    print("RESULT " + json.dumps({"peak_rss": peak, "seconds": seconds, "blocks_resident": resident}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the weight file goes (default: a temporary folder, removed)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiers", nargs="+", default=["full", "lowest"])
    parser.add_argument("--child", nargs=3, metavar=("TIER", "LOAD", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.child:
        child(args.child[0], args.child[1], args.steps, args.child[2])
        return 0
    if args.write:
        write_weights(Path(args.write))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        weights = Path(work) / "dit_1p3b_fp32.safetensors"
        # Linux keeps a process's peak RSS across fork and exec: the weights are made in a child of
        # their own, so that this process stays small and each measured child starts from it.
        subprocess.run([sys.executable, __file__, "--write", str(weights)], check=True)
        size = weights.stat().st_size
        log.info("weights: %s, %.2f GiB (float32)", weights.name, size / 2**30)
        results, latents = {}, {}
        for tier in args.tiers:
            out = Path(work) / f"latents_{tier}.safetensors"
            run = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--child", tier, str(weights), str(out)],
                capture_output=True,
                text=True,
            )
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                log.error("tier %s failed:\n%s", tier, run.stderr[-3000:])
                return 1
            results[tier] = json.loads(lines[-1][len("RESULT ") :])
            from safetensors.torch import load_file

            latents[tier] = load_file(str(out))["latents"]
        log.info("| tier | peak RSS GiB | × weight file | × full | blocks resident | sampling s | latent vs full |")
        log.info("|---|---|---|---|---|---|---|")
        base = results[args.tiers[0]]["peak_rss"]
        for tier, result in results.items():
            same = "bit-identical" if torch.equal(latents[tier], latents[args.tiers[0]]) else "differs"
            log.info(
                "| %s | %.2f | %.3f | %.3f | %d | %.1f | %s |",
                tier,
                result["peak_rss"] / 2**30,
                result["peak_rss"] / size,
                result["peak_rss"] / base,
                result["blocks_resident"],
                result["seconds"],
                same,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
