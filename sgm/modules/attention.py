"""The one attention entry point of the DiT.

| argument | shape |
|---|---|
| q | ``[B, Lq, heads, head_dim]`` |
| k, v | ``[B, Lk, heads, head_dim]`` |
| returns | ``[B, Lq, heads·head_dim]`` |

No mask and the default scale ``1/sqrt(head_dim)``: the release attends to every token, T5
padding included (spec-dit §4.3). flash-attn is used when it is installed, the tensors are on
CUDA and in half precision; otherwise PyTorch SDPA (which picks its own flash kernel on GPU).
Sequence parallelism wraps this function from outside; the model never calls collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Like ``attention`` but returns ``[B, Lq, heads, head_dim]`` (heads not merged)."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, heads, Lq, d] -> [B, Lq, heads, d]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_heads(q, k, v).flatten(2)
