"""Quantised frozen weights (QLoRA): `QuantisedArray` and `quantise`.

A weight of shape `(*batch, *core)` is flattened per matrix (the leading `*batch` axes
of a layer stack are kept, so that `lax.scan` slices a quantised stack layer by
layer), cut into blocks of `block_size` elements (the last one zero-padded), and each
block stored as integer codes plus one scale, its absolute maximum:
`w ≈ code[q] · absmax[block]`. Four-bit codes are packed two to a `uint8`.
"""

import functools
import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import quax
from jaxtyping import Array, PyTree

from ._lora_array import LoraArray
from ._loraify import SUPPORTED
from ._paths import matches, path_str, Where
from ._trainable import is_adapted, Trainable


KINDS = ("nf4", "int4", "int8")

# The NF4 code of QLoRA (Dettmers et al., 2023) as bitsandbytes stores it
# (csrc/kernels.cu): normal quantiles, normalised to [-1, 1], with an exact zero.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Double quantisation: one float32 scale per this many block scales.
SCALE_BLOCK = 256


def code_values(kind: str) -> np.ndarray:
    """The values `code[q]` a stored code stands for, in increasing order (before
    the block scale): NF4's 16 values, `k / 7` for int4, `k / 127` for int8."""
    if kind == "nf4":
        return NF4_CODE
    levels = 7 if kind == "int4" else 127
    return (np.arange(-levels, levels + 1) / levels).astype(np.float32)


def code_bits(kind: str) -> int:
    return 8 if kind == "int8" else 4


def _encode(x: Array, kind: str) -> Array:
    """Nearest code of `x` in `[-1, 1]`, as the stored integer (a nibble for the
    4-bit kinds, an `int8` for int8)."""
    if kind == "nf4":
        mid = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
        return jnp.searchsorted(jnp.asarray(mid), x).astype(jnp.uint8)
    if kind == "int4":
        return (jnp.clip(jnp.round(x * 7), -7, 7) + 8).astype(jnp.uint8)
    return jnp.clip(jnp.round(x * 127), -127, 127).astype(jnp.int8)


def _decode(q: Array, kind: str) -> Array:
    """`code[q]` in float32."""
    if kind == "nf4":
        return jnp.take(jnp.asarray(NF4_CODE), q.astype(jnp.int32))
    if kind == "int4":
        return (q.astype(jnp.float32) - 8) / 7
    return q.astype(jnp.float32) / 127


def _pack(q: Array) -> Array:
    """Two nibbles per byte along the last axis: element `2i` in the low nibble."""
    q = q.reshape(*q.shape[:-1], -1, 2)
    return q[..., 0] | (q[..., 1] << 4)


def unpack_nibbles(p: Array) -> Array:
    return jnp.stack([p & 15, p >> 4], axis=-1).reshape(*p.shape[:-1], -1)


def _padded_size(size: int, block_size: int, bits: int) -> int:
    n = -(-size // block_size) * block_size
    if bits == 4 and n % 2:  # only with `block_size=1`: one more block to pair up
        n += block_size
    return n


class QuantisedArray(quax.ArrayValue):
    """A frozen weight stored in 4 or 8 bits: blockwise absmax quantisation, codes
    packed two to a byte for the 4-bit kinds. It stands for its dequantised value,
    `code[q] · absmax[block]` in `dtype`; under `quax.quaxify` each matmul,
    convolution and embedding lookup dequantises it on the fly (see
    `quaxlora.quantise`). Build one with `quaxlora.quantise(array, kind)`.

    Fields: `codes` `(*batch, n // 2)` `uint8` (4-bit) or `(*batch, n)` `int8`, for
    `n` elements after padding; `scales` `(*batch, n // block_size)`, `float32` or,
    with double quantisation, `uint8` against `scales2` (`float32`, one per 256
    scales). `core_shape` is the shape of one matrix as stored; `perm` a lazy
    transpose of it (a tied embedding's `emb.T`); `dtype` the dtype it computes in.
    """

    codes: Array
    scales: Array
    scales2: Array | None
    kind: str = eqx.field(static=True)
    block_size: int = eqx.field(static=True)
    core_shape: tuple[int, ...] = eqx.field(static=True)
    perm: tuple[int, ...] = eqx.field(static=True)
    compute_dtype: Any = eqx.field(static=True)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1])

    def aval(self) -> jax.core.ShapedArray:
        core = tuple(self.core_shape[p] for p in self.perm)
        return jax.core.ShapedArray(self.batch_shape + core, self.compute_dtype)

    def block_scales(self) -> Array:
        """The float32 scale of every block, `(*batch, n // block_size)`."""
        if self.scales2 is None:
            return self.scales
        s2 = jnp.repeat(self.scales2, SCALE_BLOCK, axis=-1)[
            ..., : self.scales.shape[-1]
        ]
        return self.scales.astype(jnp.float32) / 255 * s2

    def flat_codes(self) -> Array:
        """The code of every (padded) element, `(*batch, n)`."""
        return unpack_nibbles(self.codes) if code_bits(self.kind) == 4 else self.codes

    def materialise(self) -> Array:
        """The dequantised weight, `code[q] · absmax[block]`, in `dtype`."""
        values = dequantise_blocks(self.flat_codes(), self.block_scales(), self)
        size = math.prod(self.core_shape)
        w = values[..., :size].reshape(self.batch_shape + self.core_shape)
        nb = len(self.batch_shape)
        w = jnp.transpose(w, (*range(nb), *(nb + p for p in self.perm)))
        return w.astype(self.compute_dtype)

    def stored_bytes(self) -> int:
        """Bytes of the stored codes and scales."""
        return sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(self))


def dequantise_blocks(q: Array, scales: Array, like: QuantisedArray) -> Array:
    """`code[q] · scale` for codes `(..., m)` and the scales `(..., m / block_size)`
    of their blocks, in float32."""
    bs = like.block_size
    values = _decode(q, like.kind).reshape(*q.shape[:-1], -1, bs)
    return (values * scales[..., None]).reshape(q.shape)


def _check_block_size(block_size: Any) -> int:
    ok = isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool)
    if not ok or block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(
            f"`block_size` must be a positive power of two, got {block_size!r}."
        )
    return int(block_size)


def quantise_array(
    w: Array,
    kind: str,
    *,
    block_size: int = 64,
    batch_ndim: int = 0,
    double_quant: bool = False,
    compute_dtype: Any = None,
) -> QuantisedArray:
    """Quantise one weight; the leading `batch_ndim` axes are kept (one set of blocks
    per matrix of a layer stack). Checks as `quantise` does, naming no path."""
    core = tuple(w.shape[batch_ndim:])
    codes, scales, scales2 = _quantise_fields(
        w, kind, block_size, batch_ndim, double_quant
    )
    dtype = w.dtype if compute_dtype is None else jnp.dtype(compute_dtype)
    return QuantisedArray(
        codes,
        scales,
        scales2,
        kind,
        block_size,
        core,
        tuple(range(len(core))),
        jnp.dtype(dtype),
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantise_fields(
    w: Array, kind: str, block_size: int, batch_ndim: int, double_quant: bool
) -> tuple[Array, Array, Array | None]:
    """The stored codes, scales and second-level scales of `quantise_array`: one
    compiled program per weight shape, so the float32 blocks and the unpacked codes
    are fused away instead of each being a weight-sized temporary."""
    bits = code_bits(kind)
    batch, core = tuple(w.shape[:batch_ndim]), tuple(w.shape[batch_ndim:])
    size = math.prod(core)
    n = _padded_size(size, block_size, bits)
    flat = w.astype(jnp.float32).reshape(*batch, size)
    flat = jnp.pad(flat, [(0, 0)] * len(batch) + [(0, n - size)])
    blocks = flat.reshape(*batch, n // block_size, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scales2 = None
    if double_quant:
        nb = absmax.shape[-1]
        nb2 = -(-nb // SCALE_BLOCK)
        grouped = jnp.pad(absmax, [(0, 0)] * len(batch) + [(0, nb2 * SCALE_BLOCK - nb)])
        scales2 = jnp.max(grouped.reshape(*batch, nb2, SCALE_BLOCK), axis=-1)
        s2 = jnp.repeat(scales2, SCALE_BLOCK, axis=-1)[..., :nb]
        ratio = absmax / jnp.where(s2 > 0, s2, 1)
        # Round up, so the stored scale still covers its block.
        scales = jnp.clip(jnp.ceil(ratio * 255), 0, 255).astype(jnp.uint8)
        absmax = scales.astype(jnp.float32) / 255 * s2
    else:
        scales = absmax
    # An all-zero block has scale 0; divide by 1 there, so its codes are code 0.
    x = blocks / jnp.where(absmax > 0, absmax, 1)[..., None]
    q = _encode(x, kind).reshape(*batch, n)
    return (_pack(q) if bits == 4 else q), scales, scales2


@jax.jit
def _all_finite(w: Array) -> Array:
    return jnp.all(jnp.isfinite(w))


def _check_weight(w: Any, path: str) -> None:
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(
            f"`quantise` needs a floating-point weight, but `{path}` has dtype "
            f"{w.dtype}; exclude it with `exclude=`."
        )
    if not isinstance(w, jax.core.Tracer) and not bool(_all_finite(w)):
        raise ValueError(
            f"`quantise` found a non-finite value (inf or NaN) in `{path}`; its block "
            "scale would make the whole block non-finite."
        )


def _core_ndim(module: Any) -> int:
    if isinstance(module, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
        return 2 + module.num_spatial_dims
    return 2


def quantise(
    model: PyTree,
    kind: Literal["nf4", "int4", "int8"],
    *,
    block_size: int = 64,
    where: Where = None,
    exclude: Where = None,
    double_quant: bool = False,
    compute_dtype: Any = None,
) -> PyTree:
    """Store a model's frozen weights in 4 or 8 bits, for QLoRA.

    Each targeted layer's `weight` becomes a `QuantisedArray`: the weight, flattened
    (per matrix of a layer stack), is cut into blocks of `block_size` elements, and
    each block is stored as integer codes and one scale, its absolute maximum, so
    that it dequantises to `code[q] · absmax[block]`. The 4-bit kinds pack two codes
    in a byte. Under `quax.quaxify` every matmul, convolution and embedding lookup
    dequantises the weight it reads, inside the operation (the dequantised copy is a
    temporary, recomputed in the backward rather than stored; a lookup dequantises
    only the rows it reads).

    Use it before `quaxlora.loraify`
    (`ql.loraify(ql.quantise(model, "nf4"), rank=8, key=key)`) or after it: the base
    inside each `LoraArray` is quantised, never the adapters.

    **Arguments:**

    - `model`: the model, any pytree; or a single floating-point array, which is
        returned as one `QuantisedArray`.
    - `kind`: `"nf4"` (the 4-bit NormalFloat of QLoRA: 16 normal quantiles with an
        exact zero), `"int4"` (symmetric, codes `-7..7`) or `"int8"` (symmetric,
        `-127..127`).
    - `block_size`: elements per scale, a positive power of two. A weight whose size
        is not a multiple of it is zero-padded (the padding is never read back). An
        embedding lookup dequantises only the rows it reads when `block_size` divides
        the row length; otherwise it dequantises the whole table.
    - `where`: which layers to quantise, in the forms `loraify` takes. Default: every
        `eqx.nn.Linear`, `Conv`, `ConvTranspose` and `Embedding`. A weight trained in
        full (a `quaxlora.Trainable`, from `modules_to_save`) is never quantised.
    - `exclude`: layers to leave alone, in the same forms.
    - `double_quant`: store the block scales in 8 bits against one float32 scale per
        256 blocks (rounded up, so a block's scale still covers it), as QLoRA does.
    - `compute_dtype`: the dtype the weight dequantises to (its `dtype`); default the
        original weight's dtype.

    **Returns:**

    A copy of `model` with `QuantisedArray` weights. Check the saving with
    `quaxlora.stored_bytes`.

    !!! Example

        ```python
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import quaxlora as ql

        mlp = eqx.nn.MLP(64, 64, width_size=128, depth=2, key=jr.key(0))
        qlora = ql.loraify(ql.quantise(mlp, "nf4"), rank=4, key=jr.key(1))
        y = quax.quaxify(qlora)(jnp.ones(64))
        ```
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    block_size = _check_block_size(block_size)
    kw: dict[str, Any] = dict(
        block_size=block_size,
        double_quant=bool(double_quant),
        compute_dtype=compute_dtype,
    )
    if eqx.is_array(model):
        _check_weight(model, "array")
        return quantise_array(model, kind, **kw)
    where = SUPPORTED if where is None else where

    def is_module(x):
        return isinstance(x, SUPPORTED)

    def convert(path, node):
        p = path_str(path)
        name = f"{p}.weight" if p else "weight"
        if not is_module(node) or not matches(where, p, node):
            return node
        if exclude is not None and matches(exclude, p, node):
            return node
        w = node.weight
        if isinstance(w, Trainable):
            return node  # trained in full (`modules_to_save`): never quantised
        lora = w if isinstance(w, LoraArray) else None
        base = w.weight if isinstance(w, LoraArray) else w
        if isinstance(base, QuantisedArray):
            raise ValueError(f"`{name}` is already quantised.")
        _check_weight(base, name)
        nb = base.ndim - _core_ndim(node)
        q = quantise_array(base, kind, batch_ndim=nb, **kw)
        if lora is not None:
            q = eqx.tree_at(lambda l: l.weight, lora, q)
        return eqx.tree_at(lambda m: m.weight, node, q)

    return jtu.tree_map_with_path(convert, model, is_leaf=is_module)


def stored_bytes(model: PyTree, *, frozen_only: bool = True) -> int:
    """Bytes of a model's arrays as stored: a `QuantisedArray` counts its codes and
    scales, not the size of its dequantised value.

    **Arguments:**

    - `model`: any pytree, typically a (Q)LoRA model.
    - `frozen_only`: count only the frozen base (not the LoRA factors nor
        `quaxlora.Trainable` arrays).

    **Returns:**

    The number of bytes.
    """

    def count(x) -> int:
        if isinstance(x, LoraArray):
            factors = 0 if frozen_only else count(x.a) + count(x.b)
            return count(x.weight) + factors
        if isinstance(x, Trainable):
            return 0 if frozen_only else count(x.array)
        if isinstance(x, QuantisedArray):
            return x.stored_bytes()
        return x.size * x.dtype.itemsize if eqx.is_array(x) else 0

    def is_leaf(x):
        return is_adapted(x) or isinstance(x, QuantisedArray)

    return sum(count(x) for x in jtu.tree_leaves(model, is_leaf=is_leaf))
