import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose, normal, np_rng, random_lora, TOLS


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


VOCAB, DIM = 11, 6


# Tables drawn by NumPy (tests/helpers.py): no compilation per shape and dtype.
def _table(key, dtype=jnp.float64, stop_gradient=True, batch=()):
    rng = np_rng(key)
    w = normal(rng, (*batch, VOCAB, DIM), dtype)
    return random_lora(
        w,
        rank=3,
        key=rng,
        alpha=2.0,
        stop_gradient=stop_gradient,
        batch_ndim=len(batch),
    )


# `merged` of a result as one compiled program (not its several eager ops).
_merged = eqx.filter_jit(lambda l: l.merged())


IDS = jnp.array([[3, 0, 10], [-1, 4, 4]])
LOOKUPS = {
    "index": lambda w: w[IDS],
    "index-1d": lambda w: w[IDS[0]],
    "index-scalar": lambda w: w[7],
    "index-negative": lambda w: w[-2],
    "take": lambda w: jnp.take(w, IDS, axis=0),
    "take-clip": lambda w: jnp.take(w, jnp.array([2, 30]), axis=0, mode="clip"),
    "take-fill": lambda w: jnp.take(w, jnp.array([2, 30]), axis=0, mode="fill"),
    "columns": lambda w: jnp.take(w, jnp.array([5, 0, 2]), axis=1),
    "column": lambda w: w[:, 1],
    "slice": lambda w: w[2:9:3],
    "dynamic-slice": lambda w: lax.dynamic_slice_in_dim(w, jnp.array(8), 4),
    "vmap": lambda w: jax.vmap(lambda i: w[i])(IDS),
    "embedding": lambda w: eqx.nn.Embedding(weight=w)(jnp.array(5)),
    "embedding-vmap": lambda w: jax.vmap(eqx.nn.Embedding(weight=w))(IDS[0]),
    "embedding-vmap2": lambda w: jax.vmap(jax.vmap(eqx.nn.Embedding(weight=w)))(IDS),
    "tied-output": lambda w: jnp.ones((2, DIM), w.dtype) @ w.T,
    "tied-output-2": lambda w: w @ jnp.linspace(0, 1, DIM, dtype=w.dtype),
}


def _nan_equal(x, y, tol):
    # On the host: NumPy compiles nothing.
    assert x.shape == y.shape and x.dtype == y.dtype
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.array_equal(np.isnan(x), np.isnan(y))
    assert np.allclose(np.nan_to_num(x), np.nan_to_num(y), **tol), (x, y)


def _dense(out):
    return out.merged() if isinstance(out, ql.LoraArray) else out


# The jitted checks of every lookup, with their dense references, as one program:
# compiled once per dtype (or `stop_gradient`) and shared by the parametrised cases,
# each of which calls it with its own table and reads its own lookup's entry.


@jax.jit
def _jitted_values(lora):
    dense = lora.merged()
    return {n: (_dense(quax.quaxify(f)(lora)), f(dense)) for n, f in LOOKUPS.items()}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(LOOKUPS))
def test_values(name, dtype, getkey):
    lora = _table(getkey(), dtype)
    got_jit, want = _jitted_values(lora)[name]
    # And eagerly (slices keep the LoRA form, merged here to compare).
    got = quax.quaxify(LOOKUPS[name])(lora)
    if isinstance(got, ql.LoraArray):
        got = _merged(got)
    for out in (got, got_jit):
        _nan_equal(out, want, TOLS[jnp.dtype(dtype)])


def _lookups_only(name):
    return not name.startswith("tied") and name not in ("slice", "dynamic-slice")


@pytest.mark.parametrize("name", [n for n in LOOKUPS if _lookups_only(n)])
def test_never_the_whole_table(name, getkey):
    lora = _table(getkey())
    jaxpr = jax.make_jaxpr(quax.quaxify(LOOKUPS[name]))(lora)
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.stop_gradient_p:
            continue
        for v in eqn.outvars:
            assert v.aval.size < VOCAB * DIM, (name, eqn)


def _loss(out):
    return jnp.sum(jnp.nan_to_num(jnp.sin(_dense(out))))


def _gradients(f):
    """The gradient through the LoRA lookup, and its dense reference."""
    grad = eqx.filter_grad(lambda l: _loss(quax.quaxify(f)(l)))
    dense_grad = eqx.filter_grad(lambda l: _loss(f(l.merged())))
    return grad, dense_grad


@eqx.filter_jit
def _jitted_gradients(lora):  # as `_jitted_values`
    return {n: tuple(g(lora) for g in _gradients(f)) for n, f in LOOKUPS.items()}


@pytest.mark.parametrize("stop_gradient", [True, False])
@pytest.mark.parametrize("name", list(LOOKUPS))
def test_gradients(name, stop_gradient, getkey):
    lora = _table(getkey(), stop_gradient=stop_gradient)
    got_jit, want = _jitted_gradients(lora)[name]
    got = _gradients(LOOKUPS[name])[0](lora)  # and eagerly
    assert_tree_allclose(got, want, **TOLS[jnp.dtype(jnp.float64)])
    assert_tree_allclose(got_jit, want, **TOLS[jnp.dtype(jnp.float64)])


def test_vmap_outside_quaxify(getkey):
    lora = _table(getkey())
    emb = eqx.nn.Embedding(weight=lora)
    got = jax.vmap(quax.quaxify(emb))(IDS[1])
    assert_tree_allclose(got, lora.merged()[IDS[1]], **TOLS[jnp.dtype(jnp.float64)])


def test_loraify_embedding(getkey):
    emb = eqx.nn.Embedding(VOCAB, DIM, key=getkey())
    model = ql.loraify(emb, rank=2, key=getkey(), where=eqx.nn.Embedding)
    assert isinstance(model.weight, ql.LoraArray)
    out = jax.vmap(quax.quaxify(model))(IDS[0])
    assert jnp.array_equal(out, jax.vmap(emb)(IDS[0]))  # b = 0 at init
    b = normal(getkey(), model.weight.b.shape, model.weight.b.dtype, scale=0.5)
    model = eqx.tree_at(lambda m: m.weight.b, model, b)  # non-zero, so it matters
    out = quax.quaxify(lambda m, i: jax.vmap(m)(i))(model, IDS[0])
    want = jax.vmap(ql.merge(model))(IDS[0])
    assert_tree_allclose(out, want, **TOLS[jnp.dtype(jnp.float32)])


def test_stacked_tables(getkey):
    # A layer stack: `w[l, i]` slices the batch axis and a row.
    lora = _table(getkey(), batch=(3,))
    dense = _merged(lora)
    for f in (lambda w: w[1, 4], lambda w: w[2], lambda w: w[:, 3:5]):
        got = quax.quaxify(f)(lora)
        got = _merged(got) if isinstance(got, ql.LoraArray) else got
        assert_tree_allclose(got, f(dense), **TOLS[jnp.dtype(jnp.float64)])


def test_squeeze_keeps_lora_form(getkey):
    w = normal(getkey(), (5, 1, 4, 1))
    lora = random_lora(w, rank=2, key=getkey())
    out = quax.quaxify(lambda w: jnp.squeeze(w, (1, 3)))(lora)
    assert isinstance(out, ql.LoraArray) and out.a.shape == (2, 4)
    assert_tree_allclose(out.merged(), lora.merged()[:, 0, :, 0], rtol=1e-5, atol=1e-6)
    row = quax.quaxify(lambda w: w[2, 0, :, 0])(lora)
    assert_tree_allclose(row, lora.merged()[2, 0, :, 0], rtol=1e-5, atol=1e-6)


def test_batched_gather_is_an_error(getkey):
    lora = _table(getkey(), batch=(2,))
    f = quax.quaxify(lambda w: w[jnp.array([0, 1]), jnp.array([3, 4])])
    with pytest.raises(TypeError, match="`gather`"):
        f(lora)
