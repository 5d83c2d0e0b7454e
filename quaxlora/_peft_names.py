"""The correspondence between PEFT module names and quaxlora module paths.

`load_peft` and `save_peft` take it in one of three forms: a dict
`{PEFT module name: quaxlora module path}`; a rename function
`quaxlora module path -> PEFT module name | None`; or `(pattern, replacement)` pairs,
the first pattern matching the whole path renaming it (as `re.sub` would). The last
two are turned into the dict here and checked against the file or the model, so that
nobody has to list every module by hand.
"""

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from jaxtyping import PyTree

from ._paths import model_leaves


NameMap: TypeAlias = (
    Mapping[str, str] | Callable[[str], str | None] | Sequence[tuple[str, str]]
)


def _pairs(mapping: Sequence[Any]) -> Callable[[str], str | None]:
    compiled = []
    for pair in mapping:
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(s, str) for s in pair)
        ):
            raise TypeError(
                "`mapping` as a sequence must hold `(pattern, replacement)` pairs of "
                f"strings; got {pair!r}."
            )
        try:
            compiled.append((re.compile(pair[0]), pair[1]))
        except re.error as e:
            raise ValueError(f"`mapping`: bad pattern {pair[0]!r} ({e}).") from None

    def rename(path: str) -> str | None:
        for pattern, repl in compiled:
            if (m := pattern.fullmatch(path)) is not None:
                return m.expand(repl)
        return None

    return rename


def renamer(mapping: NameMap) -> Callable[[str], str | None]:
    """`mapping` as a function from a quaxlora module path to its PEFT module name
    (`None`: the module has no PEFT counterpart)."""
    if isinstance(mapping, Mapping):
        strings = (isinstance(s, str) for kv in mapping.items() for s in kv)
        if not all(strings):
            raise TypeError("`mapping` as a dict must map strings to strings.")
        inverse: dict[str, str] = {}
        for name, path in mapping.items():
            if inverse.setdefault(path, name) != name:
                raise ValueError(
                    f"`mapping` names the module `{path}` twice: `{inverse[path]}` "
                    f"and `{name}`."
                )
        return inverse.get
    if callable(mapping):
        return mapping
    if isinstance(mapping, Sequence) and not isinstance(mapping, str):
        return _pairs(mapping)
    raise TypeError(
        "`mapping` must be a dict `{PEFT module name: quaxlora module path}`, a "
        "function `quaxlora module path -> PEFT module name`, or a list of "
        f"`(pattern, replacement)` pairs; got {mapping!r}."
    )


def _name(rename: Callable[[str], str | None], path: str) -> str | None:
    name = rename(path)
    if name is not None and not isinstance(name, str):
        raise TypeError(
            f"`mapping` renamed `{path}` to {name!r}; it must return a string or None."
        )
    return name


def module_paths(model: PyTree) -> list[str]:
    """Every module path of `model`: each proper prefix of an array's path."""
    paths: dict[str, None] = {}
    for leaf_path in model_leaves(model):
        parts = leaf_path.split(".")
        for i in range(1, len(parts)):
            paths[".".join(parts[:i])] = None
    return list(paths)


def _listed(xs: Iterable[str], n: int = 10) -> str:
    xs = sorted(xs)
    more = f" and {len(xs) - n} more" if len(xs) > n else ""
    return f"{xs[:n]}{more}"


def _twice(twice: Mapping[str, Any]) -> str:
    return (
        "`mapping` gives several quaxlora modules the same PEFT name: "
        + "; ".join(f"`{n}` <- {sorted(ps)}" for n, ps in sorted(twice.items()))
        + "."
    )


def peft_to_paths(
    mapping: NameMap, model: PyTree, exact: set[str], keys: set[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Resolve the PEFT modules of a file to quaxlora module paths.

    **Arguments:**

    - `mapping`: the user's `mapping`, in any of its forms.
    - `model`: the model the file is loaded onto.
    - `exact`: PEFT module names the file names exactly (those with LoRA factors).
    - `keys`: other tensor names (`head.weight`), whose module is their longest
        prefix that names a module.

    **Returns:**

    `({PEFT module name: quaxlora path}, {key: PEFT module name})`. Every PEFT
    module must match exactly one quaxlora module, else a `ValueError` lists what is
    left over.
    """
    if isinstance(mapping, Mapping):
        renamer(mapping)  # validates
        found = {name: [path] for name, path in mapping.items()}
    else:
        rename = renamer(mapping)
        found = {}
        for path in module_paths(model):
            if (name := _name(rename, path)) is not None:
                found.setdefault(name, []).append(path)
    owners: dict[str, str] = {}
    missing = {n for n in exact if n not in found}
    for key in keys:
        parts = key.split(".")
        owner = next(
            (
                ".".join(parts[:i])
                for i in range(len(parts) - 1, 0, -1)
                if ".".join(parts[:i]) in found
            ),
            None,
        )
        if owner is None:
            missing.add(key.rpartition(".")[0])
        else:
            owners[key] = owner
    used = exact | set(owners.values())
    problems = []
    if missing:
        problems.append(
            f"`mapping` has no entry for the PEFT module(s) {_listed(missing)}. "
            f"Module paths of `model`: {_listed(module_paths(model))}."
        )
    if twice := {n: found[n] for n in used if len(found.get(n, [])) > 1}:
        problems.append(_twice(twice))
    if problems:
        raise ValueError(" ".join(problems))
    return {n: found[n][0] for n in used}, owners


def paths_to_peft(
    mapping: NameMap, modules: Sequence[str], leaves: Sequence[str]
) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Name, for saving, the adapted modules and the modules of trained arrays.

    **Arguments:**

    - `mapping`: the user's `mapping`, in any of its forms.
    - `modules`: quaxlora paths of modules that must be named exactly (adapted ones).
    - `leaves`: paths of other trained arrays; each belongs to its longest prefix
        that `mapping` names.

    **Returns:**

    `({module path: PEFT name}, {leaf path: (module path, PEFT name)})`. A module
    or array left without a PEFT name, or two modules given one name, is a
    `ValueError` listing them.
    """
    rename = renamer(mapping)
    named: dict[str, str] = {}
    missing = []
    for path in modules:
        if (name := _name(rename, path)) is None:
            missing.append(path)
        else:
            named[path] = name
    owners: dict[str, tuple[str, str]] = {}
    for leaf in leaves:
        parts = leaf.split(".")
        for i in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:i])
            if (name := _name(rename, path)) is not None:
                owners[leaf] = (path, name)
                break
        else:
            missing.append(leaf)
    if missing:
        raise ValueError(
            "`mapping` gives no PEFT module name to the adapted module(s) or trained "
            f"array(s) {_listed(missing)}."
        )
    by_name: dict[str, set[str]] = {}
    for path, name in [*named.items(), *owners.values()]:
        by_name.setdefault(name, set()).add(path)
    if twice := {n: ps for n, ps in by_name.items() if len(ps) > 1}:
        raise ValueError(_twice(twice))
    return named, owners
