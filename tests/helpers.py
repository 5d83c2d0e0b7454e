import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


TOLS = {
    jnp.dtype(jnp.float64): dict(rtol=1e-10, atol=1e-10),
    jnp.dtype(jnp.float32): dict(rtol=1e-4, atol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=5e-2, atol=5e-2),
}


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """Same structure, shapes and dtypes, and values close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)):
        if eqx.is_array(a) != eqx.is_array(b):
            return False
        if eqx.is_array(a):
            if a.shape != b.shape or a.dtype != b.dtype:
                return False
            a32 = np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a)
            b32 = np.asarray(b.astype(jnp.float32) if b.dtype == jnp.bfloat16 else b)
            if not np.allclose(a32, b32, rtol=rtol, atol=atol):
                return False
        elif a != b:
            return False
    return True


def assert_tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    assert tree_allclose(x, y, rtol=rtol, atol=atol), (x, y)


def nonzero_lora(lora, key, scale=0.5):
    """The same `LoraArray` with a random (non-zero) `b`, so the update matters."""
    import jax.random as jr

    b = scale * jr.normal(key, lora.b.shape, lora.b.dtype)
    return eqx.tree_at(lambda l: l.b, lora, b)
