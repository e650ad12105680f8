"""Step caching: skip most of the DiT when its first block says the step changes little.

First Block Cache (ParaAttention, chengzeyi/ParaAttention; the adaptive successor of TeaCache,
Liu et al. 2024, arXiv 2411.19108), through diffusers' hooks (``apply_first_block_cache``): at
every evaluation the first block runs; when the relative mean absolute change of its residual
since the last full evaluation is below ``threshold``, the other blocks are skipped and the
residual they added last time is added instead. The hooks find our blocks through diffusers'
block registry (``TransformerLayer`` registered below: its first argument is the hidden states,
it returns them) and keep their state per cache context, which this module names and resets.

The decision is local to a process: with sequence parallelism the ranks of a group would decide
on different shards and disagree about running the layers' all-to-alls, so caching is refused
there (``check_step_cache``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sgm.modules.dit import KaleidoDiT, TransformerLayer

CACHE_METHODS = ("none", "first_block")


@dataclass
class StepCacheConfig:
    method: str = "none"  # none | first_block
    threshold: float = 0.05  # first_block: relative change of the first block's residual below which a step is reused


def check_step_cache(config: StepCacheConfig, *, sp_size: int = 1) -> None:
    """Raise ``ValueError`` naming the ``cache`` key that cannot work."""
    if config.method not in CACHE_METHODS:
        raise ValueError(f"cache.method: expected one of {', '.join(CACHE_METHODS)}, got '{config.method}'")
    if config.method == "none":
        return
    if not (math.isfinite(config.threshold) and config.threshold >= 0):
        raise ValueError(f"cache.threshold: expected a number of 0 or more, got {config.threshold}")
    if sp_size > 1:
        raise ValueError(
            "cache.method: step caching decides per process; with sequence_parallel_size > 1 the ranks of a group "
            "would disagree (use cache.method=none, or CFG-parallel / data parallelism without SP)"
        )


def _register_blocks() -> None:
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(
        model_class=TransformerLayer,
        metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
    )


class StepCache:
    """First Block Cache on ``dit``'s layers; counts the evaluations that ran every block."""

    def __init__(self, dit: KaleidoDiT, config: StepCacheConfig):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        if len(dit.transformer.layers) < 3:
            raise ValueError(f"cache.method={config.method}: needs at least 3 layers (a head, a body and a tail)")
        _register_blocks()
        self.dit, self.config = dit, config
        for layer in dit.transformer.layers:  # the hooks read inputs after the block ran: no in-place residuals
            layer.keep_input = True
        self.full_evaluations = 0
        # the last layer's MLP runs only in an evaluation that was not skipped
        self._counter = dit.transformer.layers[-1].mlp.register_forward_pre_hook(self._count)
        apply_first_block_cache(dit.transformer, FirstBlockCacheConfig(threshold=config.threshold))

    def _count(self, module, args) -> None:
        self.full_evaluations += 1

    def start(self, name: str) -> None:
        """A new sampling run (a video or a segment): forget the cached residuals, name the context."""
        from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

        HookRegistry.check_if_exists_or_initialize(self.dit.transformer).reset_stateful_hooks()
        _set_cache_context(self.dit.transformer, CacheContext(name=name))

    def remove(self) -> None:
        """Take the hooks off: the DiT computes every block again."""
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
        from diffusers.hooks.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(self.dit.transformer)
        registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
        self._counter.remove()
        for layer in self.dit.transformer.layers:
            layer.keep_input = False


@torch.no_grad()
def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of ``a`` against ``b`` (videos in [-1, 1]: peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
