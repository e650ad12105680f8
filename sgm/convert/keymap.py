"""Table-driven renaming between two key layouts: the project's one rename engine.

A ``KeyMap`` maps a *left* layout (ours: the Kaleido SAT DiT, the release's VAE and umT5 files)
to a *right* one (Wan2.1, diffusers, transformers) with two tables: one-to-one renames, and fused
left tensors (QKV, cross KV) that are row blocks of several right tensors. ``{i}`` in a template
stands for a layer index; a template matches a key with an optional ``.weight``/``.bias``/``.gamma``
leaf. Conversions refuse to drop or invent tensors: every input key must be consumed, every
fused tensor complete.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@functools.cache
def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    # .weight_scale: the per-row scales of a pre-quantised fp8 weight (sgm.memory), fused like the weight's rows
    return re.compile("^" + body + r"(?P<suffix>\.weight_scale|\.weight|\.bias|\.gamma)?$")


def _split_key(key: str, templates) -> tuple[str, str | None, str] | None:
    """(template, layer index or None, leaf suffix or "") of the template matching ``key``."""
    for template in templates:
        match = _pattern(template).match(key)
        if match:
            groups = match.groupdict()
            return template, groups.get("i"), groups["suffix"] or ""
    return None


def _fill(template: str, index: str | None) -> str:
    return template if index is None else template.replace("{i}", index)


@dataclass(frozen=True)
class KeyMap:
    """``left`` <-> ``right`` key layout."""

    left: str
    right: str
    renames: Mapping[str, str]  # left template -> right template
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # left fused -> right parts, in row order

    def apply(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        unknown = []
        for key, tensor in state_dict.items():
            if found := _split_key(key, self.renames):
                template, index, suffix = found
                out[_fill(self.renames[template], index) + suffix] = tensor
            elif found := _split_key(key, self.fused):
                template, index, suffix = found
                targets = self.fused[template]
                if tensor.shape[0] % len(targets):
                    raise ValueError(f"{key}: {tensor.shape[0]} rows do not split into {len(targets)} blocks")
                for target, part in zip(targets, tensor.chunk(len(targets), dim=0), strict=True):
                    out[_fill(target, index) + suffix] = part.clone()
            else:
                unknown.append(key)
        if unknown:
            raise KeyError(f"no {self.right} name for {self.left} key(s): {sorted(unknown)}")
        return out

    def invert(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reverse = {v: k for k, v in self.renames.items()}
        part_of = {part: (fused, n) for fused, parts in self.fused.items() for n, part in enumerate(parts)}
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, dict[int, torch.Tensor]] = {}
        unknown = []
        for key, tensor in state_dict.items():
            if found := _split_key(key, reverse):
                template, index, suffix = found
                out[_fill(reverse[template], index) + suffix] = tensor
            elif found := _split_key(key, part_of):
                template, index, suffix = found
                fused, position = part_of[template]
                pending.setdefault(_fill(fused, index) + suffix, {})[position] = tensor
            else:
                unknown.append(key)
        if unknown:
            raise KeyError(f"no {self.left} name for {self.right} key(s): {sorted(unknown)}")
        for key, parts in pending.items():
            count = len(self.fused[_split_key(key, self.fused)[0]])
            if sorted(parts) != list(range(count)):
                raise KeyError(f"{key}: found {len(parts)} of the {count} row blocks it is fused from")
            out[key] = torch.cat([parts[n] for n in range(count)], dim=0)
        return out

    def locate(self, right_name: str) -> tuple[str, int, int] | None:
        """The left name a right module or parameter name belongs to, and its row block:
        ``(left name, block, blocks)`` (``block`` 0 of 1 for a plain rename), or None.

        ``right_name`` carries no leaf (``blocks.3.self_attn.q``, not ``....q.weight``), as in LoRA
        files, which name modules.
        """
        reverse = {v: k for k, v in self.renames.items()}
        if found := _split_key(right_name, reverse):
            template, index, suffix = found
            return _fill(reverse[template], index) + suffix, 0, 1
        part_of = {part: (fused, n) for fused, parts in self.fused.items() for n, part in enumerate(parts)}
        if found := _split_key(right_name, part_of):
            template, index, suffix = found
            fused, position = part_of[template]
            return _fill(fused, index) + suffix, position, len(self.fused[fused])
        return None

    def right_names(self, num_layers: int) -> list[str]:
        """Every right module name of a model with ``num_layers`` layers (templates filled)."""
        templates = list(self.renames.values()) + [part for parts in self.fused.values() for part in parts]
        names = []
        for template in templates:
            if "{i}" in template:
                names += [_fill(template, str(i)) for i in range(num_layers)]
            else:
                names.append(template)
        return names
