"""Peak memory and throughput of merge_kaleido.py on a fabricated multi-GB download.

A ``kaleido-1.3b`` DiT (Wan2.1-1.3B shape, 1.4 B parameters) in float32 is written as 6
safetensors shards with an index (about 5.7 GB), plus the tiny VAE and text encoder, then merged
with the default format in a fresh process. Prints the merge's peak resident-memory growth
against the largest shard and the total, and MB/s. Goal: peak <= largest shard + 10 %.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("merge_memory")


def fabricate(folder: Path, shards: int) -> None:
    from safetensors.torch import save_file

    from sgm.checkpoint import ENGINE_PREFIX
    from sgm.registry import build_dit

    shapes = {k: v.shape for k, v in build_dit("kaleido-1.3b", device="meta").state_dict().items()}
    keys = sorted(shapes)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for n in range(shards):
        part = keys[n::shards]
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {ENGINE_PREFIX + k: torch.empty(shapes[k]).uniform_(-0.02, 0.02, generator=generator) for k in part}
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(ROOT / "assets/kaleido-tiny/Wan2.1_VAE.pth", folder / "Wan2.1_VAE.pth")
    shutil.copytree(ROOT / "assets/kaleido-tiny/umt5", folder / "umt5-xxl")


def merge_child(download: str, out: str) -> None:
    """Runs ``merge_kaleido.py`` as a program in this process (after its libraries are imported, so
    the peak growth is the merge's own memory)."""
    import runpy

    import sgm.convert.shards  # noqa: F401
    import sgm.registry  # noqa: F401

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    before = rss("VmRSS")
    start = time.perf_counter()
    sys.argv = ["merge_kaleido.py", "--checkpoint_dir", download, "--output_dir", out, "--model", "kaleido-1.3b"]
    sys.argv += ["--log-level", "WARNING"]
    try:
        runpy.run_path(str(ROOT / "merge_kaleido.py"), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    print(
        "RESULT "
        + json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_growth": rss("VmHWM") - before})
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one; needs ~12 GB)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--fabricate", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        merge_child(*args.child)
        return 0
    if args.fabricate:
        fabricate(Path(args.fabricate), args.shards)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        download, out = Path(tmp) / "download", Path(tmp) / "merged"
        download.mkdir()
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--fabricate", str(download), "--shards", str(args.shards)], check=True
        )
        shard_sizes = [p.stat().st_size for p in download.glob("*.safetensors")]
        total, largest = sum(shard_sizes), max(shard_sizes)
        log.info(
            "fabricated %d shards, %.2f GB (largest %.0f MB) in %.0f s",
            len(shard_sizes),
            total / 1e9,
            largest / 1e6,
            time.perf_counter() - start,
        )
        result = subprocess.run(
            [sys.executable, __file__, "--child", str(download), str(out)], capture_output=True, text=True, cwd=ROOT
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode != 0 or not lines:
            log.error("merge failed:\n%s", result.stderr[-3000:])
            return 1
        report = json.loads(lines[-1][len("RESULT ") :])
        if report["code"] != 0:
            log.error("merge_kaleido exited %d:\n%s", report["code"], result.stderr[-3000:])
            return 1
        peak = report["peak_growth"]
        log.info(
            "merge (safetensors format): %.1f s, %.0f MB/s; peak memory growth %.0f MB = %.2f x the largest "
            "shard (%.0f MB), %.2f x the total (%.0f MB)",
            report["seconds"],
            total / 1e6 / report["seconds"],
            peak / 1e6,
            peak / largest,
            largest / 1e6,
            peak / total,
            total / 1e6,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
