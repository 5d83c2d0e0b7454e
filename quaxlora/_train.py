"""What is trained: the adapter factors, plus any array marked `Trainable`."""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.tree_util as jtu
import numpy as np
import quax
from jaxtyping import PyTree

from ._lora_array import LoraArray
from ._paths import path_str
from ._stacked import StackedLoraArray
from ._trainable import is_adapted, Trainable


def _spec(x: Any) -> Any:
    if isinstance(x, (LoraArray, StackedLoraArray)):
        spec = jtu.tree_map(lambda _: False, x)
        spec = eqx.tree_at(lambda l: (l.a, l.b), spec, (True, True))
        if getattr(x, "magnitude", None) is not None:  # DoRA's magnitude trains too
            spec = eqx.tree_at(lambda l: l.magnitude, spec, True)
        return spec
    return isinstance(x, Trainable)


def trainable_spec(model: PyTree) -> PyTree[bool]:
    """The filter spec of what LoRA trains in `model`.

    A per-leaf predicate cannot tell a LoRA factor from the frozen weight beside it
    (both are plain arrays), so this takes the whole model and returns a pytree of
    bools of the same structure, for `eqx.partition` / `eqx.filter`: `True` on the
    `a` and `b` (and the DoRA `magnitude`) of every `LoraArray` (and
    `StackedLoraArray`) and on every `Trainable` array (`modules_to_save`, trained
    biases); `False` everywhere else.

    **Arguments:**

    - `model`: a model returned by `quaxlora.loraify`.

    **Returns:**

    A pytree of bools, a valid `filter_spec` for `model`.

    !!! Example

        ```python
        trainable, frozen = eqx.partition(model, ql.trainable_spec(model))
        ```
    """
    if isinstance(model, (jax.Array, np.ndarray, np.generic)):
        # `eqx.partition(model, ql.trainable_spec)` calls it on each array leaf,
        # where it could only answer "not trained" and silently train nothing.
        raise TypeError(
            "`quaxlora.trainable_spec` takes the whole model and returns a filter "
            "spec, but was called on a single array (as `eqx.partition(model, "
            "ql.trainable_spec)` does). Call it on the model: `eqx.partition(model, "
            "ql.trainable_spec(model))`, or use `ql.partition(model)`."
        )
    return jtu.tree_map(_spec, model, is_leaf=is_adapted)


def partition(model: PyTree) -> tuple[PyTree, PyTree]:
    """Split a LoRA model into `(trainable, frozen)`; `eqx.combine` joins them back.

    Differentiate with respect to `trainable` only, and initialise the optimiser on
    it: gradients and optimiser state then hold the adapter factors and nothing of
    the size of a frozen weight.

    **Arguments:**

    - `model`: a model returned by `quaxlora.loraify`.

    **Returns:**

    A pair `(trainable, frozen)` of pytrees with `model`'s structure, with `None`
    in place of the leaves each one leaves out.
    """
    return eqx.partition(model, trainable_spec(model))


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters of a model, overall and per module.

    **Attributes:**

    - `trainable`: number of trained scalars (LoRA factors and `Trainable` arrays).
    - `total`: number of all scalars, frozen weights and adapters together.
    - `per_module`: `{module path: (trainable, total)}` for each module that directly
        holds arrays, in model order.
    """

    trainable: int
    total: int
    per_module: dict[str, tuple[int, int]]

    @property
    def fraction(self) -> float:
        """`trainable / total`."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.fraction:.4f}"
        )


def _param_count(x: Any) -> int:
    # A quax value (a quantised weight) counts the parameters it stands for.
    is_value = isinstance(x, quax.ArrayValue)
    return int(np.prod(x.shape)) if eqx.is_array(x) or is_value else 0


def count_parameters(model: PyTree) -> ParameterCount:
    """Count trainable and total parameters of a (loraified) model, exactly.

    A `LoraArray` contributes `w.size + a.size + b.size` to the total and
    `a.size + b.size` to the trainable count (plus the DoRA magnitude's size to
    both); a `Trainable` array counts in full in both; every other array counts as
    frozen. A quantised weight counts the parameters it stands for (its bytes as
    stored: `quaxlora.stored_bytes`).

    **Arguments:**

    - `model`: any pytree; typically a model returned by `quaxlora.loraify`.

    **Returns:**

    A `ParameterCount`, whose `str` reads like PEFT's `print_trainable_parameters`.
    """
    per_module: dict[str, tuple[int, int]] = {}
    is_leaf = lambda x: is_adapted(x) or isinstance(x, quax.ArrayValue)
    for path, leaf in jtu.tree_leaves_with_path(model, is_leaf=is_leaf):
        if isinstance(leaf, (LoraArray, StackedLoraArray)):
            m = getattr(leaf, "magnitude", None)
            t = _param_count(leaf.a) + _param_count(leaf.b) + _param_count(m)
            n = t + _param_count(leaf.weight)
        elif isinstance(leaf, Trainable):
            t = n = _param_count(leaf.array)
        else:
            t, n = 0, _param_count(leaf)
        module = path_str(path[:-1])
        t0, n0 = per_module.get(module, (0, 0))
        per_module[module] = (t0 + t, n0 + n)
    trainable = sum(t for t, _ in per_module.values())
    total = sum(n for _, n in per_module.values())
    return ParameterCount(trainable, total, per_module)
