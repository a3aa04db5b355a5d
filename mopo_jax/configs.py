"""Dataclass configs from YAML files plus ``key=value`` command-line overrides (one mechanism for every command)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Sequence

import yaml


def _coerce(text: str, annotation: Any, key: str) -> Any:
    """Parses ``text`` as YAML and checks it against the field's annotation."""
    value = yaml.safe_load(text)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple or annotation is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_type = args[0] if args else str
        try:
            return tuple(item_type(v) for v in value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"override {key}={text!r}: expected a list of {item_type.__name__}") from error
    candidates = [a for a in args if a is not type(None)] if args else [annotation]
    if value is None and type(None) in args:
        return None
    for candidate in candidates:
        if candidate is bool and isinstance(value, bool):
            return value
        if candidate in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if candidate is int and float(value) != int(value):
                continue
            return candidate(value)
        if candidate is str:
            return str(value)
    raise ValueError(f"override {key}={text!r}: expected {annotation}")


def apply_overrides(config, overrides: Sequence[str], _prefix: str = ""):
    """Returns a copy of the dataclass ``config`` with ``key=value`` overrides applied (nested keys use dots).

    All overrides of one level are applied in a single ``dataclasses.replace``, so a config's cross-field checks
    (``__post_init__``) see the final combination, not each intermediate one.
    """
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes: dict[str, Any] = {}
    nested: dict[str, list[str]] = {}
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like key=value")
        key, text = override.split("=", 1)
        head, _, rest = key.partition(".")
        if head not in names:
            where = f"section {_prefix.rstrip('.')!r}" if _prefix else "the config"
            raise ValueError(f"unknown config key {_prefix + head!r} in override {_prefix}{override}; known keys of "
                             f"{where}: {', '.join(names)}")
        if rest:
            nested.setdefault(head, []).append(f"{rest}={text}")
        else:
            changes[head] = _coerce(text, hints[head], _prefix + key)
    for head, items in nested.items():
        changes[head] = apply_overrides(changes.get(head, getattr(config, head)), items, f"{_prefix}{head}.")
    return dataclasses.replace(config, **changes) if changes else config


def config_from_mapping(cls, data: Any, source: str = "config", overrides: Sequence[str] = ()):
    """Builds ``cls`` from defaults, then the (nested) mapping ``data`` read from ``source``, then the overrides."""
    if not isinstance(data, dict):
        raise ValueError(f"config file {source} must hold a mapping of keys to values")
    flat = []

    def walk(prefix, mapping):
        for key, value in mapping.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
                flat.append(f"{prefix}{key}={text}")

    walk("", data)
    try:
        return apply_overrides(cls(), [*flat, *overrides])
    except ValueError as error:
        raise ValueError(f"{source} (with overrides {list(overrides)}): {error}") from error


def load_config(cls, path: str | None = None, overrides: Sequence[str] = ()):
    """Builds ``cls`` from defaults, then the YAML file at ``path``, then the overrides."""
    if path is None:
        return apply_overrides(cls(), overrides)
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError as error:
        raise ValueError(f"config file {path} does not exist") from error
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from error
    return config_from_mapping(cls, data, path, overrides)
