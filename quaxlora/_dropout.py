"""Keys for LoRA dropout: quax rules receive no PRNG key, so the model holds one."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray, PyTree

from ._lora_array import LoraArray


def _is_lora(x) -> bool:
    return isinstance(x, LoraArray)


def set_dropout_key(model: PyTree, key: PRNGKeyArray | None) -> PyTree:
    """Give every `LoraArray` of `model` its own LoRA-dropout key, derived from `key`
    — or, with `key=None`, remove them, which turns dropout off (inference).

    Dropout (`quaxlora.loraify(..., dropout=p)`) is applied only while keys are set.
    A training step sets a fresh key each step, one line before running the model:

    ```python
    model = ql.set_dropout_key(eqx.combine(trainable, frozen), key)
    ```

    Each layer gets `jr.fold_in(key, i)`; a layer stack (`batch_ndim > 0`, run with
    `lax.scan`) gets one key per layer. The mask has the shape of the adapted layer's
    input as the rule sees it: under `jax.vmap(model)`, a single key gives every
    example the same mask; for independent masks, set the key inside the vmapped
    function from per-example keys, as with `eqx.nn.Dropout`:

    ```python
    keys = jr.split(key, len(xs))
    run = lambda x, k: quax.quaxify(ql.set_dropout_key(model, k))(x)
    ys = jax.vmap(run)(xs, keys)
    ```

    **Arguments:**

    - `model`: a model with `LoraArray`s.
    - `key`: a PRNG key, or `None` to remove the keys.

    **Returns:**

    The model with each `LoraArray`'s `dropout_key` replaced.
    """
    loras = [x for x in jtu.tree_leaves(model, is_leaf=_is_lora) if _is_lora(x)]
    if key is None:
        keys = [None] * len(loras)
    else:
        raw = not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        key = jr.wrap_key_data(key) if raw else key
        keys = []
        for i, lora in enumerate(loras):
            k = jr.fold_in(key, i)
            batch = lora.b.shape[: lora.batch_ndim]
            if batch:
                k = jr.split(k, math.prod(batch)).reshape(batch)
            keys.append(k)
    it = iter(keys)

    def replace(x):
        if not _is_lora(x):
            return x
        return eqx.tree_at(
            lambda l: l.dropout_key, x, next(it), is_leaf=lambda v: v is None
        )

    return jtu.tree_map(replace, model, is_leaf=_is_lora)
