"""Tiny real components made inside the tests (nothing is downloaded)."""

from pathlib import Path

import sentencepiece as spm
import torch
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

CORPUS = [
    "a red fox jumps over the lazy dog",
    "the first object moves left while the second bounces",
    "a blue circle and a green square grow and shrink",
    "two people walk along a beach at sunset",
]


def make_tokenizer_folder(folder: Path) -> Path:
    """A sentencepiece unigram tokenizer saved as a Hugging Face T5 tokenizer folder.

    ``T5TokenizerFast(vocab_file=...)`` silently builds a 4-token vocabulary in transformers 5
    (environment.md §6), so the tokenizer goes through ``from_pretrained`` of the spm folder.
    """
    spm_dir = folder / "spm"
    spm_dir.mkdir(parents=True, exist_ok=True)
    corpus = spm_dir / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(spm_dir / "spiece"),
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tokenizer = T5TokenizerFast.from_pretrained(str(spm_dir), extra_ids=0)
    out = folder / "umt5"
    tokenizer.save_pretrained(str(out))
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


def make_video_dataset(root: Path, count: int = 4, frames: int = 12, size: int = 64, fps: int = 8) -> Path:
    """A dataset in the release layout: moving coloured squares, captions, 1-2 references each."""
    import imageio.v2 as imageio
    import numpy as np
    from PIL import Image

    for folder in ("labels", "videos", "references"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 40)]
    for i in range(count):
        sample = f"clip{i:03d}"
        colour = colours[i % len(colours)]
        with imageio.get_writer(root / "videos" / f"{sample}.mp4", fps=fps, codec="libx264", macro_block_size=16) as w:
            for t in range(frames):
                frame = np.full((size, size, 3), 90, dtype=np.uint8)
                x = 4 + (t * 3 + 7 * i) % (size - 20)
                frame[20:36, x : x + 16] = colour
                w.append_data(frame)
        (root / "labels" / f"{sample}.txt").write_text(f"the object moves right {i}\nsecond line is ignored\n")
        refs = root / "references" / sample
        refs.mkdir(exist_ok=True)
        Image.new("RGB", (24, 24), colour).save(refs / "ref1.png")
        if i % 2:
            Image.new("RGB", (20, 30), colours[(i + 1) % len(colours)]).save(refs / "ref2.png")
    return root
