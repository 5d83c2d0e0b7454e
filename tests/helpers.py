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
            # Converted on the host (an eager `astype` compiles per shape).
            a32 = np.asarray(a)
            b32 = np.asarray(b)
            if a.dtype == jnp.bfloat16:
                a32, b32 = a32.astype(np.float32), b32.astype(np.float32)
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


# Random test data drawn by NumPy and put on the device: no compilation. Each eager
# `jr.normal` (or `jr.split`, `jr.uniform`) of a new shape compiles its own threefry
# program, about 0.15 s at the suite's XLA flags, and the tests draw hundreds of
# shapes; NumPy draws any shape for free. Seeded from a JAX key, so deterministic.


def np_rng(key) -> np.random.Generator:
    """A NumPy generator seeded from a JAX PRNG key (typed or raw) or an int."""
    import jax
    import jax.random as jr

    if isinstance(key, int):
        return np.random.default_rng(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jr.key_data(key)
    return np.random.default_rng(np.asarray(key).ravel().tolist())


def device(x, dtype):
    """A NumPy array on the device as `dtype` (converted on the host)."""
    import jax

    return jax.device_put(np.asarray(x, jnp.dtype(dtype)))


def normal(key, shape, dtype=None, scale=1.0):
    """`scale` times standard normal samples of `shape` and `dtype` (see above); the
    default dtype is `jr.normal`'s (float64 with 64-bit types on, else float32)."""
    import jax

    if dtype is None:
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    rng = key if isinstance(key, np.random.Generator) else np_rng(key)
    return device(scale * rng.standard_normal(shape), dtype)


def random_lora(weight, *, rank, key, scale=0.5, batch_ndim=0, dtype=None, **kwargs):
    """A `LoraArray` over `weight` with random factors drawn by NumPy (see above):
    `a` as the default initialisation draws it, U(±1/sqrt(fan_in)), and `b` random
    (non-zero, as `nonzero_lora` makes it), `scale · N(0, 1)`."""
    import quaxlora as ql

    rng = key if isinstance(key, np.random.Generator) else np_rng(key)
    dtype = weight.dtype if dtype is None else dtype
    batch = weight.shape[:batch_ndim]
    out, *rest = weight.shape[batch_ndim:]
    bound = 1 / np.sqrt(np.prod(rest))
    a = rng.uniform(-bound, bound, (*batch, rank, *rest))
    b = scale * rng.standard_normal((*batch, out, rank))
    return ql.LoraArray(
        weight,
        a=device(a, dtype),
        b=device(b, dtype),
        batch_ndim=batch_ndim,
        **kwargs,
    )


def random_arrays(tree, key, scale=0.3):
    """`tree` with every array leaf (or `jax.ShapeDtypeStruct`, as
    `eqx.filter_eval_shape` leaves them) replaced by `scale · N(0, 1)` drawn by NumPy
    (see above). With `filter_eval_shape` of a builder (a layer, `loraify` of a
    model), the builder's structure and static fields with no compilation at all."""
    import jax
    import jax.tree_util as jtu

    rng = key if isinstance(key, np.random.Generator) else np_rng(key)

    def fill(x):
        if not isinstance(x, (jax.ShapeDtypeStruct, jax.Array)):
            return x
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise ValueError(f"cannot fill a {x.dtype} array")
        return normal(rng, x.shape, x.dtype, scale)

    return jtu.tree_map(fill, tree)
