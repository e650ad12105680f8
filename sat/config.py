"""YAML configuration: typed schemas, composition of several files, loud errors.

A script declares its configuration as a tree of dataclasses (the schema). Users pass several
YAML files, merged left to right, then ``key=value`` overrides (dotted keys for nested sections).
Every key of every file is checked against the schema before merging, so a typo fails with the
key and the file it came from; values are converted to the field's type by OmegaConf (booleans
accept ``true/false/yes/no/on/off`` in any case, never Python's ``bool("False") is True``).

``instantiate`` builds a ``{"target": "module.Class", "params": {...}}`` entry after checking
the params against the constructor's signature, so a misspelled parameter is an error, not a
silently ignored keyword.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

COMMAND_LINE = "<command line>"


class ConfigError(ValueError):
    """A configuration problem, with the file (or command line) and key that caused it."""


def _field_types(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _nested_schema(annotation: Any) -> type | None:
    """The dataclass a field holds, if any (``Optional[X]`` counts as ``X``)."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def check_keys(schema: type, values: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Raise ``ConfigError`` for the first key of ``values`` that ``schema`` does not declare.

    Fields typed as a dataclass are checked recursively; fields typed ``dict``/``Any`` accept
    any keys (their consumer validates them, e.g. ``instantiate``).
    """
    types = _field_types(schema)
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"{source}: unknown key '{dotted}' (expected one of: {known})")
        nested = _nested_schema(types[key])
        if nested is not None and isinstance(value, Mapping):
            check_keys(nested, value, source, prefix=f"{dotted}.")


def _dotlist_to_tree(overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{COMMAND_LINE}: override '{item}' is not of the form key=value")
    tree = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    assert isinstance(tree, dict)
    return tree


def load_config(schema: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Compose ``files`` (left to right) and ``overrides`` onto the defaults of ``schema``.

    Returns an instance of ``schema``. Raises ``ConfigError`` naming the file and key for an
    unknown key, a missing file, invalid YAML or a value of the wrong type.
    """
    merged: DictConfig = OmegaConf.structured(schema)
    layers: list[tuple[str, Any]] = []
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path))
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        layers.append((str(path), raw))
    if overrides:
        layers.append((COMMAND_LINE, _dotlist_to_tree(overrides)))
    for source, raw in layers:
        check_keys(schema, raw, source)
        try:
            merged = OmegaConf.merge(merged, raw)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            message = str(exc).splitlines()[0]
            raise ConfigError(f"{source}: bad value for '{key}': {message}") from None
    return OmegaConf.to_object(merged)


def to_yaml(config: Any) -> str:
    """The resolved configuration as YAML (saved next to outputs and checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def import_target(target: str) -> Any:
    """Import ``package.module.Name``."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"target '{target}' is not a dotted path 'module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"target '{target}': cannot import module '{module_name}': {exc}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"target '{target}': module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def instantiate(spec: Mapping[str, Any], where: str = "config", **extra: Any) -> Any:
    """Build ``spec["target"](**spec["params"], **extra)`` after checking the signature.

    ``where`` names the config key for error messages (for example ``sampling.sampler``).
    """
    unknown = set(spec) - {"target", "params"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (expected 'target' and 'params')")
    if "target" not in spec:
        raise ConfigError(f"{where}: missing 'target'")
    cls = import_target(str(spec["target"]))
    params = dict(spec.get("params") or {})
    overlap = set(params) & set(extra)
    if overlap:
        raise ConfigError(f"{where}: params {sorted(overlap)} are set by the program and may not be given")
    try:
        inspect.signature(cls).bind(**params, **extra)
    except TypeError as exc:
        accepted = ", ".join(inspect.signature(cls).parameters)
        raise ConfigError(f"{where}: bad params for {spec['target']}: {exc} (accepted: {accepted})") from None
    return cls(**params, **extra)
