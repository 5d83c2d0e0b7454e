"""Einsum-style contraction by axis labels: one `lax.dot_general`, as a primitive
with its own derivative rules.

Each rule names the axes of its operands with labels (`"o"` for a weight's output
axis, `"k"` for the rank axis, ...) and asks for an output labelling; `contract` finds
the dimension numbers. A label in both operands is a batch axis if the output keeps
it and is contracted otherwise; a label in one operand only is free.

`contract` on plain arrays binds `contract_p`, a primitive whose rules are all
labelled contractions again:

- **jvp**: the product is bilinear, `d(x·y) = dx·y + x·dy`.
- **transpose**: the cotangent of one operand is the contraction of the output
  cotangent `g` with the other operand, computed in whichever of its two operand
  orders relayouts fewer elements (`cheapest`). JAX's own transpose of `dot_general`
  always puts `g` first; for the gradient of a LoRA factor `b`, `gᵀ·t` with the big
  `(rows, out)` cotangent first, XLA then writes a transposed copy of the whole
  cotangent, where `(tᵀ·g)ᵀ` transposes only the tiny `(rank, out)` result.
- **batching**: a batched operand gets one more label (`V0`, `V1`, ...), free or
  batch like any other, so `vmap` folds into the same single contraction and its
  transpose still sums over the mapped axis inside one product.

Because every rule produces `contract_p` again, the primitive composes with every
transformation, at any order: `grad`, `jvp` / `jacfwd` / `linearize`, `vmap`, `scan`,
`checkpoint`, and their nestings (`jacfwd` inside `grad`, `hessian`).
"""

import functools as ft
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.core
import jax.extend.core as jexc
import jax.lax as lax
import jax.numpy as jnp
import quax
from jax.interpreters import ad, batching, mlir

from .._lora_array import is_value


Labels = Sequence[str]


def bind(fn, *args, **kwargs) -> Any:
    """Call `fn`, re-dispatching through quax if an operand is itself a quax value
    (a `LoraArray` on both sides, a quantised base, ...)."""
    if any(is_value(x) for x in args):
        return quax.quaxify(fn)(*args, **kwargs)
    return fn(*args, **kwargs)


def cast(x: Any, dtype: Any) -> Any:
    """`x.astype(dtype)`, binding nothing when `x` already has that dtype (fewer
    operations to trace than `jnp`'s `astype`, which binds a conversion anyway)."""
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def transpose_to(x: Any, labels: Labels, out: Labels) -> Any:
    labels, out = list(labels), list(out)
    if labels == out:
        return x
    perm = tuple(labels.index(l) for l in out)
    return bind(lambda x: lax.transpose(x, perm), x)


def _dimension_numbers(xl: Labels, yl: Labels, out: Labels):
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


def dot(x, xl, y, yl, out, precision=None, preferred_element_type=None):
    """`einsum(xl, yl -> out)` as one `lax.dot_general` (and a transpose, only if
    `out` is not the natural `(batch, x free, y free)` order). No custom rules."""
    dn, batch, _, free_x, free_y = _dimension_numbers(xl, yl, out)
    z = lax.dot_general(
        x, y, dn, precision=precision, preferred_element_type=preferred_element_type
    )
    return transpose_to(z, batch + free_x + free_y, out)


def _relayouts(x, xl, y, yl, out) -> int:
    """Elements moved by relayouts when `einsum(xl, yl -> out)` is lowered with `x` as
    the left operand: a matmul reads `x` as `(batch, free, contracted)` and `y` as
    `(batch, contracted, free)`, and writes `(batch, x free, y free)`; an operand or
    result in any other order is copied."""
    _, batch, summed, free_x, free_y = _dimension_numbers(xl, yl, out)
    cost = 0
    if list(xl) != batch + free_x + summed:
        cost += math.prod(x.shape)
    if list(yl) != batch + summed + free_y:
        cost += math.prod(y.shape)
    if list(out) != batch + free_x + free_y:
        cost += size_of(out, x, xl, y, yl)
    return cost


def size_of(labels: Labels, x, xl: Labels, y, yl: Labels) -> int:
    """The number of elements of an array labelled `labels`, whose axes are axes of
    `x` (labelled `xl`) or `y` (labelled `yl`)."""
    sizes = dict(zip(xl, x.shape)) | dict(zip(yl, y.shape))
    return math.prod(sizes[l] for l in labels)


def cheapest(x, xl, y, yl, out, *, precision=None, preferred_element_type=None):
    """`contract` in whichever operand order relayouts less. Ties keep `x` first."""
    if _relayouts(y, yl, x, xl, out) < _relayouts(x, xl, y, yl, out):
        x, xl, y, yl = y, yl, x, xl
    return contract(
        x,
        xl,
        y,
        yl,
        out,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _impl(x, y, *, xl, yl, out, precision, preferred_element_type):
    return dot(x, xl, y, yl, out, precision, preferred_element_type)


def _aval(xshape, xdtype, yshape, ydtype, **params):
    x, y = jax.ShapeDtypeStruct(xshape, xdtype), jax.ShapeDtypeStruct(yshape, ydtype)
    z = jax.eval_shape(ft.partial(_impl, **params), x, y)
    return jax.core.ShapedArray(z.shape, z.dtype)


# Tracing a model meets the same few contractions over and over (every layer of a
# width, each with its forward and tangent products): `eval_shape` once per kind.
_cached_aval = ft.lru_cache(maxsize=4096)(_aval)


def _abstract_eval(x, y, **params):
    pet = params["preferred_element_type"]
    if x.dtype == y.dtype and (pet is None or pet == x.dtype):
        # The common case, without tracing a `dot_general` to find out.
        sizes = dict(zip(params["xl"], x.shape)) | dict(zip(params["yl"], y.shape))
        return jax.core.ShapedArray(tuple(sizes[l] for l in params["out"]), x.dtype)
    try:
        return _cached_aval(x.shape, x.dtype, y.shape, y.dtype, **params)
    except TypeError:  # an unhashable parameter (a precision config, say)
        return _aval(x.shape, x.dtype, y.shape, y.dtype, **params)


def _transpose(operand: str, g, x, y, *, xl, yl, out, **kwargs):
    # The cotangent of `x` is `einsum(g, y -> x)`, of `y` is `einsum(x, g -> y)`.
    if operand == "x":
        aval, other, otherl, labels = x.aval, y, yl, xl
    else:
        aval, other, otherl, labels = y.aval, x, xl, yl
    ct = cheapest(g, out, other, otherl, labels, **kwargs)
    return cast(ct, aval.dtype)


def _batch(args, dims, *, xl, yl, out, **kwargs):
    # The mapped axis becomes one more label, so the batched product is still one
    # labelled contraction (free or batch, as the mapped operands decide).
    taken = {*xl, *yl, *out}
    label = next(f"V{i}" for i in range(len(taken) + 1) if f"V{i}" not in taken)
    (x, y), (bx, by) = args, dims
    if bx is not None:
        x, xl = jnp.moveaxis(x, bx, 0), (label, *xl)
    if by is not None:
        y, yl = jnp.moveaxis(y, by, 0), (label, *yl)
    z = contract_p.bind(x, y, xl=xl, yl=yl, out=(label, *out), **kwargs)
    return z, 0


# A relayout the CPU lowering pins (see `_impl_cpu`) is at most this fraction of the
# largest array of the product.
PIN_MAX_FRACTION = 0.25


def _impl_cpu(x, y, *, xl, yl, out, precision, preferred_element_type):
    """The CPU lowering: the product in the layout `_relayouts` (and so `cheapest`)
    prices. Each small operand or result that is not in the matmul's natural order
    is transposed explicitly, behind an `optimization_barrier`, so that XLA's
    transpose folding cannot move the transpose into the dot. Left to itself, XLA
    turns `(tᵀ·g)ᵀ`, the gradient of a LoRA factor `b`, back into `gᵀ·t` with the
    big cotangent's contracted axis leading, which XLA:CPU runs as a generic
    (Eigen) matmul about 3× slower than the same product with a 32 KiB transposed
    copy of `t` in front of the fast matmul kernel. Relayouts of arrays larger than
    `PIN_MAX_FRACTION` of the product's largest array stay XLA's to fold."""
    _, batch, summed, free_x, free_y = _dimension_numbers(xl, yl, out)
    natural = batch + free_x + free_y
    big = max(math.prod(x.shape), math.prod(y.shape), size_of(out, x, xl, y, yl))
    small = lambda n: n <= PIN_MAX_FRACTION * big

    def pin(a, labels, want):
        if list(labels) == want or not small(math.prod(a.shape)):
            return a, labels
        return lax.optimization_barrier(transpose_to(a, labels, want)), want

    x, xl = pin(x, xl, batch + free_x + summed)
    y, yl = pin(y, yl, batch + summed + free_y)
    z = dot(x, xl, y, yl, natural, precision, preferred_element_type)
    if list(out) != natural and small(math.prod(z.shape)):
        z = lax.optimization_barrier(z)
    return transpose_to(z, natural, out)


contract_p = jexc.Primitive("quaxlora_contract")
contract_p.def_impl(_impl)
contract_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(contract_p, mlir.lower_fun(_impl, multiple_results=False))
mlir.register_lowering(
    contract_p, mlir.lower_fun(_impl_cpu, multiple_results=False), platform="cpu"
)
ad.defbilinear(contract_p, ft.partial(_transpose, "x"), ft.partial(_transpose, "y"))
batching.primitive_batchers[contract_p] = _batch


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

    Plain arrays bind `contract_p` (see the module docstring for its derivative and
    batching rules); when an operand is a quax value the contraction re-dispatches,
    and autodiff differentiates whatever that value's own rules produce."""
    xl, yl, out = tuple(xl), tuple(yl), tuple(out)
    pet = preferred_element_type
    if is_value(x) or is_value(y):
        return bind(lambda x, y: dot(x, xl, y, yl, out, precision, pet), x, y)
    params = dict(precision=precision, preferred_element_type=pet)
    return contract_p.bind(x, y, xl=xl, yl=yl, out=out, **params)
