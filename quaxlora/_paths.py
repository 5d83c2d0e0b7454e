"""Module paths (`"blocks.attn.query_proj"`), PEFT-style pattern matching, and a
model's leaves by path (quax values kept whole)."""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import jax.tree_util as jtu
from jaxtyping import PyTree

from ._lora_array import is_value
from ._trainable import is_adapted


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


def model_leaves(model: PyTree) -> dict[str, Any]:
    """`{dotted path: leaf}`, with every quax value (adapters, quantised weights)
    kept whole."""
    flat = jtu.tree_leaves_with_path(model, is_leaf=is_value)
    return {path_str(p): x for p, x in flat}


def adapted_leaves(model: PyTree) -> dict[str, Any]:
    """`{dotted path: leaf}` of the `LoraArray`s and `Trainable`s of `model`."""
    return {p: x for p, x in model_leaves(model).items() if is_adapted(x)}


def replace_leaves(model: PyTree, new: dict[str, Any]) -> PyTree:
    """`model` with the leaf at each path of `new` replaced."""
    flat, treedef = jtu.tree_flatten_with_path(model, is_leaf=is_value)
    leaves = [new.get(path_str(p), x) for p, x in flat]
    return jtu.tree_unflatten(treedef, leaves)
