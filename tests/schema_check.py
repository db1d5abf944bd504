"""A small JSON Schema (2020-12) checker for the keywords docs/events.schema.json
uses, so the schema test needs no extra dependency. An unknown keyword is an
error here, so the schema cannot quietly use more than is checked."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["errors"]

_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "integer": int, "null": type(None),
    "boolean": bool,
}  # fmt: skip
_IGNORED = {"$schema", "$id", "title", "description", "$defs"}


def errors(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
           path: str = "$") -> list[str]:  # fmt: skip
    """Every way ``instance`` breaks ``schema`` (empty: valid)."""
    root = root or schema
    found: list[str] = []
    for keyword, rule in schema.items():
        if keyword in _IGNORED:
            continue
        check = _KEYWORDS.get(keyword)
        if check is None:
            raise ValueError(f"schema keyword {keyword!r} is not supported by this checker")
        found += check(instance, rule, root, path)
    return found


def _type(instance: Any, rule: Any, root: Any, path: str) -> list[str]:
    names = [rule] if isinstance(rule, str) else rule
    for name in names:
        kind = _TYPES[name]
        if isinstance(instance, kind) and not (name == "integer" and isinstance(instance, bool)):
            return []
    return [f"{path}: {instance!r} is not of type {rule}"]


def _ref(instance: Any, rule: str, root: Any, path: str) -> list[str]:
    target: Any = root
    for part in rule.removeprefix("#/").split("/"):
        target = target[part]
    return errors(instance, target, root, path)


def _properties(instance: Any, rule: Mapping[str, Any], root: Any, path: str) -> list[str]:
    if not isinstance(instance, dict):
        return []
    return [e for k, s in rule.items() if k in instance
            for e in errors(instance[k], s, root, f"{path}.{k}")]  # fmt: skip


def _additional(instance: Any, rule: Any, root: Any, path: str) -> list[str]:
    if not isinstance(instance, dict):
        return []
    return [e for k, v in instance.items() for e in errors(v, rule, root, f"{path}.{k}")]


def _one_of(instance: Any, rule: list[Any], root: Any, path: str) -> list[str]:
    matching = sum(1 for s in rule if not errors(instance, s, root, path))
    return [] if matching == 1 else [f"{path}: matches {matching} of oneOf, not exactly 1"]


_Check = Callable[[Any, Any, Any, str], list[str]]

_KEYWORDS: dict[str, _Check] = {
    "type": _type,
    "$ref": _ref,
    "properties": _properties,
    "additionalProperties": _additional,
    "oneOf": _one_of,
    "allOf": lambda i, r, root, p: [e for s in r for e in errors(i, s, root, p)],
    "items": lambda i, r, root, p: (
        [e for n, v in enumerate(i) for e in errors(v, r, root, f"{p}[{n}]")]
        if isinstance(i, list)
        else []
    ),
    "required": lambda i, r, root, p: [
        f"{p}: {k!r} is required" for k in r if isinstance(i, dict) and k not in i
    ],
    "not": lambda i, r, root, p: (
        [] if errors(i, r, root, p) else [f"{p}: matches a schema it must not"]
    ),
    "enum": lambda i, r, root, p: (
        [] if any(i == v and type(i) is type(v) for v in r) else [f"{p}: not one of {r!r}"]
    ),
    "const": lambda i, r, root, p: [] if i == r and type(i) is type(r) else [f"{p}: not {r!r}"],
    "minimum": lambda i, r, root, p: [f"{p}: {i} < {r}"] if isinstance(i, int) and i < r else [],
    "minLength": lambda i, r, root, p: (
        [f"{p}: too short"] if isinstance(i, str) and len(i) < r else []
    ),
}
