"""Typed configs: dataclasses filled from a YAML file and `key=value` overrides.

Every command owns a dataclass (nested dataclasses for sections). `load_config`
reads YAML, applies dotted overrides such as `train.lr=3e-4 mesh.fsdp=4`, and
checks every key and type. An unknown key is an error naming the key and its
nearest valid spelling, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from neo_jax.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration problem, with a message naming the setting."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the named device mesh axes; their product must equal the device count.

    `-1` on one axis means "all remaining devices". A mesh axis that does not divide the
    dimension of a parameter it is meant to split is an error, unless that dimension's logical
    axis (`kv_heads`, `vocab`, ...; see `neo_jax.sharding.LOGICAL_AXIS_RULES`) is listed in
    `allow_replicated`: then the dimension stays whole on that axis, and the run logs it.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    allow_replicated: tuple[str, ...] = ()


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert `value` (from YAML or a `key=value` string) to `annotation`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot parse {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {_coerce(k, key_t, f"{where}"): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _build(annotation, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], values: dict[str, Any], where: str, base: T | None = None) -> T:
    """`cls` from `values`; every setting `values` does not name keeps its value in `base` (default:
    the field defaults of `cls`). A section given as a mapping is built on the section it replaces,
    so `embedding.collab.epochs=1` changes that one setting and keeps the rest of `embedding`, even
    where the enclosing config's default for `embedding` is not `EmbeddingConfig()`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown setting '{full}'{_nearest(key, list(fields))}")
        section = getattr(base, key) if base is not None else fields[key].default
        if dataclasses.is_dataclass(hints[key]) and isinstance(section, hints[key]) and isinstance(value, dict):
            kwargs[key] = _build(hints[key], value, full, section)
        else:
            kwargs[key] = _coerce(value, hints[key], full)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    missing = [f.name for f in fields.values() if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        names = ", ".join(f"'{where}.{m}'" if where else f"'{m}'" for m in missing)
        raise ConfigError(f"missing required setting {names}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def _check_override_path(cls: type, dotted: str) -> None:
    """Name the first unknown component of a dotted override, with a suggestion."""
    current: Any = cls
    walked = []
    for part in dotted.split("."):
        if current is dict or typing.get_origin(current) is dict:  # a free-form mapping: any key below it
            return
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"unknown setting '{dotted}': '{'.'.join(walked)}' is not a section")
        hints = typing.get_type_hints(current)
        names = list(hints)
        if part not in names:
            prefix = ".".join(walked + [part])
            raise ConfigError(f"unknown setting '{prefix}'{_nearest(part, names)}")
        walked.append(part)
        current = hints[part]
        for arg in typing.get_args(current):  # Optional[Section]
            if dataclasses.is_dataclass(arg):
                current = arg


def parse_overrides(cls: type, overrides: list[str]) -> dict[str, Any]:
    """Parse `a.b=value` strings into a nested dict, checking every key against `cls`."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check_override_path(cls, key)
        value: Any = raw
        try:  # numbers, booleans, lists and mappings in YAML syntax
            parsed = yaml.safe_load(raw)
            if not isinstance(parsed, str) and parsed is not None:
                value = parsed
        except yaml.YAMLError as e:
            if raw.lstrip()[:1] in ("[", "{"):  # meant as a list or mapping: say why it is not one
                raise ConfigError(f"override '{item}': not a valid YAML list or mapping "
                                  f"({getattr(e, 'problem', None) or 'unclosed bracket'})") from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from an optional YAML file plus `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        values = loaded
    values = _merge(values, parse_overrides(cls, overrides or []))
    try:
        return _build(cls, values, "")
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def add_config_arguments(parser: argparse.ArgumentParser, doc: str | None, config_help: str, overrides_help: str,
                         config_required: bool = False) -> None:
    """A command's `--config FILE` and `KEY=VALUE` overrides (read with `load_config`), its module
    docstring as the description."""
    parser.description = doc
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=config_required, default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config (for saving beside a run)."""
    return dataclasses.asdict(config)
