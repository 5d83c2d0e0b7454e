"""`reshape` of a `LoraArray` (quaxlora/_rules/_reshape.py), and the stacked
convolutions under `vmap` that need it."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose, nonzero_lora


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "shape, batch_ndim, dimensions, new_sizes, rank",
    [
        ((2, 4, 3, 5), 1, None, (8, 3, 5), 4),  # stack axis into `o`
        ((2, 4, 3, 5), 1, None, (2, 4, 15), 2),  # other axes merged
        ((2, 3, 4, 5), 1, (1, 0, 2, 3), (6, 4, 5), 4),  # stack axis into an `in`
        ((2, 3, 4, 5), 1, (1, 0, 2, 3), (3, 2, 20), 4),  # ... kept as its own axis
        ((2, 3, 4, 5), 2, None, (2, 12, 5), 6),  # second batch axis into `o`
        ((4, 3, 5), 0, None, (4, 15), 2),  # a conv kernel flattened
    ],
)
def test_reshape_keeps_lora_form(
    getkey, shape, batch_ndim, dimensions, new_sizes, rank
):
    w = jr.normal(getkey(), shape)
    lora = ql.LoraArray(w, rank=2, alpha=3.0, batch_ndim=batch_ndim, key=getkey())
    lora = nonzero_lora(lora, getkey())
    f = lambda w: lax.reshape(w, new_sizes, dimensions)
    out = quax.quaxify(f)(lora)
    assert isinstance(out, ql.LoraArray) and out.rank == rank
    assert out.scaling == pytest.approx(lora.scaling)
    assert_tree_allclose(out.merged(), f(lora.merged()), **TOL)
    # Gradients of a non-linear function of the reshaped array, through the factors.
    x = jr.normal(getkey(), new_sizes[-1:])
    loss = lambda l: jnp.sum(jnp.sin(quax.quaxify(lambda w: f(w) @ x)(l)))
    loss_ref = lambda l: jnp.sum(jnp.sin(f(l.merged()) @ x))
    grads = jax.jit(lambda l: (jax.grad(loss)(l), jax.grad(loss_ref)(l)))(lora)
    assert_tree_allclose(*grads, **TOL)


@pytest.mark.parametrize(
    "shape, batch_ndim, new_sizes",
    [
        ((2, 4, 3, 5), 1, (4, 30)),  # the stack axis behind `o`
        ((2, 3, 4, 5), 2, (2, 3, 20)),  # `o` merged with another axis
        ((4, 5), 0, (20,)),  # flattened
    ],
)
def test_reshape_without_lora_form(getkey, shape, batch_ndim, new_sizes):
    w = jr.normal(getkey(), shape)
    lora = ql.LoraArray(w, rank=2, batch_ndim=batch_ndim, key=getkey())
    f = quax.quaxify(lambda w: lax.reshape(w, new_sizes))
    with pytest.raises(TypeError, match="`reshape`"):
        f(lora)
    lora = ql.LoraArray(
        w, rank=2, batch_ndim=batch_ndim, allow_materialise=True, key=getkey()
    )
    assert_tree_allclose(f(lora), lax.reshape(lora.merged(), new_sizes), **TOL)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("transpose", [False, True])
def test_vmap_over_stacked_convs(getkey, groups, transpose):
    # quaxify outside a vmap over a stack of convolutions: vmap folds the stack axis
    # into the kernel's features with a `reshape`.
    cls = eqx.nn.ConvTranspose2d if transpose else eqx.nn.Conv2d
    make = lambda k: cls(4, 6, 3, groups=groups, key=k, dtype=jnp.float64)
    convs = eqx.filter_vmap(make)(jr.split(getkey(), 3))
    lora = ql.loraify(convs, rank=2, alpha=4.0, key=getkey(), where=cls)
    lora = eqx.tree_at(lambda m: m.weight, lora, nonzero_lora(lora.weight, getkey()))
    xs = jr.normal(getkey(), (3, 4, 7, 7), jnp.float64)
    call = eqx.filter_vmap(lambda m, x: m(x))
    values = eqx.filter_jit(
        lambda l, x: (quax.quaxify(call)(l, x), call(ql.merge(l), x))
    )
    assert_tree_allclose(*values(lora, xs), **TOL)
    trainable, frozen = ql.partition(lora)

    def loss(t, x):
        return jnp.sum(jnp.tanh(quax.quaxify(call)(eqx.combine(t, frozen), x)) ** 2)

    def loss_ref(t, x):
        return jnp.sum(jnp.tanh(call(ql.merge(eqx.combine(t, frozen)), x)) ** 2)

    grads = jax.jit(
        lambda t, x: (jax.grad(loss, (0, 1))(t, x), jax.grad(loss_ref, (0, 1))(t, x))
    )
    assert_tree_allclose(*grads(trainable, xs), **TOL)
