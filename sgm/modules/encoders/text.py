"""umT5-XXL text encoder: ``transformers.UMT5EncoderModel`` behind the release's interface.

spec-vae-t5-data.md §2. Prompts are cleaned (ftfy, HTML unescaped twice, whitespace collapsed),
tokenised to exactly ``max_length`` (512) with padding, truncation and EOS, encoded, and the
padded positions are multiplied by the mask, so they are exactly zero: ``[B, 512, 4096]`` in the
encoder's dtype. The DiT attends to all 512 positions, pads included.

Weights come from the release's ``models_t5_umt5-xxl-enc-bf16.pth`` (rename table of spec §2.7,
architecture read off the tensor shapes) or a Hugging Face UMT5 folder. The model is built on the
meta device and the (memory-mapped) weights become its parameters: no float32 copy of 5.7 B
parameters, unlike the release.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import ftfy
import torch
from torch import nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from sgm.checkpoint import StateDictMismatchError, load_strict, read_state_dict
from sgm.convert.keymap import KeyMap

log = logging.getLogger(__name__)

T5_MAX_LENGTH = 512
RELEASE_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
# Not stored in the checkpoint's shapes; umT5-XXL's value.
RELATIVE_ATTENTION_MAX_DISTANCE = 128


def clean_text(text: str) -> str:
    """The release's prompt cleaning: ftfy, HTML unescape twice, whitespace runs -> one space."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# Release key -> Hugging Face key (spec §2.7); "{i}" is the block index, leaves ``.weight``.
UMT5_KEYMAP = KeyMap(
    "umT5 release",
    "transformers UMT5",
    renames={
        "token_embedding": "shared",
        "norm": "encoder.final_layer_norm",
        "blocks.{i}.norm1": "encoder.block.{i}.layer.0.layer_norm",
        "blocks.{i}.attn.q": "encoder.block.{i}.layer.0.SelfAttention.q",
        "blocks.{i}.attn.k": "encoder.block.{i}.layer.0.SelfAttention.k",
        "blocks.{i}.attn.v": "encoder.block.{i}.layer.0.SelfAttention.v",
        "blocks.{i}.attn.o": "encoder.block.{i}.layer.0.SelfAttention.o",
        "blocks.{i}.pos_embedding.embedding": "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias",
        "blocks.{i}.norm2": "encoder.block.{i}.layer.1.layer_norm",
        "blocks.{i}.ffn.gate.0": "encoder.block.{i}.layer.1.DenseReluDense.wi_0",
        "blocks.{i}.ffn.fc1": "encoder.block.{i}.layer.1.DenseReluDense.wi_1",
        "blocks.{i}.ffn.fc2": "encoder.block.{i}.layer.1.DenseReluDense.wo",
    },
)
# The token embedding is one tensor tied to two Hugging Face names; the map writes the first.
_TIED_EMBEDDING = ("shared.weight", "encoder.embed_tokens.weight")


def release_to_hf_umt5(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release ``.pth`` keys -> ``UMT5EncoderModel`` keys (pure renames, no reshapes)."""
    out = UMT5_KEYMAP.apply(state_dict)
    if _TIED_EMBEDDING[0] in out:
        out[_TIED_EMBEDDING[1]] = out[_TIED_EMBEDDING[0]]
    return out


def hf_to_release_umt5(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``release_to_hf_umt5`` (the tied embedding is written once)."""
    hf = dict(state_dict)
    if _TIED_EMBEDDING[0] not in hf and _TIED_EMBEDDING[1] in hf:
        hf[_TIED_EMBEDDING[0]] = hf[_TIED_EMBEDDING[1]]
    hf.pop(_TIED_EMBEDDING[1], None)
    return UMT5_KEYMAP.invert(hf)


def infer_umt5_config(release_state_dict: Mapping[str, torch.Tensor]) -> UMT5Config:
    """The encoder's configuration read off the release checkpoint's shapes (umT5-XXL: 256384, 4096, 24, 64 heads)."""
    vocab, d_model = release_state_dict["token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in release_state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    buckets, heads = release_state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=release_state_dict["blocks.0.attn.q.weight"].shape[0] // heads,
        d_ff=release_state_dict["blocks.0.ffn.fc1.weight"].shape[0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=RELATIVE_ATTENTION_MAX_DISTANCE,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )


class Placement(Enum):
    """Where the text encoder lives: on ``device``, always on the CPU, or on the CPU between calls."""

    device = "device"
    cpu = "cpu"
    offload = "offload"


class TextEncoder(nn.Module):
    """Frozen umT5 encoder with its tokenizer. ``encode(prompts) -> [B, max_length, d_model]``."""

    def __init__(
        self,
        tokenizer,
        model: UMT5EncoderModel,
        max_length: int = T5_MAX_LENGTH,
        device: str | torch.device = "cpu",
        placement: Placement = Placement.device,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.target = torch.device(device)
        self.placement = Placement(placement)
        self.model.to(self.target if self.placement is Placement.device else "cpu")

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        placement: Placement = Placement.device,
        max_length: int = T5_MAX_LENGTH,
    ) -> TextEncoder:
        """Load from the release's ``umt5-xxl`` folder (``.pth`` + tokenizer) or a Hugging Face UMT5 folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: text encoder folder not found")
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        release_file = folder / RELEASE_T5_FILE
        if release_file.is_file():
            model = load_release_umt5(release_file, dtype)
        elif (folder / "config.json").is_file():
            model = UMT5EncoderModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        else:
            raise FileNotFoundError(f"{folder}: neither {RELEASE_T5_FILE} nor a Hugging Face config.json")
        return cls(tokenizer, model, max_length=max_length, device=device, placement=placement)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> ``input_ids, attention_mask`` ``[B, max_length]``; warns about truncation."""
        texts = [clean_text(p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        for index, length in enumerate(lengths):
            if length > self.max_length:
                log.warning(
                    "prompt %d is %d tokens long: the last %d are dropped (the text encoder reads %d)",
                    index,
                    length,
                    length - self.max_length,
                    self.max_length,
                )
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, max_length, d_model]`` on the target device, in the encoder's dtype, zero at padding."""
        ids, mask = self.tokenize(list(prompts))
        run_on = self.target if self.placement is not Placement.cpu else torch.device("cpu")
        if self.placement is Placement.offload:
            self.model.to(run_on)
        try:
            hidden = self.model(input_ids=ids.to(run_on), attention_mask=mask.to(run_on)).last_hidden_state
        finally:
            if self.placement is Placement.offload:
                self.model.to("cpu")
        hidden = hidden * mask.to(device=hidden.device, dtype=hidden.dtype)[..., None]
        return hidden.to(self.target)

    forward = encode


@dataclass
class TextEncoderConfig:
    """The ``text_encoder:`` config section."""

    path: str | None = None  # the release's umt5-xxl folder (.pth + tokenizer) or an HF UMT5 folder; unset: the card's
    dtype: str = "bfloat16"  # float32 on CPU
    placement: Placement = Placement.device  # device | cpu (always) | offload (on the device only while encoding)
    max_length: int = T5_MAX_LENGTH


def build_text_encoder(config: TextEncoderConfig, device: str | torch.device) -> TextEncoder:
    from sgm.registry import resolve_dtype

    return TextEncoder.from_folder(
        config.path,
        dtype=resolve_dtype(config.dtype),
        device=device,
        placement=config.placement,
        max_length=config.max_length,
    )


def load_release_umt5(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> UMT5EncoderModel:
    """The release's ``.pth`` into a ``UMT5EncoderModel`` built on the meta device, strictly."""
    release = read_state_dict(path)
    try:
        config = infer_umt5_config(release)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a umT5 encoder checkpoint ({exc})") from None
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        renamed = release_to_hf_umt5(release)
    except KeyError as exc:
        raise StateDictMismatchError(f"{path} (umT5 encoder): {exc.args[0]}") from None
    load_strict(model, renamed, f"{path} (umT5 encoder)", assign=True, dtype=dtype)
    # assign=True gives each name its own Parameter (sharing storage only until the first .to());
    # tie them again, or moving the encoder copies the embedding twice (2.1 GB more for umT5-XXL in bf16)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model
