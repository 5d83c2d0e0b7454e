"""Module paths (`"blocks.attn.query_proj"`) and PEFT-style pattern matching."""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import jax.tree_util as jtu


Where: TypeAlias = (
    str | type | Callable[[str, Any], bool] | Sequence["str | type"] | None
)


def path_str(path: Sequence[Any]) -> str:
    """Render a `jax.tree_util` key path as a dotted module path."""
    parts = []
    for k in path:
        if isinstance(k, jtu.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jtu.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jtu.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jtu.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return ".".join(parts)


def name_matches(path: str, pattern: str) -> bool:
    """PEFT's rule: the whole path is `pattern` (also as a regular expression), or
    ends with `"." + pattern`."""
    if path == pattern or path.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


def matches(where: Where, path: str, module: Any) -> bool:
    """Whether the module at `path` is selected by `where` (see `loraify`)."""
    if where is None:
        return False
    if isinstance(where, type):
        return isinstance(module, where)
    if isinstance(where, str):
        return name_matches(path, where)
    if callable(where):
        return bool(where(path, module))
    if isinstance(where, Sequence):
        return any(matches(w, path, module) for w in where)
    raise TypeError(
        "`where` must be a predicate `(path, module) -> bool`, a pattern string, a "
        f"module type, or a sequence of patterns and types; got {where!r}."
    )


def per_target(value: Any, path: str, name: str) -> Any:
    """Resolve a per-target option: a plain value, or a mapping pattern -> value
    (the first matching pattern wins)."""
    if not isinstance(value, Mapping):
        return value
    for pattern, v in value.items():
        if name_matches(path, pattern):
            return v
    raise ValueError(
        f"No pattern in `{name}` matches the target `{path}`; add an entry for it "
        f"(for instance a catch-all `'.*'`). Patterns: {list(value)}."
    )
