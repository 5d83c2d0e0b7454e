"""Rules for `QuantisedArray`: dequantise on the fly, inside each operation.

- `dot_general` and `conv_general_dilated` (a quantised operand on either side)
  dequantise inside a `jax.checkpoint` around the operation: the dequantised weight
  is a temporary of that one product, and the backward dequantises again instead of
  keeping it alive from the forward. In a `lax.scan` over a quantised layer stack,
  one layer's dequantised weights exist at a time.
- `gather`, `dynamic_slice` and `slice` that take whole rows of a 2-D table (an
  embedding lookup) gather the codes and scales of those rows only, when the row
  length is a multiple of `block_size` (so a row is whole blocks); otherwise the
  table is dequantised first.
- `transpose` is lazy (a permutation of the stored axes, applied at dequantisation),
  so a tied embedding `x @ emb.weight.T` stays quantised; `convert_element_type` to a
  floating dtype changes the dtype it dequantises to; `copy` is the identity.

Any other primitive dequantises the whole array (quax's default).
"""

import dataclasses
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import quax
from jaxtyping import ArrayLike

from .._quantised import code_bits, dequantise_blocks, QuantisedArray, unpack_nibbles


def _dequantised(fn, *args) -> Any:
    """`fn(*args)` with every `QuantisedArray` dequantised, as one checkpointed
    operation: only the stored codes and scales are residuals of the backward."""

    def f(*args):
        dense = [a.materialise() if isinstance(a, QuantisedArray) else a for a in args]
        return fn(*dense)

    return jax.checkpoint(f)(*args)


def _dot(lhs, rhs, **params):
    return _dequantised(lambda l, r: lax.dot_general_p.bind(l, r, **params), lhs, rhs)


def _conv(lhs, rhs, **params):
    f = lambda l, r: lax.conv_general_dilated_p.bind(l, r, **params)
    return _dequantised(f, lhs, rhs)


@quax.register(lax.dot_general_p)
def _(lhs: QuantisedArray, rhs: ArrayLike, **params):
    return _dot(lhs, rhs, **params)


@quax.register(lax.dot_general_p)
def _(lhs: ArrayLike, rhs: QuantisedArray, **params):
    return _dot(lhs, rhs, **params)


@quax.register(lax.dot_general_p)
def _(lhs: QuantisedArray, rhs: QuantisedArray, **params):
    return _dot(lhs, rhs, **params)


@quax.register(lax.conv_general_dilated_p)
def _(lhs: ArrayLike, rhs: QuantisedArray, **params):
    return _conv(lhs, rhs, **params)


@quax.register(lax.conv_general_dilated_p)
def _(lhs: QuantisedArray, rhs: ArrayLike, **params):
    return _conv(lhs, rhs, **params)


@quax.register(lax.conv_general_dilated_p)
def _(lhs: QuantisedArray, rhs: QuantisedArray, **params):
    return _conv(lhs, rhs, **params)


def _rows(q: QuantisedArray, sizes) -> tuple[Any, Any] | None:
    """Codes `(rows, bytes)` and block scales `(rows, blocks)` of a 2-D table, when
    `sizes` takes whole rows and a row is whole blocks (and whole bytes)."""
    if q.batch_shape or len(q.core_shape) != 2 or q.perm != (0, 1):
        return None
    rows, dim = q.core_shape
    if sizes[1] != dim or dim % q.block_size or dim * code_bits(q.kind) % 8:
        return None
    codes = q.codes.reshape(rows, -1)  # no padding: the table is whole blocks
    return codes, q.block_scales().reshape(rows, dim // q.block_size)


def _dequantise_rows(q: QuantisedArray, codes, scales, axis: int):
    """Dequantise gathered codes and scales whose row-content axis is `axis`."""
    codes, scales = jnp.moveaxis(codes, axis, -1), jnp.moveaxis(scales, axis, -1)
    codes = unpack_nibbles(codes) if code_bits(q.kind) == 4 else codes
    values = dequantise_blocks(codes, scales, q).astype(q.compute_dtype)
    return jnp.moveaxis(values, -1, axis)


def _offset_position(dn, axis: int) -> int | None:
    """Output position of operand axis `axis` of a 2-D gather, if an offset axis."""
    skip = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    offsets = [d for d in range(2) if d not in skip]
    return dn.offset_dims[offsets.index(axis)] if axis in offsets else None


@quax.register(lax.gather_p)
def _(
    operand: QuantisedArray,
    indices: ArrayLike,
    *,
    dimension_numbers,
    slice_sizes,
    fill_value,
    mode,
    **params,
):
    dn = dimension_numbers
    found = _rows(operand, slice_sizes)
    p = _offset_position(dn, 1) if found is not None else None
    if found is None or p is None or dn.operand_batching_dims:
        return lax.gather_p.bind(
            operand.materialise(),
            indices,
            dimension_numbers=dn,
            slice_sizes=slice_sizes,
            fill_value=fill_value,
            mode=mode,
            **params,
        )

    def gather(x, fill):
        sizes = (slice_sizes[0], x.shape[1])
        kw = dict(dimension_numbers=dn, slice_sizes=sizes, mode=mode, **params)
        return lax.gather_p.bind(x, indices, fill_value=fill, **kw)

    codes, scales = found
    out = _dequantise_rows(operand, gather(codes, 0), gather(scales, 0), p)
    if mode == lax.GatherScatterMode.FILL_OR_DROP:
        # Out-of-bounds rows read the fill value, as the dense gather's do.
        valid = gather(jnp.ones((codes.shape[0], 1), jnp.uint8), 0)
        fill = jnp.nan if fill_value is None else fill_value
        out = jnp.where(valid > 0, out, jnp.asarray(fill, out.dtype))
    return out


@quax.register(lax.dynamic_slice_p)
def _(operand: QuantisedArray, *starts: ArrayLike, slice_sizes):
    found = _rows(operand, slice_sizes)
    if found is None:
        w = operand.materialise()
        return lax.dynamic_slice_p.bind(w, *starts, slice_sizes=slice_sizes)
    codes, scales = found
    zero = jnp.zeros((), jnp.asarray(starts[0]).dtype)
    codes = lax.dynamic_slice(
        codes, (starts[0], zero), (slice_sizes[0], codes.shape[1])
    )
    scales = lax.dynamic_slice(
        scales, (starts[0], zero), (slice_sizes[0], scales.shape[1])
    )
    return _dequantise_rows(operand, codes, scales, 1)


@quax.register(lax.slice_p)
def _(operand: QuantisedArray, *, start_indices, limit_indices, strides):
    sizes = [hi - lo for lo, hi in zip(start_indices, limit_indices)]
    found = _rows(operand, sizes)
    if found is None or (strides is not None and strides[1] != 1):
        return lax.slice(operand.materialise(), start_indices, limit_indices, strides)
    codes, scales = found
    lo, hi = start_indices[0], limit_indices[0]
    step = 1 if strides is None else strides[0]
    codes = lax.slice(codes, (lo, 0), (hi, codes.shape[1]), (step, 1))
    scales = lax.slice(scales, (lo, 0), (hi, scales.shape[1]), (step, 1))
    return _dequantise_rows(operand, codes, scales, 1)


@quax.register(lax.transpose_p)
def _(operand: QuantisedArray, *, permutation):
    nb = len(operand.batch_shape)
    perm = tuple(permutation)
    if perm[:nb] != tuple(range(nb)):
        return lax.transpose(operand.materialise(), perm)
    new = tuple(operand.perm[p - nb] for p in perm[nb:])
    return dataclasses.replace(operand, perm=new)


@quax.register(lax.convert_element_type_p)
def _(operand: QuantisedArray, *, new_dtype, **params):
    if not jnp.issubdtype(new_dtype, jnp.floating):
        w = operand.materialise()
        return lax.convert_element_type_p.bind(w, new_dtype=new_dtype, **params)
    return dataclasses.replace(operand, compute_dtype=jnp.dtype(new_dtype))


@quax.register(lax.copy_p)
def _(operand: QuantisedArray) -> QuantisedArray:
    return operand
