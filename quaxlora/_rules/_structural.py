"""Primitives that rearrange a `LoraArray` without computing with it.

A result that is still of the form `w' + s·b'@a'` stays a `LoraArray`; anything else
falls through to `LoraArray.default` (the error, or the opt-in dense fallback).
"""

from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import quax
from jax._src.ad_checkpoint import remat_p
from jaxtyping import ArrayLike

from .._dora import replace
from .._lora_array import LoraArray
from ._contract import bind


def _replace(lora: LoraArray, **fields) -> LoraArray:
    names = list(fields)
    return eqx.tree_at(
        lambda l: [getattr(l, n) for n in names], lora, [fields[n] for n in names]
    )


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
        return _replace(operand, weight=w, a=a, b=b)
    # DoRA: the magnitude (and a carried norm) follow their axis; norms over the
    # other axes are unchanged by permuting them.
    move = lambda m: None if m is None else jnp.transpose(m, (*batch_perm, n))
    return replace(
        operand,
        weight=w,
        a=a,
        b=b,
        magnitude=move(operand.magnitude),
        norm=move(operand.norm),
        dora_axis=core.index(operand.dora_axis),
    )


@quax.register(lax.convert_element_type_p)
def _(operand: LoraArray, *, new_dtype, **params) -> Any:
    # The factors keep their dtype (e.g. f32 adapters on a bf16 base); rules cast
    # them to the weight's dtype at use.
    if not jnp.issubdtype(new_dtype, jnp.floating):
        return LoraArray.default(
            lax.convert_element_type_p, [operand], dict(new_dtype=new_dtype, **params)
        )
    if new_dtype == operand.dtype:
        return operand
    w = bind(
        lambda w: lax.convert_element_type_p.bind(w, new_dtype=new_dtype, **params),
        operand.weight,
    )
    return _replace(operand, weight=w)


@quax.register(lax.copy_p)
def _(operand: LoraArray) -> LoraArray:
    return operand


@quax.register(remat_p)
def _(*args: ArrayLike | quax.ArrayValue, jaxpr, **params) -> Any:
    # `eqx.filter_checkpoint` / `jax.checkpoint` around code that uses a `LoraArray`:
    # checkpoint a quaxified replay of the body, so the rules above run inside it.
    def body(*inner):
        return jax.core.eval_jaxpr(jaxpr, (), *inner)

    policy = params.get("policy")
    prevent_cse = params.get("prevent_cse", True)
    return jax.checkpoint(quax.quaxify(body), prevent_cse=prevent_cse, policy=policy)(
        *args
    )
