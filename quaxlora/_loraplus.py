"""LoRA+ (Hayou et al., 2024): a larger learning rate for the `b` factors."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu
import optax
from jaxtyping import PyTree

from ._lora_array import LoraArray


def _labels(params: PyTree) -> PyTree:
    """`"b"` on every LoRA `b` factor, `"rest"` on every other leaf."""

    def label(x):
        if isinstance(x, LoraArray):
            spec = jtu.tree_map(lambda _: "rest", x)
            return eqx.tree_at(lambda l: l.b, spec, "b")
        return "rest"

    return jtu.tree_map(label, params, is_leaf=lambda x: isinstance(x, LoraArray))


def loraplus(
    optimiser: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    *,
    ratio: float = 16.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA+: any optax optimiser, with the `b` factors' learning rate `ratio`
    times that of everything else.

    As PEFT's `create_loraplus_optimizer`: `b` (PEFT's `lora_B`) gets
    `ratio * learning_rate`; `a`, DoRA magnitudes and `Trainable` arrays get
    `learning_rate`. Built on `optax.multi_transform`, with two instances of the
    optimiser, so each keeps its own state.

    **Arguments:**

    - `optimiser`: an optax optimiser factory taking the learning rate as its first
        argument, e.g. `optax.adamw`.
    - `learning_rate`: the base learning rate, a float or an optax schedule.
    - `ratio`: `b`'s learning rate over `a`'s (PEFT's `loraplus_lr_ratio`; 16 by
        default, the paper's recommendation for many tasks).
    - `**kwargs`: passed to `optimiser` (e.g. `weight_decay=0.01`).

    **Returns:**

    An `optax.GradientTransformation`, for the trainable half of
    `quaxlora.partition(model)` (or the whole model's filter).

    !!! Example

        ```python
        opt = ql.loraplus(optax.adamw, 1e-4, ratio=16, weight_decay=0.01)
        trainable, frozen = ql.partition(model)
        opt_state = opt.init(trainable)
        ```
    """
    if callable(learning_rate):
        fast = lambda step: ratio * learning_rate(step)
    else:
        fast = ratio * learning_rate
    return optax.multi_transform(
        {
            "rest": optimiser(learning_rate, **kwargs),
            "b": optimiser(fast, **kwargs),
        },
        _labels,
    )
