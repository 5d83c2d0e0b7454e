"""Back to plain Equinox models: fold adapters in, drop them, or take them back out."""

import jax.tree_util as jtu
import quax
from jaxtyping import PyTree

from ._lora_array import dense_weight, LoraArray
from ._paths import adapted_leaves, model_leaves, replace_leaves
from ._stacked import StackedLoraArray
from ._trainable import is_adapted, Trainable


def merge(model: PyTree) -> PyTree:
    """Fold every adapter into its weight, for serving.

    Each `LoraArray` becomes the plain array `w + scaling * b @ a` in the base
    weight's dtype (a quax-valued base, e.g. a quantised one, is materialised),
    each `Trainable` becomes its array, and any other quax value (a quantised weight
    without an adapter) is materialised. The result is an ordinary Equinox model: call
    it directly, without `quax.quaxify`, at the cost of the base model.

    **Arguments:**

    - `model`: a model returned by `quaxlora.loraify` (trained or not).

    **Returns:**

    A model of the original structure and dtypes, with no quax values in it.
    """

    def _merge(x):
        if isinstance(x, StackedLoraArray):
            raise ValueError(
                "`model` has stacked adapters (from `quaxlora.stack_adapters`); merge "
                "one of them: `quaxlora.merge(quaxlora.select_adapter(model, i))`."
            )
        if isinstance(x, LoraArray):
            return x.merged()
        if isinstance(x, Trainable):
            return x.array
        if isinstance(x, quax.Value):
            return x.materialise()
        return x

    is_leaf = lambda x: is_adapted(x) or isinstance(x, quax.Value)
    return jtu.tree_map(_merge, model, is_leaf=is_leaf)


def unloraify(model: PyTree) -> PyTree:
    """Drop every adapter, giving back the base model.

    Each `LoraArray` is replaced by its frozen weight (the very array it was built
    from) and each `Trainable` by its array; nothing is recomputed.

    **Arguments:**

    - `model`: a model returned by `quaxlora.loraify`.

    **Returns:**

    The base model: with `model = loraify(base, ...)`, `unloraify(model)` has the
    same leaves as `base`, until the `Trainable` arrays are trained.
    """

    def _drop(x):
        if isinstance(x, (LoraArray, StackedLoraArray)):
            return x.weight
        if isinstance(x, Trainable):
            return x.array
        return x

    return jtu.tree_map(_drop, model, is_leaf=is_adapted)


def unmerge(merged: PyTree, adapters: PyTree) -> PyTree:
    """Recover the base model from a merged model and its adapters.

    For every `LoraArray` of `adapters`, the weight at its path in `merged`
    (`quaxlora.merge`'s `w + scaling * b @ a`) becomes `merged - scaling * b @ a`,
    computed as `merge` computed it and rounded once to the weight's dtype.

    This is exact up to rounding: `merge` rounded `w + delta` once and `unmerge`
    rounds the difference once, so elementwise
    `|unmerge - w| <= u * (|w| + |w + delta|)` (to first order), with `u` the unit
    roundoff of the weight's dtype (`2**-24` for float32, `2**-8` for bfloat16).
    Where `delta` is much larger than `w` the *relative* error in `w` can be large;
    keep the base weights if you need them bit for bit. `Trainable` arrays
    (`modules_to_save`) replaced the base arrays entirely, so they cannot be
    unmerged: they are left as they are in `merged`. Neither can DoRA adapters
    (the merged weight's norms are the magnitude, whatever the base was): they
    raise a `ValueError`.

    **Arguments:**

    - `merged`: the output of `quaxlora.merge(model)`.
    - `adapters`: `model` itself, or its adapter pytree `quaxlora.partition(model)[0]`.

    **Returns:**

    `merged` with the base weights restored (a plain model).
    """
    leaves = model_leaves(merged)
    new = {}
    for p, ad in adapted_leaves(adapters).items():
        if not isinstance(ad, LoraArray):
            continue
        if ad.magnitude is not None:
            raise ValueError(
                f"Cannot unmerge the DoRA adapter at `{p}`: a merged DoRA weight has "
                "row norms equal to the magnitude, whatever the base weight was, so "
                "the base cannot be recovered from it. Keep the base weights."
            )
        w = leaves.get(p)
        if w is None or tuple(w.shape) != tuple(ad.b.shape[:-1]) + tuple(
            ad.a.shape[ad.batch_ndim + 1 :]
        ):
            raise ValueError(f"`merged` has no weight of the adapter's shape at `{p}`.")
        w = dense_weight(w)
        new[p] = (w - ad.delta(w.dtype)).astype(w.dtype)
    return replace_leaves(merged, new)
