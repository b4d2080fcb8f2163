"""Scenario schema machinery: frozen dataclasses loaded from YAML with strict validation.

Every section of a scenario is a frozen dataclass whose fields carry their constraints in
metadata (see `spec`). `load_into` walks a parsed YAML mapping into such a dataclass and raises
`ConfigError` with the key path and what is allowed on the first problem: an unknown key, a
wrong type, a value out of range (NaN and infinities are outside every declared bound). `parse_yaml` reads
YAML strictly (a duplicate key, text nested too deeply: errors with the line). `apply_override`
implements `--set key.path=value`. Sections owned by other modules (workload, policies) are
declared there with the same helpers.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def spec(
    default: Any = _MISSING,
    *,
    factory: Any = _MISSING,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple[Any, ...] | None = None,
    nonempty: bool = False,
    doc: str = "",
) -> Any:
    """A dataclass field with validation metadata (bounds apply to numbers and to each
    element of a tuple of numbers)."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "nonempty": nonempty, "doc": doc}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _check_bounds(value: Any, meta: Mapping[str, Any], path: str) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(_fmt(c) for c in meta["choices"])
        raise ConfigError(f"{path}: must be one of {allowed}, got {_fmt(value)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    bounded = any(meta.get(key) is not None for key in ("gt", "ge", "lt", "le"))
    if bounded and not math.isfinite(value):  # .inf passes `> 0`; .nan fails it confusingly
        raise ConfigError(f"{path}: must be a finite number, got {_fmt(value)}")
    for key, ok, word in (
        ("gt", lambda v, b: v > b, ">"),
        ("ge", lambda v, b: v >= b, ">="),
        ("lt", lambda v, b: v < b, "<"),
        ("le", lambda v, b: v <= b, "<="),
    ):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            shown = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
            raise ConfigError(f"{path}: must be {word} {shown}, got {_fmt(value)}")


def convert(tp: Any, value: Any, path: str, meta: Mapping[str, Any] | None = None) -> Any:
    """Convert a parsed YAML value to type `tp`, validating it; raise ConfigError naming `path`."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path, meta)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: must be {_type_name(tp)}, got {_fmt(value)}")
    if tp is Any:
        return value
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        if isinstance(value, str | int | float) and not isinstance(value, bool) and elem is not str:
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: must be {_type_name(tp)}, got {_fmt(value)}")
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{path}: must not be empty")
        return tuple(convert(elem, v, f"{path}[{i}]", meta) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a mapping, got {_fmt(value)}")
        _, vtp = typing.get_args(tp)
        return {str(k): convert(vtp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, str) and hasattr(tp, "from_string"):
            value = tp.from_string(value)
        return load_into(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            out = tp(value)
        except ValueError:
            raise ConfigError(f"{path}: must be {_type_name(tp)}, got {_fmt(value)}") from None
        _check_bounds(out, meta, path)
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {_fmt(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: must be an integer, got {_fmt(value)}")
        value = int(value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: must be a number, got {_fmt(value)}")
        _check_bounds(value, meta, path)  # before the cast, so messages show what was written
        return float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {_fmt(value)}")
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{path}: must not be empty")
    _check_bounds(value, meta, path)
    return value


def load_into(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from mapping `data`, strictly. `path` prefixes key paths in errors."""
    where = path or "scenario"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping, got {_fmt(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        allowed = ", ".join(fields)
        raise ConfigError(f"{_join(path, str(unknown[0]))}: unknown key (allowed: {allowed})")
    kwargs = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name in data:
            kwargs[name] = convert(hints[name], data[name], key_path, f.metadata)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"{key_path}: required ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(path)
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-able values (enums as their values)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key written twice in one mapping."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: the base constructor reports it
                    continue
                if first is not None:
                    raise _DuplicateKeyError(
                        None, None, f"duplicate key {_fmt(key)} (first at line {first + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)  # type: ignore[arg-type]


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text strictly; `where` (a file, an option) starts every error message."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader
    except _DuplicateKeyError as exc:
        mark = exc.problem_mark
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise ConfigError(f"{where}:{line} {exc.problem}; write each key once") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply to read") from None


def read_yaml_mapping(path: Path, what: str, where: str | None = None) -> dict[str, Any]:
    """A YAML file that holds a mapping (a scenario, a profile), read strictly (`parse_yaml`);
    not UTF-8, not valid YAML, a key written twice or no mapping raise ConfigError starting with
    `where` (default: the path)."""
    at = where or str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{at}: line {line}: not UTF-8 text; save the {what} as UTF-8") from None
    data = parse_yaml(text, at)
    if not isinstance(data, dict):
        raise ConfigError(f"{at}: the {what} must be a mapping of sections")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text}: empty key path")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""
    except _DuplicateKeyError as exc:
        raise ConfigError(f"--set {text}: {exc.problem}") from None
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {text[:60]}: value nested too deeply to read") from None
    return parts, value


def apply_override(data: dict[str, Any], text: str) -> None:
    """`--set key.path=value`: set the field in the raw mapping `data`."""
    parts, value = parse_override(text)
    set_path(data, parts, value, f"--set {text}")


def set_path(data: dict[str, Any], parts: list[str], value: Any, where: str) -> None:
    """Set `parts` (a key path) in the raw mapping `data`, creating intermediate mappings."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value
