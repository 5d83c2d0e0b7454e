"""Back to plain Equinox models: fold adapters in, or drop them."""

import jax.tree_util as jtu
import quax
from jaxtyping import PyTree

from ._lora_array import LoraArray
from ._stacked import StackedLoraArray
from ._train import is_adapted, Trainable


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
