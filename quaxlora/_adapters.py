"""Several adapters on one base: extract, put in, and combine."""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jaxtyping import PyTree

from ._lora_array import LoraArray, replace_fields
from ._paths import adapted_leaves, model_leaves, replace_leaves
from ._trainable import Trainable


def _fit(p: str, ad: Any, old: Any) -> Any:
    """The adapter leaf `ad` (weight possibly `None`) put on the model leaf `old`."""
    base = old.weight if isinstance(old, LoraArray) else old
    if isinstance(base, Trainable):
        base = base.array
    if isinstance(ad, Trainable):
        if (tuple(ad.array.shape), ad.array.dtype) != (base.shape, base.dtype):
            raise ValueError(
                f"`adapters` at `{p}`: array {ad.array.shape} {ad.array.dtype} does "
                f"not match the model's {base.shape} {base.dtype}."
            )
        return ad
    try:
        return LoraArray(
            base,
            a=ad.a,
            b=ad.b,
            rank=ad.rank,
            alpha=ad.alpha,
            rslora=ad.rslora,
            stop_gradient=ad.stop_gradient,
            allow_materialise=ad.allow_materialise,
            dropout=ad.dropout,
            batch_ndim=ad.batch_ndim,
            magnitude=ad.magnitude,
            dora_axis=ad.dora_axis,
            init=ad.init,
        )
    except ValueError as e:
        raise ValueError(f"`adapters` at `{p}` do not fit the model: {e}") from None


def with_adapters(model: PyTree, adapters: PyTree) -> PyTree:
    """Put an adapter pytree on a model: switch adapters.

    Every `LoraArray` of `adapters` is rebuilt on the weight at the same path of
    `model`, and every `Trainable` replaces the array there. Any other `LoraArray`
    that `model` had is dropped back to its frozen weight, so the result carries
    exactly the adapters given. (A `Trainable` of `model` that `adapters` does not
    replace is an error: the base array it stands in for is not stored.)
    `with_adapters(base, quaxlora.partition(m)[0])` rebuilds `m` from its base.

    To disable adapters, use the base model itself (or `quaxlora.unloraify(model)`,
    which is the base model whenever there are no `modules_to_save`).

    **Arguments:**

    - `model`: the base model, or a model with (other) adapters.
    - `adapters`: an adapter pytree (`quaxlora.partition(model)[0]`), or any model with
        adapters, of the same module structure as `model`.

    **Returns:**

    `model` with the adapters in place. A path of `adapters` that `model` lacks, or
    whose shapes do not fit, raises a `ValueError` naming it.

    !!! Example

        ```python
        task_a, task_b = ql.partition(model_a)[0], ql.partition(model_b)[0]
        model = ql.with_adapters(base, task_a)   # serve task A
        model = ql.with_adapters(model, task_b)  # switch to task B
        ```
    """
    leaves = model_leaves(model)
    given = adapted_leaves(adapters)
    new = {p: x.weight for p, x in leaves.items() if isinstance(x, LoraArray)}
    for p, x in leaves.items():
        if isinstance(x, Trainable) and p not in given:
            raise ValueError(
                f"`model` has a trained array at `{p}` (`modules_to_save`) that "
                "`adapters` does not replace, and the base array it replaced is not "
                "stored; put the adapters on the base model instead."
            )
    for p, ad in given.items():
        if p not in leaves:
            raise ValueError(f"`adapters` has `{p}`, which `model` does not have.")
        new[p] = _fit(p, ad, leaves[p])
    return replace_leaves(model, new)


def combine_adapters(
    models: Sequence[PyTree], weights: Sequence[float] | None = None
) -> PyTree:
    """A linear combination of adapters trained on one base.

    For each target, `sum_i weights[i] * scaling_i * b_i @ a_i` is exactly one LoRA
    update of rank `sum_i rank_i`: its factors are the `a_i` stacked along the rank
    axis and the `weights[i] * scaling_i * b_i` side by side (with `alpha` equal to
    the new rank, so scaling 1). Nothing is approximated. `Trainable` arrays
    (`modules_to_save`) are combined as `sum_i weights[i] * array_i`.

    **Arguments:**

    - `models`: models with adapters on the same base (or adapter pytrees), with
        the same adapted paths and factor dtypes. The frozen weights are taken from
        the first.
    - `weights`: one float per model; default all `1.0` (the sum of the updates).

    **Returns:**

    The first model with its adapters replaced by the combination.

    !!! Example

        ```python
        both = ql.combine_adapters([model_a, model_b], [0.7, 0.3])
        ```
    """
    models = list(models)
    if not models:
        raise ValueError("`models` must contain at least one model.")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(
            f"`weights` has {len(weights)} entries for {len(models)} `models`."
        )
    ads = [adapted_leaves(m) for m in models]
    for i, ad in enumerate(ads[1:], 1):
        diff = sorted(set(ads[0]) ^ set(ad))
        if diff:
            raise ValueError(
                f"`models[0]` and `models[{i}]` have different adapters: `{diff[0]}` "
                "is in only one of them."
            )
    new = {p: _combine(p, [ad[p] for ad in ads], weights) for p in ads[0]}
    return replace_leaves(models[0], new)


def _combine(p: str, leaves: list[Any], weights: list[float]) -> Any:
    kinds = {type(x) for x in leaves}
    dtypes = {x.a.dtype if isinstance(x, LoraArray) else x.array.dtype for x in leaves}
    if len(kinds) != 1 or len(dtypes) != 1:
        raise ValueError(
            f"`models` differ at `{p}`: mixed kinds {kinds} or dtypes {dtypes}."
        )
    (dtype,) = dtypes
    if isinstance(leaves[0], Trainable):
        terms = (w * x.array for w, x in zip(weights, leaves))
        return Trainable(sum(terms, start=jnp.zeros((), dtype)))
    if any(x.magnitude is not None for x in leaves):
        raise ValueError(
            f"Cannot combine the DoRA adapters at `{p}`: DoRA rescales by the norm "
            "of the whole weight, so its updates do not add up."
        )
    n = leaves[0].batch_ndim
    if any(
        x.batch_ndim != n
        or x.a.shape[n + 1 :] != leaves[0].a.shape[n + 1 :]
        or x.b.shape[: n + 1] != leaves[0].b.shape[: n + 1]
        for x in leaves
    ):
        raise ValueError(f"`models` have factors of different shapes at `{p}`.")
    a = jnp.concatenate([x.a for x in leaves], axis=n)
    b = jnp.concatenate(
        [jnp.asarray(w * x.scaling, dtype) * x.b for w, x in zip(weights, leaves)],
        axis=n + 1,
    )
    rank = sum(x.rank for x in leaves)
    return replace_fields(
        leaves[0], a=a, b=b, rank=rank, alpha=float(rank), rslora=False
    )
