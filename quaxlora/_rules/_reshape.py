"""`reshape` of a `LoraArray`: merging axes, batch axes included.

A reshape that merges runs of adjacent axes (after the optional permutation
`dimensions`) keeps the LoRA form when the output axis `o` stays first among the
non-batch axes. Merging other axes among themselves reshapes `a`. Merging a batch
axis `β` into a matrix axis is still of LoRA form, at rank `|β|·r`, because the
batch axes make the update block-diagonal:

```
w[β, o, R] + s·Σₖ b[β, o, k]·a[β, k, R]
    = w'[(β, o), R] + s·Σ_(β', k) b'[(β, o), (β', k)]·a'[(β', k), R]
```

with `b'[(β, o), (β', k)] = δ(β, β')·b[β, o, k]` and `a'[(β', k), R] = a[β', k, R]` —
and symmetrically, merging `β` into another axis puts the `δ` into `a'`. This is what
`vmap` of a convolution over a stack of kernels does (`quax.quaxify` outside the
`vmap`): it folds the stack axis into the kernel's output features and runs one grouped
convolution, which the convolution rule then computes from the factors.
"""

import math
from typing import Any

import jax.lax as lax
import jax.numpy as jnp
import quax

from .._lora_array import LoraArray
from ._contract import bind


def _groups(shape: tuple, new_sizes: tuple) -> list[list[int]] | None:
    """Split the axes of `shape` into runs whose sizes multiply to `new_sizes` (a
    reshape that only merges axes), or `None`."""
    groups, i = [], 0
    for size in new_sizes:
        if i == len(shape):
            return None
        group, prod = [i], shape[i]
        i += 1
        while prod < size and i < len(shape):
            group.append(i)
            prod *= shape[i]
            i += 1
        if prod != size:
            return None
        groups.append(group)
    if i != len(shape):
        if not groups or any(shape[j] != 1 for j in range(i, len(shape))):
            return None
        groups[-1] += list(range(i, len(shape)))
    return groups


def _expand(x, labels, deltas, out, sizes):
    """`x` (axes `labels`) times `δ(β, β')` for each pair in `deltas`, as the axes
    `out`."""
    args = [x, labels]
    for d, p in deltas:
        args += [jnp.eye(sizes[d], dtype=x.dtype), [d, p]]
    return jnp.einsum(*args, out)


@quax.register(lax.reshape_p)
def _(operand: LoraArray, *, new_sizes, dimensions, **params) -> Any:
    fallback = lambda: LoraArray.default(
        lax.reshape_p,
        [operand],
        dict(new_sizes=new_sizes, dimensions=dimensions, **params),
    )
    if operand.magnitude is not None:
        # DoRA's norms are per output unit of each layer; a reshape that merges
        # layers has no factored DoRA form here.
        return fallback()
    n, ndim = operand.batch_ndim, operand.ndim
    # Axis labels: batch axes 0..n-1, the output axis n, the rest n+1..; the rank
    # labels of merged batch axes are ndim + i, that of the rank axis 2 * ndim.
    order = list(range(ndim)) if dimensions is None else list(dimensions)
    shape = tuple(operand.shape[i] for i in order)
    runs = _groups(shape, tuple(new_sizes))
    if runs is None:
        return fallback()
    groups = [[order[i] for i in run] for run in runs]
    # Batch axes that stay batch axes: leading, one per group.
    kept = []
    for g in groups:
        if len(g) != 1 or g[0] >= n:
            break
        kept.append(g[0])
    merged = [i for i in range(n) if i not in kept]
    out_at = next(j for j, g in enumerate(groups) if n in g)
    if out_at != len(kept) or any(i > n for i in groups[out_at]):
        return fallback()  # `o` behind or merged with another matrix axis
    if out_at == len(groups) - 1:
        return fallback()  # no axis left besides the output axis
    sizes = {i: operand.shape[i] for i in range(ndim)}
    sizes.update({ndim + i: operand.shape[i] for i in merged})
    rank_labels = [ndim + i for i in merged] + [2 * ndim]
    out_group = groups[out_at]
    rest_groups = groups[out_at + 1 :]

    # b': axes (kept, out group, new rank); δ for batch axes merged into `o`.
    b_labels = [i if i in kept + out_group else ndim + i for i in range(n)]
    b_labels += [n, 2 * ndim]
    b_deltas = [(i, ndim + i) for i in merged if i in out_group]
    b_out = kept + out_group + rank_labels
    b = _expand(operand.b, b_labels, b_deltas, b_out, sizes)
    # a': axes (kept, new rank, rest groups); δ for batch axes merged into them.
    rest_labels = [i for g in rest_groups for i in g]
    a_labels = [i if i in kept + rest_labels else ndim + i for i in range(n)]
    a_labels += [2 * ndim] + list(range(n + 1, ndim))
    a_deltas = [(i, ndim + i) for i in merged if i in rest_labels]
    a_out = kept + rank_labels + rest_labels
    a = _expand(operand.a, a_labels, a_deltas, a_out, sizes)

    rank = operand.rank * math.prod(operand.shape[i] for i in merged)
    batch = tuple(new_sizes[: len(kept)])
    b = b.reshape(*batch, new_sizes[len(kept)], rank)
    a = a.reshape(*batch, rank, *new_sizes[len(kept) + 1 :])
    w = bind(
        lambda w: lax.reshape_p.bind(
            w, new_sizes=new_sizes, dimensions=dimensions, **params
        ),
        operand.weight,
    )
    # The same scale at the new rank.
    alpha = operand.scaling * (math.sqrt(rank) if operand.rslora else rank)
    return LoraArray(
        w,
        a=a,
        b=b,
        rank=rank,
        alpha=alpha,
        rslora=operand.rslora,
        stop_gradient=operand.stop_gradient,
        allow_materialise=operand.allow_materialise,
        # A per-layer key stack no longer matches once layers are merged:
        # `adapter_input` then refuses it, rather than dropping dropout silently.
        dropout=operand.dropout,
        dropout_key=operand.dropout_key,
        batch_ndim=len(kept),
    )
