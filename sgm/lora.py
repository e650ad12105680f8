"""LoRA files on the Kaleido DiT: the layouts people publish for Wan2.1, merged or as adapters.

A LoRA file holds, per adapted module, a down projection ``A [r, in]`` and an up projection
``B [out, r]`` (and optionally ``alpha``): the module's weight becomes ``W + scale·(alpha/r)·B·A``.
Accepted layouts (``parse_lora`` tells them apart by their keys):

| layout | example key |
|---|---|
| ours (Kaleido SAT names, engine prefix optional) | ``transformer.layers.0.attention.query_key_value.lora_A.weight`` |
| Wan / ComfyUI | ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` (or ``lora_A``/``lora_B``), ``....alpha`` |
| kohya | ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` |
| diffusers | ``transformer.blocks.0.attn1.to_q.lora_A.weight`` |

Names are mapped with the converters' ``KeyMap`` tables, so a LoRA on Wan's separate q, k and v
lands on the matching row block of our fused ``query_key_value`` (and k, v on ``key_value``).
Full differences (``.diff`` for a weight, ``.diff_b`` for a bias, as some distillation LoRAs
carry for norms and biases) are added as they are. A key that maps to nothing is an error that
lists every such key.

Two ways to apply (``apply_loras``): ``merge`` adds the deltas to the weights in place (no cost
per step) and keeps a copy of each changed tensor, so ``unmerge`` restores the weights bit for bit;
``adapter`` registers a parametrization, so every read of the weight (the DiT reads some weights
directly) returns ``W + delta`` computed from the low-rank factors, the scale can be changed per
call, and removing it restores the untouched original.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from sgm.checkpoint import ENGINE_PREFIX, read_state_dict
from sgm.convert.diffusers_wan import DIFFUSERS
from sgm.convert.wan_official import WAN_OFFICIAL

log = logging.getLogger(__name__)

# Leaf suffixes of the factors, in the spellings of PEFT/diffusers and of kohya/ComfyUI.
_DOWN = (".lora_A.weight", ".lora_down.weight")
_UP = (".lora_B.weight", ".lora_up.weight")
_ALPHA = ".alpha"
_DIFF = {".diff": "weight", ".diff_b": "bias"}
_KOHYA_PREFIX = "lora_unet_"
_WAN_PREFIX = "diffusion_model."
_DIFFUSERS_PREFIX = "transformer."
_OURS_PREFIXES = ("transformer.layers.", "mixins.", "time_embed.", "text_embedding.", "adaln_projection.")


@dataclass
class LoraConfig:
    """One entry of the ``lora:`` list of a sampling config."""

    path: str = ""
    scale: float = 1.0


@dataclass(frozen=True)
class LoraDelta:
    """A change of rows ``rows`` of the DiT parameter ``target``: ``scale·up·down`` or ``scale·up``."""

    target: str
    rows: tuple[int, int]
    up: torch.Tensor  # [rows, r] (low rank) or the full difference of those rows
    down: torch.Tensor | None  # [r, in] or None for a full difference
    scale: float

    def dense(self, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The delta of the target's rows, in ``shape[1:]`` per row, computed in float32."""
        rows_shape = (self.rows[1] - self.rows[0], *shape[1:])
        if self.down is None:
            delta = self.up.float().reshape(rows_shape)
        else:
            delta = (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(rows_shape)
        return (delta * self.scale).to(dtype)


def _split_module(key: str) -> tuple[str, str] | None:
    for suffix in (*_DOWN, *_UP, _ALPHA, *_DIFF):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def _kohya_table(num_layers: int) -> dict[str, str]:
    """kohya name (dots made underscores after ``lora_unet_``) -> Wan module name."""
    return {_KOHYA_PREFIX + name.replace(".", "_"): name for name in WAN_OFFICIAL.right_names(num_layers)}


def _resolve(module: str, kohya: Mapping[str, str]) -> tuple[str, int, int] | None:
    """Our parameter-less name, row block and block count of a module named in any layout."""
    if module.startswith(_KOHYA_PREFIX):
        return WAN_OFFICIAL.locate(kohya[module]) if module in kohya else None
    if module.startswith(_OURS_PREFIXES):
        return module, 0, 1
    for prefix, keymap in ((_WAN_PREFIX, WAN_OFFICIAL), (_DIFFUSERS_PREFIX, DIFFUSERS)):
        if module.startswith(prefix):
            return keymap.locate(module[len(prefix) :])
    if module.startswith("blocks."):  # Wan names without ComfyUI's prefix
        return WAN_OFFICIAL.locate(module)
    return None


def _target(base: str, leaf: str, params: Mapping[str, torch.Size]) -> str | None:
    """The parameter key of our module ``base`` for a ``weight``/``bias`` leaf (a bare parameter
    such as the modulation offsets is its own key)."""
    if f"{base}.{leaf}" in params:
        return f"{base}.{leaf}"
    if leaf == "weight" and base in params:
        return base
    return None


def parse_lora(
    state_dict: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Size],
    num_layers: int,
    scale: float = 1.0,
    source: str = "LoRA",
) -> list[LoraDelta]:
    """The deltas of a LoRA state dict on a DiT with parameter shapes ``params``.

    Raises ``ValueError`` listing every key that maps to no parameter, every module with a missing
    factor and every factor whose shape does not fit its target.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown, problems = [], []
    for key, tensor in state_dict.items():
        split = _split_module(key[len(ENGINE_PREFIX) :] if key.startswith(ENGINE_PREFIX) else key)
        if split is None:
            unknown.append(key)
            continue
        modules.setdefault(split[0], {})[split[1]] = tensor
    kohya = _kohya_table(num_layers)
    deltas = []
    for module, parts in sorted(modules.items()):
        found = _resolve(module, kohya)
        if found is None:
            unknown += [module + suffix for suffix in parts]
            continue
        base, block, blocks = found
        for suffix, leaf in _DIFF.items():
            if suffix in parts:
                target = _target(base, leaf, params)
                if target is None:
                    unknown.append(module + suffix)
                    continue
                rows = _rows(params[target][0], block, blocks)
                deltas.append(LoraDelta(target, rows, parts[suffix], None, scale))
        down = next((parts[s] for s in _DOWN if s in parts), None)
        up = next((parts[s] for s in _UP if s in parts), None)
        if down is None and up is None:
            continue
        if down is None or up is None:
            problems.append(
                f"{module}: has {'up' if down is None else 'down'} but no {'down' if down is None else 'up'}"
            )
            continue
        target = _target(base, "weight", params)
        if target is None:
            unknown.append(module)
            continue
        shape = params[target]
        rows = _rows(shape[0], block, blocks)
        rank = down.shape[0]
        if up.shape[0] != rows[1] - rows[0] or up.shape[1] != rank or down[0].numel() != shape[1:].numel():
            problems.append(
                f"{module}: up {list(up.shape)} x down {list(down.shape)} does not fit rows {rows} of "
                f"{target} {list(shape)}"
            )
            continue
        alpha = float(parts[_ALPHA]) if _ALPHA in parts else float(rank)
        deltas.append(LoraDelta(target, rows, up, down, scale * alpha / rank))
    if unknown:
        listed = ", ".join(sorted(unknown)[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        problems.insert(0, f"{len(unknown)} key(s) map to no parameter of the DiT: {listed}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return deltas


def _rows(out: int, block: int, blocks: int) -> tuple[int, int]:
    size = out // blocks
    return block * size, (block + 1) * size


def load_lora(path: str | Path, dit: nn.Module, scale: float = 1.0) -> list[LoraDelta]:
    """Read a LoRA file (``.safetensors``, or ``.pt``/``.bin`` weights-only) for ``dit``."""
    params = {k: v.shape for k, v in dit.state_dict().items()}
    return parse_lora(read_state_dict(path), params, dit.config.num_layers, scale, source=str(path))


def _by_target(deltas: Sequence[LoraDelta]) -> dict[str, list[LoraDelta]]:
    grouped: dict[str, list[LoraDelta]] = {}
    for delta in deltas:
        grouped.setdefault(delta.target, []).append(delta)
    return grouped


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, name = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), name


def total_delta(deltas: Sequence[LoraDelta], like: torch.Tensor) -> torch.Tensor:
    """The sum of ``deltas`` over a whole parameter shaped like ``like`` (float32)."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for delta in deltas:
        out[delta.rows[0] : delta.rows[1]] += delta.dense(like.shape).to(like.device)
    return out


class _LowRankDelta(nn.Module):
    """Parametrization ``W -> W + multiplier·Σ deltas`` (the deltas stay low rank until read)."""

    def __init__(self, deltas: Sequence[LoraDelta]):
        super().__init__()
        self.deltas = list(deltas)
        self.multiplier = 1.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 0.0:
            return weight
        return weight + (self.multiplier * total_delta(self.deltas, weight)).to(weight.dtype)


@dataclass
class AppliedLoras:
    """What ``apply_loras`` changed, and how to undo it exactly."""

    model: nn.Module
    mode: str
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # merge: the untouched tensors
    adapters: dict[str, _LowRankDelta] = field(default_factory=dict)  # adapter: the parametrizations

    def set_scale(self, multiplier: float) -> None:
        """Adapters only: scale every delta by ``multiplier`` (0 switches them off) without reloading."""
        if self.mode != "adapter":
            raise ValueError("set_scale needs lora_mode=adapter (merged deltas are baked into the weights)")
        for adapter in self.adapters.values():
            adapter.multiplier = multiplier

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the weights bit for bit (merged: the saved tensors; adapters: the untouched originals)."""
        for key, original in self.originals.items():
            module, name = _owner(self.model, key)
            getattr(module, name).copy_(original)
        for key in self.adapters:
            module, name = _owner(self.model, key)
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self.originals.clear()
        self.adapters.clear()


@torch.no_grad()
def apply_loras(model: nn.Module, deltas: Sequence[LoraDelta], mode: str = "merge") -> AppliedLoras:
    """Apply ``deltas`` to ``model`` merged into the weights or as adapters (see the module docstring)."""
    if mode not in ("merge", "adapter"):
        raise ValueError(f"lora_mode: expected merge or adapter, got '{mode}'")
    applied = AppliedLoras(model, mode)
    for key, group in _by_target(deltas).items():
        module, name = _owner(model, key)
        param = getattr(module, name)
        if mode == "merge":
            applied.originals[key] = param.detach().clone()
            param.add_(total_delta(group, param).to(param.dtype))
        else:
            adapter = _LowRankDelta(group)
            parametrize.register_parametrization(module, name, adapter, unsafe=True)
            applied.adapters[key] = adapter
    log.info("LoRA %s: %d tensors of %d parameters changed", mode, len(deltas), len(_by_target(deltas)))
    return applied


def lora_targets(deltas: Sequence[LoraDelta]) -> list[str]:
    """The parameter keys a list of deltas changes, sorted (for reports)."""
    return sorted(_by_target(deltas))


# ---------------------------------------------------------------------------------------------
# Training adapters

# Target groups -> the linear layers of every transformer layer they adapt (Wan's self_attn q/k/v/o,
# cross_attn q/k/v/o and ffn.0/2: what community LoRAs adapt).
LORA_TARGET_GROUPS = {
    "attention": ("attention.query_key_value", "attention.dense"),
    "cross_attention": ("cross_attention.query", "cross_attention.key_value", "cross_attention.dense"),
    "mlp": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
}
LORA_FILE = "lora.safetensors"
LORA_INFO_FILE = "lora.json"


@dataclass
class LoraTrainConfig:
    """The ``lora:`` section of a training config; ``rank: 0`` is full fine-tuning."""

    rank: int = 0
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGET_GROUPS))
    # Rank dropout (kohya's rank_dropout): each step drops rank channels of B·A. Input dropout
    # (PEFT's lora_dropout) cannot be written as a change of the weight, and the DiT reads weights.
    dropout: float = 0.0
    # Storage of the adapted layers' frozen weights: "model" (the model dtype, e.g. bf16) or "fp8"
    # (float8 e4m3 scaled per output channel, dequantised to the model dtype when read: half of bf16).
    base_storage: str = "model"


class TrainableLora(nn.Module):
    """Parametrization ``W -> W + (alpha/r)·B·A`` with trainable float32 factors.

    Why not peft: peft wraps ``nn.Linear.forward``, but the DiT reads several weights directly
    (the fused QKV and KV projections split by rows, the output projections' bias added after the
    matmul, the MLP's ``addmm``), so a wrapped forward would never run; a parametrization changes
    every read of the weight. ``B`` starts at zero: training starts from the base model.
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        dropout: float,
        device=None,
        base_scale: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)  # nn.Linear's (and peft's) init of A
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        # fp8 base: the per-row scales of the stored weight and the dtype it is dequantised to
        self.register_buffer("base_scale", base_scale, persistent=False)
        self.compute_dtype = compute_dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.base_scale is not None:
            weight = (weight.float() * self.base_scale).to(self.compute_dtype)
        down = self.lora_A
        if self.training and self.dropout > 0:
            keep = torch.rand(self.rank, 1, device=down.device) >= self.dropout
            down = down * keep / (1 - self.dropout)
        delta = (self.alpha / self.rank) * (self.lora_B @ down)  # [out, in] float32
        return weight + delta.to(weight.dtype)


def lora_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the linear layers ``targets`` (group names of ``LORA_TARGET_GROUPS``) adapt."""
    unknown = sorted(set(targets) - set(LORA_TARGET_GROUPS))
    if unknown or not targets:
        raise ValueError(f"lora.targets: expected some of {sorted(LORA_TARGET_GROUPS)}, got {list(targets)}")
    suffixes = tuple("." + s for group in targets for s in LORA_TARGET_GROUPS[group])
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name.endswith(suffixes)]


def add_trainable_lora(model: nn.Module, config: LoraTrainConfig) -> list[str]:
    """Freeze ``model`` and give each target linear layer a trainable LoRA; returns their names."""
    if config.rank < 1:
        raise ValueError(f"lora.rank: expected at least 1 for LoRA training, got {config.rank}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"lora.dropout: expected 0 <= dropout < 1, got {config.dropout}")
    if config.base_storage not in ("model", "fp8"):
        raise ValueError(f"lora.base_storage: expected model or fp8, got '{config.base_storage}'")
    names = lora_modules(model, config.targets)
    model.requires_grad_(False)
    alpha = float(config.alpha if config.alpha is not None else config.rank)
    for name in names:
        linear = model.get_submodule(name)
        scale, compute_dtype = None, linear.weight.dtype
        if config.base_storage == "fp8":
            stored, scale = quantize_fp8_rows(linear.weight.detach())
            linear.weight = nn.Parameter(stored, requires_grad=False)
        adapter = TrainableLora(
            linear.out_features,
            linear.in_features,
            config.rank,
            alpha,
            config.dropout,
            device=linear.weight.device,
            base_scale=scale,
            compute_dtype=compute_dtype,
        )
        parametrize.register_parametrization(linear, "weight", adapter, unsafe=True)
    return names


FP8 = torch.float8_e4m3fn


def quantize_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q = fp8(weight / scale)`` and ``scale`` = the row's largest magnitude over
    fp8 e4m3's largest value (448), so every row uses the format's whole range (float32 scales)."""
    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / torch.finfo(FP8).max
    return (weight.float() / scale).to(FP8), scale


def restore_fp8_storage(model: nn.Module) -> int:
    """Cast fp8-stored LoRA bases back to fp8 after something (DeepSpeed's bf16 setup casts every
    floating parameter) widened them; lossless, the values came from fp8. Returns the count."""
    count = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            adapters = [a for a in module.parametrizations.weight if isinstance(a, TrainableLora)]
            if adapters and adapters[0].base_scale is not None:
                original = module.parametrizations.weight.original
                if original.dtype != FP8:
                    original.data = original.data.to(FP8)
                    count += 1
    return count


def trainable_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapters in our layout (``<module>.lora_A.weight``, ``.lora_B.weight``, ``.alpha``),
    which ``load_lora`` reads back: the file a LoRA run ships."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for adapter in module.parametrizations.weight:
                if isinstance(adapter, TrainableLora):
                    out[f"{name}.lora_A.weight"] = adapter.lora_A.detach().float().cpu().contiguous()
                    out[f"{name}.lora_B.weight"] = adapter.lora_B.detach().float().cpu().contiguous()
                    out[f"{name}.alpha"] = torch.tensor(adapter.alpha)
    return out
