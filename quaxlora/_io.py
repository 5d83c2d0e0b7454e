"""Adapter-only files: `save_adapters` / `load_adapters`, in safetensors format."""

import hashlib
import json
import math
import os
from importlib.metadata import version as package_version
from typing import Any, Literal, overload

import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._init import RESIDUAL
from ._lora_array import dense_weight, LoraArray
from ._paths import adapted_leaves, model_leaves, replace_leaves
from ._safetensors import read_safetensors, write_safetensors
from ._stacked import StackedLoraArray
from ._trainable import Trainable


FORMAT = "quaxlora.adapters"
# The newest format version this quaxlora reads. A file is written with the oldest
# version that can hold it: 1, unless it has stacked adapters (2), so files without
# stacks stay readable by older quaxlora.
FORMAT_VERSION = 2


def _dtype_name(x: Any) -> str:
    return str(jnp.dtype(x.dtype))


def save_adapters(path: str | os.PathLike, model: PyTree) -> None:
    """Save only the adapters of `model` to a safetensors file.

    Written: the factors `a` and `b` of every `LoraArray` (keyed `"<path>.a"` and
    `"<path>.b"`, with `<path>` the dotted path of the adapted weight, e.g.
    `"layers.0.weight"`), the DoRA magnitude where there is one (`"<path>.magnitude"`)
    and every `Trainable` array (`modules_to_save`, trained biases; keyed by its
    path). The metadata records, per target, the rank, alpha, scaling mode (rsLoRA
    or not), batch axes, the base weight's shape and dtype, the DoRA axis and the
    initialisation — for PiSSA and OLoRA, whose base is the residual weight, with a
    fingerprint of that residual that `load_adapters` checks — plus the list of
    targets, the library version and the file format version.
    Frozen weights are not written, so the file is a small fraction of the model.

    A model of stacked adapters (`quaxlora.stack_adapters`) is saved in one file:
    each stack's factors with their leading adapter axis (zero padding included),
    and each adapter's own rank, alpha and scaling mode in the metadata. Such a file
    has format version 2; a file without stacks keeps version 1, readable by older
    quaxlora.

    The write is atomic: the file is written under a temporary name in the same
    folder and renamed over `path` at the end, so an error or a crash midway leaves
    any previous file at `path` intact.

    **Arguments:**

    - `path`: where to write (conventionally ending in `.safetensors`).
    - `model`: a model with adapters (from `quaxlora.loraify`, `load_adapters`, ...).
        An adapter pytree (`quaxlora.partition(model)[0]`) works as well.

    **Returns:**

    Nothing.
    """

    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, dict[str, Any]] = {}
    trainable: dict[str, dict[str, Any]] = {}
    for p, leaf in adapted_leaves(model).items():
        if isinstance(leaf, StackedLoraArray):
            tensors[p + ".a"] = np.asarray(leaf.a)
            tensors[p + ".b"] = np.asarray(leaf.b)
            targets[p] = _stacked_metadata(leaf)
        elif isinstance(leaf, LoraArray):
            tensors[p + ".a"] = np.asarray(leaf.a)
            tensors[p + ".b"] = np.asarray(leaf.b)
            targets[p] = dict(
                rank=leaf.rank,
                alpha=leaf.alpha,
                rslora=leaf.rslora,
                batch_ndim=leaf.batch_ndim,
                dtype=_dtype_name(leaf.a),
                weight_shape=None if leaf.weight is None else list(leaf.shape),
                weight_dtype=None if leaf.weight is None else _dtype_name(leaf),
            )
            if leaf.magnitude is not None:
                tensors[p + ".magnitude"] = np.asarray(leaf.magnitude)
                targets[p]["dora_axis"] = leaf.dora_axis
            if leaf.init != "default":
                targets[p]["init"] = leaf.init
            if leaf.init in RESIDUAL and leaf.weight is not None:
                targets[p]["base_fingerprint"] = fingerprint(leaf.weight)
        else:
            tensors[p] = np.asarray(leaf.array)
            trainable[p] = dict(shape=list(leaf.shape), dtype=_dtype_name(leaf))
    if not tensors:
        raise ValueError("`model` has no adapters (no `LoraArray` or `Trainable`).")
    metadata = {
        "format": FORMAT,
        "format_version": str(2 if _has_stacks(targets) else 1),
        "quaxlora_version": package_version("quaxlora"),
        "targets": json.dumps(targets),
        "trainable": json.dumps(trainable),
    }
    metadata["sha256"] = digest(tensors, metadata)
    write_safetensors(path, tensors, metadata)


def _stacked_metadata(leaf: StackedLoraArray) -> dict[str, Any]:
    """A stack's metadata: `rank` is the padded rank, `stacked` each adapter's own."""
    return dict(
        rank=leaf.a.shape[leaf.batch_ndim + 1],
        alpha=float(leaf.a.shape[leaf.batch_ndim + 1]),
        rslora=False,
        batch_ndim=leaf.batch_ndim,
        dtype=_dtype_name(leaf.a),
        weight_shape=None if leaf.weight is None else list(leaf.shape),
        weight_dtype=None if leaf.weight is None else _dtype_name(leaf),
        stacked=dict(
            ranks=list(leaf.ranks), alphas=list(leaf.alphas), rslora=list(leaf.rslora)
        ),
    )


def _has_stacks(targets: dict[str, dict[str, Any]]) -> bool:
    return any("stacked" in t for t in targets.values())


def _stacked_ok(t: dict[str, Any]) -> bool:
    """Whether a target's optional `stacked` entry is well formed."""
    s = t.get("stacked")
    if s is None:
        return True
    ranks, alphas, rslora = s["ranks"], s["alphas"], s["rslora"]
    return (
        isinstance(ranks, list)
        and isinstance(alphas, list)
        and isinstance(rslora, list)
        and len(ranks) == len(alphas) == len(rslora) >= 1
        and all(_posint(r) for r in ranks)
        and max(ranks) == t["rank"]
        and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
            for a in alphas
        )
        and all(isinstance(r, bool) for r in rslora)
    )


def fingerprint(weight: Any) -> list[float]:
    """`[sum, sum of squares]` of a weight, in float64: enough to tell the residual
    base a PiSSA / OLoRA adapter was made for from the original weight."""
    x = np.asarray(dense_weight(weight), np.float64)
    return [float(x.sum()), float(np.square(x).sum())]


def digest(tensors: dict[str, Any], metadata: dict[str, str]) -> str:
    """A SHA-256 of the tensors (names, dtypes, shapes, bytes) and the metadata,
    stored in the file so that any corruption is caught on loading."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(json.dumps([key, metadata[key]]).encode())
    for name in sorted(tensors):
        x = np.ascontiguousarray(tensors[name])
        h.update(json.dumps([name, str(x.dtype), list(x.shape)]).encode())
        h.update(x.tobytes())
    return h.hexdigest()


def _target_checks(t: dict) -> list[tuple[str, Any]]:
    """`(field, check)` pairs for one target's metadata, in the order they are
    checked, so that an error names the first field that is wrong."""
    alpha = t.get("alpha")
    return [
        ("rank", lambda: _posint(t["rank"])),
        (
            "alpha",
            lambda: (
                isinstance(alpha, (int, float))
                and not isinstance(alpha, bool)
                and math.isfinite(alpha)
            ),
        ),
        ("rslora", lambda: isinstance(t["rslora"], bool)),
        ("batch_ndim", lambda: _posint(t["batch_ndim"], 0)),
        ("dtype", lambda: isinstance(t.get("dtype"), str)),
        ("weight_shape", lambda: _shape_or_none(t.get("weight_shape"))),
        ("weight_dtype", lambda: isinstance(t.get("weight_dtype"), (str, type(None)))),
        ("stacked", lambda: _stacked_ok(t)),
        (
            "dora_axis",
            lambda: t.get("dora_axis") is None or _posint(t["dora_axis"], 0),
        ),
        ("init", lambda: isinstance(t.get("init", "default"), str)),
        ("base_fingerprint", lambda: _floats_or_none(t.get("base_fingerprint"))),
    ]


def _parse(path: str) -> tuple[dict, dict, dict]:
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"`path` {path!r} is not a quaxlora adapter file (no "
            f"'format: {FORMAT}' in its metadata). For a PEFT adapter, use "
            "`quaxlora.load_peft`."
        )
    try:
        version = int(metadata.get("format_version", ""))
        if version < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"`path` {path!r} has no valid format version.") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"`path` {path!r} has adapter format version {version}, newer than "
            f"this quaxlora understands ({FORMAT_VERSION}); it was written by "
            f"quaxlora {metadata.get('quaxlora_version', '?')}. Upgrade quaxlora."
        )
    if metadata.get("sha256") != digest(tensors, metadata):
        raise ValueError(
            f"`path` {path!r} is corrupted: its contents do not match the checksum "
            "written with them."
        )
    try:
        targets = json.loads(metadata["targets"])
        trainable = json.loads(metadata["trainable"])
        if not isinstance(targets, dict) or not isinstance(trainable, dict):
            raise ValueError("targets")
        for p, t in targets.items():
            if not isinstance(t, dict):
                raise ValueError(f"target `{p}`")
            bad = next((f for f, ok in _target_checks(t) if not ok()), None)
            if bad is not None:
                raise ValueError(f"target `{p}`: field `{bad}`")
        for p, t in trainable.items():
            if not isinstance(t, dict):
                raise ValueError(p)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"`path` {path!r} has malformed metadata: {what}.") from None
    expected = {k for p in targets for k in (p + ".a", p + ".b")} | set(trainable)
    expected |= {p + ".magnitude" for p, t in targets.items() if "dora_axis" in t}
    if set(tensors) != expected:
        extra = sorted(set(tensors) ^ expected)
        raise ValueError(
            f"`path` {path!r} is inconsistent: its tensors do not match its "
            f"metadata (first difference: `{extra[0]}`)."
        )
    return tensors, targets, trainable


def _posint(x: Any, low: int = 1) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _floats_or_none(x: Any) -> bool:
    return x is None or (
        isinstance(x, list)
        and len(x) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)
    )


def _shape_or_none(x: Any) -> bool:
    return x is None or (isinstance(x, list) and all(_posint(d, 0) for d in x))


def _lora_from_file(p, t, a, b, old, magnitude=None) -> Any:
    """The new leaf for target `p`, or a string saying why it does not fit."""
    if "stacked" in t:
        return _stacked_from_file(p, t, a, b, old)
    if isinstance(old, StackedLoraArray):
        return "the model has stacked adapters here, the file one adapter"
    n, r = t["batch_ndim"], t["rank"]
    base = old.weight if isinstance(old, LoraArray) else old
    if base is None or not hasattr(base, "shape"):
        return "the model has no array there"
    shape, dtype = tuple(base.shape), str(jnp.dtype(base.dtype))
    if t.get("weight_shape") is not None and tuple(t["weight_shape"]) != shape:
        return f"base weight shape {shape} != file's {tuple(t['weight_shape'])}"
    if t.get("weight_dtype") is not None and t["weight_dtype"] != dtype:
        return f"base weight dtype {dtype} != file's {t['weight_dtype']}"
    want_a = (*shape[:n], r, *shape[n + 1 :])
    want_b = (*shape[: n + 1], r)
    if len(shape) < n + 2 or a.shape != want_a or b.shape != want_b:
        return (
            f"factor shapes {a.shape}, {b.shape} (rank {r}) do not fit a weight of "
            f"shape {shape}"
        )
    if not (jnp.issubdtype(a.dtype, jnp.floating) and a.dtype == b.dtype):
        return f"factor dtypes {a.dtype}, {b.dtype} are not one floating dtype"
    want = t.get("base_fingerprint")
    if want is not None and not np.allclose(fingerprint(base), want, rtol=1e-4):
        return (
            f"the adapter was initialised with `init={t.get('init')!r}`, so it "
            "belongs to the residual base weight `loraify` made (the original "
            "minus the adapter's initial value), and this base weight is not it "
            "(its sum and sum of squares differ). Load it onto the residual base"
        )
    if isinstance(old, LoraArray):
        if old.rank != r:
            return f"rank {r} != the model's rank {old.rank}"
        if (old.magnitude is None) != (magnitude is None):
            return "one of the file and the model has a DoRA adapter, the other not"
        if old.a.dtype != a.dtype:
            return f"factor dtype {a.dtype} != the model's {old.a.dtype}"
    flags: dict[str, Any] = {}
    if isinstance(old, LoraArray):
        flags = dict(
            stop_gradient=old.stop_gradient,
            allow_materialise=old.allow_materialise,
            dropout=old.dropout,
        )
    try:
        return LoraArray(
            base,
            a=jnp.asarray(a),
            b=jnp.asarray(b),
            rank=r,
            alpha=t["alpha"],
            rslora=t["rslora"],
            batch_ndim=n,
            magnitude=None if magnitude is None else jnp.asarray(magnitude),
            dora_axis=t.get("dora_axis") or 0,
            init=t.get("init", "default"),
            **flags,
        )
    except ValueError as e:
        return str(e)


def _stacked_from_file(p, t, a, b, old) -> Any:
    """The `StackedLoraArray` for a stacked file entry, or why it does not fit."""
    s = t["stacked"]
    if isinstance(old, LoraArray):
        return "the model has one adapter here, the file a stack of adapters"
    count = len(s["ranks"])
    if a.ndim < 1 or b.ndim < 1 or a.shape[0] != count or b.shape[0] != count:
        return f"the stacked factors do not hold {count} adapters"
    stacked = isinstance(old, StackedLoraArray)
    if stacked and (old.a.shape, old.b.shape) != (a.shape, b.shape):
        return (
            f"stacked factor shapes {a.shape}, {b.shape} != the model's "
            f"{old.a.shape}, {old.b.shape}"
        )
    if stacked and old.a.dtype != a.dtype:
        return f"factor dtype {a.dtype} != the model's {old.a.dtype}"
    # Adapter 0 is checked as an unstacked entry would be (shapes, dtypes, base).
    base = old.weight if stacked else old
    plain = {k: v for k, v in t.items() if k != "stacked"}
    one = _lora_from_file(p, plain, a[0], b[0], base)
    if isinstance(one, str):
        return one
    return StackedLoraArray(
        weight=base,
        a=jnp.asarray(a),
        b=jnp.asarray(b),
        ranks=tuple(s["ranks"]),
        alphas=tuple(float(x) for x in s["alphas"]),
        rslora=tuple(s["rslora"]),
        stop_gradient=old.stop_gradient if stacked else True,
        allow_materialise=old.allow_materialise if stacked else False,
    )


def _trainable_from_file(x, old) -> Any:
    base = old.array if isinstance(old, Trainable) else old
    if isinstance(base, LoraArray):
        return "the model has a LoRA adapter there, not a trained array"
    if base is None or not hasattr(base, "shape"):
        return "the model has no array there"
    if tuple(base.shape) != x.shape or jnp.dtype(base.dtype) != x.dtype:
        return (
            f"array {x.shape} {x.dtype} != the model's {tuple(base.shape)} "
            f"{jnp.dtype(base.dtype)}"
        )
    return Trainable(jnp.asarray(x))


@overload
def load_adapters(
    path: str | os.PathLike, model: PyTree, *, strict: Literal[True] = True
) -> PyTree: ...


@overload
def load_adapters(
    path: str | os.PathLike, model: PyTree, *, strict: Literal[False]
) -> tuple[PyTree, dict[str, str]]: ...


def load_adapters(path, model, *, strict=True):
    """Load adapters saved by `save_adapters` onto a model.

    `model` may be the plain base model (each target weight is then wrapped in a new
    `LoraArray` with the file's factors, rank, alpha and scaling mode), or a model
    that already has the same adapters: they are replaced by the file's. The file's
    alpha and scaling mode are used, since they are part of what was trained.

    Everything is checked before anything is built: the file (a missing, truncated,
    corrupted — its checksum does not match — or non-safetensors file, or one of a
    future format version, raises), and then each entry against the model — the path
    must exist, the base weight's shape and dtype must be the ones the adapter was
    trained on, the factors' shapes must fit, and where `model` already has an
    adapter there its rank and factor dtype must agree. An adapter or trained array
    of `model` that the file lacks is a mismatch too.

    A file of stacked adapters loads as a stacked model (`quaxlora.StackedLoraArray`s,
    onto the base model or onto a stacked model with the same number of adapters
    and padded ranks); a stack where `model` has a single adapter, or the other way
    round, is a mismatch.

    **Arguments:**

    - `path`: a file written by `quaxlora.save_adapters`.
    - `model`: the model to put the adapters on. It is not modified.
    - `strict`: if `True` (default), any mismatch raises a `ValueError` naming the
        first mismatching path, and nothing is loaded. If `False`, the entries that
        match are loaded and the others are reported.

    **Returns:**

    With `strict=True`, the model with the file's adapters. With `strict=False`, a
    pair `(model, mismatched)`, where `mismatched` maps each path that was not
    loaded to the reason: a file entry that did not fit the model (the model's leaf
    there is left as it was), or an adapter of the model that the file lacks (it is
    dropped back to its base weight; a `Trainable` array is kept as it is).

    !!! Example

        ```python
        ql.save_adapters("adapters.safetensors", lora_model)
        lora_model2 = ql.load_adapters("adapters.safetensors", base_model)
        ```
    """
    path = os.fspath(path)
    tensors, targets, trainable = _parse(path)
    leaves = model_leaves(model)
    new: dict[str, Any] = {}
    mismatched: dict[str, str] = {}
    for p in [*targets, *trainable]:
        if p not in leaves:
            result = "the model has no array at this path"
        elif p in targets:
            a, b = tensors[p + ".a"], tensors[p + ".b"]
            m = tensors.get(p + ".magnitude")
            result = _lora_from_file(p, targets[p], a, b, leaves[p], m)
        else:
            result = _trainable_from_file(tensors[p], leaves[p])
        if isinstance(result, str):
            mismatched[p] = result
        else:
            new[p] = result
    for p, leaf in leaves.items():
        if p in new or p in mismatched:
            continue
        if isinstance(leaf, (LoraArray, StackedLoraArray)):
            mismatched[p] = "the model has an adapter here that the file lacks"
            new[p] = leaf.weight
        elif isinstance(leaf, Trainable):  # kept: the base array is not stored
            mismatched[p] = "the model has a trained array here that the file lacks"
    if strict and mismatched:
        p, why = next(iter(mismatched.items()))
        raise ValueError(
            f"Adapter file {path!r} does not match `model` at `{p}`: {why}. "
            "Nothing was loaded; pass `strict=False` to load the entries that match."
        )
    out = replace_leaves(model, new)
    return out if strict else (out, mismatched)
