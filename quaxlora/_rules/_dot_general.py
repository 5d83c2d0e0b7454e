"""`dot_general` with a `LoraArray` on either or both sides.

`(w + s·b@a)·x = w·x + (s·b)·(a·x)`: the operand is contracted with the factor whose
axes it meets first (`a` for the usual `in` contraction, `b` for a transposed use),
giving a rank-sized intermediate, which is then contracted with the other factor;
with plain operands this is `_factored.factored_product`, one differentiable
operation with its own backward (and, under `grad`, one fused product). Every product
is computed with the non-LoRA operand first — the layout its consumer (vmap, a
following matmul) wants — and transposed to `dot_general`'s output order at the end,
where XLA folds the transpose away. See `quaxlora/README.md`.
"""

from typing import Any

import jax.lax as lax
import quax
from jaxtyping import ArrayLike

from .._dora import dora_scale, scale_along, scale_labels
from .._lora_array import is_value, LoraArray
from ._contract import cast, contract, transpose_to
from ._factored import factored_product, forward, Spec


def lora_labels(lora: LoraArray) -> tuple[list[str], list[str], list[str], list[str]]:
    """Labels for `w`, `a`, `b` and the batch axes of a `LoraArray`."""
    n = lora.batch_ndim
    batch = [f"B{i}" for i in range(n)]
    rest = [f"R{i}" for i in range(lora.ndim - n - 1)]
    return batch + ["o"] + rest, batch + ["k"] + rest, batch + ["o", "k"], batch


def _keep(xl, yl, out, extra) -> list[str]:
    """Natural output labels of contracting `xl` with `yl`, keeping the shared labels
    that are in `out` or in `extra`."""
    kept = set(out) | set(extra)
    batch = [l for l in xl if l in yl and l in kept]
    return batch + [l for l in xl if l not in yl] + [l for l in yl if l not in xl]


def lora_contract(
    x: Any,
    xl: list[str],
    lora: LoraArray,
    out: list[str],
    final: list[str] | None = None,
    **dot_kwargs,
) -> Any:
    """`einsum(x, lora -> out)` in factored form: `x·w + (x·a)·(s·b)` (or through `b`
    first when the output axis of `w` is contracted), returned in the order `final`
    (a reordering of `out`; by default `out`). With DoRA, `W = V·diag(m/‖V‖)`
    along one axis of `V = w + s·b⊗a`: the result of the product with `V` is
    rescaled along that axis when it survives in `out`; otherwise (it is
    contracted) `x` is, before the product."""
    final = out if final is None else final
    if lora.magnitude is None:
        return _lora_contract(x, xl, lora, out, final, **dot_kwargs)
    sl = scale_labels(lora, lora_labels(lora)[0])
    scale = dora_scale(lora)
    if set(sl) <= set(out):
        y = _lora_contract(x, xl, lora, out, out, **dot_kwargs)
        return transpose_to(scale_along(y, list(out), scale, sl), out, final)
    if set(sl) <= set(xl):
        x = scale_along(x, list(xl), scale, sl)
        return _lora_contract(x, xl, lora, out, final, **dot_kwargs)
    # The product contracts some of the scale's axes (a stacked weight's batch axis,
    # or the DoRA axis) and keeps others: neither side carries all of them.
    raise TypeError(
        "quaxlora cannot compute this `dot_general` with a stacked DoRA `LoraArray` "
        "in factored form (it contracts the stack axis or the DoRA axis but not "
        "both); `quaxlora.merge` the model first."
    )


def _lora_contract(
    x: Any, xl: list[str], lora: LoraArray, out: list[str], final, **dot_kwargs
) -> Any:
    wl, al, bl, batch = lora_labels(lora)
    a = cast(lora.a, lora.dtype)
    b = cast(lora.b, lora.dtype)
    if "o" in xl and "o" not in out:  # contraction over the weight's output axis
        (f1, f1l), (f2, f2l) = (b, bl), (a, al)
    else:
        (f1, f1l), (f2, f2l) = (a, al), (b, bl)
    tl = _keep(xl, f1l, out, batch)
    spec = Spec(
        tuple(xl),
        tuple(wl),
        tuple(f1l),
        tuple(f2l),
        tuple(tl),
        tuple(out),
        lora.scaling,
        not lora.stop_gradient,
        dot_kwargs.get("precision"),
        dot_kwargs.get("preferred_element_type"),
        final=None if list(final) == list(out) else tuple(final),
    )
    if not (is_value(x) or is_value(lora.weight)):
        # The raw weight: `w_grad` keeps gradients from it, and under `lax.scan` a
        # scanned parameter slice is a residual that needs no copy (a
        # `stop_gradient` output would be stacked over the iterations).
        xa = lora.adapter_input(x)
        return factored_product(spec, x, lora.weight, f1, f2, xa)
    # A quax value on the other side (a `LoraArray`, ...) or as the base (quantised):
    # each product re-dispatches through quax, and autodiff differentiates whatever
    # those values' rules compute.
    xa = lora.adapter_input(x)
    return forward(spec, x, lora.w, f1, f2, xa, fuse=False, dot=contract)[0]


def _lora_dot(
    lora: LoraArray,
    x: Any,
    lora_is_lhs: bool,
    *,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    **params,
) -> Any:
    """`dot_general` of `lora` with `x`, `lora` being the left-hand operand or not."""
    del params
    (lc, rc), (lb, rb) = dimension_numbers
    if lora_is_lhs:
        (l_contract, x_contract), (l_batch, x_batch) = (lc, rc), (lb, rb)
    else:
        (l_contract, x_contract), (l_batch, x_batch) = (rc, lc), (rb, lb)
    wl = lora_labels(lora)[0]
    xl = [f"X{i}" for i in range(x.ndim)]
    for li, xi in zip((*l_contract, *l_batch), (*x_contract, *x_batch)):
        xl[xi] = wl[li]
    batch = [wl[i] for i in l_batch]
    l_free = [l for i, l in enumerate(wl) if i not in l_contract and i not in l_batch]
    x_free = [l for i, l in enumerate(xl) if i not in x_contract and i not in x_batch]
    # The products have shape (*batch, *x_free, *lora_free): the layout a consumer of
    # `x` wants. With the `LoraArray` on the left, the result is transposed to
    # `dot_general`'s order as part of the factored product.
    out = batch + x_free + l_free
    return lora_contract(
        x,
        xl,
        lora,
        out,
        batch + l_free + x_free if lora_is_lhs else out,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


# One implementation, `_lora_dot`, for both sides: `dot_general`'s output order
# (batch, lhs free, rhs free) is the product's natural order when the `LoraArray` is
# on the right, and one transpose (folded away by XLA) when it is on the left.


@quax.register(lax.dot_general_p)
def _(lhs: LoraArray, rhs: ArrayLike | quax.ArrayValue, **params) -> Any:
    return _lora_dot(lhs, rhs, True, **params)


@quax.register(lax.dot_general_p)
def _(lhs: ArrayLike | quax.ArrayValue, rhs: LoraArray, **params) -> Any:
    return _lora_dot(rhs, lhs, False, **params)


@quax.register(lax.dot_general_p)
def _(lhs: LoraArray, rhs: LoraArray, **params) -> Any:
    # Both rules above match; this one settles the dispatch. The right-hand
    # `LoraArray` is the "operand": each product of it with `w`, `a` or `b`
    # re-dispatches to the rules above, so nothing is ever materialised.
    return _lora_dot(lhs, rhs, True, **params)
