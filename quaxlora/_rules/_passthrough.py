"""Primitives that pass a `LoraArray` through: a floating dtype conversion (of `w`
only), `copy`, and `remat` (`jax.checkpoint`, whose body is re-traced under quax)."""

from typing import Any

import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import quax
from jax._src.ad_checkpoint import remat_p
from jaxtyping import ArrayLike

from .._lora_array import LoraArray, replace_fields
from ._contract import bind


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
    return replace_fields(operand, weight=w)


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
