"""LoRA models under JAX transforms, against the merged (dense) model."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose, normal, np_rng, random_arrays


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


# Random data drawn by NumPy (tests/helpers.py): an eager `jr.normal` of each new shape
# and dtype would compile its own program.


def _trained(model, key, scale=0.3):
    """Give every `b` random values, as after some training."""
    rng = np_rng(key)

    def perturb(x):
        if isinstance(x, ql.LoraArray):
            return eqx.tree_at(
                lambda l: l.b, x, normal(rng, x.b.shape, x.b.dtype, scale)
            )
        return x

    return jax.tree_util.tree_map(
        perturb, model, is_leaf=lambda x: isinstance(x, ql.LoraArray)
    )


def _random(cls, *args, key, **kwargs):
    """`cls(*args, **kwargs, key=key)` with its arrays drawn by NumPy."""
    return random_arrays(eqx.filter_eval_shape(cls, *args, **kwargs, key=key), key)


@pytest.fixture
def mlp_pair(getkey):
    mlp = _random(
        eqx.nn.MLP, 5, 3, 16, 2, activation=jnp.tanh, key=getkey(), dtype=jnp.float64
    )
    lora = _trained(ql.loraify(mlp, rank=4, alpha=8.0, key=getkey()), getkey())
    return lora, eqx.filter_jit(ql.merge)(lora)  # the reference, as one program


TOL = dict(rtol=1e-10, atol=1e-10)


def test_call_jit_vmap(mlp_pair, getkey):
    lora, dense = mlp_pair
    x = normal(getkey(), (7, 5), jnp.float64)
    # The dense reference, as one program.
    want = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(dense, x)
    assert_tree_allclose(quax.quaxify(lora)(x[0]), want[0], **TOL)
    assert_tree_allclose(eqx.filter_jit(quax.quaxify(lora))(x[0]), want[0], **TOL)
    call = eqx.filter_jit(lambda m, x: m(x))
    assert_tree_allclose(quax.quaxify(call)(lora, x[0]), want[0], **TOL)
    vmapped = jax.vmap(quax.quaxify(lora))(x)
    assert_tree_allclose(vmapped, want, **TOL)
    vcall = jax.vmap(lambda m, x: m(x), in_axes=(None, 0))
    assert_tree_allclose(quax.quaxify(vcall)(lora, x), want, **TOL)


def _loss(model, x):
    return jnp.sum(jax.vmap(model)(x) ** 2)


def test_grad_inside_and_outside(mlp_pair, getkey):
    lora, dense = mlp_pair
    x = normal(getkey(), (7, 5), jnp.float64)
    trainable, frozen = ql.partition(lora)

    def loss(t, f, x):
        return _loss(quax.quaxify(eqx.combine(t, f)), x)

    # Reference: the same function of (a, b), with the merged weight formed densely.
    def loss_ref(t, f, x):
        return _loss(ql.merge(eqx.combine(t, f)), x)

    # The jitted gradient and the references (below too) in one program.
    grads = lambda *a: (eqx.filter_grad(loss)(*a), eqx.filter_grad(loss_ref)(*a))
    g_jit, g_ref = eqx.filter_jit(grads)(trainable, frozen, x)
    g = eqx.filter_grad(loss)(trainable, frozen, x)
    assert_tree_allclose(g, g_ref, **TOL)
    assert_tree_allclose(g_jit, g_ref, **TOL)
    # quaxify outside grad: the gradient with respect to the input x.
    gx_ref = eqx.filter_jit(jax.grad(_loss, argnums=1))(dense, x)
    gx = quax.quaxify(jax.grad(_loss, argnums=1))(lora, x)
    assert_tree_allclose(gx, gx_ref, **TOL)
    gx = quax.quaxify(eqx.filter_jit(jax.grad(_loss, argnums=1)))(lora, x)
    assert_tree_allclose(gx, gx_ref, **TOL)


def test_grad_of_lora_as_array(getkey):
    # quaxify outside grad, differentiating with respect to the LoraArray itself:
    # the gradient of the effective weight, as for the dense weight.
    w = normal(getkey(), (4, 3))
    lora = _trained(ql.LoraArray(w, rank=2, key=getkey()), getkey())
    x = normal(getkey(), (5, 3))
    f = lambda w, x: jnp.sum(jnp.sin(x @ w.T))
    g = quax.quaxify(jax.grad(f))(lora, x)
    assert_tree_allclose(g, jax.grad(f)(lora.merged(), x), **TOL)


def test_cond(mlp_pair, getkey):
    lora, dense = mlp_pair
    x = normal(getkey(), (5,), jnp.float64)

    def f(m, x, p):
        return lax.cond(p, lambda x: m(x), lambda x: -m(x), x)

    for p in (True, False):
        assert_tree_allclose(quax.quaxify(f)(lora, x, p), f(dense, x, p), **TOL)
    g = jax.grad(lambda t, f_, x: jnp.sum(quax.quaxify(f)(eqx.combine(t, f_), x, True)))
    trainable, frozen = ql.partition(lora)
    g_ref = jax.grad(lambda t, f_, x: jnp.sum(f(ql.merge(eqx.combine(t, f_)), x, True)))
    g_ref = eqx.filter_jit(g_ref)  # the reference as one program
    assert_tree_allclose(g(trainable, frozen, x), g_ref(trainable, frozen, x), **TOL)


def test_checkpoint(mlp_pair, getkey):
    lora, dense = mlp_pair
    x = normal(getkey(), (5,), jnp.float64)
    f = eqx.filter_checkpoint(lambda m, x: m(x))
    assert_tree_allclose(quax.quaxify(f)(lora, x), dense(x), **TOL)
    trainable, frozen = ql.partition(lora)
    g = jax.grad(lambda t: jnp.sum(quax.quaxify(f)(eqx.combine(t, frozen), x)))(
        trainable
    )
    g_ref = eqx.filter_jit(  # the reference as one program
        jax.grad(lambda t: jnp.sum(ql.merge(eqx.combine(t, frozen))(x)))
    )(trainable)
    assert_tree_allclose(g, g_ref, **TOL)


class Block(eqx.Module):
    lin1: eqx.nn.Linear
    lin2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.lin1 = eqx.nn.Linear(6, 12, key=k1, dtype=jnp.float64)
        self.lin2 = eqx.nn.Linear(12, 6, key=k2, dtype=jnp.float64)

    def __call__(self, x):
        return x + self.lin2(jax.nn.gelu(self.lin1(x)))


def _stack(key, n):
    """`n` stacked `Block`s (`filter_vmap` of the constructor), drawn by NumPy."""
    build = lambda key: eqx.filter_vmap(Block)(jr.split(key, n))
    return random_arrays(eqx.filter_eval_shape(build, key), key)


def _run_stack(blocks, x):
    dynamic, static = eqx.partition(blocks, eqx.is_array)

    def step(x, d):
        return eqx.combine(d, static)(x), None

    return lax.scan(step, x, dynamic)[0]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_scan_over_stacked_layers(getkey, checkpoint):
    blocks = _stack(getkey(), 4)
    lora = _trained(ql.loraify(blocks, rank=2, key=getkey()), getkey())
    assert lora.lin1.weight.a.shape == (4, 2, 6)
    assert lora.lin1.weight.b.shape == (4, 12, 2)
    x = normal(getkey(), (3, 6), jnp.float64)
    run = eqx.filter_checkpoint(_run_stack) if checkpoint else _run_stack
    f = lambda m, x: jax.vmap(lambda xi: run(m, xi))(x)
    trainable, frozen = ql.partition(lora)
    loss = lambda t, x: jnp.sum(quax.quaxify(f)(eqx.combine(t, frozen), x) ** 2)
    loss_ref = lambda t, x: jnp.sum(f(ql.merge(eqx.combine(t, frozen)), x) ** 2)

    # The jitted forward pass and gradient and the references in one program.
    @eqx.filter_jit
    def jitted(lora, trainable, x):
        grads = (
            eqx.filter_grad(loss)(trainable, x),
            eqx.filter_grad(loss_ref)(trainable, x),
        )
        return quax.quaxify(f)(lora, x), f(ql.merge(lora), x), grads

    out_jit, want, (g, g_ref) = jitted(lora, trainable, x)
    assert_tree_allclose(quax.quaxify(f)(lora, x), want, **TOL)
    assert_tree_allclose(out_jit, want, **TOL)
    assert_tree_allclose(g, g_ref, **TOL)


def test_vmap_over_stacked_lora(getkey):
    # vmap over the stack axis itself, with quaxify outside and inside the vmap.
    blocks = _stack(getkey(), 3)
    lora = _trained(ql.loraify(blocks, rank=2, key=getkey()), getkey())
    x = normal(getkey(), (3, 6), jnp.float64)
    f = eqx.filter_vmap(lambda m, x: m(x))
    want = eqx.filter_jit(lambda l, x: f(ql.merge(l), x))(lora, x)  # one program
    assert_tree_allclose(quax.quaxify(f)(lora, x), want, **TOL)
    g = eqx.filter_vmap(lambda m, x: quax.quaxify(m)(x))
    assert_tree_allclose(g(lora, x), want, **TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_model(getkey, dtype):
    mlp = _random(eqx.nn.MLP, 5, 3, 16, 2, key=getkey(), dtype=dtype)
    lora = _trained(ql.loraify(mlp, rank=4, alpha=6.0, key=getkey()), getkey())
    x = normal(getkey(), (5,), dtype)
    out = eqx.filter_jit(quax.quaxify(lora))(x)
    assert out.dtype == dtype

    # Against the dense model in float32, so only the low-precision rounding differs;
    # the references in one program.
    @eqx.filter_jit
    def refs(lora, mlp, x):
        f32 = jax.tree.map(
            lambda v: v.astype(jnp.float32) if eqx.is_inexact_array(v) else v,
            ql.merge(lora),
        )
        return f32(x.astype(jnp.float32)), mlp(x).astype(jnp.float32)

    ref, base = refs(lora, mlp, x)
    assert not np.allclose(ref, base, atol=0.1)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    assert_tree_allclose(
        np.asarray(out, np.float32), np.asarray(ref), rtol=tol, atol=tol
    )


def _count_quax_retraces(monkeypatch):
    """Count the jitted functions quax re-traces under `quaxify` (quax's `jit` rule
    turns each one's jaxpr back into a function to trace)."""
    import quax._primitives as quax_primitives

    calls = []
    real = quax_primitives.jexc.jaxpr_as_fun

    def spy(jaxpr, *args, **kwargs):
        calls.append(jaxpr)
        return real(jaxpr, *args, **kwargs)

    monkeypatch.setattr(quax_primitives.jexc, "jaxpr_as_fun", spy)
    return calls


def test_jit_on_plain_arrays_is_not_retraced(getkey, monkeypatch):
    # A jitted function that receives only plain arrays cannot meet a LoraArray:
    # quaxlora binds it as it is instead of letting quax re-trace it.
    lora = ql.LoraArray(normal(getkey(), (5, 4)), rank=2, key=getkey())
    lora = eqx.tree_at(lambda l: l.b, lora, normal(getkey(), lora.b.shape))
    x = normal(getkey(), (4,))
    plain = jax.jit(lambda y: jnp.tanh(y) * 2)
    calls = _count_quax_retraces(monkeypatch)
    out = jax.jit(quax.quaxify(lambda w, x: plain(w @ x)))(lora, x)
    # `w @ x` (jnp.matmul, itself jitted) receives the LoraArray and is re-traced;
    # `plain` receives its plain result and is not.
    assert calls and not any("tanh" in str(j) for j in calls)
    assert_tree_allclose(out, jnp.tanh(lora.merged() @ x) * 2, rtol=1e-5, atol=1e-6)
    # One that receives the LoraArray is still interpreted, so the rules apply.
    with_lora = jax.jit(lambda w, x: jnp.tanh(w @ x) * 2)
    out = jax.jit(quax.quaxify(with_lora))(lora, x)
    assert any("tanh" in str(j) for j in calls)
    assert_tree_allclose(out, jnp.tanh(lora.merged() @ x) * 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mapped", ["x", "factors", "x and factors", "x and a", "weight"]
)
def test_vmap_outside_quaxify_maps_any_operand(getkey, mapped):
    # `jax.vmap` outside `quaxify`: the factored product meets the vmap itself (its
    # batching rule), with any of `x`, the factors and the weight mapped. Per
    # example factors against one weight must not be merged into it (the mapped
    # axis would be summed) nor concatenated to it (one copy per example).
    n = 4
    lora = _trained(ql.LoraArray(normal(getkey(), (5, 3)), rank=2, key=getkey()), 0)
    xs = normal(getkey(), (n, 7, 3))
    stack = lambda a: jnp.stack([a * (i + 1) for i in range(n)])  # one per example
    axes = {
        "x": (None, None, None, 0),
        "factors": (None, 0, 0, None),
        "x and factors": (None, 0, 0, 0),
        "x and a": (None, 0, None, 0),
        "weight": (0, None, None, 0),
    }[mapped]
    w = stack(lora.weight) if axes[0] == 0 else lora.weight
    a = stack(lora.a) if axes[1] == 0 else lora.a
    b = stack(lora.b) if axes[2] == 0 else lora.b
    x = xs if axes[3] == 0 else xs[0]

    def f(w, a, b, x):
        lora_i = eqx.tree_at(lambda l: (l.weight, l.a, l.b), lora, (w, a, b))
        return jnp.tanh(quax.quaxify(lambda l, x: x @ l.T)(lora_i, x))

    def f_ref(w, a, b, x):
        return jnp.tanh(x @ (w + lora.scaling * b @ a).T)

    def loss(f, *args):
        return jnp.sum(jax.vmap(f, in_axes=axes)(*args) ** 2)

    args = (w, a, b, x)
    assert_tree_allclose(
        jax.vmap(f, in_axes=axes)(*args), jax.vmap(f_ref, in_axes=axes)(*args), **TOL
    )
    grad = jax.grad(loss, argnums=(2, 3, 4))  # a, b and x (w is frozen)
    assert_tree_allclose(
        jax.jit(grad, static_argnums=0)(f, *args), grad(f_ref, *args), **TOL
    )
    # grad inside the vmap: per-example gradients.
    per = lambda f: jax.vmap(
        jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(1, 2, 3)), in_axes=axes
    )
    assert_tree_allclose(per(f)(*args), per(f_ref)(*args), **TOL)


def test_linear_use_inside_a_jvp_rule(getkey):
    # A `custom_jvp` whose jvp rule applies the LoRA product to the tangent (the
    # product is linear in `x`): under `grad` that use is partially evaluated with
    # an unknown operand, and transposed.
    lora = _trained(ql.LoraArray(normal(getkey(), (5, 3)), rank=2, key=getkey()), 0)
    x = normal(getkey(), (7, 3))

    def make(matmul):
        @jax.custom_jvp
        def g(w, x):
            return jnp.sin(matmul(w, x))

        @g.defjvp
        def g_jvp(primals, tangents):
            (w, x), (_, dx) = primals, tangents
            y = matmul(w, x)
            return jnp.sin(y), jnp.cos(y) * matmul(w, dx)

        return g

    g = make(lambda w, x: x @ w.T)
    loss = lambda w, x: jnp.sum(g(w, x) ** 2)
    gx = quax.quaxify(jax.grad(loss, argnums=1))(lora, x)
    gx_jit = jax.jit(quax.quaxify(jax.grad(loss, argnums=1)))(lora, x)
    want = jax.grad(loss, argnums=1)(lora.merged(), x)
    assert_tree_allclose(gx, want, **TOL)
    assert_tree_allclose(gx_jit, want, **TOL)


def test_grad_through_the_jvp_rule(mlp_pair, getkey, monkeypatch):
    # Without its linearisation rule (a JAX that has none), `grad` linearises the
    # factored product through its jvp rule: the same gradients.
    from jax._src.interpreters import ad as jax_ad
    from jax.interpreters import ad

    import quaxlora._rules._factored as factored

    p = factored.factored_p
    monkeypatch.delitem(jax_ad.primitive_linearizations, p)
    calls, jvp = [], ad.primitive_jvps[p]
    counted = lambda *args, **params: calls.append(1) or jvp(*args, **params)
    monkeypatch.setitem(ad.primitive_jvps, p, counted)
    lora, _ = mlp_pair
    x = normal(getkey(), (7, 5), jnp.float64)
    trainable, frozen = ql.partition(lora)
    loss = lambda t, f, x: _loss(quax.quaxify(eqx.combine(t, f)), x)
    loss_ref = lambda t, f, x: _loss(ql.merge(eqx.combine(t, f)), x)
    g = eqx.filter_jit(eqx.filter_grad(loss))(trainable, frozen, x)
    assert calls  # the jvp rule did the linearising
    assert_tree_allclose(g, eqx.filter_grad(loss_ref)(trainable, frozen, x), **TOL)
