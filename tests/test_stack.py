"""Many adapters, one batch: `stack_adapters`, `select_adapter`, `unstack_adapters`."""

import json

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

from .helpers import normal, np_rng, random_arrays
from .test_adapters import Net, TARGETS, TOKENS


# `eqx.error_if` under `jax.vmap` inside `jit` (`select_adapter`'s check of a traced
# index) crashes JAX's tracer-leak checker itself (an IndexError in its report), with
# no quaxlora code involved (reproduced with a bare `eqx.error_if`); so CI's
# leak-check run leaves these tests out.
pytestmark = [
    pytest.mark.no_leak_check,
    # Its models are float64, so each mixed batch is compared with each merged model
    # to 1e-10: a reference comparison (see tests/conftest.py).
    pytest.mark.x64,
]


# Models traced, not run, with their arrays drawn by NumPy: no compilation per shape
# (see tests/helpers.py).


def _net(key):
    return random_arrays(eqx.filter_eval_shape(Net, jr.key(0), jnp.float64), key)


def _loraify(base, key, **kwargs):
    """`ql.loraify(base, **kwargs)` with random factors `a` and (non-zero) `b`."""
    adapt = lambda base: ql.loraify(base, key=jr.key(0), **kwargs)
    adapters = ql.partition(eqx.filter_eval_shape(adapt, base))[0]
    return ql.with_adapters(base, random_arrays(adapters, key))


def _mlp(key, dtype=None):
    make = lambda k: eqx.nn.MLP(4, 3, 8, 2, key=k, dtype=dtype)
    return random_arrays(eqx.filter_eval_shape(make, jr.key(0)), key)


# rank, alpha, rslora: different per adapter, so padding and scales are exercised
SETTINGS = [(2, 3.0, False), (4, None, True), (3, 7.0, False)]


def _models(base, key):
    rng = np_rng(key)
    return [
        _loraify(base, rng, rank=r, alpha=al, rslora=rs, where=TARGETS)
        for r, al, rs in SETTINGS
    ]


def _mixed(stacked, xs, ids):
    run = lambda x, i: quax.quaxify(ql.select_adapter(stacked, i))(x)
    return eqx.filter_jit(jax.vmap(run))(xs, ids)


def test_stack_layout(getkey):
    base = _net(getkey())
    stacked = ql.stack_adapters(_models(base, getkey()))
    emb, stack = stacked.emb.weight, stacked.stack.weight
    assert isinstance(emb, ql.StackedLoraArray)
    assert emb.a.shape == (3, 4, 4) and emb.b.shape == (3, 7, 4)  # padded to rank 4
    assert stack.a.shape == (3, 2, 4, 4) and stack.batch_ndim == 1
    assert emb.ranks == (2, 4, 3) and emb.alphas == (3.0, 4.0, 7.0)
    assert emb.rslora == (False, True, False) and emb.num_adapters == 3
    np.testing.assert_array_equal(emb.a[0, 2:], 0)
    np.testing.assert_array_equal(emb.b[2, :, 3:], 0)
    assert emb.weight is base.emb.weight  # shared, not copied
    assert emb.shape == base.emb.weight.shape


def test_mixed_batch_equals_each_merged_model(getkey):
    base = _net(getkey())
    models = _models(base, getkey())
    stacked = ql.stack_adapters(models)
    ids = jnp.array([0, 1, 2, -1, 2, 0, -1, 1])
    xs = jnp.asarray(np_rng(getkey()).integers(0, 7, (len(ids), 5)), jnp.int32)
    ys = _mixed(stacked, xs, ids)

    # Jitted, every reference in one program: one compilation rather than one per
    # eager primitive. The indices stay static Python ints.
    @eqx.filter_jit
    def refs(base, models, stacked, xs):
        out = []
        for x, i in zip(xs, ids.tolist()):
            ref = base(x) if i == -1 else ql.merge(models[i])(x)
            out.append((ref, quax.quaxify(ql.select_adapter(stacked, i))(x)))
        return out

    for y, (ref, alone) in zip(ys, refs(base, models, stacked, xs)):
        np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)
        # a static index gives the same model
        np.testing.assert_allclose(alone, ref, rtol=1e-10, atol=1e-12)
    assert ql.select_adapter(stacked, -1).emb.weight is base.emb.weight
    assert not np.allclose(ys[0], ys[1])  # the adapters do differ


def test_unstack_round_trip(getkey):
    models = _models(_net(getkey()), getkey())
    stacked = ql.stack_adapters(models)
    back = ql.unstack_adapters(stacked)
    assert len(back) == len(models)
    for m, b in zip(models, back):
        assert eqx.tree_equal(m, b)  # factors, ranks, alphas, scaling modes
    # the adapter pytree alone (no frozen weights) unstacks too
    back = ql.unstack_adapters(ql.partition(stacked)[0])
    for m, b in zip(models, back):
        assert eqx.tree_equal(ql.partition(m)[0], b)


def test_partition_and_counts(getkey):
    models = _models(_net(getkey()), getkey())
    stacked = ql.stack_adapters(models)
    trainable, frozen = ql.partition(stacked)
    assert trainable.emb.weight.weight is None
    assert frozen.emb.weight.a is None and frozen.emb.weight.b is None
    assert trainable.emb.weight.a is stacked.emb.weight.a
    count = ql.count_parameters(stacked)
    factors = sum(
        x.a.size + x.b.size
        for x in jtu.tree_leaves(stacked, is_leaf=lambda x: hasattr(x, "ranks"))
        if isinstance(x, ql.StackedLoraArray)
    )
    assert count.trainable == factors
    assert count.total == ql.count_parameters(ql.unloraify(stacked)).total + factors


def _loss(trainable, frozen, xs, ids, ys):
    stacked = eqx.combine(trainable, frozen)
    out = _mixed_raw(stacked, xs, ids)
    return jnp.sum(jnp.tanh(out) * ys)  # non-linear in the output


def _mixed_raw(stacked, xs, ids):
    run = lambda x, i: quax.quaxify(ql.select_adapter(stacked, i))(x)
    return jax.vmap(run)(xs, ids)


def test_gradients_go_to_each_examples_adapter(getkey):
    base = _net(getkey())
    models = _models(base, getkey())
    stacked = ql.stack_adapters(models)
    ids = jnp.array([0, 2, 0, -1, 2])  # adapter 1 has no example
    xs = jnp.asarray(np_rng(getkey()).integers(0, 7, (len(ids), 5)), jnp.int32)
    ys = normal(getkey(), (len(ids), 2))
    trainable, frozen = ql.partition(stacked)
    grads = eqx.filter_jit(jax.grad(_loss))(trainable, frozen, xs, ids, ys)
    per_adapter = ql.unstack_adapters(grads)  # checks the padding's gradient is 0

    # Jitted, each model's own gradient in one program: one compilation rather than
    # hundreds of eager primitives.
    @eqx.filter_jit
    def wants(models, xs, ids, ys):
        out = []
        for i, model in enumerate(models):
            t, f = ql.partition(model)

            def own(t):
                m = quax.quaxify(eqx.combine(t, f))
                mask = (ids == i).astype(ys.dtype)[:, None]
                return jnp.sum(jnp.tanh(jax.vmap(m)(xs)) * ys * mask)

            out.append(jax.grad(own)(t))
        return out

    for i, (model, want) in enumerate(zip(models, wants(models, xs, ids, ys))):
        got = eqx.filter(per_adapter[i], ql.trainable_spec(model))
        for g, w in zip(jtu.tree_leaves(got), jtu.tree_leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
        nonzero = any(np.any(np.asarray(g)) for g in jtu.tree_leaves(got))
        assert nonzero == (i != 1)


def test_two_tasks_train_in_one_loop(getkey):
    base = eqx.nn.MLP(4, 1, 16, 1, key=getkey())
    targets = [jr.normal(getkey(), (4,)), jr.normal(getkey(), (4,))]
    models = [ql.loraify(base, rank=2, key=getkey()) for _ in targets]
    trainable, frozen = ql.partition(ql.stack_adapters(models))
    opt = optax.adam(3e-2)
    state = opt.init(trainable)
    run = lambda m, x, i: quax.quaxify(ql.select_adapter(m, i))(x)[0]

    def loss(trainable, xs, ids):
        pred = jax.vmap(run, (None, 0, 0))(eqx.combine(trainable, frozen), xs, ids)
        want = jnp.sum(xs * jnp.stack(targets)[ids], -1)
        return jnp.mean((pred - want) ** 2)

    @eqx.filter_jit
    def step(trainable, state, key):
        xs = jr.normal(key, (32, 4))
        ids = jnp.arange(32) % 2  # a mixed batch: both tasks in every step
        grads = jax.grad(loss)(trainable, xs, ids)
        # optax mixes Python floats with its int32 step count: standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state)
        return eqx.apply_updates(trainable, updates), state

    def task_loss(trainable, adapter, task):
        xs = jr.normal(jr.key(1), (64, 4))
        model = eqx.combine(trainable, frozen)
        pred = jax.vmap(run, (None, 0, None))(model, xs, adapter)
        return float(jnp.mean((pred - xs @ targets[task]) ** 2))

    before = [task_loss(trainable, i, i) for i in range(2)]
    for key in jr.split(getkey(), 300):
        trainable, state = step(trainable, state, key)
    for i in range(2):
        own, other = task_loss(trainable, i, i), task_loss(trainable, 1 - i, i)
        assert own < 0.1 * before[i]
        assert own < 0.1 * other  # adapter i learnt task i, not the other one


def test_hot_swap_does_not_recompile(getkey):
    base = _mlp(getkey())
    models = [_loraify(base, getkey(), rank=2) for _ in "ab"]
    new = _loraify(base, getkey(), rank=2)
    traces = 0

    @eqx.filter_jit
    def step(model, xs, ids):
        nonlocal traces
        traces += 1
        return _mixed_raw(model, xs, ids)

    xs, ids = normal(getkey(), (4, 4)), jnp.array([0, 1, 1, 0])
    step(ql.stack_adapters(models), xs, ids)
    # restack with adapter 1 replaced, or replace its factors in place
    swapped = ql.stack_adapters([models[0], new])
    y = step(swapped, xs, ids)
    old = ql.stack_adapters(models)
    in_place = eqx.tree_at(
        lambda m: [l.weight for l in m.layers],
        old,
        [l.weight for l in swapped.layers],
    )
    y2 = step(in_place, xs, ids)
    assert traces == 1
    np.testing.assert_allclose(y[1], ql.merge(new)(xs[1]), rtol=1e-10)
    np.testing.assert_array_equal(y, y2)
    # a single-adapter model: `with_adapters` of the same rank
    traces = 0

    @eqx.filter_jit
    def single(model, x):
        nonlocal traces
        traces += 1
        return quax.quaxify(model)(x)

    single(models[0], xs[0])
    y = single(ql.with_adapters(base, ql.partition(new)[0]), xs[0])
    assert traces == 1
    np.testing.assert_allclose(y, ql.merge(new)(xs[0]), rtol=1e-10)
    # a different alpha is static metadata: one new compilation
    traces = 0
    other = _loraify(base, getkey(), rank=2, alpha=5.0)
    step(ql.stack_adapters([models[0], other]), xs, ids)
    assert traces == 1


# 8 rows per example: the differentiated forward is the two-product form; 256: the
# fused `[x | s·t]·[w | f2]` form (`_factored.py`), with `f2` per example.
@pytest.mark.parametrize("rows", [8, 256])
def test_no_weight_sized_copy_per_example(getkey, rows):
    """The gathered factors are the only per-example arrays: a mixed batch needs
    at most the gathered factors more scratch memory than a single adapter, forward
    and backward, far less than one weight per example."""
    width, batch = 128, 16
    base = eqx.nn.MLP(width, width, width, 2, key=getkey())
    models = [ql.loraify(base, rank=4, key=getkey()) for _ in range(3)]
    stacked = ql.stack_adapters(models)
    xs = jr.normal(getkey(), (batch, rows, width))
    ids = jnp.arange(batch) % 4 - 1

    def temp(model, mixed, grad):
        arrays, static = eqx.partition(model, eqx.is_array)
        t, f = eqx.partition(arrays, ql.trainable_spec(model))

        def loss(t, f, xs, ids):
            m = eqx.combine(t, f, static)

            def one(x, i):
                m1 = ql.select_adapter(m, i) if mixed else m
                return jax.vmap(quax.quaxify(m1))(x)

            return jnp.sum(jax.vmap(one)(xs, ids) ** 2)

        fn = jax.grad(loss) if grad else loss
        compiled = jax.jit(fn).lower(t, f, xs, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()

    itemsize = xs.dtype.itemsize
    factors = sum(l.weight.a[0].size + l.weight.b[0].size for l in stacked.layers)
    # Per-example factors cannot join `w` in the fused `[w | f2]` product without a
    # copy of `w` per example, so a mixed batch differentiates the two-product form,
    # which keeps one more activation per layer for the backward.
    activations = len(stacked.layers) * batch * rows * width
    for grad in (False, True):
        mixed, hlo = temp(stacked, True, grad)
        extra = mixed - temp(models[0], False, grad)[0]
        assert extra <= 2 * batch * factors * itemsize + grad * activations * itemsize
        # No per-example copy of a weight (or of `[w | b]`), in any layout.
        for shape in ((width, width), (width, width + 4), (width + 4, width)):
            assert f"[{batch},{shape[0]},{shape[1]}]" not in hlo


def test_index_errors(getkey):
    stacked = ql.stack_adapters(_models(_net(getkey()), getkey()))
    with pytest.raises(ValueError, match=r"`index` must be -1 .* \[0, 3\), got 3"):
        ql.select_adapter(stacked, 3)
    with pytest.raises(ValueError, match="`index` must be -1"):
        ql.select_adapter(stacked, -2)
    with pytest.raises(TypeError, match="`index` must be an int or a scalar integer"):
        ql.select_adapter(stacked, 1.0)
    with pytest.raises(TypeError, match="`index` must be an int or a scalar integer"):
        ql.select_adapter(stacked, jnp.array([0, 1]))
    run = eqx.filter_jit(lambda i: quax.quaxify(ql.select_adapter(stacked, i))(TOKENS))
    run(jnp.array(2))
    with pytest.raises(Exception, match="`index` out of range"):
        run(jnp.array(5))
    with pytest.raises(ValueError, match="`model` has no stacked adapters"):
        ql.select_adapter(_net(getkey()), 0)


def test_stacked_model_needs_a_selection(getkey):
    base = _net(getkey())
    stacked = ql.stack_adapters(_models(base, getkey()))
    with pytest.raises(TypeError, match="met a `StackedLoraArray`.*select_adapter"):
        quax.quaxify(stacked)(TOKENS)
    with pytest.raises(ValueError, match="merge one of them"):
        ql.merge(stacked)
    assert eqx.tree_equal(ql.unloraify(stacked), base)


def test_stack_errors(getkey):
    base = _net(getkey())
    models = _models(base, getkey())
    with pytest.raises(ValueError, match="`models` must contain at least one"):
        ql.stack_adapters([])
    with pytest.raises(ValueError, match="`models` have no `LoraArray`"):
        ql.stack_adapters([base, base])
    fewer = ql.loraify(base, rank=2, where=TARGETS[:2], key=getkey())
    with pytest.raises(ValueError, match="adapt different weights: `head.weight`"):
        ql.stack_adapters([models[0], fewer])
    other = ql.loraify(_net(getkey()), rank=2, where=TARGETS, key=getkey())
    with pytest.raises(ValueError, match="do not have the same base model"):
        ql.stack_adapters([models[0], other])
    saved = ql.loraify(
        base, rank=2, where=TARGETS[:3], modules_to_save="head", key=getkey()
    )
    with pytest.raises(ValueError, match=r"`models\[1\]` has a trained array at"):
        ql.stack_adapters([models[0], saved])
    stacked = ql.stack_adapters(models)
    with pytest.raises(ValueError, match="no already-stacked adapters"):
        ql.stack_adapters([stacked])
    free = ql.loraify(base, rank=2, where=TARGETS, stop_gradient=False, key=getkey())
    with pytest.raises(ValueError, match="differ at `.*` in `batch_ndim`"):
        ql.stack_adapters([models[0], free])


def test_unstack_refuses_to_cut_a_grown_adapter(getkey):
    models = _models(_net(getkey()), getkey())
    stacked = ql.stack_adapters(models)
    b = stacked.head.weight.b.at[0, :, -1].set(1.0)  # adapter 0 has rank 2 of 4
    grown = eqx.tree_at(lambda m: m.head.weight.b, stacked, b)
    with pytest.raises(ValueError, match="`head.weight`: adapter 0 has rank 2 but"):
        ql.unstack_adapters(grown)


def test_save_and_load_stacked(getkey, tmp_path):
    from quaxlora._io import digest
    from quaxlora._safetensors import read_safetensors, write_safetensors

    base = _net(getkey())
    models = _models(base, getkey())
    stacked = ql.stack_adapters(models)
    path = tmp_path / "stacked.safetensors"
    ql.save_adapters(path, stacked)
    tensors, meta = read_safetensors(path)
    assert meta["format_version"] == "2"
    assert tensors["emb.weight.a"].shape == (3, 4, 4)  # one file, adapter axis
    assert eqx.tree_equal(ql.load_adapters(path, base), stacked)
    assert eqx.tree_equal(ql.load_adapters(path, stacked), stacked)
    assert eqx.tree_equal(ql.unstack_adapters(ql.load_adapters(path, base)), models)
    with pytest.raises(ValueError, match="the file a stack of adapters"):
        ql.load_adapters(path, models[0])
    one = tmp_path / "one.safetensors"
    ql.save_adapters(one, models[0])
    with pytest.raises(ValueError, match="stacked adapters here, the file one"):
        ql.load_adapters(one, stacked)
    two = ql.stack_adapters(models[:2])
    with pytest.raises(ValueError, match="stacked factor shapes"):
        ql.load_adapters(path, two)
    # a malformed stack entry is caught with the rest of the metadata
    targets = json.loads(meta["targets"])
    targets["head.weight"]["stacked"]["ranks"] = [2, 4]
    meta = {**meta, "targets": json.dumps(targets)}
    write_safetensors(path, tensors, {**meta, "sha256": digest(tensors, meta)})
    with pytest.raises(ValueError, match="has malformed metadata"):
        ql.load_adapters(path, base)


def test_low_precision_strict_promotion(getkey):
    base = _mlp(getkey(), jnp.bfloat16)
    models = [_loraify(base, getkey(), rank=r) for r in (2, 3)]
    xs = normal(getkey(), (4, 4), jnp.bfloat16)
    ids = jnp.array([1, 0, -1, 1])
    ys = _mixed(ql.stack_adapters(models), xs, ids)
    assert ys.dtype == jnp.bfloat16
    # Jitted, every reference in one program (one compilation).
    refs = eqx.filter_jit(
        lambda base, models, xs: [
            base(x) if i == -1 else ql.merge(models[i])(x)
            for x, i in zip(xs, ids.tolist())
        ]
    )(base, models, xs)
    for y, ref in zip(ys, refs):
        np.testing.assert_allclose(
            y.astype(jnp.float32), ref.astype(jnp.float32), rtol=5e-2, atol=5e-2
        )
