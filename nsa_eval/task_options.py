"""`--task-option TASK.KEY=VALUE`, typed: each task's constructor signature is its option schema (names, types,
defaults), so a value is read as the type the option takes and a wrong one ends in one line before any model
loads (`--task-option aime.temperature=hot: temperature takes a number, e.g. aime.temperature=0.7`). Ranges are
the constructors' own checks."""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from typing import Any, Callable

from nsa_eval.tasks.base import Tokens, token_count

_NONE = ("none", "null")
SCALARS = (bool, Tokens, int, float, str)  # the order a union's members are tried in
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option_types(factory: Callable[..., Any]) -> dict[str, Any]:
    """name -> annotation of each keyword option the factory (a task class, or a functools.partial of one) takes."""
    target = factory.func if isinstance(factory, functools.partial) else factory
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to no type checks for that task
        hints = {}
    fixed = set(factory.args and list(inspect.signature(target).parameters)[1 : 1 + len(factory.args)] or ()) \
        if isinstance(factory, functools.partial) else set()
    parameters = inspect.signature(factory).parameters
    return {name: hints.get(name, Any) for name, p in parameters.items()
            if name not in fixed and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def describe(annotation: Any) -> str:
    """'a whole number', 'a number', 'true or false', 'comma-separated whole numbers', ... for error lines."""
    names = []
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if member is type(None):
            continue
        if origin in (list, tuple):
            item = (typing.get_args(member) or (str,))[0]
            names.append({int: "comma-separated whole numbers", float: "comma-separated numbers",
                          Tokens: "comma-separated token counts (4096 or 4k)"}.get(item, "a comma-separated list"))
        else:
            names.append({int: "a whole number", float: "a number", bool: "true or false", str: "text",
                          Tokens: "a token count (4096 or 4k)"}.get(member, str(member)))
    return " or ".join(dict.fromkeys(names)) or "a value"


def _scalar(text: str, kind: Any) -> Any:
    """The text as `kind`, or raise ValueError."""
    stripped = text.strip()
    if kind is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise ValueError
    if kind is Tokens:
        if re.fullmatch(r"\d+[kK]?", stripped):
            return token_count(stripped, "a token count")
        raise ValueError
    if kind is int:
        if re.fullmatch(r"[+-]?\d+", stripped):
            return int(stripped)
        raise ValueError
    if kind is float:
        value = float(stripped)  # ValueError for 'hot'
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        return value
    if kind is str or kind is Any:
        return text
    raise ValueError


def coerce(text: str, annotation: Any) -> Any:
    """A command-line value as the annotation's type. Order for unions: null, then a list when the text has a comma,
    then the scalar types the union names (bool, int, float, text), then a one-item list. ValueError when none fits."""
    members = _members(annotation)
    if annotation is Any:
        return text
    if type(None) in members and text.strip().lower() in _NONE:
        return None
    lists = [m for m in members if typing.get_origin(m) in (list, tuple)]
    scalars = [m for m in members if m in SCALARS]
    if lists and "," in text:
        item = (typing.get_args(lists[0]) or (str,))[0]
        return [_scalar(part, item) for part in text.split(",") if part.strip()]
    for kind in sorted(scalars, key=SCALARS.index):
        try:
            return _scalar(text, kind)
        except ValueError:
            continue
    if lists:
        item = (typing.get_args(lists[0]) or (str,))[0]
        return [_scalar(text, item)]
    raise ValueError


def example(task: str, key: str, annotation: Any, default: Any) -> str:
    """An example assignment for an error line, from the option's default where it has one."""
    if default is not inspect.Parameter.empty and default is not None and not isinstance(default, bool):
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{task}.{key}={shown}"
    members = _members(annotation)
    sample = "true" if bool in members else "4k" if Tokens in members else "3" if int in members else "0.5" \
        if float in members else "1,2" if any(typing.get_origin(m) in (list, tuple) for m in members) else "TEXT"
    return f"{task}.{key}={sample}"


def typed_options(task: str, factory: Callable[..., Any], texts: dict[str, str]) -> dict[str, Any]:
    """The --task-option values of one task read as the types its options take. Unknown keys are left for the
    caller (which lists the task's options)."""
    types_ = option_types(factory)
    defaults = {name: p.default for name, p in inspect.signature(factory).parameters.items()}
    out = {}
    for key, text in texts.items():
        if key not in types_:
            out[key] = text
            continue
        try:
            out[key] = coerce(text, types_[key])
        except ValueError:
            raise ValueError(f"--task-option {task}.{key}={text}: {key} takes {describe(types_[key])}, "
                             f"e.g. {example(task, key, types_[key], defaults.get(key))}") from None
    return out
