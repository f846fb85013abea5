"""Command-line flags derived from a pydantic Config, so that a setting's type, default, choices and meaning
live once, in its Field.

`add_flags(parser, Config)` adds one flag per field: the type from the annotation (`X | None` -> X),
`Literal[...]` -> choices, `bool` -> --x/--no-x, `list[X]` -> a repeatable flag, a nested BaseModel ->
one flag per field of it with the field's name as prefix (`router.kind` -> --router-kind), unless `names`
maps the dotted key to another flag name. Help = the Field's description and its default. Every flag
defaults to None, so `collect` returns only what was given, as the nested mapping the Config takes, and
`config.validate` checks it with `Config.model_validate`: a bad value is a UserError (exit 2) naming its key.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

Flags = dict[str, str]  # argparse dest -> the dotted key in the Config (router.kind)


def _members(annotation) -> list:
    """The union's members without None, Annotated unwrapped (RecipePath | None -> [str])."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) if a is not type(None) for m in _members(a)]
    return [annotation]


def _model(annotation) -> type[BaseModel] | None:
    """The nested BaseModel of a field typed `Sub`, `Sub | None` or `Sub | str`, else None."""
    for m in _members(annotation):
        if isinstance(m, type) and issubclass(m, BaseModel):
            return m
    return None


def _default(info) -> Any:
    if info.default is not PydanticUndefined:
        return info.default
    return None


def _help(info) -> str:
    text = (info.description or "").replace("%", "%%")  # argparse formats help with %
    default = _default(info)
    if default is not None and default != "" and not isinstance(default, (list, dict, BaseModel)):
        text += f" (default: {default})"
    return text


def _argument(annotation) -> dict:
    """argparse keywords for one scalar, list or Literal annotation."""
    members = _members(annotation)
    first = members[0] if members else str
    origin = typing.get_origin(first)
    if origin is Literal:
        choices = list(typing.get_args(first))
        return {"choices": choices, "type": type(choices[0])}
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(first)
        return {"action": "append", **({"type": args[0]} if args and args[0] in (int, float, str) else {})}
    if first is bool:
        return {"action": argparse.BooleanOptionalAction}
    if first in (int, float):
        return {"type": first}
    return {"type": str}


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], names: Mapping[str, str] | None = None,
              metavars: Mapping[str, str] | None = None, skip: tuple[str, ...] = (), _prefix: str = "") -> Flags:
    """One flag per field of `model` (nested models: one per field of theirs, prefixed); returns dest -> key.

    `names`: dotted key -> flag (e.g. {"models": "--model", "router.threshold": "--threshold"}) for flags
    whose names predate this derivation; `skip`: dotted keys that get no flag."""
    names, metavars = names or {}, metavars or {}
    flags: Flags = {}
    for field_name, info in model.model_fields.items():
        key = f"{_prefix}{field_name}"
        if key in skip:
            continue
        sub = _model(info.annotation)
        if sub is not None:
            flags.update(add_flags(parser, sub, names, metavars, skip, _prefix=f"{key}."))
            continue
        flag = names.get(key, "--" + key.replace(".", "-").replace("_", "-"))
        dest = key.replace(".", "__")
        kw = _argument(info.annotation)
        if key in metavars:
            kw["metavar"] = metavars[key]
        elif "choices" not in kw and kw.get("action") is not argparse.BooleanOptionalAction:
            kw["metavar"] = flag.removeprefix("--").replace("-", "_").upper()  # --threshold THRESHOLD
        parser.add_argument(flag, dest=dest, default=None, help=_help(info), **kw)
        flags[dest] = key
    return flags


def collect(args: argparse.Namespace, flags: Flags) -> dict:
    """The flags that were given, as the nested mapping a Config takes ({"router": {"kind": ...}})."""
    out: dict = {}
    for dest, key in flags.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`, section by section (a recipe's settings, then the flags given)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
