"""Run under torchrun (2 processes): the sequence-parallel loss and gradients equal one process's.

Every rank builds the same tiny DiT and batch; the reference is computed locally without
parallelism, the SP result with the latent split along ``argv[1]`` (height|width) and Ulysses
attention. Gradients of the SP run are summed over the group (what data-parallel averaging does
up to the constant world size). Rank 0 prints the worst relative differences as JSON.
"""

import json
import sys

import torch
import torch.distributed as dist

from sat.parallel import init_parallel, shard, split_dim, token_offset
from sgm.diffusion.loss import rf_loss
from sgm.pipeline import enable_sequence_parallel
from sgm.registry import build_dit

ARCH = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "inner_hidden_size": 128, "text_dim": 24}


def loss_and_grads(model, x0, noise, sigmas, context, subjects, state=None, dim=3):
    model.zero_grad()
    offset = (0, 0)
    if state is not None:
        patch = model.config.patch_size[1:]
        x0, noise, subjects = (shard(t, dim, state, patch=patch) for t in (x0, noise, subjects))
        offset = token_offset(tuple(x0.shape), dim, state, patch=patch)
    loss = rf_loss(lambda x, t, c, s: model(x, t, c, s, token_offset=offset), x0, noise, sigmas, context, subjects)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def main() -> None:
    preference = sys.argv[1]
    state = init_parallel(2, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_dit(ARCH)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 16, 8, 8, generator=g)
    noise = torch.randn(2, 3, 16, 8, 8, generator=g)
    subjects = torch.randn(2, 2, 16, 8, 8, generator=g)
    context = torch.randn(2, 7, 24, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    ref_loss, ref_grads = loss_and_grads(model, x0, noise, sigmas, context, subjects)

    enable_sequence_parallel(model, state)
    dim = split_dim(8, 2, preference, patch=model.config.patch_size[1:])
    loss, grads = loss_and_grads(model, x0, noise, sigmas, context, subjects, state, dim)
    dist.all_reduce(loss)
    loss /= 2  # the mean over the two halves = the full mean
    worst = 0.0
    for name, grad in grads.items():
        dist.all_reduce(grad)
        grad /= 2  # each rank's loss is its half's mean: the full gradient is their average
        worst = max(worst, ((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-12)).item())
    if state.rank == 0:
        rel_loss = ((loss - ref_loss).abs() / ref_loss.abs()).item()
        print(json.dumps({"dim": dim, "loss": rel_loss, "grad": worst}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
