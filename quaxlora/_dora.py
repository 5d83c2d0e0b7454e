"""DoRA in factored form: the norms of `V = w + s·b⊗a` without forming `V`.

A DoRA `LoraArray` stands for `W = diag(m / ‖V‖) · V` along one axis `d` of the
weight (`dora_axis`; the output axis of a linear or convolution weight, the feature
axis of an embedding table), the norm taken over every other non-batch axis and
treated as a constant in the backward (`stop_gradient`, as the DoRA paper and PEFT
do). Since `W` is `V` rescaled along one axis, every rule computes with `V` in
factored form and rescales the operand or the result along that axis: the output
where `d` survives in it, the other operand where `d` is contracted.

The squared norms are, with `o` the output axis and `R` the others,

    d = o:  ‖V_o‖² = ‖w_o‖² + 2s·Σ_k b_ok (a·w_oᵀ)_k + s²·b_o (a·aᵀ) b_oᵀ
    d ∈ R:  ‖V_d‖² = ‖w_d‖² + 2s·Σ_k,R\\d a_k (bᵀ·w)_k + s²·Σ_k,R\\d a_k ((bᵀ·b)·a)_k

— a rank-sized product with `w` (`a·wᵀ` or `bᵀ·w`, the factor's size), a rank ×
rank Gram matrix, and one elementwise pass over `w` for `‖w_d‖²` that XLA fuses into
its reduction: no array of the weight's size is formed.
"""

from typing import Any

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from ._lora_array import (
    at_least_float32,
    dense_weight,
    is_value,
    LoraArray,
    replace_fields,
)


def _dot(x, xl, y, yl, out):
    from ._rules._contract import contract, dot

    if is_value(x) or is_value(y):  # a quantised base: dispatch again
        return contract(x, xl, y, yl, out)
    return dot(x, xl, y, yl, out)


def dora_norm(lora: LoraArray) -> Array:
    """`‖w + s·b⊗a‖` along `lora.dora_axis`, shape `(*batch, size)`, in float32 (or
    wider), through `stop_gradient`. A norm carried by the array (a slice of a DoRA
    array, whose norm was taken before slicing) is returned as it is."""
    if lora.norm is not None:
        return lora.norm
    n, d = lora.batch_ndim, lora.dora_axis
    dt = at_least_float32(lora.dtype)
    w = lax.stop_gradient(lora.weight)
    a = lax.stop_gradient(lora.a).astype(dt)
    b = lax.stop_gradient(lora.b).astype(dt)
    batch = [f"B{i}" for i in range(n)]
    rest = [f"R{i}" for i in range(lora.ndim - n - 1)]
    wl, al, bl = batch + ["o"] + rest, batch + ["k"] + rest, batch + ["o", "k"]
    keep = batch + [wl[n + d]]
    axes = tuple(i for i, l in enumerate(wl) if l not in keep)
    ww = jnp.sum(jnp.square(dense_weight(w).astype(dt)), axis=axes)
    wc = w if is_value(w) else w.astype(dt)
    a2 = batch + ["j"] + rest
    if d == 0:
        p = _dot(wc, wl, a, al, bl).astype(dt)  # a·wᵀ: (*batch, o, k)
        gram = _dot(a, al, a, a2, batch + ["k", "j"])
        bg = _dot(b, bl, gram, batch + ["k", "j"], batch + ["o", "j"])
        cross = jnp.sum(b * p, axis=-1)
        quad = jnp.sum(b * bg, axis=-1)
    else:
        p = _dot(wc, wl, b, bl, al).astype(dt)  # bᵀ·w: (*batch, k, *rest)
        gram = _dot(b, bl, b, batch + ["o", "j"], batch + ["k", "j"])
        ga = _dot(gram, batch + ["k", "j"], a, a2, al)
        summed = tuple(i for i, l in enumerate(al) if l not in keep)
        cross = jnp.sum(a * p, axis=summed)
        quad = jnp.sum(a * ga, axis=summed)
    s = lora.scaling
    sq = ww + 2 * s * cross + s * s * quad
    return lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0)))


def dora_scale(lora: LoraArray) -> Array:
    """`m / ‖V‖` along `lora.dora_axis`, shape `(*batch, size)`: what `V` is
    multiplied by along that axis."""
    assert lora.magnitude is not None
    norm = dora_norm(lora)
    return lora.magnitude.astype(norm.dtype) / norm


def scale_along(x: Any, xl: list[str], scale: Array, sl: list[str]) -> Any:
    """`x` (labelled `xl`) times `scale` (labelled `sl`, a subset of `xl`),
    broadcast along the other axes."""
    from ._rules._contract import bind

    order = [l for l in xl if l in sl]
    scale = jnp.transpose(scale, [sl.index(l) for l in order])
    shape = [x.shape[i] if l in sl else 1 for i, l in enumerate(xl)]
    scale = scale.reshape(shape)
    return bind(lambda x: x * scale.astype(x.dtype), x)


def scale_labels(lora: LoraArray, wl: list[str]) -> list[str]:
    """Labels of `dora_scale(lora)`, given the weight's labels `wl`."""
    n = lora.batch_ndim
    return list(wl[:n]) + [wl[n + lora.dora_axis]]


def with_norm(lora: LoraArray) -> LoraArray:
    """`lora` carrying its DoRA norm, so that a slice of it keeps the norms of the
    whole array (a no-op without DoRA)."""
    if lora.magnitude is None or lora.norm is not None:
        return lora
    return replace_fields(lora, norm=dora_norm(lora))
