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
