"""Typed configuration trees: dataclasses filled from dicts/YAML, changed by command-line overrides.

Why: every command (train, test, ...) has a nested config; users change it with ``key=value`` or
CVNet-style ``KEY VALUE`` pairs (``MODEL.DEPTH 50 TEST.WEIGHTS ckpt.pyth``). One helper does the
parsing and type checking so a misspelt key fails loudly (ConfigError naming it) instead of being
silently ignored.

* ``from_dict(cls, data)``: build dataclass ``cls`` from a nested mapping; unknown keys raise.
* ``to_dict(cfg)``: the plain nested dict (JSON/YAML-able).
* ``load_yaml(path)`` / ``merge_dicts``.
* ``apply_overrides(cfg, tokens, aliases=None)``: returns a new config. ``tokens`` mixes
  ``a.b=1`` items and ``KEY VALUE`` pairs. Keys match field names case-insensitively, so
  ``OPTIM.LR`` reaches ``optim.lr``; ``aliases`` maps other spellings (e.g. CVNet's
  ``TEST.WEIGHTS``) to dotted field paths. Values are parsed as YAML scalars/lists and coerced
  to the field's annotated type (``"3"`` for a str field stays the string "3").
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from irkit.errors import ConfigError

T = TypeVar("T")

#: CVNet's published test CLI keys -> irkit test-config paths (the `irkit test` command's config
#: is expected to have these fields; pass your own mapping when it differs).
CVNET_TEST_ALIASES: dict[str, str] = {
    "MODEL.DEPTH": "model.depth",
    "MODEL.HEADS.REDUCTION_DIM": "model.reduction_dim",
    "TEST.WEIGHTS": "weights",
    "TEST.DATA_DIR": "data_dir",
    "TEST.DATASET_LIST": "datasets",
    "TEST.SCALE_LIST": "scales",
    "TEST.TOPK_LIST": "topk",
}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolved forward refs: fall back to raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return tp, optional
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a parsed override) to annotated type ``tp`` or raise."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional or base is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {getattr(base, '__name__', base)})")
    if base is Any:
        return value
    if _is_dataclass_type(base):
        if isinstance(value, base):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {base.__name__} fields, got {value!r}")
        return from_dict(base, value, prefix=where)
    origin = typing.get_origin(base)
    if origin in (list, tuple, Sequence) or base in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(base)
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or base is tuple) else items
    if origin is dict or base is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        for arg in typing.get_args(base):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {base}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if base is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming all of them."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(unknown)}; "
                          f"valid keys: {', '.join(sorted(names))}")
    kwargs = {k: coerce(v, hints.get(k, Any), f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list of a dataclass config (tuples become lists; Paths strings)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding one mapping (empty file = {})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def merge_dicts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in ``update`` replaces."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def split_overrides(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """``["a.b=1", "MODEL.DEPTH", "50"]`` -> ``[("a.b", "1"), ("MODEL.DEPTH", "50")]``."""
    pairs: list[tuple[str, str]] = []
    i = 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if "=" in tok and not tok.startswith("="):
            key, value = tok.split("=", 1)
            pairs.append((key.strip(), value))
            i += 1
        elif i + 1 < len(tokens):
            pairs.append((tok.strip(), tokens[i + 1]))
            i += 2
        else:
            raise ConfigError(f"override {tok!r} has no value: write key=value or KEY VALUE")
        if not pairs[-1][0]:
            raise ConfigError(f"override {tok!r} has an empty key")
    return pairs


def _parse_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _resolve_path(cfg: Any, key: str, aliases: Mapping[str, str]) -> list[str]:
    """Field names along the dotted ``key`` (case-insensitive), after alias lookup."""
    upper = {k.upper(): v for k, v in aliases.items()}
    dotted = upper.get(key.upper(), key)
    parts = dotted.split(".")
    names: list[str] = []
    node: Any = cfg
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(node):
            fields = {f.name.lower(): f.name for f in dataclasses.fields(node)}
            name = fields.get(part.lower())
            if name is None:
                where = ".".join(names) or "the config"
                raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r}; "
                                  f"valid: {', '.join(sorted(fields.values()))}")
            names.append(name)
            node = getattr(node, name)
        elif isinstance(node, dict):
            names.append(part)  # free-form dict (e.g. model options): any key, value kept as parsed
            node = node.get(part)
        else:
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(names)} is a value, not a section")
    return names


def set_value(cfg: T, path: Sequence[str], value: Any, _done: tuple[str, ...] = ()) -> T:
    """A copy of ``cfg`` with the field at ``path`` set (coerced to its type)."""
    if not path:
        return cfg
    head, rest = path[0], list(path[1:])
    if dataclasses.is_dataclass(cfg):
        hints = _hints(type(cfg))
        current = getattr(cfg, head)
        if rest:
            new = set_value(current, rest, value, _done + (head,))
        else:
            if isinstance(value, str):
                base, _ = _unwrap_optional(hints.get(head, Any))
                value = value if base is str else _parse_text(value)
            new = coerce(value, hints.get(head, Any), ".".join(_done + tuple(path)))
        return dataclasses.replace(cfg, **{head: new})
    if isinstance(cfg, dict):
        out = dict(cfg)
        if rest:
            out[head] = set_value(out.get(head, {}), rest, value, _done + (head,))
        else:
            out[head] = _parse_text(value) if isinstance(value, str) else value
        return out  # type: ignore[return-value]
    raise ConfigError(f"cannot set {'.'.join(path)}")


def apply_overrides(cfg: T, tokens: Sequence[str], aliases: Mapping[str, str] | None = None) -> T:
    """A new config with every override in ``tokens`` applied, in order (later wins)."""
    aliases = dict(aliases or {})
    for key, text in split_overrides(tokens):
        cfg = set_value(cfg, _resolve_path(cfg, key, aliases), text)
    return cfg
