"""Peak memory of loading a large text-encoder checkpoint: our loader vs the naive way.

A umT5 encoder at the XXL width (vocab 256,384, d_model 4096, FFN 10,240, 64 heads) with a few
layers is written in the release's ``models_t5_umt5-xxl-enc-bf16.pth`` layout (bf16), then loaded
in two fresh processes:

- ours: ``sgm.modules.encoders.text.load_release_umt5`` (meta-device build, memory-mapped
  ``torch.load(weights_only=True)``, tensors assigned as parameters), then every parameter read
  once so all of it is resident;
- naive: build ``UMT5EncoderModel`` in float32, ``torch.load`` the file, ``load_state_dict``,
  cast to bf16 (what the release does, minus the GPU).

Each child reports its peak resident memory (``VmHWM``) minus its resident memory just before
loading. Prints both, the file size, our peak as a multiple of the file size (goal <= 1.2) and the
ratio naive/ours. The file is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgm.modules.encoders.text import hf_to_release_umt5, infer_umt5_config, release_to_hf_umt5  # noqa: E402

log = logging.getLogger("load_memory")
XXL = {"vocab_size": 256384, "d_model": 4096, "d_ff": 10240, "num_heads": 64, "d_kv": 64, "buckets": 32}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_checkpoint(path: Path, layers: int) -> None:
    """Random bf16 tensors with the release's key names and the XXL shapes."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=XXL["vocab_size"],
        d_model=XXL["d_model"],
        d_kv=XXL["d_kv"],
        d_ff=XXL["d_ff"],
        num_layers=layers,
        num_heads=XXL["num_heads"],
        relative_attention_num_buckets=XXL["buckets"],
        feed_forward_proj="gated-gelu",
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UMT5EncoderModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {
        k: torch.empty(s, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=generator) for k, s in shapes.items()
    }
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    torch.save(hf_to_release_umt5(tensors), path)


def load(which: str, path: Path) -> dict:
    """Child process: load ``path`` one way, return peak memory growth in MiB."""
    from transformers import UMT5EncoderModel

    from sgm.checkpoint import read_state_dict
    from sgm.modules.encoders.text import load_release_umt5

    before = status_kib("VmRSS")
    start = time.perf_counter()
    if which == "ours":
        model = load_release_umt5(path, dtype=torch.bfloat16)
    else:
        config = infer_umt5_config(read_state_dict(path))  # shapes only (memory-mapped, nothing read)
        model = UMT5EncoderModel(config)  # float32
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(release_to_hf_umt5(state), strict=True)
        del state
        model = model.to(torch.bfloat16)
    # Read every parameter once (all of it resident), in chunks so the float32 sums need no big copy.
    checksum = sum(
        float(c.sum(dtype=torch.float32)) for t in model.state_dict().values() for c in t.flatten().split(2**22)
    )
    seconds = time.perf_counter() - start
    return {
        "peak_growth_mib": (status_kib("VmHWM") - before) / 1024,
        "seconds": seconds,
        "dtype": str(next(model.parameters()).dtype),
        "checksum": checksum,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (the release has 24)")
    parser.add_argument("--dir", default=None, help="where to write the fabricated checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action=argparse.BooleanOptionalAction, default=False, help="keep the file")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        which, path = args.child
        if which == "make":
            make_checkpoint(Path(path), args.layers)
        else:
            print(json.dumps(load(which, Path(path))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "models_t5_umt5-xxl-enc-bf16.pth"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--layers", str(args.layers), "--child", "make", str(path)], check=True
        )
        size_mib = path.stat().st_size / 2**20
        log.info(
            "fabricated %s: %d layers at the XXL width, %.0f MiB (%.0f s)",
            path.name,
            args.layers,
            size_mib,
            time.perf_counter() - start,
        )
        results = {}
        for which in ("ours", "naive"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", which, str(path)], check=True, capture_output=True, text=True
            )
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
            log.info(
                "%-5s: peak memory growth %.0f MiB = %.2f x file size, %.1f s, weights %s",
                which,
                results[which]["peak_growth_mib"],
                results[which]["peak_growth_mib"] / size_mib,
                results[which]["seconds"],
                results[which]["dtype"],
            )
        if abs(results["ours"]["checksum"] - results["naive"]["checksum"]) > 1e-3 * abs(results["naive"]["checksum"]):
            log.error("the two loaders disagree on the weights")
            return 1
        log.info(
            "ratio naive/ours peak memory: %.2f (file %.0f MiB)",
            results["naive"]["peak_growth_mib"] / results["ours"]["peak_growth_mib"],
            size_mib,
        )
        if args.keep:
            kept = Path(args.dir or ".") / path.name
            path.rename(kept)
            log.info("kept %s", kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
