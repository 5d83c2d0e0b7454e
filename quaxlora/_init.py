"""Initialisations of the LoRA factors: PEFT's `init_lora_weights` choices.

Each returns `(weight, a, b)` for a weight of shape `(*batch, out, *rest)`. The
"default" and "gaussian" ones keep the weight and start `b` at zero. PiSSA and OLoRA
start the adapter as a rank-`r` part of the weight itself and replace the frozen
weight by the residual `w - s·b@a`, so the model's output is unchanged at init —
and the adapter then only makes sense on that residual base.
"""

import math
from typing import Any, Literal

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray

from ._lora_array import at_least_float32, is_value


Init = Literal["default", "gaussian", "pissa", "olora"]
INITS = ("default", "gaussian", "pissa", "olora")
# Initialisations whose adapter belongs to a residual base weight, not the original.
RESIDUAL = ("pissa", "olora")


def _matrix(w: Array, batch_ndim: int) -> Array:
    """`w` as `(*batch, out, prod(rest))` in float32 (or wider)."""
    dt = at_least_float32(w.dtype)
    return w.reshape(w.shape[: batch_ndim + 1] + (-1,)).astype(dt)


def _residual(w, a, b, scaling, batch_ndim) -> tuple[Array, Array, Array]:
    """`(w - s·b@a, a, b)`, the factors in `a`'s final dtype and shape."""
    m = _matrix(w, batch_ndim)
    a2 = a.reshape(a.shape[: batch_ndim + 1] + (-1,)).astype(m.dtype)
    delta = scaling * (b.astype(m.dtype) @ a2)
    return (m - delta).reshape(w.shape).astype(w.dtype), a, b


def init_factors(
    init: Init,
    weight: Any,
    *,
    rank: int,
    scaling: float,
    batch_ndim: int,
    dtype: Any,
    key: PRNGKeyArray,
) -> tuple[Any, Array | None, Array | None]:
    """`(weight, a, b)` for `LoraArray`; `a = b = None` for the default init (which
    `LoraArray` does itself)."""
    if init not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, got {init!r}.")
    if init == "default":
        return weight, None, None
    shape = tuple(weight.shape)
    batch, out, rest = shape[:batch_ndim], shape[batch_ndim], shape[batch_ndim + 1 :]
    dtype = weight.dtype if dtype is None else dtype
    if init == "gaussian":  # PEFT: a ~ N(0, (1/r)²), b = 0
        a = jr.normal(key, (*batch, rank, *rest), dtype) / rank
        return weight, a, jnp.zeros((*batch, out, rank), dtype)
    if is_value(weight):
        raise ValueError(
            f"`init={init!r}` needs a plain floating base weight; initialise on the "
            "unquantised model, then quantise the residual base weight."
        )
    if rank > min(out, math.prod(rest)):
        raise ValueError(
            f"`init={init!r}` needs `rank <= min(out, in)` = "
            f"{min(out, math.prod(rest))}, got {rank}."
        )
    m = _matrix(weight, batch_ndim)
    if init == "pissa":
        # PEFT: w = U·S·Vh; a = sqrt(S_r / s)·Vh_r, b = U_r·sqrt(S_r / s).
        u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
        root = jnp.sqrt(sv[..., :rank] / scaling)
        a = root[..., :, None] * vh[..., :rank, :]
        b = u[..., :, :rank] * root[..., None, :]
    else:
        # OLoRA (PEFT): w = Q·R; a = R_r, b = Q_r.
        q, r = jnp.linalg.qr(m)
        a, b = r[..., :rank, :], q[..., :, :rank]
    a = a.reshape((*batch, rank, *rest)).astype(dtype)
    return _residual(weight, a, b.astype(dtype), scaling, batch_ndim)


def residual_to_lora(model: Any, initial: Any) -> Any:
    """Turn PiSSA / OLoRA adapters into plain LoRA adapters on the original weights.

    A PiSSA or OLoRA adapter is trained on the residual base `w - s·b₀@a₀` that
    `loraify` made. This rewrites each such target exactly as PEFT's
    `path_initial_model_for_weight_conversion` does: the base becomes the original
    weight `w = (w - s·b₀@a₀) + s·b₀@a₀` again, and the adapter the rank-`2r` LoRA
    `s·b@a - s·b₀@a₀` (`a' = [a; a₀]`, `b' = [s·b, -s·b₀]`, scaling 1), so the model
    computes the same function (up to rounding) while its adapter now fits the
    original base — to save and share with `save_adapters` / `save_peft`. A DoRA
    magnitude is kept (the direction `V` is unchanged). Other targets are left as
    they are.

    **Arguments:**

    - `model`: the trained model (or any model with the adapters).
    - `initial`: the model as `loraify` returned it, or its adapters
        (`quaxlora.partition(initial)[0]`): the initial factors `a₀`, `b₀`.

    **Returns:**

    `model` on the original base weights, with plain LoRA adapters of twice the rank
    where it had PiSSA / OLoRA ones.
    """
    from ._lora_array import dense_weight, LoraArray, replace_fields
    from ._paths import adapted_leaves, model_leaves, replace_leaves

    start = adapted_leaves(initial)
    new = {}
    for p, x in model_leaves(model).items():
        if not isinstance(x, LoraArray) or x.init not in RESIDUAL:
            continue
        x0 = start.get(p)
        if not isinstance(x0, LoraArray) or x0.a.shape != x.a.shape:
            raise ValueError(f"`initial` has no initial adapter of `{p}`'s shape.")
        n = x.batch_ndim
        w = dense_weight(x.weight)
        d0 = _residual(w, x0.a, -x0.b, x0.scaling, n)[0]  # w + s·b₀@a₀
        dtype = x.a.dtype
        a = jnp.concatenate([x.a, x0.a.astype(dtype)], axis=n)
        b = jnp.concatenate(
            [x.scaling * x.b, -x0.scaling * x0.b.astype(dtype)], axis=n + 1
        ).astype(dtype)
        new[p] = replace_fields(
            x,
            weight=d0,
            a=a,
            b=b,
            rank=2 * x.rank,
            alpha=float(2 * x.rank),
            rslora=False,
            norm=None,
            init="default",
        )
    return replace_leaves(model, new)
