"""One-line messages for bad params: the file, the key path and the nearest valid key.

A typo in a params file must stop ``omniad grid check`` with a line a person can act on, not
a pydantic report; every params file goes through :func:`explain`.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError


def shown(path: Path) -> str:
    """The path as a person typed it: relative to the working folder when inside it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:  # another drive
        return str(path)


def _flat(annotation: Any) -> list[Any]:
    """An annotation with its unions (``X | None``) spread out."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [x for a in typing.get_args(annotation) for x in _flat(a)]
    return [annotation]


def valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where ``loc`` (a pydantic error location, last part excluded) points:
    walk the annotations, a field name into a model, a key into a dict, an index into a list."""
    anns: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for a in (x for ann in anns for x in _flat(ann)):
            origin, args = typing.get_origin(a), typing.get_args(a)
            if isinstance(a, type) and issubclass(a, BaseModel):
                field = a.model_fields.get(str(part))
                if field is not None:
                    nxt.append(field.annotation)
            elif origin is dict and len(args) == 2:
                nxt.append(args[1])
            elif origin in (list, tuple) and args:
                nxt.append(args[0])
        anns = nxt
    return sorted({k for ann in anns for a in _flat(ann)
                   if isinstance(a, type) and issubclass(a, BaseModel) for k in a.model_fields})


def closest(key: str, valid: list[str]) -> str | None:
    """The valid key nearest to ``key`` (difflib's ratio >= 0.6), or None."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def nearest(key: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid key, or '' when none is close."""
    close = closest(key, valid)
    return f" (did you mean {close!r}?)" if close else ""


def explain(exc: ValidationError, where: str | Path, model: type[BaseModel] | None = None,
            prefix: str = "") -> str:
    """``file: key.path: fault (did you mean 'k'?)`` for the first error of ``exc``; the count
    of further errors, if any, follows in brackets. ``prefix`` is the key path of the block
    that ``model`` validated inside the file (e.g. ``protocols.paper``)."""
    # a typo shows as an unknown key and, when the key was required, a missing one: the
    # unknown key (with its nearest valid spelling) is the line a person can act on
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = tuple(err["loc"])
    path = ".".join(p for p in (prefix, ".".join(str(x) for x in loc)) if p) or "(top level)"
    if err["type"] == "extra_forbidden":
        close = closest(str(loc[-1]), valid_keys(model, loc[:-1])) if model else None
        fault = "unknown key" + (f" (did you mean {close!r}?)" if close else "")
        # the required key the typo misspelt is missing too: the same fault, not another one
        errors = [e for e in errors if not (e["type"] == "missing" and close is not None
                                            and tuple(e["loc"]) == (*loc[:-1], close))]
    elif err["type"] == "missing":
        fault = "required key missing"
    else:
        # a union (``int | 'auto'``) fails once per member, each at <key>.<member>: one fault
        members = [e for e in errors if tuple(e["loc"])[:-1] == loc[:-1] and loc
                   and e.get("input") is err.get("input") and e["type"] != "missing"]
        if len(members) > 1:
            loc, errors = loc[:-1], [e for e in errors if e not in members[1:]]
            path = ".".join(p for p in (prefix, ".".join(str(x) for x in loc)) if p)
        msgs = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in members or [err])
        fault = " or ".join(msgs) + _got(err.get("input"))
    more = f" [+{len(errors) - 1} more]" if len(errors) > 1 else ""
    where = shown(where) if isinstance(where, Path) else where
    return f"{where}: {path}: {fault}{more}"


def _got(value: Any) -> str:
    """' (got <value>)', shortened; nothing for a whole block (its keys are in the file)."""
    if isinstance(value, dict):
        return ""
    text = repr(value)
    return f" (got {text if len(text) <= 60 else text[:57] + '...'})"


def unknown_key(data: dict[str, Any], valid: list[str], where: str | Path,
                prefix: str = "") -> str | None:
    """The line for the first key of ``data`` not in ``valid`` (a plain-dict level), or None."""
    for key in data:
        if key not in valid:
            where = shown(where) if isinstance(where, Path) else where
            path = f"{prefix}.{key}" if prefix else str(key)
            return f"{where}: {path}: unknown key{nearest(str(key), valid)}"
    return None
