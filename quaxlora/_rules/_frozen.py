"""A product with a frozen weight that keeps the weight itself as its residual.

`fn(x, lax.stop_gradient(w))` stops gradients reaching `w`, but its derivative saves
the *output* of `stop_gradient` — a new value, not `w`. Inside `lax.scan` over a
layer stack, a saved new value is stacked over the iterations, so every frozen
weight would be copied once per step (a full copy of the model's weights). The
tangent map below reads `w` directly, so the saved value is the scanned weight
slice itself, which scan passes through without a copy; and it has no term in `w`'s
tangent, so no gradient ever reaches the base.
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def apply_frozen(fn: Callable[[Any, Any], Any], x: Any, w: Any) -> Any:
    """`fn(x, w)` for `fn` linear in `x`, differentiated as if `w` were a constant."""
    return fn(x, w)


@ft.partial(apply_frozen.defjvp, symbolic_zeros=True)
def _jvp(fn, primals, tangents):
    (x, w), (dx, _) = primals, tangents
    y = fn(x, w)
    if isinstance(dx, jax.custom_derivatives.SymbolicZero):
        return y, jnp.zeros_like(y)
    return y, fn(dx, w)
