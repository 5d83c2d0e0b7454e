"""Many adapters, one batch: stack adapters on an adapter axis, select per example."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from ._lora_array import is_value, LoraArray
from ._paths import model_leaves, replace_leaves
from ._stacked import StackedLoraArray
from ._trainable import Trainable


# The `LoraArray` fields `stack_adapters` knows how to stack; a field added later
# (a DoRA magnitude, ...) must be handled explicitly rather than silently dropped.
_KNOWN = {
    "weight",
    "a",
    "b",
    "rank",
    "alpha",
    "rslora",
    "stop_gradient",
    "allow_materialise",
}


# Fields of variants `stack_adapters` does not stack, with the value that means "off"
# (plain LoRA): DoRA's magnitude and norms, the initialisation (a PiSSA / OLoRA
# adapter needs its own residual base), LoRA dropout.
_OFF = {
    "magnitude": None,
    "norm": None,
    "dora_axis": 0,
    "init": "default",
    "dropout": 0.0,
    "dropout_key": None,
}


def _is_default(value: Any, off: Any) -> bool:
    return value is None if off is None else (value is not None and value == off)


def _same(x: Any, y: Any) -> bool:
    """Whether two leaves of the base are the same (values compared for arrays)."""
    if x is y:
        return True
    if eqx.is_array(x) or eqx.is_array(y):
        if not (eqx.is_array(x) and eqx.is_array(y)):
            return False
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
            return True  # values cannot be compared while tracing
        return bool(np.array_equal(np.asarray(x), np.asarray(y)))
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:
        return False


def _base(model: PyTree) -> PyTree:
    """`model` with each `LoraArray` replaced by its frozen weight."""
    drop = lambda x: x.weight if isinstance(x, LoraArray) else x
    return jtu.tree_map(drop, model, is_leaf=is_value)


def _check_models(models: list[PyTree]) -> list[dict[str, LoraArray]]:
    loras = []
    for i, m in enumerate(models):
        leaves = model_leaves(m)
        for p, x in leaves.items():
            if isinstance(x, (Trainable, StackedLoraArray)):
                what = "trained array" if isinstance(x, Trainable) else "stack"
                raise ValueError(
                    f"`models[{i}]` has a {what} at `{p}`: `stack_adapters` stacks "
                    "LoRA factors only (no `Trainable` arrays — `modules_to_save`, "
                    "trained biases — and no already-stacked adapters)."
                )
            if isinstance(x, LoraArray):
                extra = [
                    f.name
                    for f in dataclasses.fields(x)
                    if f.name not in _KNOWN
                    and not _is_default(getattr(x, f.name), _OFF.get(f.name))
                ]
                if extra:
                    raise ValueError(
                        f"`models[{i}]` at `{p}` has a `LoraArray` with `{extra[0]}`, "
                        "which `stack_adapters` does not support."
                    )
        loras.append({p: x for p, x in leaves.items() if isinstance(x, LoraArray)})
    base0, treedef0 = jtu.tree_flatten(_base(models[0]))
    for i, m in enumerate(models[1:], 1):
        diff = sorted(set(loras[0]) ^ set(loras[i]))
        if diff:
            raise ValueError(
                f"`models[0]` and `models[{i}]` adapt different weights: `{diff[0]}` "
                "is adapted in only one of them. Stacked adapters need the same "
                "targets."
            )
        base, treedef = jtu.tree_flatten(_base(m))
        if treedef != treedef0 or not all(map(_same, base0, base)):
            raise ValueError(
                f"`models[0]` and `models[{i}]` do not have the same base model "
                "(structure, frozen weights or other leaves differ). Stacked "
                "adapters must all be trained on one base."
            )
    if not loras[0]:
        raise ValueError("`models` have no `LoraArray` adapters to stack.")
    return loras


def _pad(x: Array, axis: int, size: int) -> Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _stack(p: str, xs: list[LoraArray]) -> StackedLoraArray:
    x0 = xs[0]
    for i, x in enumerate(xs):
        same = (x.batch_ndim, x.stop_gradient, x.allow_materialise, x.a.dtype) == (
            x0.batch_ndim,
            x0.stop_gradient,
            x0.allow_materialise,
            x0.a.dtype,
        )
        if not same:
            raise ValueError(
                f"`models[0]` and `models[{i}]` differ at `{p}` in `batch_ndim`, "
                "`stop_gradient`, `allow_materialise` or the factors' dtype; "
                "stacked adapters must agree on these."
            )
    n, rank = x0.batch_ndim, max(x.rank for x in xs)
    return StackedLoraArray(
        weight=x0.weight,
        a=jnp.stack([_pad(x.a, n, rank) for x in xs]),
        b=jnp.stack([_pad(x.b, n + 1, rank) for x in xs]),
        ranks=tuple(x.rank for x in xs),
        alphas=tuple(x.alpha for x in xs),
        rslora=tuple(x.rslora for x in xs),
        stop_gradient=x0.stop_gradient,
        allow_materialise=x0.allow_materialise,
    )


def stack_adapters(models: Sequence[PyTree]) -> PyTree:
    """Stack the adapters of several models on one base into one model, to run or
    train them all in one batch with `quaxlora.select_adapter`.

    Every `LoraArray` becomes a `quaxlora.StackedLoraArray`, whose factors have a
    leading adapter axis (adapter `i` is `models[i]`'s). Adapters of different
    ranks are padded with zeros to the largest rank, which changes no output (the
    padding adds `0 · 0` terms) and stays zero under training (its gradient is
    zero). Each adapter keeps its own rank, alpha and scaling mode as static
    metadata, so `unstack_adapters` gives back exactly the models stacked.

    **Arguments:**

    - `models`: models with LoRA adapters on the same base model (the same
        structure and the same frozen arrays), adapting the same weights, with the
        same `batch_ndim`, `stop_gradient`, `allow_materialise` and factor dtype per
        weight. Ranks and alphas may differ. `Trainable` arrays (`modules_to_save`,
        trained biases) cannot be stacked.

    **Returns:**

    The first model with each `LoraArray` replaced by its stack. It cannot be called
    as it is: pick an adapter with `quaxlora.select_adapter` first.

    !!! Example

        ```python
        stacked = ql.stack_adapters([model_a, model_b, model_c])
        run = lambda x, i: quax.quaxify(ql.select_adapter(stacked, i))(x)
        ys = jax.vmap(run)(xs, ids)  # example j through adapter ids[j]
        ```
    """
    models = list(models)
    if not models:
        raise ValueError("`models` must contain at least one model.")
    loras = _check_models(models)
    new = {p: _stack(p, [ls[p] for ls in loras]) for p in loras[0]}
    return replace_leaves(models[0], new)


def _stacked_leaves(model: PyTree) -> dict[str, StackedLoraArray]:
    """`{path: StackedLoraArray}` of `model`, checked to hold one number of adapters."""
    found = {
        p: x for p, x in model_leaves(model).items() if isinstance(x, StackedLoraArray)
    }
    if not found:
        raise ValueError(
            "`model` has no stacked adapters; build it with `quaxlora.stack_adapters`."
        )
    counts = {x.num_adapters for x in found.values()}
    if len(counts) != 1:
        raise ValueError(
            f"`model`'s stacked adapters disagree on the number of adapters: {counts}."
        )
    return found


def _new(cls: type, **fields: Any) -> Any:
    """An instance of a module built from its fields, without `__init__` (whose
    checks need a weight, which an adapter pytree lacks)."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        object.__setattr__(obj, f.name, fields[f.name])
    return obj


def _unstack(p: str, x: StackedLoraArray, i: int) -> LoraArray:
    n, r = x.batch_ndim, x.ranks[i]
    a, b = x.a[i], x.b[i]
    pad_a = jax.lax.slice_in_dim(a, r, a.shape[n], axis=n)
    pad_b = jax.lax.slice_in_dim(b, r, b.shape[n + 1], axis=n + 1)
    concrete = not any(isinstance(f, jax.core.Tracer) for f in (pad_a, pad_b))
    if concrete and (np.any(np.asarray(pad_a)) or np.any(np.asarray(pad_b))):
        raise ValueError(
            f"`model` at `{p}`: adapter {i} has rank {r} but non-zero factors in its "
            f"zero padding (up to rank {a.shape[n]}); its factors were replaced by "
            "ones of a larger rank. Restack the models with `stack_adapters`."
        )
    fields = dict(
        weight=x.weight,
        a=jax.lax.slice_in_dim(a, 0, r, axis=n),
        b=jax.lax.slice_in_dim(b, 0, r, axis=n + 1),
        rank=r,
        alpha=x.alphas[i],
        rslora=x.rslora[i],
        stop_gradient=x.stop_gradient,
        allow_materialise=x.allow_materialise,
    )
    if x.weight is None:  # an adapter pytree (`quaxlora.partition(model)[0]`)
        return _new(LoraArray, **fields, **_OFF)
    weight = fields.pop("weight")
    return LoraArray(weight, batch_ndim=n, **fields)


def unstack_adapters(model: PyTree) -> list[PyTree]:
    """The inverse of `quaxlora.stack_adapters`: one model per stacked adapter.

    Each adapter comes back with its own rank (the zero padding is removed), alpha
    and scaling mode, so `unstack_adapters(stack_adapters(models))` equals `models`
    exactly (trained or not).

    **Arguments:**

    - `model`: a model from `quaxlora.stack_adapters` (trained or not), or its
        adapter pytree (`quaxlora.partition(model)[0]`).

    **Returns:**

    A list of models, one per adapter, each with ordinary `LoraArray`s. An adapter
    whose zero padding is not zero (its factors were replaced by ones of a larger
    rank) raises a `ValueError` rather than being cut.
    """
    stacked = _stacked_leaves(model)
    (count,) = {x.num_adapters for x in stacked.values()}
    return [
        replace_leaves(model, {p: _unstack(p, x, i) for p, x in stacked.items()})
        for i in range(count)
    ]


def _check_index(index: Any, count: int) -> Any:
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        if not -1 <= index < count:
            raise ValueError(
                f"`index` must be -1 (the base model) or an adapter in "
                f"[0, {count}), got {index}."
            )
        return int(index)
    dtype = getattr(index, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or jnp.ndim(index):
        raise TypeError(
            "`index` must be an int or a scalar integer array (under `jax.vmap`, "
            f"one per example), got {index!r}."
        )
    bad = (index < -1) | (index >= count)
    return eqx.error_if(index, bad, f"`index` out of range [-1, {count}).")


def _select(x: StackedLoraArray, index: Any) -> Any:
    # Each adapter's scale is folded into its smaller factor, so the selected array
    # has scale 1; the base (-1) is an extra all-zero adapter at the end. Both are
    # done to the stack, once, so that under `vmap` the only per-example work is a
    # gather of each example's small factors.
    a, b = x.a, x.b
    scales = jnp.asarray(x.scalings)
    scale = lambda f: f * scales.astype(f.dtype).reshape(-1, *[1] * (f.ndim - 1))
    if a[0].size <= b[0].size:
        a = scale(a)
    else:
        b = scale(b)
    if isinstance(index, int):
        if index == -1:
            return x.weight
        a, b = a[index], b[index]
    else:
        pad = lambda f: jnp.pad(f, [(0, 1)] + [(0, 0)] * (f.ndim - 1))
        i = jnp.where(index >= 0, index, x.num_adapters)
        a, b = jnp.take(pad(a), i, axis=0), jnp.take(pad(b), i, axis=0)
    rank = a.shape[x.batch_ndim]
    return LoraArray(
        x.weight,
        a=a,
        b=b,
        rank=rank,
        alpha=rank,
        stop_gradient=x.stop_gradient,
        allow_materialise=x.allow_materialise,
        batch_ndim=x.batch_ndim,
    )


def select_adapter(model: PyTree, index: int | ArrayLike) -> PyTree:
    """One adapter of a stacked model, as an ordinary LoRA model.

    Each `StackedLoraArray` becomes the `LoraArray` of adapter `index` (at the
    stack's padded rank, with the adapter's own scale folded into its smaller
    factor), or, for `index == -1`, the base model alone. The frozen weights are
    shared, never copied.

    `index` may be traced, so one compiled function serves every adapter; under
    `jax.vmap` with one index per example it runs a batch that mixes adapters:
    each example's factors are gathered (they are small) and the dispatch rules
    batch the factored products over the examples, while the frozen weights stay
    unbatched — nothing of a weight's size is copied per example. That is the fast
    path when each example holds many rows (a sequence); for single-row examples,
    whose gathered factors outweigh their activations, running the batch grouped by
    adapter is faster (see the "Many adapters, one batch" guide). Differentiating
    through it gives each adapter the gradient of its own examples only, and zero
    to an adapter with none in the batch.

    **Arguments:**

    - `model`: a model from `quaxlora.stack_adapters`.
    - `index`: an int, or a scalar integer array (possibly traced), in
        `[-1, adapters)`; `-1` means the base model. A traced index out of range is
        an error at run time (`eqx.error_if`).

    **Returns:**

    `model` with one adapter selected, to run with `quax.quaxify`.

    !!! Example

        ```python
        stacked = ql.stack_adapters([model_a, model_b])
        ids = jnp.array([0, 1, -1, 1])  # per example: task A, task B, base, task B
        run = lambda x, i: quax.quaxify(ql.select_adapter(stacked, i))(x)
        ys = jax.vmap(run)(xs, ids)
        ```
    """
    stacked = _stacked_leaves(model)
    (count,) = {x.num_adapters for x in stacked.values()}
    index = _check_index(index, count)
    return replace_leaves(model, {p: _select(x, index) for p, x in stacked.items()})
