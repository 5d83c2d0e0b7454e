"""Einsum-style contraction by axis labels, lowered to one `lax.dot_general`.

Each rule names the axes of its operands with labels (`"o"` for a weight's output
axis, `"k"` for the rank axis, ...) and asks for an output labelling; `contract` finds
the dimension numbers. A label in both operands is a batch axis if the output keeps
it and is contracted otherwise; a label in one operand only is free.

The backward is written by hand (`jax.custom_vjp`). The cotangent of an operand of a
labelled contraction is itself a labelled contraction — of the output cotangent with
the other operand — and of its two possible operand orders we take the one that needs
no relayout of a large array: autodiff's own choice computes the gradient of a LoRA
factor `b` as `gᵀ·h` (the big output cotangent first), for which XLA writes a
transposed copy of the whole cotangent; `(hᵀ·g)ᵀ` transposes only the tiny result.
The price: JAX cannot apply forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) to a
`custom_vjp` function, so through a `LoraArray` only reverse mode is available.
"""

import functools as ft
from collections.abc import Sequence
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
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


def _plan(xl: Labels, yl: Labels, out: Labels):
    """Dimension numbers and natural output labels of `einsum(xl, yl -> out)`."""
    both = [l for l in xl if l in yl]
    batch = [l for l in both if l in out]
    summed = [l for l in both if l not in out]
    for l in (*xl, *yl):
        if l not in out and l not in both:
            raise AssertionError(f"label {l} is neither kept nor contracted")
    for l in out:
        if l not in xl and l not in yl:
            raise AssertionError(f"output label {l} is in neither operand")
    dn = (
        (tuple(xl.index(l) for l in summed), tuple(yl.index(l) for l in summed)),
        (tuple(xl.index(l) for l in batch), tuple(yl.index(l) for l in batch)),
    )
    free_x = [l for l in xl if l not in yl]
    free_y = [l for l in yl if l not in xl]
    return dn, batch, summed, free_x, free_y


def _dot(x, xl, y, yl, out, precision, preferred_element_type):
    dn, batch, _, free_x, free_y = _plan(xl, yl, out)
    z = lax.dot_general(
        x, y, dn, precision=precision, preferred_element_type=preferred_element_type
    )
    return transpose_to(z, batch + free_x + free_y, out)


def _relayouts(x, xl, y, yl, out) -> int:
    """Elements moved by relayouts when `einsum(xl, yl -> out)` is lowered with `x` as
    the left operand: a matmul reads `x` as `(batch, free, contracted)` and `y` as
    `(batch, contracted, free)`, and writes `(batch, x free, y free)`; an operand or
    result in any other order is copied."""
    _, batch, summed, free_x, free_y = _plan(xl, yl, out)
    cost = 0
    if list(xl) != batch + free_x + summed:
        cost += x.size
    if list(yl) != batch + summed + free_y:
        cost += y.size
    if list(out) != batch + free_x + free_y:
        cost += _out_size(x, xl, y, yl, out)
    return cost


def _out_size(x, xl, y, yl, out) -> int:
    sizes = dict(zip(xl, x.shape)) | dict(zip(yl, y.shape))
    n = 1
    for l in out:
        n *= sizes[l]
    return n


def _cheapest(x, xl, y, yl, out, precision, preferred_element_type, dtype):
    """`einsum(xl, yl -> out)` in whichever operand order relayouts less, cast to
    `dtype` (unless None). Ties keep `x` first."""
    if _relayouts(y, yl, x, xl, out) < _relayouts(x, xl, y, yl, out):
        x, xl, y, yl = y, yl, x, xl
    z = _dot(x, xl, y, yl, out, precision, preferred_element_type)
    return z if dtype is None else z.astype(dtype)


@ft.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _contract(spec, x, y):
    return _dot(x, spec[0], y, *spec[1:])


def _contract_fwd(spec, x, y):
    return _contract(spec, x, y), (x, y)


def _contract_bwd(spec, res, g):
    xl, yl, out, precision, preferred_element_type = spec
    x, y = res
    grads = []
    for operand, ol, other, otherl in ((x, xl, y, yl), (y, yl, x, xl)):
        if jnp.issubdtype(operand.dtype, jnp.inexact):
            grads.append(
                _cheapest(
                    g,
                    out,
                    other,
                    otherl,
                    ol,
                    precision,
                    preferred_element_type,
                    operand.dtype,
                )
            )
        else:
            grads.append(None)
    return tuple(grads)


_contract.defvjp(_contract_fwd, _contract_bwd)


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
    transpose, only if `out` is not the natural `(batch, x free, y free)` order).

    Plain arrays go through a hand-written backward (see the module docstring); when
    an operand is a quax value the contraction re-dispatches, and autodiff is left to
    differentiate whatever that value's own rules produce."""
    xl, yl, out = tuple(xl), tuple(yl), tuple(out)
    if _is_value(x) or _is_value(y):
        pet = preferred_element_type
        return bind(lambda x, y: _dot(x, xl, y, yl, out, precision, pet), x, y)
    spec = (xl, yl, out, precision, preferred_element_type)
    return _contract(spec, x, y)
