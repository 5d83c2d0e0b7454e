"""`dot_general` with a `LoraArray`: values and gradients vs the dense reference.

Gradients are checked with the differentiated forward in each of its forms (see
`quaxlora/_rules/_factored.py`): one product against the merged `w + s·f2⊗f1`, one
product of the concatenated `[x | s·t]` and `[w | f2]`, and two products and a sum."""

import contextlib
import math
import re
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


# The differentiated forward's three forms: (FUSE_MAX_COPY, MERGE_FORWARD). The
# merged form needs a float32 or wider weight; elsewhere "merged" gives the
# concatenated form, as the library does.
FUSE_MODES = {
    "merged": (math.inf, True),
    "concatenated": (math.inf, False),
    "two-product": (0, False),
}


@contextlib.contextmanager
def forward_form(mode):
    max_copy, merge = FUSE_MODES[mode]
    with mock.patch.object(factored, "FUSE_MAX_COPY", max_copy):
        with mock.patch.object(factored, "MERGE_FORWARD", merge):
            yield


@pytest.fixture(params=list(FUSE_MODES))
def fuse(request):
    """Force the differentiated forward into one of its forms."""
    with forward_form(request.param):
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
    [
        (jnp.float32, "merged"),
        (jnp.float64, "merged"),
        (jnp.float32, "concatenated"),
        (jnp.float64, "concatenated"),
        (jnp.float32, "two-product"),
    ],
)
def test_cases(getkey, wshape, nb, xshape, dn, lhs, dtype, mode):
    lora = _lora(getkey(), wshape, batch_ndim=nb, dtype=dtype)
    x = normal(getkey(), xshape, dtype)
    with forward_form(mode):
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
    with forward_form(mode):
        _check(lora, x, dn, lhs)


def _grad_jaxpr(lora, x):
    def loss(lora, x):
        return jnp.sum(quax.quaxify(lambda w, x: x @ w.T)(lora, x) ** 2)

    return str(jax.make_jaxpr(jax.grad(loss, allow_int=True))(lora, x))


def _form(jaxpr: str, dtype) -> str:
    """Which form the differentiated forward took, from the gradient's jaxpr of an
    (8, 6) weight: the merged form adds a weight-shaped array (in either layout)."""
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[
        jnp.dtype(dtype).name
    ]
    merged = re.search(rf"{short}\[(8,6|6,8)\] = add ", jaxpr) is not None
    concatenated = "concatenate" in jaxpr
    assert not (merged and concatenated)
    return "merged" if merged else "concatenated" if concatenated else "two-product"


@pytest.mark.parametrize(
    "rows,dtype,form",
    [
        (16, jnp.float32, "merged"),
        (3, jnp.float32, "merged"),
        (2, jnp.float32, "two-product"),
        (16, jnp.bfloat16, "concatenated"),
        (3, jnp.float16, "concatenated"),
        (2, jnp.bfloat16, "two-product"),
    ],
)
def test_forward_form(getkey, rows, dtype, form):
    # The one-product forms have a w-sized temporary (the merged weight, or
    # [w | b]): taken when w.size <= FUSE_MAX_COPY·output size, i.e. here
    # (8·6 <= 2·rows·8) from 3 rows on. The merged weight only for float32 or wider
    # (a narrower dtype would round a small update away).
    lora = _lora(getkey(), (8, 6), rank=2, dtype=dtype)
    x = normal(getkey(), (rows, 6), dtype)
    assert _form(_grad_jaxpr(lora, x), dtype) == form
    with mock.patch.object(factored, "MERGE_FORWARD", False):
        expect = "two-product" if form == "two-product" else "concatenated"
        assert _form(_grad_jaxpr(lora, x), dtype) == expect
    # Inference is never fused: one factored product, lowered as two products and
    # a sum.
    f = jax.jit(quax.quaxify(lambda w, x: x @ w.T))
    assert str(f.trace(lora, x).jaxpr).count("quaxlora_factored") == 1
    hlo = f.lower(lora, x).as_text()
    assert "concatenate" not in hlo
    assert hlo.count("stablehlo.dot_general") == 3


def test_forward_form_under_dropout(getkey):
    # Under LoRA dropout the adapter's input is not `x`: the merged weight would
    # apply the update to the undropped input, so the concatenated form is used.
    w = normal(getkey(), (8, 6), jnp.float32)
    lora = ql.LoraArray(w, rank=2, dropout=0.5, dropout_key=getkey(), key=getkey())
    x = normal(getkey(), (16, 6), jnp.float32)
    assert _form(_grad_jaxpr(lora, x), jnp.float32) == "concatenated"


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
