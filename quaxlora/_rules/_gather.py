"""Embedding lookups and slices of a `LoraArray`.

Rows of `w + s·b@a` are the rows of `w` plus the same rows of `b` times `a`:
gathering an embedding table gathers `w` and the (vocab, rank) `b`, never the whole
table. Likewise columns are columns of `w` plus `b` times columns of `a`.

- `gather` (`w[ids]`, `jnp.take`, a vmapped `eqx.nn.Embedding`) returns a plain
  array: `gather(w) + gather(b)·(s·a)` (or `(s·b)·gather(a)` for columns).
- `dynamic_slice` and `slice` (`eqx.nn.Embedding`, `w[i]`, `w[2:5]`) keep the LoRA
  form: they slice `w`, and the matching axes of `a` and `b`.
- `squeeze` keeps the LoRA form unless it drops the output axis (or the last other
  axis); then the result is the small plain array `w[0] + s·b[0]@a`.
"""

from typing import Any

import jax.lax as lax
import jax.numpy as jnp
import quax
from jaxtyping import ArrayLike

from .._dora import dora_scale, replace, with_norm
from .._lora_array import LoraArray
from ._contract import bind, contract
from ._structural import _replace


def _offset_position(dnums, axis: int, ndim: int) -> int | None:
    """Output position of operand axis `axis` in a gather, if it is an offset axis."""
    skip = set(dnums.collapsed_slice_dims) | set(dnums.operand_batching_dims)
    offsets = [d for d in range(ndim) if d not in skip]
    if axis not in offsets:
        return None
    return dnums.offset_dims[offsets.index(axis)]


def _whole_axis(lora: LoraArray, dn, slice_sizes) -> tuple[int, int] | None:
    """For a 2-D table, an axis the gather takes whole (1: rows are gathered, 0:
    columns are), and its position in the output."""
    if lora.batch_ndim != 0 or lora.ndim != 2 or dn.operand_batching_dims:
        return None
    for axis in (1, 0):
        p = _offset_position(dn, axis, 2)
        if p is not None and slice_sizes[axis] == lora.shape[axis]:
            return axis, p
    return None


@quax.register(lax.gather_p)
def _(
    operand: LoraArray, indices: ArrayLike, *, dimension_numbers, slice_sizes, **params
):
    lora, dn = operand, dimension_numbers
    found = _whole_axis(lora, dn, slice_sizes)
    if found is None:
        params = dict(dimension_numbers=dn, slice_sizes=slice_sizes, **params)
        return LoraArray.default(lax.gather_p, [operand, indices], params)
    axis, p = found

    def gather(x, sizes, **extra):
        kwargs = dict(params, dimension_numbers=dn, slice_sizes=sizes, **extra)
        return bind(lambda x: lax.gather_p.bind(x, indices, **kwargs), x)

    base = gather(lora.w, slice_sizes)
    # Gather the factor that shares the indexed axis, with the rank axis in place of
    # the whole one (same indices, so the same clamping and bounds), then contract
    # it with the other factor: rows gather(b)·(s·a), columns (s·b)·gather(a).
    # Out-of-bounds slices of the factor are 0, so the base alone carries the fill
    # value (and no NaN fill leaks into the factors' gradients).
    a, b = lora.a.astype(lora.dtype), lora.b.astype(lora.dtype)
    g, f = (b, a) if axis == 1 else (a, b)
    sizes = list(slice_sizes)
    sizes[axis] = lora.rank
    t = gather(g, tuple(sizes), fill_value=0)
    labels = [f"Y{i}" for i in range(base.ndim)]
    tl = labels[:p] + ["k"] + labels[p + 1 :]
    f = (lora.scaling * f).astype(t.dtype)
    fl = ["k", labels[p]] if axis == 1 else [labels[p], "k"]
    delta = contract(t, tl, f, fl, labels)
    valid = None
    if params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
        # The dense gather's transpose drops the cotangent of out-of-bounds slices;
        # drop it here too, so a NaN there cannot reach `a` or `b` through 0·NaN.
        ones = jnp.ones(g.shape[:axis] + (1,) + g.shape[axis + 1 :], t.dtype)
        sizes[axis] = 1
        valid = gather(ones, tuple(sizes), fill_value=0)
        delta = jnp.where(valid > 0, delta, jnp.zeros((), delta.dtype))
    out = (base + delta.astype(base.dtype)).astype(base.dtype)
    if lora.magnitude is None:
        return out
    # DoRA: rescale along the magnitude's axis — the whole axis, at output position
    # `p`, or the gathered one, whose scales are gathered with the same indices
    # (fill 1: an out-of-bounds slice keeps the base's fill value).
    scale = dora_scale(lora).astype(out.dtype)
    if lora.dora_axis == axis:
        shape = [1] * out.ndim
        shape[p] = scale.shape[0]
        scaled = out * scale.reshape(shape)
        # An out-of-bounds slice holds the fill value, which is not rescaled.
        return scaled if valid is None else jnp.where(valid > 0, scaled, out)
    scale = jnp.expand_dims(scale, axis)
    sizes = list(slice_sizes)
    sizes[axis] = 1
    return out * gather(scale, tuple(sizes), fill_value=1)


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
        return _replace(operand, weight=w, a=a, b=b)
    m_axes = _magnitude_axes(operand, axes)
    operand = with_norm(operand)
    m, norm = dslice(operand.magnitude, m_axes), dslice(operand.norm, m_axes)
    return replace(operand, weight=w, a=a, b=b, magnitude=m, norm=norm)


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
        return _replace(operand, weight=w, a=a, b=b)
    m_axes = _magnitude_axes(operand, axes)
    operand = with_norm(operand)
    m, norm = sl(operand.magnitude, m_axes), sl(operand.norm, m_axes)
    return replace(operand, weight=w, a=a, b=b, magnitude=m, norm=norm)


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
            return _replace(operand, weight=w, a=a, b=b)
        # DoRA: squeezing size-1 axes leaves the norms as they are.
        batch = tuple(d for d in dims if d < n)
        sq = lambda m: None if m is None else lax.squeeze(m, batch)
        return replace(
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
