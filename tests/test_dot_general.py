"""`dot_general` with a `LoraArray`: values and gradients vs the dense reference.

Gradients are checked with the differentiated forward in both of its forms (see
`quaxlora/_rules/_factored.py`): one product against the concatenated `[w | f2]`, and
two products and a sum."""

import math
from unittest import mock

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax
from hypothesis import given, settings, strategies as st

import quaxlora as ql
import quaxlora._rules._factored as factored

from .helpers import assert_tree_allclose, normal, np_rng, random_lora, TOLS


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


FUSE_MODES = {"fused": math.inf, "two-product": 0}


@pytest.fixture(params=list(FUSE_MODES))
def fuse(request):
    """Force the differentiated forward into one of its two forms."""
    with mock.patch.object(factored, "FUSE_MAX_COPY", FUSE_MODES[request.param]):
        yield request.param


def _lora(key, shape, rank=3, batch_ndim=0, dtype=jnp.float32, adapter_dtype=None):
    # Drawn by NumPy: no compilation per shape (see tests/helpers.py).
    rng = np_rng(key)
    return random_lora(
        normal(rng, shape, dtype),
        rank=rank,
        alpha=2.0 * rank,
        batch_ndim=batch_ndim,
        stop_gradient=False,
        dtype=adapter_dtype,
        key=rng,
    )


def _acc(dtype):
    """The dtype to sum a loss in: at least float32."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _dense(lora):
    return lora.merged()


def _check(lora, x, dn, lora_is_lhs, dtype=None, preferred=None, grads=True):
    def f(l, x):
        args = (l, x) if lora_is_lhs else (x, l)
        return lax.dot_general(*args, dn, preferred_element_type=preferred)

    def loss(w, a, b, x, ct, dense):
        l = ql.LoraArray(
            w,
            a=a,
            b=b,
            alpha=lora.alpha,
            stop_gradient=False,
            batch_ndim=lora.batch_ndim,
        )
        y = f(_dense(l), x) if dense else quax.quaxify(f)(l, x)
        # Non-linear in y, so the gradients depend on the differentiated forward's
        # value (a linear loss would never look at it).
        return jnp.sum((jnp.sin(y) * ct).astype(_acc(y.dtype)))

    # Jitted, values and gradients of both in one program: one compilation per case
    # rather than one per eager primitive.
    @eqx.filter_jit
    def run(lora, x, ct):
        out = quax.quaxify(f)(lora, x)
        ref = f(_dense(lora), x)
        if not grads:
            return out, ref, None
        # Gradients with respect to a, b, w (stop_gradient=False) and x.
        args = (lora.weight, lora.a, lora.b, x, ct)
        vg = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
        return out, ref, (vg(*args, False), vg(*args, True))

    shape = jax.eval_shape(lambda l, x: f(_dense(l), x), lora, x)
    ct = normal(0, shape.shape, shape.dtype)
    out, ref, g = run(lora, x, ct)
    tol = TOLS[jnp.dtype(dtype or x.dtype)]
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert_tree_allclose(out, ref, **tol)
    if not grads:
        return
    gtol = dict(tol, atol=tol["atol"] * 10)
    assert_tree_allclose(g[0], g[1], **gtol)


# (weight shape, batch_ndim, x shape, dimension numbers, lora is lhs)
CASES = [
    # w @ x, as eqx.nn.Linear does.
    ((5, 4), 0, (4,), (((1,), (0,)), ((), ())), True),
    # w @ x under vmap: x batched on a free axis.
    ((5, 4), 0, (7, 4), (((1,), (1,)), ((), ())), True),
    # x @ w.T with the LoRA array on the right.
    ((5, 4), 0, (2, 7, 4), (((2,), (1,)), ((), ())), False),
    # x @ w: contraction over the output axis (a transposed use, tied weights).
    ((5, 4), 0, (7, 5), (((1,), (0,)), ((), ())), False),
    ((5, 4), 0, (5, 7), (((0,), (0,)), ((), ())), True),
    # Stacked weights with a leading batch axis, batched against x.
    ((3, 5, 4), 1, (3, 7, 4), (((2,), (2,)), ((0,), (0,))), True),
    ((3, 5, 4), 1, (3, 7, 4), (((2,), (2,)), ((0,), (0,))), False),
    # Stacked weight, batch axis left free.
    ((3, 5, 4), 1, (7, 4), (((2,), (1,)), ((), ())), True),
    # Contraction over both the output and an input axis.
    ((5, 4), 0, (5, 4, 2), (((0, 1), (0, 1)), ((), ())), True),
    # A conv-like weight with two rest axes, one contracted.
    ((5, 4, 3), 0, (3, 6), (((2,), (0,)), ((), ())), True),
    # Contraction over a stacking axis (summing layers).
    ((3, 5, 4), 1, (3, 4), (((0, 2), (0, 1)), ((), ())), True),
    # The output axis as a dot batch axis.
    ((5, 4), 0, (5, 6), (((), ()), ((0,), (0,))), True),
]


@pytest.mark.parametrize("wshape,nb,xshape,dn,lhs", CASES)
@pytest.mark.parametrize(
    "dtype,mode",
    [(jnp.float32, "fused"), (jnp.float64, "fused"), (jnp.float32, "two-product")],
)
def test_cases(getkey, wshape, nb, xshape, dn, lhs, dtype, mode):
    lora = _lora(getkey(), wshape, batch_ndim=nb, dtype=dtype)
    x = normal(getkey(), xshape, dtype)
    with mock.patch.object(factored, "FUSE_MAX_COPY", FUSE_MODES[mode]):
        _check(lora, x, dn, lhs)


@pytest.mark.parametrize("wshape,nb,xshape,dn,lhs", CASES[:6])
def test_bf16(getkey, wshape, nb, xshape, dn, lhs):
    lora = _lora(getkey(), wshape, batch_ndim=nb, dtype=jnp.bfloat16)
    x = normal(getkey(), xshape, jnp.bfloat16)
    _check(lora, x, dn, lhs)


def test_mixed_adapter_dtype(getkey, fuse):
    # bf16 base, f32 adapters: the result has the dense bf16 op's dtype.
    lora = _lora(getkey(), (6, 5), dtype=jnp.bfloat16, adapter_dtype=jnp.float32)
    assert lora.a.dtype == jnp.float32 and lora.dtype == jnp.bfloat16
    x = normal(getkey(), (5,), jnp.bfloat16)
    _check(lora, x, (((1,), (0,)), ((), ())), True)


def test_preferred_element_type(getkey):
    lora = _lora(getkey(), (6, 5), dtype=jnp.bfloat16)
    x = normal(getkey(), (3, 5), jnp.bfloat16)
    dn = (((1,), (1,)), ((), ()))
    # Tolerance of bf16: the reference rounds the merged weight to bf16.
    _check(lora, x, dn, True, dtype=jnp.bfloat16, preferred=jnp.float32, grads=False)


def test_lora_both_sides(getkey):
    l1 = _lora(getkey(), (5, 4))
    l2 = _lora(getkey(), (4, 6))
    dn = (((1,), (0,)), ((), ()))
    f = lambda x, y: lax.dot_general(x, y, dn)
    # Jitted: one compilation rather than one per eager primitive.
    out, ref = eqx.filter_jit(
        lambda l1, l2: (quax.quaxify(f)(l1, l2), f(l1.merged(), l2.merged()))
    )(l1, l2)
    assert_tree_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_matmul_forms(getkey):
    lora = _lora(getkey(), (5, 4))
    x = normal(getkey(), (3, 4), jnp.float32)
    fns = [
        lambda w, x: w @ x[0],
        lambda w, x: x @ w.T,
        lambda w, x: jnp.einsum("oi,bi->bo", w, x),
        lambda w, x: jnp.dot(x, w.T),
        lambda w, x: jnp.matmul(w, x.T),
    ]
    # Jitted, all forms in one program: one compilation rather than one per eager
    # primitive.
    run = eqx.filter_jit(
        lambda lora, x: [
            (quax.quaxify(fn)(lora, x), fn(lora.merged(), x)) for fn in fns
        ]
    )
    for got, want in run(lora, x):
        assert_tree_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_never_materialises(getkey):
    # The weight-sized product b @ a never appears in the jaxpr: every dot has a
    # rank-sized operand or is the base product against x.
    lora = _lora(getkey(), (64, 48), rank=2)
    x = normal(getkey(), (48,), jnp.float32)
    jaxpr = jax.make_jaxpr(quax.quaxify(lambda w, x: w @ x))(lora, x)
    for eqn in jaxpr.jaxpr.eqns:
        for v in eqn.outvars:
            assert v.aval.shape != (64, 48), eqn


@st.composite
def _dimension_numbers(draw):
    """A random LoRA weight and operand, with valid random dimension numbers."""
    nb = draw(st.integers(0, 1))
    n_rest = draw(st.integers(1, 2))
    wshape = [draw(st.integers(1, 4)) for _ in range(nb + 1 + n_rest)]
    roles = [draw(st.sampled_from(["free", "contract", "batch"])) for _ in wshape]
    x_axes = [(i, r) for i, r in enumerate(roles) if r != "free"]
    n_xfree = draw(st.integers(0, 2))
    xshape_labels = [("w", i) for i, _ in x_axes] + [("x", j) for j in range(n_xfree)]
    perm = draw(st.permutations(range(len(xshape_labels))))
    xlabels = [xshape_labels[p] for p in perm]
    xfree_sizes = [draw(st.integers(1, 4)) for _ in range(n_xfree)]
    xshape = [wshape[l[1]] if l[0] == "w" else xfree_sizes[l[1]] for l in xlabels]
    pos = {lab: k for k, lab in enumerate(xlabels)}
    contract = [(i, pos[("w", i)]) for i, r in enumerate(roles) if r == "contract"]
    batch = [(i, pos[("w", i)]) for i, r in enumerate(roles) if r == "batch"]
    batch = draw(st.permutations(batch))
    lc, xc = tuple(c[0] for c in contract), tuple(c[1] for c in contract)
    lb, xb = tuple(b[0] for b in batch), tuple(b[1] for b in batch)
    lhs = draw(st.booleans())
    if lhs:
        dn = ((lc, xc), (lb, xb))
    else:
        dn = ((xc, lc), (xb, lb))
    rank = draw(st.integers(1, 3))
    return tuple(wshape), nb, tuple(xshape), dn, lhs, rank


@pytest.mark.parametrize("mode", list(FUSE_MODES))
@settings(max_examples=6, deadline=None)
@given(_dimension_numbers())
def test_random_dimension_numbers(mode, case):
    wshape, nb, xshape, dn, lhs, rank = case
    key = jr.key(sum(wshape) + 7 * len(xshape))
    lora = _lora(key, wshape, rank=rank, batch_ndim=nb, dtype=jnp.float64)
    x = normal(jr.fold_in(key, 1), xshape, jnp.float64)
    with mock.patch.object(factored, "FUSE_MAX_COPY", FUSE_MODES[mode]):
        _check(lora, x, dn, lhs)


def _grad_jaxpr(lora, x):
    def loss(lora, x):
        return jnp.sum(quax.quaxify(lambda w, x: x @ w.T)(lora, x) ** 2)

    return str(jax.make_jaxpr(jax.grad(loss, allow_int=True))(lora, x))


@pytest.mark.parametrize("rows,fused", [(16, True), (3, True), (2, False)])
def test_fused_forward_only_when_it_pays(getkey, rows, fused):
    # [w | b] is a w-sized temporary: taken when w.size <= FUSE_MAX_COPY·output
    # size, i.e. here (8·6 <= 2·rows·8) from 3 rows on.
    lora = _lora(getkey(), (8, 6), rank=2)
    x = normal(getkey(), (rows, 6), jnp.float32)
    assert ("concatenate" in _grad_jaxpr(lora, x)) == fused
    # Inference is never fused: two products and a sum.
    jaxpr = str(jax.make_jaxpr(quax.quaxify(lambda w, x: x @ w.T))(lora, x))
    assert "concatenate" not in jaxpr
    assert jaxpr.count("dot_general") == 3


# Whether each of CASES lines up for the fused forward: x·w must contract one weight
# axis, and t = x·f1 must carry x's axes with the rank axis in its place. Not so for
# a stack axis left free or summed (t keeps it), a second rest axis (t keeps it), two
# contracted axes, or no contraction at all.
LINES_UP = [True] * 7 + [False] * 5


@pytest.mark.parametrize("case,lines_up", list(zip(CASES, LINES_UP)))
def test_concat_label(case, lines_up):
    wshape, nb, xshape, dn, lhs = case
    x = jnp.zeros(xshape)
    lora = _lora(jr.key(0), wshape, batch_ndim=nb)
    seen = []
    real = factored.concat_label

    def spy(spec):
        seen.append(real(spec))
        return seen[-1]

    def f(l, x):
        args = (l, x) if lhs else (x, l)
        return jnp.sum(lax.dot_general(*args, dn))

    # Traced, not run: the rule picks its form while tracing.
    with mock.patch.object(factored, "concat_label", spy):
        jax.make_jaxpr(jax.grad(quax.quaxify(f), argnums=1))(lora, x)
    assert seen and all((c is not None) == lines_up for c in seen), seen


def test_zero_b_equals_base(getkey):
    w = normal(getkey(), (8, 6))
    lora = ql.LoraArray(w, rank=2, key=getkey())
    x = normal(getkey(), (4, 6))
    f = lambda w, x: x @ w.T
    out, ref = eqx.filter_jit(lambda l, x: (quax.quaxify(f)(l, x), f(l.weight, x)))(
        lora, x
    )
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
