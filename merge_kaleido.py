"""Merge the Kaleido-14B-S2V download into the layout the sampler and trainer read.

    python merge_kaleido.py --checkpoint_dir Kaleido-14B-S2V-download --output_dir Kaleido-14B-S2V

Accepted in the download (any mix, any folder depth):
  - safetensors shards, with or without a ``*.safetensors.index.json`` weight map;
  - ``.bin`` / ``.pt`` / ``.pth`` state-dict shards (read with ``weights_only=True``: no pickled
    code runs), with or without an index;
  - any file split into byte parts (``name.part_aa``, ``name.part_ab`` … or ``name.00``,
    ``name.01`` …), joined in order and checked against ``name.sha256`` or ``name.size`` when given.
``Wan2.1_VAE.pth`` is the VAE; the folder holding ``models_t5_umt5-xxl-enc-bf16.pth`` (with the
tokenizer files) is the text encoder; every other weight file is the DiT.

Written (through temporary names, then renamed; nothing partial is left on failure):
  OUT/model/latest, OUT/model/1/ (the DiT, keys ``model.diffusion_model.*``),
  OUT/Wan2.1_VAE.pth, OUT/umt5-xxl/.
The DiT is validated against the registry's architecture (``--model``) first: missing,
unexpected and wrongly shaped keys are listed and nothing is written. A second run on a finished
output says so and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sat.arguments import setup_logging
from sgm.convert.merge import MergeError, merge
from sgm.convert.shards import ShardError
from sgm.registry import ARCHITECTURES

log = logging.getLogger("merge_kaleido")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, help="the downloaded (split) files")
    parser.add_argument("--output_dir", help="where to write model/, Wan2.1_VAE.pth and umt5-xxl/")
    parser.add_argument(
        "--model",
        default="kaleido-14b",
        choices=sorted(ARCHITECTURES),
        help="registry architecture the DiT must match exactly (default: kaleido-14b)",
    )
    parser.add_argument(
        "--format",
        default="safetensors",
        choices=["safetensors", "pt"],
        help="safetensors (default): one output shard per input shard plus an index; streams shard by shard, "
        "peak memory about the largest shard. pt: the release's single model/1/mp_rank_00_model_states.pt "
        "(state dict under 'module') for the release's own scripts; needs memory for the whole model",
    )
    parser.add_argument(
        "--link", action="store_true", help="hard-link the VAE and text-encoder files instead of copying them"
    )
    parser.add_argument("--dit-only", action="store_true", help="merge the DiT even if the VAE or T5 files are absent")
    parser.add_argument("--verify-only", action="store_true", help="check the download completely; write nothing")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if not args.verify_only and not args.output_dir:
        parser.error("--output_dir is required (or use --verify-only)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        return merge(
            args.checkpoint_dir,
            args.output_dir,
            model=args.model,
            fmt=args.format,
            link=args.link,
            dit_only=args.dit_only,
            verify_only=args.verify_only,
        )
    except (MergeError, ShardError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
