"""Discriminator regulariser of the release's VAE-training code (spec-vae §5.2)."""

from __future__ import annotations

import torch


def gradient_penalty(inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """One-centred gradient penalty on real inputs: ``mean_b (‖∂Σlogits/∂inputs_b‖₂ − 1)²``.

    ``inputs`` must require grad and ``logits`` be computed from them. The gradient keeps its
    graph (``create_graph=True``) so the penalty can be back-propagated into the discriminator.
    """
    (grads,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    norms = grads.flatten(1).norm(2, dim=1)
    return ((norms - 1) ** 2).mean()
