"""Tiny real components made inside the tests (nothing is downloaded)."""

from pathlib import Path

import torch
from transformers import UMT5Config, UMT5EncoderModel

from tools.make_tiny_assets import make_tokenizer

CORPUS = [
    "a red fox jumps over the lazy dog",
    "the first object moves left while the second bounces",
    "a blue circle and a green square grow and shrink",
    "two people walk along a beach at sunset",
]


def make_tokenizer_folder(folder: Path) -> Path:
    """A small sentencepiece tokenizer saved as a Hugging Face T5 tokenizer folder."""
    out = folder / "umt5"
    make_tokenizer(out, CORPUS * 20, vocab_size=48)
    return out


def tiny_umt5(vocab_size: int, seed: int = 0) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def demo_config(*overrides: str):
    """The shipped demo model's sampling config (``make demo``'s) with ``overrides``, its paths made
    absolute so a test may run from any folder (a ``load=`` override that is absolute is kept)."""
    from sat.config import load_config
    from sgm.pipeline import SamplingConfig

    root = Path(__file__).resolve().parents[1]
    config = load_config(SamplingConfig, [str(root / "configs/sampling/shapes.yaml")], list(overrides))
    config.text_encoder.path = str(root / config.text_encoder.path)
    config.vae.path = str(root / config.vae.path)
    config.load = str(root / config.load)  # an absolute override stays itself (pathlib joins it as is)
    return config
