"""Initialisations (`init=`) and LoRA+ (`quaxlora.loraplus`)."""

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


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


TOL = dict(rtol=1e-9, atol=1e-9)


class Net(eqx.Module):
    emb: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    fc: eqx.nn.Linear

    def __call__(self, tokens, signal):
        h = jax.vmap(self.emb)(tokens).mean(0) + self.conv(signal).mean(1)
        return self.fc(jnp.tanh(h))


def _net(key):
    k = jr.split(key, 3)
    return Net(
        eqx.nn.Embedding(7, 6, key=k[0]),
        eqx.nn.Conv1d(2, 6, 3, key=k[1]),
        eqx.nn.Linear(6, 5, key=k[2]),
    )


def _args():
    # Built inside each test, under its x64 marker, in the model's float64.
    return jnp.array([1, 4, 6]), jnp.linspace(-1, 1, 18).reshape(2, 9)


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "olora"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_output_unchanged_at_init(getkey, init, use_dora):
    net = _net(getkey())
    model = ql.loraify(
        net,
        rank=2,
        alpha=3.0,
        key=getkey(),
        where=["emb", "conv", "fc"],
        init=init,
        use_dora=use_dora,
    )
    assert_tree_allclose(quax.quaxify(model)(*_args()), net(*_args()), **TOL)
    assert_tree_allclose(ql.merge(model)(*_args()), net(*_args()), **TOL)
    lora = model.fc.weight
    assert lora.init == init
    residual = init in ("pissa", "olora")
    # PiSSA / OLoRA: the adapter starts non-zero and the base is the residual.
    assert bool(jnp.any(lora.b != 0)) == residual
    assert bool(jnp.any(lora.weight != net.fc.weight)) == residual


def test_pissa_is_the_principal_part(getkey):
    w = jr.normal(getkey(), (6, 5))
    linear = eqx.tree_at(lambda l: l.weight, eqx.nn.Linear(5, 6, key=getkey()), w)
    model = ql.loraify(linear, rank=2, alpha=4.0, key=getkey(), init="pissa")
    lora = model.weight
    u, s, vh = np.linalg.svd(np.asarray(w))
    principal = (u[:, :2] * s[:2]) @ vh[:2]
    assert_tree_allclose(lora.delta(), jnp.asarray(principal), rtol=1e-8, atol=1e-8)
    # PEFT's convention: the singular values are split evenly, divided by scaling.
    assert_tree_allclose(
        jnp.linalg.norm(lora.b, axis=0), jnp.sqrt(s[:2] / lora.scaling), **TOL
    )
    olora = ql.loraify(linear, rank=2, key=getkey(), init="olora").weight
    q, r = np.linalg.qr(np.asarray(w))
    assert_tree_allclose(jnp.abs(olora.a), jnp.abs(jnp.asarray(r[:2])), **TOL)


def test_init_stacked_and_gaussian(getkey):
    stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(jr.split(getkey(), 3))
    x = jnp.ones(4)
    f = lambda m: jax.vmap(lambda l: l(x))(m)
    for init in ("pissa", "olora"):
        model = ql.loraify(stack, rank=2, key=getkey(), init=init)
        assert_tree_allclose(quax.quaxify(f)(model), f(stack), **TOL)
    g = ql.loraify(_net(getkey()), rank=4, key=getkey(), init="gaussian").fc.weight
    assert float(jnp.std(g.a)) < 0.5  # N(0, 1/r²): std 1/4


def test_init_errors(getkey):
    with pytest.raises(ValueError, match="init"):
        ql.loraify(_net(getkey()), rank=2, key=getkey(), init="loftq")
    with pytest.raises(ValueError, match="rank <= min"):
        ql.loraify(_net(getkey()), rank=6, key=getkey(), init="pissa")


def test_residual_base_recorded(getkey, tmp_path):
    """A PiSSA adapter file says it needs the residual base, and will not load onto
    the original one."""
    net = _net(getkey())
    model = ql.loraify(net, rank=2, key=getkey(), init="pissa")
    path = tmp_path / "pissa.safetensors"
    ql.save_adapters(path, model)
    with pytest.raises(ValueError, match="residual base"):
        ql.load_adapters(path, net)
    loaded = ql.load_adapters(path, ql.unloraify(model))  # the residual base
    assert_tree_allclose(quax.quaxify(loaded)(*_args()), net(*_args()), **TOL)
    assert loaded.fc.weight.init == "pissa"


@pytest.mark.parametrize("schedule", [False, True])
def test_loraplus(getkey, schedule):
    net = _net(getkey())
    model = ql.loraify(net, rank=2, key=getkey(), where=["conv", "fc"], use_dora=True)
    model = eqx.tree_at(lambda m: m.fc.weight.b, model, jnp.ones((5, 2)))
    trainable, frozen = ql.partition(model)

    def loss(t):
        return jnp.sum(jnp.sin(quax.quaxify(eqx.combine(t, frozen))(*_args())))

    grads = jax.grad(loss)(trainable)
    lr = optax.constant_schedule(0.1) if schedule else 0.1
    plus = ql.loraplus(optax.sgd, lr, ratio=16.0)
    plain = optax.sgd(0.1)
    up, _ = plus.update(grads, plus.init(trainable), trainable)
    want, _ = plain.update(grads, plain.init(trainable), trainable)
    for layer in ("conv", "fc"):
        got_l, want_l = getattr(up, layer).weight, getattr(want, layer).weight
        assert bool(jnp.any(want_l.b != 0))
        assert_tree_allclose(got_l.b, 16.0 * want_l.b, **TOL)
        assert_tree_allclose(got_l.a, want_l.a, **TOL)
        assert_tree_allclose(got_l.magnitude, want_l.magnitude, **TOL)
    # Any optimiser, with its own options.
    adamw = ql.loraplus(optax.adamw, 1e-3, weight_decay=0.1)
    # optax mixes Python floats with its int32 step count: standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        adamw.update(grads, adamw.init(trainable), trainable)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_to_lora(getkey, tmp_path, init):
    """A trained PiSSA / OLoRA model, converted: the same function, on the original
    base weights, with an adapter file that loads onto the original model."""
    net = _net(getkey())
    start = ql.loraify(
        net, rank=2, key=getkey(), where=["conv", "fc"], init=init, use_dora=True
    )
    trainable, frozen = ql.partition(start)
    key = getkey()
    trainable = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jr.normal(jr.fold_in(key, x.size), x.shape), trainable
    )
    trained = eqx.combine(trainable, frozen)
    plain = ql.residual_to_lora(trained, ql.partition(start)[0])
    want = quax.quaxify(trained)(*_args())
    assert_tree_allclose(quax.quaxify(plain)(*_args()), want, **TOL)
    for layer in ("conv", "fc"):
        lora = getattr(plain, layer).weight
        assert (lora.rank, lora.scaling, lora.init) == (4, 1.0, "default")
        assert_tree_allclose(lora.weight, getattr(net, layer).weight, **TOL)
    ql.save_adapters(tmp_path / "plain.safetensors", plain)
    loaded = ql.load_adapters(tmp_path / "plain.safetensors", net)
    assert_tree_allclose(quax.quaxify(loaded)(*_args()), want, **TOL)
    with pytest.raises(ValueError, match="initial adapter"):
        ql.residual_to_lora(trained, ql.partition(ql.loraify(net, rank=1, key=key))[0])
