"""Embedding lookups (`gather`) of a `LoraArray`.

Rows of `w + s·b@a` are the rows of `w` plus the same rows of `b` times `a`:
gathering an embedding table gathers `w` and the (vocab, rank) `b`, never the whole
table. Likewise columns are columns of `w` plus `b` times columns of `a`.

- `gather` (`w[ids]`, `jnp.take`, a vmapped `eqx.nn.Embedding`) returns a plain
  array: `gather(w) + gather(b)·(s·a)` (or `(s·b)·gather(a)` for columns).

The other ways of reading part of a weight (`dynamic_slice`, `slice`, `squeeze`)
keep the LoRA form and live with the rearrangements (`_rearrange`).
"""

import jax.lax as lax
import jax.numpy as jnp
import quax
from jaxtyping import ArrayLike

from .._dora import dora_scale
from .._lora_array import LoraArray
from ._contract import bind, contract


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
