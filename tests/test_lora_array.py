import dataclasses
import math

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose, nonzero_lora


def test_shapes_and_init(getkey):
    w = jr.normal(getkey(), (6, 5), jnp.float32)
    lora = ql.LoraArray(w, rank=3, key=getkey())
    assert lora.a.shape == (3, 5) and lora.b.shape == (6, 3)
    assert lora.shape == (6, 5) and lora.dtype == jnp.float32
    assert np.all(lora.b == 0) and np.any(lora.a != 0)
    assert np.all(np.abs(lora.a) <= 1 / math.sqrt(5))
    assert lora.scaling == 1.0
    np.testing.assert_array_equal(lora.merged(), w)


def test_batch_axes_and_conv_shape(getkey):
    w = jr.normal(getkey(), (2, 8, 3, 3, 3), jnp.float32)
    lora = ql.LoraArray(w, rank=4, batch_ndim=1, key=getkey())
    assert lora.a.shape == (2, 4, 3, 3, 3) and lora.b.shape == (2, 8, 4)
    assert lora.batch_ndim == 1


@pytest.mark.parametrize(
    "alpha,rslora,expected", [(None, False, 1.0), (16, False, 4.0), (16, True, 8.0)]
)
def test_scaling(getkey, alpha, rslora, expected):
    lora = ql.LoraArray(
        jnp.ones((3, 3)), rank=4, alpha=alpha, rslora=rslora, key=getkey()
    )
    assert lora.scaling == expected
    lora = nonzero_lora(lora, getkey())
    expected_delta = expected * (lora.b @ lora.a)
    np.testing.assert_allclose(lora.delta(), expected_delta, rtol=1e-12)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, "2"])
def test_bad_rank(getkey, rank):
    with pytest.raises(ValueError, match="`rank` must be a positive int"):
        ql.LoraArray(jnp.ones((3, 3)), rank=rank, key=getkey())


def test_bad_weight(getkey):
    with pytest.raises(ValueError, match="at least 2 non-batch axes"):
        ql.LoraArray(jnp.ones(3), rank=1, key=getkey())
    with pytest.raises(ValueError, match="at least 2 non-batch axes"):
        ql.LoraArray(jnp.ones((3, 3)), rank=1, batch_ndim=1, key=getkey())
    with pytest.raises(ValueError, match="floating-point weight"):
        ql.LoraArray(jnp.ones((3, 3), jnp.int32), rank=1, key=getkey())
    with pytest.raises(ValueError, match="needs a `key`"):
        ql.LoraArray(jnp.ones((3, 3)), rank=1)


def test_explicit_factors(getkey):
    w = jnp.ones((4, 3))
    a, b = jnp.ones((2, 3)), jnp.ones((4, 2))
    lora = ql.LoraArray(w, a=a, b=b, alpha=4.0)
    assert lora.rank == 2 and lora.scaling == 2.0
    np.testing.assert_allclose(lora.merged(), w + 2.0 * b @ a)
    with pytest.raises(ValueError, match="factors do not match"):
        ql.LoraArray(w, a=jnp.ones((2, 4)), b=b)
    with pytest.raises(ValueError, match="factors do not match"):
        ql.LoraArray(w, a=a, b=jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="both `a` and `b`"):
        ql.LoraArray(w, a=a)
    with pytest.raises(ValueError, match="must be floating"):
        ql.LoraArray(w, a=a.astype(jnp.int32), b=b)


def test_adapter_dtype(getkey):
    w = jnp.ones((4, 3), jnp.bfloat16)
    lora = ql.LoraArray(w, rank=2, dtype=jnp.float32, key=getkey())
    assert lora.a.dtype == jnp.float32 and lora.dtype == jnp.bfloat16
    assert lora.merged().dtype == jnp.bfloat16


def test_stop_gradient(getkey):
    w = jr.normal(getkey(), (4, 3))
    x = jr.normal(getkey(), (3,))
    for stop, expect_zero in [(True, True), (False, False)]:
        lora = nonzero_lora(
            ql.LoraArray(w, rank=2, stop_gradient=stop, key=getkey()), getkey()
        )

        def loss(l):
            return jnp.sum(quax.quaxify(lambda l, x: l @ x)(l, x))

        g = jax.grad(loss)(lora)
        assert np.all(g.weight == 0) == expect_zero
        assert np.any(g.a != 0) and np.any(g.b != 0)


def test_materialise_refused(getkey):
    lora = ql.LoraArray(jnp.ones((3, 3)), rank=1, key=getkey())
    with pytest.raises(TypeError, match="Refusing to materialise"):
        lora.materialise()


def test_unsupported_primitive_error_names_it(getkey):
    lora = ql.LoraArray(jnp.ones((3, 3)), rank=1, key=getkey())
    with pytest.raises(TypeError, match="`exp`.*allow_materialise=True"):
        quax.quaxify(jnp.exp)(lora)


def test_allow_materialise_fallback(getkey):
    w = jr.normal(getkey(), (3, 3))
    lora = ql.LoraArray(w, rank=1, allow_materialise=True, key=getkey())
    lora = nonzero_lora(lora, getkey())
    out = quax.quaxify(jnp.exp)(lora)
    np.testing.assert_allclose(out, jnp.exp(lora.merged()), rtol=1e-12)


def test_transpose_stays_lora(getkey):
    lora = nonzero_lora(
        ql.LoraArray(jr.normal(getkey(), (5, 4)), rank=2, key=getkey()), getkey()
    )
    out = quax.quaxify(lambda l: l.T)(lora)
    assert isinstance(out, ql.LoraArray)
    assert out.a.shape == (2, 5) and out.b.shape == (4, 2)
    np.testing.assert_allclose(out.merged(), lora.merged().T, rtol=1e-12)


def test_transpose_batched_and_conv(getkey):
    lora = nonzero_lora(
        ql.LoraArray(
            jr.normal(getkey(), (2, 5, 4)), rank=2, batch_ndim=1, key=getkey()
        ),
        getkey(),
    )
    out = quax.quaxify(lambda l: jnp.swapaxes(l, 1, 2))(lora)
    assert isinstance(out, ql.LoraArray)
    np.testing.assert_allclose(
        out.merged(), jnp.swapaxes(lora.merged(), 1, 2), rtol=1e-12
    )
    conv = nonzero_lora(
        ql.LoraArray(jr.normal(getkey(), (6, 3, 2, 5)), rank=2, key=getkey()), getkey()
    )
    out = quax.quaxify(lambda l: jnp.transpose(l, (0, 1, 3, 2)))(conv)
    assert isinstance(out, ql.LoraArray)
    np.testing.assert_allclose(out.merged(), jnp.transpose(conv.merged(), (0, 1, 3, 2)))
    with pytest.raises(TypeError, match="`transpose`"):
        quax.quaxify(lambda l: jnp.transpose(l, (1, 0, 2, 3)))(conv)


def test_convert_element_type(getkey):
    lora = nonzero_lora(
        ql.LoraArray(jr.normal(getkey(), (5, 4), jnp.float32), rank=2, key=getkey()),
        getkey(),
    )
    out = quax.quaxify(lambda l: l.astype(jnp.bfloat16))(lora)
    assert isinstance(out, ql.LoraArray) and out.dtype == jnp.bfloat16
    assert out.a.dtype == jnp.float32
    x = jnp.ones((4,), jnp.bfloat16)
    y = quax.quaxify(lambda l, x: l.astype(jnp.bfloat16) @ x)(lora, x)
    assert y.dtype == jnp.bfloat16
    assert_tree_allclose(
        y, lora.merged().astype(jnp.bfloat16) @ x, rtol=5e-2, atol=5e-2
    )
    with pytest.raises(TypeError, match="`convert_element_type`"):
        quax.quaxify(lambda l: l.astype(jnp.int32))(lora)


def test_pytree_and_static(getkey):
    lora = ql.LoraArray(jnp.ones((3, 2)), rank=1, alpha=3.0, rslora=True, key=getkey())
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    assert len(leaves) == 3
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.alpha == 3.0 and again.rslora and again.rank == 1
    assert eqx.tree_equal(again, lora)
    # Under jit the static fields are part of the cache key, not traced.
    f = eqx.filter_jit(lambda l: l.scaling * l.a)
    np.testing.assert_allclose(f(lora), lora.scaling * lora.a)


def test_methods_and_properties_of_an_instance(getkey):
    # `LoraArray` reads its attributes without `eqx.Module`'s bound-method wrapping
    # (for trace time); its methods and properties must still work as usual,
    # eagerly and as functions handed to `jit`.
    w = jr.normal(getkey(), (4, 3))
    lora = ql.LoraArray(w, rank=2, alpha=4.0, allow_materialise=True, key=getkey())
    lora = nonzero_lora(lora, getkey())
    expect = lora.weight + 2.0 * lora.b @ lora.a
    np.testing.assert_allclose(lora.merged(), expect, rtol=1e-6)
    np.testing.assert_allclose(lora.materialise(), expect, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lora.merged)(), expect, rtol=1e-6)
    np.testing.assert_allclose(
        eqx.filter_jit(lora.delta)(), expect - lora.weight, rtol=1e-6, atol=1e-7
    )
    assert lora.scaling == 2.0 and lora.batch_ndim == 0 and not lora.use_dora
    assert lora.aval() == jax.core.ShapedArray((4, 3), lora.weight.dtype)
    # Fields stay frozen.
    with pytest.raises(dataclasses.FrozenInstanceError):
        lora.rank = 3  # pyright: ignore[reportAttributeAccessIssue]


@pytest.mark.x64
def test_checkpoint_rule(getkey):
    lora = nonzero_lora(
        ql.LoraArray(jr.normal(getkey(), (5, 4)), rank=2, key=getkey()), getkey()
    )
    x = jr.normal(getkey(), (4,))
    f = eqx.filter_checkpoint(lambda l, x: jnp.tanh(l @ x))
    out = quax.quaxify(f)(lora, x)
    np.testing.assert_allclose(out, jnp.tanh(lora.merged() @ x), rtol=1e-10)
    g = jax.grad(lambda l: jnp.sum(quax.quaxify(f)(l, x)))(lora)
    g_ref = jax.grad(
        lambda a, b: jnp.sum(jnp.tanh((lora.weight + lora.scaling * b @ a) @ x)),
        argnums=(0, 1),
    )(lora.a, lora.b)
    assert_tree_allclose((g.a, g.b), g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.x64
def test_lax_dot_general_direct(getkey):
    lora = nonzero_lora(
        ql.LoraArray(jr.normal(getkey(), (5, 4)), rank=2, key=getkey()), getkey()
    )
    x = jr.normal(getkey(), (3, 4))
    f = lambda l, x: lax.dot_general(x, l, (((1,), (1,)), ((), ())))
    np.testing.assert_allclose(
        quax.quaxify(f)(lora, x), f(lora.merged(), x), rtol=1e-10
    )
