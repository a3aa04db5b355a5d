"""Dataclass configs from YAML files plus ``key=value`` command-line overrides (one mechanism for every command).

Values are typed by the dataclass field's annotation, never guessed from their spelling:

* ``str``: the text as written (``yes``, ``007``, ``a # b`` and an empty value stay as they are);
* ``int``: an integer literal (``int(text)``); ``float``: ``float(text)`` (``1e-5``, ``.5``, ``inf``; YAML's
  ``.inf`` / ``.nan`` too); whether ``inf`` / ``nan`` make sense is for the config's own validation to decide;
* ``bool``: ``true``/``false``/``yes``/``no``/``on``/``off``/``1``/``0`` (any case);
* ``X | None``: ``none``/``null``/``~`` (any case) is ``None``, and so is an empty value unless ``X`` is ``str``;
* ``tuple[X, ...]``: a flow list ``[a, b]`` or ``a,b``, each item typed as ``X`` (quotes around an item are dropped);
* ``str | tuple[str, ...]``: a tuple when the text starts with ``[``, otherwise the string;
* a section whose dataclass has a ``from_preset(name)`` classmethod may be set to a preset's name
  (``data.pairs.columns=trl``).

A YAML config file is read with every scalar kept as its text, so a file value means exactly what the same text
means after ``key=`` on the command line. Already-typed values (a mapping from ``yaml.safe_load``, e.g. a run's
stored config) are checked against the annotation instead. Every problem is a ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Sequence

import yaml

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}
_YAML_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


class _TextLoader(yaml.SafeLoader):
    """A safe loader that keeps every scalar as its text (no implicit int/float/bool/null) and rejects duplicate
    keys."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {line}; first on line {seen[key]})",
                        key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"tuple[{_type_name(args[0])}, ...]" if args else "tuple"
    return str(annotation)


def _fail(key: str, value: Any, annotation: Any, detail: str = "") -> ValueError:
    extra = f" ({detail})" if detail else ""
    return ValueError(f"override {key}={value!r}: expected {_type_name(annotation)}{extra}")


def _split_items(text: str, key: str, annotation: Any) -> list[Any]:
    """The items of a flow list ``[a, b]`` or of ``a,b`` (strings, surrounding whitespace and quotes dropped)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = yaml.load(stripped, Loader=_TextLoader)
        except yaml.YAMLError as error:
            raise _fail(key, text, annotation, f"not a valid list: {str(error).splitlines()[0]}") from error
        if not isinstance(items, list):
            raise _fail(key, text, annotation, "not a valid list")
        return items
    if not stripped:
        return []
    items = []
    for item in stripped.split(","):
        item = item.strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1]
        items.append(item)
    return items


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (text, or an already-typed value) as the field type ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        optional = len(options) < len(args)
        if value is None:
            if optional:
                return None
            raise _fail(key, value, annotation)
        if isinstance(value, str):
            word = value.strip().lower()
            if optional and (word in _NONE_WORDS or (not word and str not in options)):
                return None
            tuples = [a for a in options if a is tuple or typing.get_origin(a) is tuple]
            if tuples and value.strip().startswith("["):
                return _convert(value, tuples[0], key)
            if str in options:
                return value
            options = [a for a in options if a not in tuples] + tuples
        elif isinstance(value, (list, tuple)):
            options = [a for a in options if a is tuple or typing.get_origin(a) is tuple] or options
        errors = []
        for option in options:
            try:
                return _convert(value, option, key)
            except ValueError as error:
                errors.append(error)
        raise _fail(key, value, annotation) from (errors[0] if errors else None)
    if annotation is tuple or origin is tuple:
        item_type = args[0] if args else str
        if isinstance(value, str):
            items = _split_items(value, key, annotation)
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _fail(key, value, annotation)
        converted = []
        for index, item in enumerate(items):
            if isinstance(item, (list, tuple, dict)):
                raise _fail(key, value, annotation, f"item {index} is not a single value")
            try:
                converted.append(_convert(item, item_type, f"{key}[{index}]"))
            except ValueError as error:
                raise _fail(key, value, annotation, str(error)) from error
        return tuple(converted)
    if isinstance(value, (list, tuple, dict)) or value is None:
        raise _fail(key, value, annotation)
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _fail(key, value, annotation, "quote it to keep it as text")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
        raise _fail(key, value, annotation, "true/false, yes/no, on/off or 1/0")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _fail(key, value, annotation, "an integer literal")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _YAML_FLOATS:
                return _YAML_FLOATS[word]
            try:
                return float(word)
            except ValueError:
                pass
        raise _fail(key, value, annotation)
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise _fail(key, value, annotation, "no rule to read this type from a value")


def _coerce(text: str, annotation: Any, key: str) -> Any:
    """Reads the override text ``text`` as the field type ``annotation`` (the rules are in the module docstring)."""
    return _convert(text, annotation, key)


def _apply(config, items: Sequence[tuple[str, Any]], prefix: str = ""):
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes: dict[str, Any] = {}
    nested: dict[str, list[tuple[str, Any]]] = {}
    for key, value in items:
        head, _, rest = key.partition(".")
        if head not in names:
            where = f"section {prefix.rstrip('.')!r}" if prefix else "the config"
            raise ValueError(f"unknown config key {prefix + head!r} in override {prefix}{key}={value}; known keys "
                             f"of {where}: {', '.join(names)}")
        if rest:
            nested.setdefault(head, []).append((rest, value))
        elif dataclasses.is_dataclass(hints[head]) and isinstance(hints[head], type):
            if hasattr(hints[head], "from_preset") and isinstance(value, str):  # a named layout of the section
                changes[head] = hints[head].from_preset(value.strip())
                continue
            raise ValueError(f"config key {prefix + head!r} is a section ({hints[head].__name__}); set its keys, "
                             f"e.g. {prefix}{head}.{dataclasses.fields(hints[head])[0].name}=...")
        else:
            changes[head] = _convert(value, hints[head], prefix + key)
    for head, sub_items in nested.items():
        current = changes.get(head, getattr(config, head))
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config key {prefix + head!r} is a value, not a section: cannot set "
                             f"{prefix}{head}.{sub_items[0][0]}")
        changes[head] = _apply(current, sub_items, f"{prefix}{head}.")
    return dataclasses.replace(config, **changes) if changes else config


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    items = []
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like key=value")
        key, text = override.split("=", 1)
        items.append((key.strip(), text))
    return items


def apply_overrides(config, overrides: Sequence[str], _prefix: str = ""):
    """Returns a copy of the dataclass ``config`` with ``key=value`` overrides applied (nested keys use dots).

    All overrides of one level are applied in a single ``dataclasses.replace``, so a config's cross-field checks
    (``__post_init__``) see the final combination, not each intermediate one.
    """
    return _apply(config, _parse_overrides(overrides), _prefix)


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def config_from_mapping(cls, data: Any, source: str = "config", overrides: Sequence[str] = ()):
    """Builds ``cls`` from defaults, then the (nested) mapping ``data`` read from ``source``, then the overrides.

    Values in ``data`` may be text (read like override text) or already typed (checked against the fields).
    """
    if not isinstance(data, dict):
        raise ValueError(f"config file {source} must hold a mapping of keys to values, not {type(data).__name__}")
    items = [*_flatten(data), *_parse_overrides(overrides)]
    try:
        return _apply(cls(), items)
    except ValueError as error:
        raise ValueError(f"{source} (with overrides {list(overrides)}): {error}") from error


def load_config(cls, path: str | None = None, overrides: Sequence[str] = ()):
    """Builds ``cls`` from defaults, then the YAML file at ``path``, then the overrides."""
    if path is None:
        return apply_overrides(cls(), overrides)
    try:
        with open(path) as handle:
            data = yaml.load(handle, Loader=_TextLoader)
    except FileNotFoundError as error:
        raise ValueError(f"config file {path} does not exist") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"config file {path} is not valid YAML{where}: {problem}") from error
    if data is None or data == "":
        # An empty file is almost always a mistake (a failed copy, the wrong path): running on the defaults would
        # silently be another experiment.
        raise ValueError(f"config file {path} is empty; give its settings, or leave out --config to use the "
                         "defaults")
    return config_from_mapping(cls, data, path, overrides)
