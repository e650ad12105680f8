"""Table-driven renaming between the Kaleido (SAT) key layout and another layout.

A layout is two tables: one-to-one renames, and fused Kaleido tensors (QKV, cross KV) that are
row blocks of several tensors elsewhere. ``{i}`` stands for a layer index. Conversions refuse to
drop or invent tensors: every input key must be consumed, every fused tensor complete.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@functools.cache
def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^" + body + r"(?P<suffix>\.weight|\.bias)?$")


def _split_key(key: str, templates) -> tuple[str, str | None, str] | None:
    """(template, layer index or None, ``.weight``/``.bias``/"") of the template matching ``key``."""
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
    """Kaleido <-> ``name`` key layout."""

    name: str
    renames: Mapping[str, str]  # Kaleido template -> other template
    fused: Mapping[str, tuple[str, ...]]  # Kaleido fused template -> other templates, in row order

    def from_kaleido(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
            raise KeyError(f"no {self.name} name for Kaleido key(s): {sorted(unknown)}")
        return out

    def to_kaleido(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
            raise KeyError(f"no Kaleido name for {self.name} key(s): {sorted(unknown)}")
        for key, parts in pending.items():
            count = len(self.fused[_split_key(key, self.fused)[0]])
            if sorted(parts) != list(range(count)):
                raise KeyError(f"{key}: found {len(parts)} of the {count} row blocks it is fused from")
            out[key] = torch.cat([parts[n] for n in range(count)], dim=0)
        return out
