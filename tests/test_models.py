"""Whole Equinox architectures, loraified: unchanged at init, factored == merged after
training, and only the adapters (and `modules_to_save`) change."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose, normal, np_rng, random_arrays
from .models import GPT, ResNet, ViT


TOL = dict(rtol=2e-4, atol=2e-5)


# The models' arrays and the inputs are drawn by NumPy (tests/helpers.py): building
# a model eagerly compiles each of its dozens of random draws (about 3 s in all).


def _build(cls, key):
    """`cls(key=key)` with its arrays drawn by NumPy: no compilation."""
    return random_arrays(eqx.filter_eval_shape(cls, key=key), key)


def _split3(key):
    # Indexed rather than iterated (see `getkey` in tests/conftest.py).
    keys = jr.split(key, 3)
    return keys[0], keys[1], keys[2]


def _vit(key):
    k1, k2, k3 = _split3(key)
    model = _build(ViT, k1)
    lora = ql.loraify(
        model,
        rank={"patch": 2, ".*": 4},
        key=k2,
        where=(eqx.nn.Linear, eqx.nn.Conv),
        exclude="head",
        modules_to_save="head",
        bias="lora_only",
    )
    x = normal(k3, (4, 3, 8, 8), jnp.float32)
    y = jnp.array([0, 3, 1, 4])
    return model, lora, x, y, _classify


def _resnet(key):
    k1, k2, k3 = _split3(key)
    model = _build(ResNet, k1)
    lora = ql.loraify(model, rank=2, key=k2, where=(eqx.nn.Conv, eqx.nn.Linear))
    x = normal(k3, (3, 3, 6, 6), jnp.float32)
    y = jnp.array([0, 3, 1])
    return model, lora, x, y, _classify


def _gpt(key):
    k1, k2, k3 = _split3(key)
    model = _build(GPT, k1)
    lora = ql.loraify(
        model,
        rank=2,
        alpha=4.0,
        key=k2,
        where=(eqx.nn.Linear, "embed"),
        rslora=True,
    )
    tokens = jnp.asarray(np_rng(k3).integers(0, 13, (2, 9)), jnp.int32)
    return model, lora, tokens[:, :-1], tokens[:, 1:], _next_token


def _classify(model, x, y):
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _next_token(model, x, y):
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _train(lora, loss_fn, x, y, steps=3):
    trainable, frozen = ql.partition(lora)
    optim = optax.adam(1e-2)
    state = optim.init(eqx.filter(trainable, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(trainable, state):
        def loss(t):
            return loss_fn(quax.quaxify(eqx.combine(t, frozen)), x, y)

        value, grads = eqx.filter_value_and_grad(loss)(trainable)
        # optax mixes Python floats with its int32 step count: standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = optim.update(grads, state, trainable)
        return eqx.apply_updates(trainable, updates), state, value

    losses = []
    for _ in range(steps):
        trainable, state, value = step(trainable, state)
        losses.append(float(value))
    return eqx.combine(trainable, frozen), losses


@pytest.mark.parametrize("make", [_vit, _resnet, _gpt], ids=["vit", "resnet", "gpt"])
def test_model(make, getkey):
    model, lora, x, y, loss_fn = make(getkey())
    count = ql.count_parameters(lora)
    assert 0 < count.trainable < count.total

    # Output unchanged at initialisation (b = 0).
    run = eqx.filter_jit(lambda m, x: jax.vmap(quax.quaxify(m))(x))
    run_dense = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    assert_tree_allclose(run(lora, x), run_dense(model, x), **TOL)

    trained, losses = _train(lora, loss_fn, x, y)
    assert losses[-1] < losses[0]

    # The factored model equals its merged form, run as a plain Equinox model.
    merged = ql.merge(trained)
    assert not any(isinstance(v, quax.Value) for v in jtu.tree_leaves(merged))
    assert_tree_allclose(run(trained, x), run_dense(merged, x), **TOL)

    # Only the adapters (and `modules_to_save` / trained biases) changed; the frozen
    # leaves are bit-identical.
    t0, f0 = ql.partition(lora)
    t1, f1 = ql.partition(trained)
    assert jtu.tree_structure(f0) == jtu.tree_structure(f1)
    for before, after in zip(jtu.tree_leaves(f0), jtu.tree_leaves(f1)):
        if eqx.is_array(before):
            assert before.dtype == after.dtype
            assert np.array_equal(before, after)  # on the host
        else:
            assert before == after
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jtu.tree_leaves(t0), jtu.tree_leaves(t1))
    ]
    assert sum(changed) >= len(changed) // 2
    assert jtu.tree_structure(ql.unloraify(trained)) == jtu.tree_structure(model)


def test_vit_targets(getkey):
    _, lora, *_ = _vit(getkey())
    assert isinstance(lora.patch.weight, ql.LoraArray)
    assert lora.patch.weight.rank == 2
    assert lora.blocks[0].attn.query_proj.weight.rank == 4
    assert isinstance(lora.head.weight, ql.Trainable)
    assert isinstance(lora.patch.bias, ql.Trainable)


def test_resnet_plans(getkey):
    # The depthwise conv trains through the delta kernel, the dense ones factored.
    _, lora, x, *_ = _resnet(getkey())
    block = lora.blocks[0]
    h = jnp.zeros((1, 16, 6, 6))
    dw = ql.conv.conv_plan(
        h, block.depthwise.weight, (1, 1), ((1, 1), (1, 1)), feature_group_count=16
    )
    assert dw.plan == "delta"
    assert dw.training["factored"] > dw.training["delta"]


def test_gpt_stack(getkey):
    _, lora, x, *_ = _gpt(getkey())
    assert lora.blocks.attn.query_proj.weight.batch_ndim == 1
    assert lora.embed.weight.a.shape == (2, 16)
    assert lora.embed.weight.b.shape == (13, 2)
