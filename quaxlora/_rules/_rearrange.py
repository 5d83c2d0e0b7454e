"""Primitives that rearrange a `LoraArray` without computing with it: `transpose`,
`dynamic_slice`, `slice`, `squeeze` and `rev` (`reshape` has its own module).

Rearranging `w + s·b@a` rearranges `w` and the matching axes of `a` and `b`, so the
result stays a `LoraArray`; a result that is not of that form any more falls through
to `LoraArray.default` (the error, or the opt-in dense fallback), or, for `squeeze`
dropping the output axis, is the small plain array `w[0] + s·b[0]@a`. With DoRA the
magnitude (and a carried norm) move with their axis; a slice keeps the norms of the
whole array (`with_norm`).
"""

from typing import Any

import jax.lax as lax
import jax.numpy as jnp
import quax
from jaxtyping import ArrayLike

from .._dora import with_norm
from .._lora_array import LoraArray, replace_fields
from ._contract import bind


@quax.register(lax.transpose_p)
def _(operand: LoraArray, *, permutation) -> Any:
    n = operand.batch_ndim
    perm = tuple(permutation)
    batch_perm, core = perm[:n], [p - n for p in perm[n:]]
    if sorted(batch_perm) != list(range(n)):
        # A batch axis moved into the matrix part: not of LoRA form any more.
        return LoraArray.default(lax.transpose_p, [operand], dict(permutation=perm))
    w = bind(lambda w: lax.transpose(w, perm), operand.weight)
    rest = [p - 1 for p in core if p != 0]  # new order of the `rest` axes
    if core[0] == 0:
        # w[β, o, R] -> w[β, o, perm(R)]: permute the rest axes of `a`.
        a = jnp.transpose(operand.a, (*batch_perm, n, *(n + 1 + r for r in rest)))
        b = jnp.transpose(operand.b, (*batch_perm, n, n + 1))
    elif len(core) == 2:
        # (out, in) -> (in, out): the factors swap roles. b' = aᵀ, a' = bᵀ.
        a = jnp.transpose(operand.b, (*batch_perm, n + 1, n))
        b = jnp.transpose(operand.a, (*batch_perm, n + 1, n))
    else:
        return LoraArray.default(lax.transpose_p, [operand], dict(permutation=perm))
    if operand.magnitude is None:
        return replace_fields(operand, weight=w, a=a, b=b)
    # DoRA: the magnitude (and a carried norm) follow their axis; norms over the
    # other axes are unchanged by permuting them.
    move = lambda m: None if m is None else jnp.transpose(m, (*batch_perm, n))
    return replace_fields(
        operand,
        weight=w,
        a=a,
        b=b,
        magnitude=move(operand.magnitude),
        norm=move(operand.norm),
        dora_axis=core.index(operand.dora_axis),
    )


def _factor_axes(lora: LoraArray, axes: list, full: Any) -> tuple[list, list]:
    """Per-axis slicing of `w` mapped onto `a` (batch, rank, rest) and `b` (batch,
    out, rank); the rank axis is taken whole (`full`)."""
    n = lora.batch_ndim
    return axes[:n] + [full] + axes[n + 1 :], axes[: n + 1] + [full]


def _magnitude_axes(lora: LoraArray, axes: list) -> list:
    """Per-axis slicing of `w` mapped onto a DoRA magnitude `(*batch, size)`. The
    norms are those of the whole array: slice only after `with_norm`."""
    n = lora.batch_ndim
    return axes[:n] + [axes[n + lora.dora_axis]]


@quax.register(lax.dynamic_slice_p)
def _(operand: LoraArray, *starts: ArrayLike, slice_sizes) -> LoraArray:
    # dynamic_slice clamps each start into range; a and b have w's sizes on the
    # axes they share with it, so they are clamped alike.
    zero = jnp.zeros((), jnp.asarray(starts[0]).dtype)
    axes = list(zip(starts, slice_sizes))
    a_axes, b_axes = _factor_axes(operand, axes, (zero, operand.rank))

    def dslice(x, axes):
        s, z = zip(*axes)
        return lax.dynamic_slice(x, s, z)

    w = bind(
        lambda w, *s: lax.dynamic_slice_p.bind(w, *s, slice_sizes=slice_sizes),
        operand.weight,
        *starts,
    )
    a, b = dslice(operand.a, a_axes), dslice(operand.b, b_axes)
    if operand.magnitude is None:
        return replace_fields(operand, weight=w, a=a, b=b)
    m_axes = _magnitude_axes(operand, axes)
    operand = with_norm(operand)
    m, norm = dslice(operand.magnitude, m_axes), dslice(operand.norm, m_axes)
    return replace_fields(operand, weight=w, a=a, b=b, magnitude=m, norm=norm)


@quax.register(lax.slice_p)
def _(operand: LoraArray, *, start_indices, limit_indices, strides) -> LoraArray:
    strides = (1,) * operand.ndim if strides is None else tuple(strides)
    axes = list(zip(start_indices, limit_indices, strides))
    a_axes, b_axes = _factor_axes(operand, axes, (0, operand.rank, 1))

    def sl(x, ax):
        s, l, st = zip(*ax)
        return lax.slice(x, s, l, st)

    w = bind(
        lambda w: lax.slice_p.bind(
            w, start_indices=start_indices, limit_indices=limit_indices, strides=strides
        ),
        operand.weight,
    )
    a, b = sl(operand.a, a_axes), sl(operand.b, b_axes)
    if operand.magnitude is None:
        return replace_fields(operand, weight=w, a=a, b=b)
    m_axes = _magnitude_axes(operand, axes)
    operand = with_norm(operand)
    m, norm = sl(operand.magnitude, m_axes), sl(operand.norm, m_axes)
    return replace_fields(operand, weight=w, a=a, b=b, magnitude=m, norm=norm)


@quax.register(lax.squeeze_p)
def _(operand: LoraArray, *, dimensions) -> Any:
    n, dims = operand.batch_ndim, tuple(dimensions)
    rest_left = operand.ndim - n - 1 - sum(d > n for d in dims)
    axis = n + operand.dora_axis
    dora = operand.magnitude is not None
    if n not in dims and rest_left >= 1 and not (dora and axis in dims):
        w = bind(lambda w: lax.squeeze(w, dims), operand.weight)
        # Batch or rest axes only: squeeze them from the factors alike.
        a = lax.squeeze(operand.a, tuple(d for d in dims if d != n))
        b = lax.squeeze(operand.b, tuple(d for d in dims if d < n))
        if not dora:
            return replace_fields(operand, weight=w, a=a, b=b)
        # DoRA: squeezing size-1 axes leaves the norms as they are.
        batch = tuple(d for d in dims if d < n)
        sq = lambda m: None if m is None else lax.squeeze(m, batch)
        return replace_fields(
            operand,
            weight=w,
            a=a,
            b=b,
            magnitude=sq(operand.magnitude),
            norm=sq(operand.norm),
            dora_axis=operand.dora_axis - sum(n < d < axis for d in dims),
        )
    # Dropping the output axis (size 1) or the last other axis leaves no LoRA form:
    # the result, `w[0] + s·b[0]@a`, is computed at its own (= the weight's) size.
    return lax.squeeze(operand.merged(), dims)


@quax.register(lax.rev_p)
def _(operand: LoraArray, *, dimensions) -> LoraArray:
    # Reversing axes of w + s·b⊗a reverses the matching axes of the factors: batch
    # axes of all three, the output axis of w and b, the other axes of w and a.
    n = operand.batch_ndim
    dims = tuple(dimensions)
    rev = lambda x, ds: lax.rev(x, tuple(ds)) if ds else x
    w = bind(lambda w: lax.rev(w, dims), operand.weight)
    a = rev(operand.a, [d for d in dims if d != n])
    b = rev(operand.b, [d for d in dims if d <= n])
    if operand.magnitude is None:
        return replace_fields(operand, weight=w, a=a, b=b)
    # DoRA: the magnitude (and a carried norm) reverse with their axis.
    axis = n + operand.dora_axis
    kept = [d for d in dims if d < n] + ([n] if axis in dims else [])
    flip = lambda m: None if m is None else rev(m, kept)
    return replace_fields(
        operand,
        weight=w,
        a=a,
        b=b,
        magnitude=flip(operand.magnitude),
        norm=flip(operand.norm),
    )
