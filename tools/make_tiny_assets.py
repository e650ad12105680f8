"""Write the tiny, seeded, *untrained* text encoder and VAE used by the tiny sampling config.

``assets/kaleido-tiny/umt5/``: a sentencepiece tokenizer trained on a small caption corpus and a
random 2-layer umT5 (d_model = kaleido-tiny's text_dim) saved under the release's
``models_t5_umt5-xxl-enc-bf16.pth`` key names; ``assets/kaleido-tiny/Wan2.1_VAE.pth``: a random
Wan VAE at base width 8 in the release's layout; ``assets/examples/``: two reference images and
an input file. The files are small and committed, so sampling on the tiny config needs nothing
else; rerunning this script reproduces them (same seed, same bytes for the weights).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgm.models.wan_vae import RELEASE_VAE_FILE, diffusers_to_release_vae  # noqa: E402
from sgm.modules.encoders.text import RELEASE_T5_FILE, hf_to_release_umt5  # noqa: E402
from sgm.registry import ARCHITECTURES  # noqa: E402

log = logging.getLogger("make_tiny_assets")
ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "a the red green blue yellow purple orange white black ball cube circle square triangle star person dog "
    "cat car tree house moves left right up down bounces grows shrinks circles stands still first second third "
    "object walks runs jumps on beach street room park at sunset night slowly quickly while and with"
).split()
VAE_ARCH = {"base_dim": 8, "z_dim": 16, "num_res_blocks": 1, "dim_mult": [1, 2, 2, 2]}


def corpus() -> list[str]:
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        picks = torch.randint(len(WORDS), (8,), generator=generator).tolist()
        lines.append(" ".join(WORDS[i] for i in picks))
    return lines + [" ".join(WORDS)]


def make_tokenizer(
    out: Path, lines: list[str] | None = None, vocab_size: int = 160, model_type: str = "unigram"
) -> int:
    """Train a sentencepiece model (``unigram`` or ``word``) on ``lines``; save it as a Hugging Face T5 tokenizer.

    ``T5TokenizerFast(vocab_file=...)`` silently builds a 4-token vocabulary in transformers 5
    (environment.md §6), so the tokenizer goes through ``from_pretrained`` of the spm folder.
    Returns the vocabulary size.
    """
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text("\n".join(lines or corpus()))
        spm.SentencePieceTrainer.train(
            input=f"{tmp}/corpus.txt",
            model_prefix=f"{tmp}/spiece",
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=1,
        )
        tokenizer = T5TokenizerFast.from_pretrained(tmp, extra_ids=0)
        tokenizer.save_pretrained(str(out))
    return len(tokenizer)


def make_umt5(out: Path, vocab_size: int, width: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=16,
        d_ff=2 * width,
        num_layers=2,
        num_heads=width // 16,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(0)
    model = UMT5EncoderModel(config)
    torch.save(hf_to_release_umt5({k: v.bfloat16() for k, v in model.state_dict().items()}), out / RELEASE_T5_FILE)


def make_vae(path: Path) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(**VAE_ARCH)
    torch.save(diffusers_to_release_vae(model.state_dict(), VAE_ARCH["num_res_blocks"]), path)


def make_examples(folder: Path) -> None:
    shapes = {"red_ball.png": ("ellipse", (220, 40, 40)), "blue_cube.png": ("rectangle", (40, 70, 220))}
    for name, (kind, colour) in shapes.items():
        image = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
        getattr(ImageDraw.Draw(image), kind)((28, 12, 68, 52), fill=colour + (255,))
        image.save(folder / name)
    (folder / "examples.txt").write_text(
        "a red ball bounces on the beach@@assets/examples/red_ball.png\n"
        "the first object moves left while the second moves right"
        "@@assets/examples/red_ball.png@@assets/examples/blue_cube.png\n"
        "a blue cube and a red ball at night\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "assets"), help="assets folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    umt5 = out / "kaleido-tiny" / "umt5"
    umt5.mkdir(parents=True, exist_ok=True)
    (out / "examples").mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(umt5)
    make_umt5(umt5, vocab, ARCHITECTURES["kaleido-tiny"].text_dim)
    make_vae(out / "kaleido-tiny" / RELEASE_VAE_FILE)
    make_examples(out / "examples")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("wrote tiny text encoder (vocab %d), VAE and examples under %s: %.1f KiB", vocab, out, total / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
