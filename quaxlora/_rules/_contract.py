"""Einsum-style contraction by axis labels, lowered to one `lax.dot_general`.

Each rule names the axes of its operands with labels (`"o"` for a weight's output
axis, `"k"` for the rank axis, ...) and asks for an output labelling; `contract` finds
the dimension numbers. A label in both operands is a batch axis if the output keeps
it and is contracted otherwise; a label in one operand only is free.
"""

from collections.abc import Sequence
from typing import Any

import jax.lax as lax
import quax

from .._lora_array import _is_value


Labels = Sequence[str]


def bind(fn, *args, **kwargs) -> Any:
    """Call `fn`, re-dispatching through quax if an operand is itself a quax value
    (a `LoraArray` on both sides, a quantised base, ...)."""
    if any(_is_value(x) for x in args):
        return quax.quaxify(fn)(*args, **kwargs)
    return fn(*args, **kwargs)


def transpose_to(x: Any, labels: Labels, out: Labels) -> Any:
    labels, out = list(labels), list(out)
    if labels == out:
        return x
    perm = tuple(labels.index(l) for l in out)
    return bind(lambda x: lax.transpose(x, perm), x)


def contract(
    x: Any,
    xl: Labels,
    y: Any,
    yl: Labels,
    out: Labels,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Any:
    """`einsum(f"{xl},{yl}->{out}", x, y)` as a single `dot_general` (then a
    transpose, only if `out` is not the natural `(batch, x free, y free)` order)."""
    xl, yl, out = list(xl), list(yl), list(out)
    both = [l for l in xl if l in yl]
    batch = [l for l in both if l in out]
    summed = [l for l in both if l not in out]
    for l in xl + yl:
        if l not in out and l not in both:
            raise AssertionError(f"label {l} is neither kept nor contracted")
    dn = (
        (tuple(xl.index(l) for l in summed), tuple(yl.index(l) for l in summed)),
        (tuple(xl.index(l) for l in batch), tuple(yl.index(l) for l in batch)),
    )
    natural = batch + [l for l in xl if l not in yl] + [l for l in yl if l not in xl]

    def _dot(x, y):
        return lax.dot_general(
            x,
            y,
            dn,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )

    return transpose_to(bind(_dot, x, y), natural, out)
