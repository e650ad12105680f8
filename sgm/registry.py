"""The one model registry: architecture names -> ``DiTConfig`` -> built modules.

Every script (sampling, training, merging, benchmarks) resolves ``model.name`` here.
``kaleido-14b`` holds the release's values (configs/video_model/dit_crossattn_14B_wanvae.yaml,
spec-dit-diffusion.md §1.1); ``kaleido-tiny`` is the same architecture at toy size, for tests
and the laptop demo.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from sgm.checkpoint import StateDictMismatchError, diff_shapes, shapes
from sgm.modules.dit import DiTConfig, KaleidoDiT, init_weights

ARCHITECTURES: dict[str, DiTConfig] = {
    "kaleido-14b": DiTConfig(
        num_layers=40,
        hidden_size=5120,
        num_attention_heads=40,
        inner_hidden_size=13824,
        time_freq_dim=256,  # time_embed_dim = hidden_size = 5120
        text_dim=4096,
        in_channels=16,
        out_channels=16,
        patch_size=(1, 2, 2),
        layernorm_epsilon=1e-6,
    ),
    # Wan2.1-T2V-1.3B's shape with Kaleido's subject tokens: no released Kaleido weights; for
    # fine-tuning from Wan2.1-1.3B and for mid-size benchmarks.
    "kaleido-1.3b": DiTConfig(
        num_layers=30,
        hidden_size=1536,
        num_attention_heads=12,
        inner_hidden_size=8960,
        time_freq_dim=256,
        text_dim=4096,
    ),
    "kaleido-tiny": DiTConfig(
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        inner_hidden_size=512,
        time_freq_dim=64,
        text_dim=64,
        in_channels=16,
        out_channels=16,
    ),
    # Issue 19's candidate demo model (trained, not shipped: model card): kaleido-tiny made deeper and
    # wider, with 4x4 patches over the 4x-spatial latents of assets/kaleido-shapes-next/vae (a token
    # still covers 16x16 pixels); the lowest loss of three 6-minute CPU probes.
    "kaleido-shapes": DiTConfig(
        num_layers=6,
        hidden_size=192,
        num_attention_heads=4,
        inner_hidden_size=768,
        time_freq_dim=64,
        text_dim=64,
        in_channels=16,
        out_channels=16,
        patch_size=(1, 4, 4),
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DType(Enum):
    """Weight (= compute) dtype names accepted in configs."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def resolve_dtype(name: str | DType | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if isinstance(name, DType):
        name = name.value
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (expected one of: {', '.join(DTYPES)})")
    return DTYPES[name]


def resolve_arch(arch: str | Mapping[str, Any] | DiTConfig, overrides: Mapping[str, Any] | None = None) -> DiTConfig:
    """A registry name, a mapping of ``DiTConfig`` fields, or a config, with optional field overrides."""
    if isinstance(arch, DiTConfig):
        config = arch
    elif isinstance(arch, str):
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture '{arch}' (registered: {', '.join(sorted(ARCHITECTURES))})")
        config = ARCHITECTURES[arch]
    else:
        config = _from_fields(dict(arch))
    updates = {k: v for k, v in (overrides or {}).items() if v is not None}
    if updates:
        base = dataclasses.asdict(config)
        if base["time_embed_dim"] == base["hidden_size"]:
            base["time_embed_dim"] = None  # derived: follows an overridden hidden_size
        config = _from_fields({**base, **updates})
    return config


def _from_fields(fields: dict[str, Any]) -> DiTConfig:
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown architecture field(s) {unknown} (expected: {', '.join(sorted(known))})")
    return DiTConfig(**fields)


def build_dit(
    arch: str | Mapping[str, Any] | DiTConfig,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    checkpoint_activations: bool = False,
    init: bool = True,
) -> KaleidoDiT:
    """Build the DiT in ``dtype`` on ``device`` (never in fp32 to cast later).

    The modules are created on the meta device, then memory is allocated once on ``device`` and
    every parameter initialised once. On ``meta`` nothing is allocated: load weights with
    ``sgm.checkpoint.load_dit_state_dict(model, sd, assign=True)``. ``init=False`` leaves the
    weights uninitialised, for a checkpoint to be loaded into them.
    """
    config = resolve_arch(arch)
    device = torch.device(device)
    model = KaleidoDiT(config, device="meta", dtype=resolve_dtype(dtype))
    if device.type != "meta":
        materialize(model, device)
        if init:
            init_weights(model)
    model.checkpoint_activations = checkpoint_activations
    return model


def check_dit_shapes(
    found: Mapping[str, tuple[int, ...]], arch: str | Mapping[str, Any] | DiTConfig, what: str = "the weights"
) -> None:
    """The one architecture check: ``found`` (DiT key -> shape) must be exactly the architecture's
    state dict, or ``StateDictMismatchError`` lists every missing, unexpected and misshaped key."""
    expected = shapes(build_dit(arch, device="meta").state_dict())
    diff = diff_shapes(expected, {k: tuple(v) for k, v in found.items()})
    if diff:
        label = arch if isinstance(arch, str) else "the architecture"
        raise StateDictMismatchError(f"{what} do not match {label}:\n{diff.report()}")


def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """Give every meta parameter uninitialised storage on ``device`` (``Module.to_empty`` without
    its ~0.3 s first-call cost of ``empty_like`` on meta tensors)."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and param.is_meta:
                data = torch.empty(param.shape, dtype=param.dtype, device=device)
                sub._parameters[name] = torch.nn.Parameter(data, requires_grad=param.requires_grad)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _optional_yaml_type(hint: Any) -> Any:
    """The YAML-facing type of a ``DiTConfig`` field, made optional (None = keep the registry value)."""
    if typing.get_origin(hint) is tuple:
        return list[int] | None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint | None


# Every DiTConfig field, optional: the ``model.arch`` section of a config overrides registry values.
ArchOverrides = dataclasses.make_dataclass(
    "ArchOverrides",
    [(name, _optional_yaml_type(hint), None) for name, hint in typing.get_type_hints(DiTConfig).items()],
)


DEFAULT_MODEL = "kaleido-tiny"


@dataclass
class ModelConfig:
    """The ``model:`` section shared by every script's config."""

    name: str | None = None  # a key of ARCHITECTURES; unset: the checkpoint's card (load=...), else kaleido-tiny
    arch: ArchOverrides = field(default_factory=ArchOverrides)  # field overrides of the named architecture
    # weights = compute dtype: float32 (CPU) or bfloat16 (GPU, release); unset: the card's, else float32
    dtype: DType | None = None
    checkpoint_activations: bool = False  # recompute each block in backward (training memory)


def build_dit_from_config(config: ModelConfig, device: str | torch.device = "cpu", init: bool = True) -> KaleidoDiT:
    _, arch = resolve_model(config)
    return build_dit(
        arch, device=device, dtype=model_dtype(config), checkpoint_activations=config.checkpoint_activations, init=init
    )


def model_dtype(config: ModelConfig, card: Mapping[str, Any] | None = None) -> torch.dtype:
    """The DiT's weight dtype: the config's, else the checkpoint card's, else float32."""
    if config.dtype is not None:
        return resolve_dtype(config.dtype)
    if card and card.get("dtype"):
        return resolve_dtype(str(card["dtype"]))
    return torch.float32


def architecture_card(name: str, arch: DiTConfig, dtype: str | DType | torch.dtype, **pointers: str | int) -> dict:
    """The architecture part of a model card (``sgm.checkpoint.write_model_card``)."""
    dtype_name = next(k for k, v in DTYPES.items() if v == resolve_dtype(dtype))
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(arch).items()}
    return {"name": name, "architecture": fields, "dtype": dtype_name, **pointers}


def resolve_model(
    config: ModelConfig, card: Mapping[str, Any] | None = None, card_source: str = ""
) -> tuple[str, DiTConfig]:
    """``(name, architecture)`` of a ``model:`` section, checked against a checkpoint's card.

    Without a card: the named registry architecture (default kaleido-tiny) with ``model.arch``
    overrides. With one: the card's architecture; a ``model.name`` or ``model.arch`` value in the
    YAML that differs from the card is an error naming both values.
    """
    overrides = {k: v for k, v in dataclasses.asdict(config.arch).items() if v is not None}
    if card is None:
        name = config.name or DEFAULT_MODEL
        return name, resolve_arch(name, overrides)
    try:
        arch = _from_fields(dict(card["architecture"]))
        name = str(card["name"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{card_source}: not a valid model card ({exc})") from None
    if config.name is not None and config.name != name:
        raise ValueError(
            f"model.name: the config says '{config.name}', the checkpoint's card {card_source} says '{name}'"
        )
    for key, value in overrides.items():
        have = getattr(arch, key)
        want = tuple(value) if isinstance(have, tuple) else value
        if want != have:
            raise ValueError(
                f"model.arch.{key}: the config says {value}, the checkpoint's card {card_source} says {have}"
            )
    return name, arch


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise the named device."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
