"""Text conditioning: captions -> ``{"crossattn": [B, L, D]}``, with caption dropout for CFG training.

spec-vae-t5-data.md §3. Dropout replaces a caption by the empty string *before* encoding, so the
unconditional embedding is T5(""), not zeros. The release draws each decision from an unseeded
per-process RNG, so ranks of one sequence-parallel group (which see the same sample) can disagree;
here the decision is a pure function of ``(seed, step, data_rank, sample index)``: identical on
every rank of a group, reproducible across runs, different between data-parallel replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# Wan2.1's default negative prompt, the release's ``sample_neg_prompt`` (spec-dit §5.6).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Distinct odd constants mix (seed, step, rank) into one 63-bit generator seed.
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def dropout_decisions(batch_size: int, rate: float, seed: int, step: int, data_rank: int = 0) -> list[bool]:
    """Which captions of a batch to replace by "": Bernoulli(``rate``) per sample, seeded.

    Every rank that passes the same ``(seed, step, data_rank)`` gets the same decisions.
    """
    if rate <= 0.0:
        return [False] * batch_size
    mixed = (seed * _MIX[0] + step * _MIX[1] + data_rank * _MIX[2]) % (2**63)
    generator = torch.Generator().manual_seed(mixed)
    return (torch.rand(batch_size, generator=generator) < rate).tolist()


class TextConditioner(nn.Module):
    """Holds the frozen text encoder; ``forward`` gives the conditioning, ``unconditional`` the negative one."""

    def __init__(self, encoder: Callable[[Sequence[str]], torch.Tensor], ucg_rate: float = 0.1, seed: int = 0):
        super().__init__()
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1], got {ucg_rate}")
        self.encoder = encoder
        self.ucg_rate = ucg_rate
        self.seed = seed

    def forward(
        self, captions: Sequence[str], step: int | None = None, data_rank: int = 0
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Encode ``captions``; with a training ``step``, drop some to "" first.

        Returns the conditioning dict and the captions actually encoded (the input is not mutated).
        """
        captions = list(captions)
        if step is not None:
            drop = dropout_decisions(len(captions), self.ucg_rate, self.seed, step, data_rank)
            captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        return {"crossattn": self.encoder(captions)}, captions

    def unconditional(self, negative_prompt: str, batch_size: int) -> dict[str, torch.Tensor]:
        """The sampler's unconditional branch: the negative prompt for every sample."""
        return {"crossattn": self.encoder([negative_prompt] * batch_size)}
