"""LoRA dropout: `x·w + s·b·a·drop(x)`, keyed by `set_dropout_key`."""

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


P = 0.25


def _lora(key, shape=(6, 5), **kwargs):
    k1, k2 = jr.split(key)
    w = jr.normal(k1, shape, jnp.float64)
    lora = ql.LoraArray(w, rank=3, alpha=5.0, key=k2, dropout=P, **kwargs)
    return nonzero_lora(lora, k2)


def _dense(lora, x, xa):
    """`x·wᵀ + s·(xa·aᵀ)·bᵀ` written out."""
    return x @ lora.weight.T + lora.scaling * (xa @ lora.a.T) @ lora.b.T


def test_dropout_masks_the_adapter_input_only(getkey):
    lora = ql.set_dropout_key(_lora(getkey()), getkey())
    x = jr.normal(getkey(), (5,), jnp.float64)
    keep = jr.bernoulli(lora.dropout_key, 1 - P, x.shape)
    xa = jnp.where(keep, x / (1 - P), 0.0)
    assert 0 < keep.sum() < keep.size  # the mask does drop something here
    f = quax.quaxify(lambda l, x: jnp.tanh(l @ x))
    assert_tree_allclose(f(lora, x), jnp.tanh(_dense(lora, x, xa)), rtol=1e-12)
    # The base term sees the undropped input.
    assert not jnp.allclose(f(lora, x), jnp.tanh(_dense(lora, xa, xa)))


def test_gradients_use_the_forward_mask(getkey):
    lora = ql.set_dropout_key(_lora(getkey()), getkey())
    x = jr.normal(getkey(), (5,), jnp.float64)
    keep = jr.bernoulli(lora.dropout_key, 1 - P, x.shape)

    def loss(a, b, x):
        l = eqx.tree_at(lambda l: (l.a, l.b), lora, (a, b))
        return jnp.sum(jnp.sin(quax.quaxify(lambda l, x: l @ x)(l, x)) ** 2)

    def loss_ref(a, b, x):
        l = eqx.tree_at(lambda l: (l.a, l.b), lora, (a, b))
        xa = jnp.where(keep, x / (1 - P), 0.0)
        return jnp.sum(jnp.sin(_dense(l, x, xa)) ** 2)

    args = (lora.a, lora.b, x)
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    assert_tree_allclose(grads, jax.grad(loss_ref, argnums=(0, 1, 2))(*args))
    # Forward mode sees the same mask.
    v = jnp.cos(x)
    assert_tree_allclose(
        jax.jvp(lambda x: loss(lora.a, lora.b, x), (x,), (v,)),
        jax.jvp(lambda x: loss_ref(lora.a, lora.b, x), (x,), (v,)),
    )


def test_mean_over_masks_is_the_undropped_output(getkey):
    lora = _lora(getkey(), shape=(4, 64))
    x = jr.normal(getkey(), (64,), jnp.float64)
    f = quax.quaxify(lambda l, x: l @ x)
    keys = jr.split(getkey(), 4000)
    outs = jax.vmap(lambda k: f(ql.set_dropout_key(lora, k), x))(keys)
    undropped = f(lora, x)
    # Each output is a sum of 64 independent terms: compare within 4 standard errors.
    sem = outs.std(axis=0) / jnp.sqrt(len(keys))
    assert jnp.all(jnp.abs(outs.mean(axis=0) - undropped) < 4 * sem)
    assert jnp.all(outs.std(axis=0) > 0)


def test_deterministic_and_off_without_a_key(getkey):
    lora = _lora(getkey())
    x = jr.normal(getkey(), (5,), jnp.float64)
    f = quax.quaxify(lambda l, x: l @ x)
    key = getkey()
    y1 = f(ql.set_dropout_key(lora, key), x)
    assert_tree_allclose(y1, f(ql.set_dropout_key(lora, key), x))
    assert not jnp.allclose(y1, f(ql.set_dropout_key(lora, getkey()), x))
    off = ql.set_dropout_key(ql.set_dropout_key(lora, key), None)
    assert off.dropout_key is None
    assert_tree_allclose(f(off, x), lora.merged() @ x, rtol=1e-12)
    # merge folds the update and ignores dropout.
    assert_tree_allclose(ql.merge(ql.set_dropout_key(lora, key)), lora.merged())


def test_conv_dropout(getkey):
    conv = eqx.nn.Conv1d(3, 4, 3, padding=1, key=getkey(), dtype=jnp.float64)
    model = ql.loraify(conv, rank=2, key=getkey(), where=eqx.nn.Conv, dropout=P)
    model = eqx.tree_at(lambda m: m.weight, model, nonzero_lora(model.weight, getkey()))
    model = ql.set_dropout_key(model, getkey())
    x = jr.normal(getkey(), (3, 7), jnp.float64)
    lora = model.weight
    keep = jr.bernoulli(lora.dropout_key, 1 - P, x.shape)
    xa = jnp.where(keep, x / (1 - P), 0.0)
    conv_ = lambda x, w: lax.conv_general_dilated(x[None], w, (1,), [(1, 1)])[0]
    delta = lora.merged() - lora.weight
    ref = conv_(x, lora.weight) + conv_(xa, delta) + conv.bias
    assert_tree_allclose(quax.quaxify(model)(x), ref, rtol=1e-10, atol=1e-12)


def test_scanned_stack_gets_one_key_per_layer(getkey):
    make = lambda k: eqx.nn.Linear(5, 5, key=k, dtype=jnp.float64)
    stack = eqx.filter_vmap(make)(jr.split(getkey(), 3))
    stack = ql.loraify(stack, rank=2, key=getkey(), dropout=P)
    b = 0.3 * jr.normal(getkey(), stack.weight.b.shape, jnp.float64)
    stack = ql.set_dropout_key(eqx.tree_at(lambda m: m.weight.b, stack, b), getkey())
    assert stack.weight.dropout_key.shape == (3,)
    x = jr.normal(getkey(), (5,), jnp.float64)
    params, static = eqx.partition(stack, eqx.is_array)

    def run(params, x):
        def body(x, p):
            return jnp.tanh(eqx.combine(p, static)(x)), None

        return lax.scan(body, x, params)[0]

    def run_ref(x):
        for i in range(3):
            layer = jax.tree.map(lambda v: v[i], params)
            l = layer.weight
            keep = jr.bernoulli(l.dropout_key, 1 - P, x.shape)
            xa = jnp.where(keep, x / (1 - P), 0.0)
            x = jnp.tanh(_dense(l, x, xa) + layer.bias)
        return x

    assert_tree_allclose(quax.quaxify(run)(params, x), run_ref(x), rtol=1e-10)


def test_bad_dropout(getkey):
    w = jnp.ones((3, 2))
    for p in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="`dropout` must be in"):
            ql.LoraArray(w, rank=1, key=getkey(), dropout=p)
