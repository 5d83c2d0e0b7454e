"""Adapter-only training with plain Equinox + optax, merge and unloraify."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose
from .test_examples import _load


def _size(tree):
    return sum(x.size for x in jax.tree_util.tree_leaves(tree) if eqx.is_array(x))


def _adapter_size(model):
    loras = [
        x
        for x in jax.tree_util.tree_leaves(
            model, is_leaf=lambda x: isinstance(x, ql.LoraArray)
        )
        if isinstance(x, ql.LoraArray)
    ]
    return sum(l.a.size + l.b.size for l in loras)


def _frozen_leaves(model):
    _, frozen = ql.partition(model)
    return [x for x in jax.tree_util.tree_leaves(frozen) if eqx.is_array(x)]


def test_adapter_only_training_on_digits(getkey):
    # The example imports scikit-learn: loaded here, not when the suite is collected.
    x_train, x_test, y_train, y_test = _load("digits").load_data()
    x_train, y_train = jnp.asarray(x_train, jnp.float32), jnp.asarray(y_train)
    base = eqx.nn.MLP(
        64, 10, 32, 2, activation=jax.nn.gelu, key=getkey(), dtype=jnp.float32
    )
    model = ql.loraify(base, rank=4, key=getkey())
    trainable, frozen = ql.partition(model)
    opt = optax.adam(1e-2)
    state = opt.init(trainable)

    def loss(trainable, frozen, x, y):
        m = quax.quaxify(eqx.combine(trainable, frozen))
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(x), y).mean()

    @eqx.filter_jit
    def step(trainable, state, x, y):
        value, grads = eqx.filter_value_and_grad(loss)(trainable, frozen, x, y)
        # optax mixes Python floats with its int32 step count: standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state, trainable)
        return eqx.apply_updates(trainable, updates), state, value, grads

    adapters = _adapter_size(model)
    losses = []
    for i in range(60):
        sl = slice((i * 64) % 1200, (i * 64) % 1200 + 64)
        trainable, state, value, grads = step(
            trainable, state, x_train[sl], y_train[sl]
        )
        losses.append(float(value))
    # Gradients and optimiser state hold the adapters and nothing else.
    assert _size(grads) == adapters
    assert _size(state) == 2 * adapters + 1  # Adam's mu, nu and its step count
    assert max(x.size for x in jax.tree_util.tree_leaves(grads)) < 32 * 32
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    trained = eqx.combine(trainable, frozen)
    # Frozen weights are bit-identical; the adapters moved.
    for before, after in zip(_frozen_leaves(model), _frozen_leaves(trained)):
        np.testing.assert_array_equal(before, after)
    assert not np.allclose(trained.layers[0].weight.b, 0)


@pytest.mark.x64
def test_merge_equals_factored_and_unloraify(getkey):
    base = eqx.nn.MLP(6, 4, 16, 2, key=getkey())
    model = ql.loraify(base, rank=3, alpha=6, modules_to_save="layers.2", key=getkey())
    # Simulate training: move every trainable leaf.
    trainable, frozen = ql.partition(model)
    trainable = jax.tree_util.tree_map(
        lambda x: x + 0.1 * jr.normal(getkey(), x.shape, x.dtype), trainable
    )
    model = eqx.combine(trainable, frozen)
    x = jr.normal(getkey(), (9, 6))
    merged = ql.merge(model)
    assert not any(
        isinstance(l, quax.Value)
        for l in jax.tree_util.tree_leaves(
            merged, is_leaf=lambda v: isinstance(v, quax.Value)
        )
    )
    assert_tree_allclose(
        jax.vmap(merged)(x), jax.vmap(quax.quaxify(model))(x), rtol=1e-10, atol=1e-10
    )
    assert merged.layers[0].weight.dtype == base.layers[0].weight.dtype
    # unloraify: the base leaves back, unchanged (the saved module was trained).
    back = ql.unloraify(model)
    for i in (0, 1):
        assert back.layers[i].weight is base.layers[i].weight
        np.testing.assert_array_equal(back.layers[i].bias, base.layers[i].bias)
    assert back.layers[2].weight.shape == base.layers[2].weight.shape
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(base)


def test_unloraify_roundtrip(getkey):
    base = eqx.nn.MLP(6, 4, 16, 2, key=getkey())
    back = ql.unloraify(ql.loraify(base, rank=3, bias="all", key=getkey()))
    assert eqx.tree_equal(back, base)


def test_trainable_spec_misuse_is_loud(getkey):
    # `eqx.partition(model, ql.trainable_spec)` would call it per leaf and, answering
    # "not trained" for every array, silently train nothing.
    model = ql.loraify(eqx.nn.Linear(3, 4, key=getkey()), rank=2, key=getkey())
    with pytest.raises(TypeError, match="takes the whole model"):
        eqx.partition(model, ql.trainable_spec)
    with pytest.raises(AttributeError, match="now `quaxlora.trainable_spec`"):
        ql.is_trainable  # noqa: B018
    trainable, _ = eqx.partition(model, ql.trainable_spec(model))
    assert trainable.weight.a is not None and trainable.weight.b is not None
