"""Representation alignment: an auxiliary training loss on the DiT's hidden states (not in the release).

REPA (Yu et al., 2024, "Representation Alignment for Generation") speeds up DiT training by asking an
early layer's hidden states, through a small head that is dropped after training, to predict features
of the clean image from a pretrained encoder. Here the targets are what a data maker knows about each
video token: per latent cell, the share of its pixels that belong to each class of a labelling (e.g.
background and the subjects' shapes, or their colours) and the mean offset of its subject pixels from
their subject's centre (``tools/make_token_targets.py`` writes them for the demo world). A hidden state
that must say which shape covers its token, and where in that subject it sits, from a noisy frame, the
caption and the references, has to read the shape from the reference it belongs to: the binding that the
demo DiT otherwise does not learn within a CPU budget (model card, issue 19).

Targets of one sample (a ``.safetensors`` file per sample, ``<root>/targets/<id>.safetensors``):
``class_<name> [T, K, h, w]`` float shares that sum to 1 over ``K`` in every cell, on the latent grid;
optionally ``offset [T, 2, h, w]`` (mean (row, column) offset of the cell's subject pixels, in subject
sizes) with ``offset_weight [T, 1, h, w]`` (the cell's subject share); optionally
``reference_class_<name> [N, K]``, each reference's class in a labelling that the video has too (e.g.
the shape it shows): every token of reference ``n`` is asked for it, through the same head, so that the
DiT has to recognise a reference's shape before it can carry it to the video tokens, and does so in the
code the video tokens are read in. The head's outputs are the classes' logits in name order, then the
two offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TARGETS_FOLDER = "targets"
CLASS_PREFIX = "class_"
REFERENCE_PREFIX = "reference_class_"
OFFSET, OFFSET_WEIGHT = "offset", "offset_weight"


def class_names(targets: dict[str, torch.Tensor]) -> list[str]:
    """The class targets' keys in the head's output order (sorted by name)."""
    return sorted(k for k in targets if k.startswith(CLASS_PREFIX))


def head_outputs(targets: dict[str, torch.Tensor]) -> int:
    """The head's output width for targets shaped like ``targets`` (one sample's or a batch's):
    the classes of every labelling (the axis third from the end), plus 2 with offsets."""
    width = sum(targets[k].shape[-3] for k in class_names(targets))
    return width + (2 if OFFSET in targets else 0)


def check_targets(targets: dict[str, torch.Tensor], where: str) -> None:
    """``ValueError`` naming ``where`` unless ``targets`` is one sample's targets in the layout above."""
    names = class_names(targets)
    if not names:
        raise ValueError(f"{where}: no '{CLASS_PREFIX}<name>' tensor (expected class shares [T, K, h, w])")
    grid = targets[names[0]].shape[-2:]
    for key, value in targets.items():
        if key.startswith(REFERENCE_PREFIX):
            video = CLASS_PREFIX + key[len(REFERENCE_PREFIX) :]
            if video not in targets or value.ndim != 2 or value.shape[1] != targets[video].shape[1]:
                raise ValueError(f"{where}: {key} has shape {list(value.shape)}, expected [N, K] with {video}'s K")
        elif key.startswith(CLASS_PREFIX) or key in (OFFSET, OFFSET_WEIGHT):
            if value.ndim != 4 or value.shape[-2:] != grid or value.shape[0] != targets[names[0]].shape[0]:
                raise ValueError(f"{where}: {key} has shape {list(value.shape)}, expected [T, K, h, w] on one grid")
        else:
            expected = f"{CLASS_PREFIX}<name>, {REFERENCE_PREFIX}<name>, {OFFSET}, {OFFSET_WEIGHT}"
            raise ValueError(f"{where}: unknown tensor '{key}' (expected {expected})")
    if (OFFSET in targets) != (OFFSET_WEIGHT in targets):
        raise ValueError(f"{where}: {OFFSET} and {OFFSET_WEIGHT} come together")
    if OFFSET in targets and (targets[OFFSET].shape[1] != 2 or targets[OFFSET_WEIGHT].shape[1] != 1):
        raise ValueError(f"{where}: expected {OFFSET} [T, 2, h, w] and {OFFSET_WEIGHT} [T, 1, h, w]")


def pool_to_tokens(cells: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Cell values ``[B, T, K, h, w]`` averaged over each DiT patch: ``[B, L, K]``, ``L`` in the DiT's
    token order (frame, row, column)."""
    x = cells.transpose(1, 2)  # [B, K, T, h, w]
    pooled = F.avg_pool3d(x, kernel_size=patch, stride=patch)  # [B, K, T/pt, h/ph, w/pw]
    return pooled.flatten(2).transpose(1, 2)  # [B, L, K]


def soft_cross_entropy(logits: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``−Σ shares·log softmax(logits)`` (``[..., K]`` both)."""
    return -(shares * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def alignment_loss(
    prediction: torch.Tensor,
    targets: dict[str, torch.Tensor],
    patch: tuple[int, int, int],
    reference_prediction: torch.Tensor | None = None,
) -> torch.Tensor:
    """The head's ``prediction [B, L, outputs]`` for the video tokens against batch ``targets``
    (``[B, T, K, h, w]`` each): per labelling, the cross-entropy with the token's class shares (mean
    over tokens); plus, with offsets, the squared error of the token's mean subject offset, weighted
    by its subject share (the mean over the subject pixels of every token). With reference targets
    (``[B, N, K]``), the cross-entropy of ``reference_prediction [B, N·L_ref, outputs]`` (the
    references' tokens, reference after reference) with each reference's class is added."""
    prediction = prediction.float()
    loss = prediction.new_zeros(())
    start = 0
    for name in class_names(targets):
        shares = pool_to_tokens(targets[name].float(), patch)  # [B, L, K]
        width = shares.shape[-1]
        loss = loss + soft_cross_entropy(prediction[..., start : start + width], shares)
        reference = REFERENCE_PREFIX + name[len(CLASS_PREFIX) :]
        if reference in targets:
            if reference_prediction is None:
                raise ValueError(f"alignment: {reference} needs the references' predictions")
            classes = targets[reference].float()  # [B, N, K]
            logits = reference_prediction.float()[..., start : start + width]
            logits = logits.view(classes.shape[0], classes.shape[1], -1, width)  # [B, N, L_ref, K]
            loss = loss + soft_cross_entropy(logits, classes[:, :, None].expand_as(logits))
        start += width
    if OFFSET in targets:
        weight = targets[OFFSET_WEIGHT].float()
        weighted_sum = pool_to_tokens(targets[OFFSET].float() * weight, patch)  # [B, L, 2]
        share = pool_to_tokens(weight, patch)  # [B, L, 1]
        offset = weighted_sum / share.clamp_min(1e-6)  # the mean offset over the token's subject pixels
        error = (prediction[..., start : start + 2] - offset).pow(2).sum(-1, keepdim=True)  # [B, L, 1]
        loss = loss + (error * share).sum() / share.sum().clamp_min(1e-6)
    return loss


class AlignmentHead(nn.Module):
    """A two-layer MLP from the DiT's hidden width to the targets' outputs, as REPA's projector
    (smaller: the targets are a few classes, not an encoder's features). Used in training only."""

    def __init__(self, hidden_size: int, outputs: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, outputs))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype))
