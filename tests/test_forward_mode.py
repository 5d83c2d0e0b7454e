"""Forward-mode and higher-order autodiff through adapted layers, against the merged
(dense) model: jvp, jacfwd, jacrev, hessian, linearize, vmap of jvp, and `grad` of a
loss that contains `jacfwd` of the model (a PINN residual)."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose, normal, random_arrays


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


TOL = dict(rtol=1e-9, atol=1e-9)


def _trained(model, key, scale=0.3):
    """Every `b` random, as after some training."""
    is_lora = lambda x: isinstance(x, ql.LoraArray)
    loras = [x for x in jax.tree.leaves(model, is_leaf=is_lora) if is_lora(x)]
    keys = iter(jr.split(key, len(loras)))
    perturb = lambda x: (
        eqx.tree_at(
            lambda l: l.b, x, scale * jr.normal(next(keys), x.b.shape, x.b.dtype)
        )
        if is_lora(x)
        else x
    )
    return jax.tree.map(perturb, model, is_leaf=is_lora)


class ConvNet(eqx.Module):
    conv: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.conv = eqx.nn.Conv1d(2, 4, 3, padding=1, key=k1, dtype=jnp.float64)
        self.head = eqx.nn.Linear(4 * 6, 3, key=k2, dtype=jnp.float64)

    def __call__(self, x):
        return self.head(jnp.tanh(self.conv(x.reshape(2, 6))).reshape(-1))


class Scanned(eqx.Module):
    layers: eqx.nn.Linear

    def __init__(self, key):
        make = lambda k: eqx.nn.Linear(12, 12, key=k, dtype=jnp.float64)
        self.layers = eqx.filter_vmap(make)(jr.split(key, 3))

    def __call__(self, x):
        params, static = eqx.partition(self.layers, eqx.is_array)

        def body(x, p):
            return jnp.tanh(eqx.combine(p, static)(x)), None

        return lax.scan(body, x, params)[0][:3]


def _mlp(key):
    return eqx.nn.MLP(12, 3, 16, 2, activation=jnp.tanh, key=key, dtype=jnp.float64)


MODELS = {"mlp": _mlp, "conv": ConvNet, "scan": Scanned}


@pytest.fixture(params=list(MODELS))
def pair(request, getkey):
    """A LoRA model (rank 3, trained `b`) and its merged dense twin. The model and
    its adapters are traced, not run, their arrays drawn by NumPy: no compilation
    per shape (see tests/helpers.py)."""
    make = MODELS[request.param]
    model = random_arrays(eqx.filter_eval_shape(make, jr.key(0)), getkey())
    adapt = lambda m: ql.loraify(m, rank=3, alpha=5.0, key=jr.key(0))
    adapters = ql.partition(eqx.filter_eval_shape(adapt, model))[0]
    lora = ql.with_adapters(model, random_arrays(adapters, getkey()))
    return lora, ql.merge(lora), normal(getkey(), (12,), jnp.float64)


def _f(model):
    return lambda x: jnp.sin(quax.quaxify(model)(x))


def test_jvp_and_linearize(pair, getkey):
    lora, dense, x = pair
    v = jr.normal(getkey(), x.shape, x.dtype)
    y, dy = jax.jvp(_f(lora), (x,), (v,))
    y_ref, dy_ref = jax.jvp(_f(dense), (x,), (v,))
    assert_tree_allclose((y, dy), (y_ref, dy_ref), **TOL)
    y, f_lin = jax.linearize(_f(lora), x)
    assert_tree_allclose((y, f_lin(v)), (y_ref, dy_ref), **TOL)


def test_jacfwd_jacrev_hessian(pair):
    lora, dense, x = pair
    jac_ref = jax.jacrev(_f(dense))(x)
    assert_tree_allclose(jax.jacfwd(_f(lora))(x), jac_ref, **TOL)
    assert_tree_allclose(jax.jacrev(_f(lora))(x), jac_ref, **TOL)
    scalar = lambda model: lambda x: jnp.sum(_f(model)(x) ** 2)
    assert_tree_allclose(
        jax.hessian(scalar(lora))(x), jax.hessian(scalar(dense))(x), **TOL
    )


def test_vmap_of_jvp(pair, getkey):
    lora, dense, x = pair
    vs = jr.normal(getkey(), (5, *x.shape), x.dtype)
    jvps = lambda model: jax.vmap(lambda v: jax.jvp(_f(model), (x,), (v,))[1])(vs)
    assert_tree_allclose(jvps(lora), jvps(dense), **TOL)


def test_jvp_with_respect_to_adapters(pair):
    # A tangent on the adapter factors, against the merged weight's tangent.
    lora, _, x = pair
    trainable, frozen = ql.partition(lora)
    tangent = jax.tree.map(jnp.cos, trainable)
    out = lambda t: _f(eqx.combine(t, frozen))(x)
    out_ref = lambda t: _f(ql.merge(eqx.combine(t, frozen)))(x)
    assert_tree_allclose(
        jax.jvp(out, (trainable,), (tangent,)),
        jax.jvp(out_ref, (trainable,), (tangent,)),
        **TOL,
    )


def test_grad_of_pinn_residual(pair):
    # A loss built from the model's input Jacobian (as a PINN residual is), then
    # differentiated with respect to the adapters: reverse over forward mode.
    lora, _, x = pair
    trainable, frozen = ql.partition(lora)

    def residual(merge):
        def loss(t):
            model = eqx.combine(t, frozen)
            model = ql.merge(model) if merge else model
            jac = jax.jacfwd(_f(model))(x)
            return jnp.sum(jnp.tanh(jac) ** 2) + jnp.sum(_f(model)(x) ** 2)

        return loss

    value, grads = jax.value_and_grad(residual(False))(trainable)
    value_ref, grads_ref = jax.value_and_grad(residual(True))(trainable)
    assert_tree_allclose((value, grads), (value_ref, grads_ref), **TOL)


def test_forward_mode_respects_stop_gradient(getkey):
    # With `stop_gradient=True` (the default) a tangent on the base weight is
    # ignored; with `stop_gradient=False` it is propagated.
    w = jr.normal(getkey(), (4, 3), jnp.float64)
    x = jr.normal(getkey(), (3,), jnp.float64)
    for stop in (True, False):
        lora = ql.LoraArray(w, rank=2, key=getkey(), stop_gradient=stop)
        lora = _trained(lora, getkey())
        dw = jr.normal(getkey(), w.shape, w.dtype)
        f = lambda w: quax.quaxify(lambda l: jnp.sin(l @ x))(
            eqx.tree_at(lambda l: l.weight, lora, w)
        )
        _, dy = jax.jvp(f, (w,), (dw,))
        expected = 0 * dy if stop else jnp.cos(lora.merged() @ x) * (dw @ x)
        assert_tree_allclose(dy, expected, **TOL)
