import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import pytest
import quax
from hypothesis import assume, given, settings, strategies as st

import quaxlora as ql
from quaxlora._rules import _conv

from .helpers import (
    assert_tree_allclose,
    normal,
    np_rng,
    random_arrays,
    random_lora,
    TOLS,
)


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


TOL = TOLS[jnp.dtype(jnp.float64)]

# (name, spatial dims, conv kwargs, in channels, out channels, kernel, input size)
CASES = [
    ("1d", 1, dict(window_strides=(1,), padding="VALID"), 4, 6, (3,), (9,)),
    ("1d-same-stride", 1, dict(window_strides=(2,), padding="SAME"), 3, 5, (4,), (9,)),
    ("2d", 2, dict(window_strides=(1, 1), padding="SAME"), 4, 6, (3, 3), (6, 5)),
    (
        "2d-explicit",
        2,
        dict(window_strides=(2, 1), padding=((1, 2), (0, 1)), rhs_dilation=(2, 1)),
        3,
        4,
        (3, 2),
        (8, 6),
    ),
    (
        "2d-lhs-dilation",
        2,
        dict(window_strides=(1, 1), padding=((2, 1), (1, 1)), lhs_dilation=(2, 3)),
        3,
        4,
        (3, 3),
        (4, 3),
    ),
    (
        "2d-grouped",
        2,
        dict(window_strides=(1, 1), padding="SAME", feature_group_count=2),
        4,
        6,
        (3, 3),
        (5, 5),
    ),
    (
        "2d-depthwise",
        2,
        dict(window_strides=(2, 2), padding="SAME", feature_group_count=4),
        4,
        8,
        (3, 3),
        (6, 6),
    ),
    (
        "3d",
        3,
        dict(window_strides=(1, 2, 1), padding="VALID", rhs_dilation=(1, 1, 2)),
        2,
        3,
        (2, 2, 2),
        (4, 5, 5),
    ),
    (
        "3d-grouped",
        3,
        dict(window_strides=(1, 1, 1), padding="SAME", feature_group_count=3),
        3,
        6,
        (2, 1, 2),
        (3, 3, 4),
    ),
]
IDS = [c[0] for c in CASES]


def _setup(case, key, dtype=jnp.float64, layout=None, n=2, stop_gradient=True):
    """Input and `LoraArray` kernel for a case, in the layout `(lhs, rhs, out)`
    (strings as `lax.conv_general_dilated` takes them; default NC..., OI...)."""
    _, nd, kwargs, cin, cout, kernel, size = case
    groups = kwargs.get("feature_group_count", 1)
    spatial = "DHW"[-nd:] if nd > 1 else "W"
    lhs_l, rhs_l, out_l = layout or ("NC" + spatial, "OI" + spatial, "NC" + spatial)
    sizes = dict(N=n, C=cin, **dict(zip(spatial, size)))
    ksizes = dict(O=cout, I=cin // groups, **dict(zip(spatial, kernel)))
    xshape = tuple(sizes[c] for c in lhs_l)
    wshape = tuple(ksizes[c] for c in rhs_l)
    x, lora = _build(key, xshape, wshape, dtype, stop_gradient)
    kwargs = dict(kwargs, dimension_numbers=(lhs_l, rhs_l, out_l))
    return x, lora, kwargs


def _build(key, xshape, wshape, dtype, stop_gradient):
    # Drawn by NumPy: no compilation per shape (see tests/helpers.py).
    rng = np_rng(key)
    x = normal(rng, xshape, dtype)
    w = normal(rng, wshape, dtype, scale=1 / 3)
    lora = random_lora(w, rank=2, alpha=3.0, key=rng, stop_gradient=stop_gradient)
    return x, lora


def _dense(x, lora, kwargs):
    return lax.conv_general_dilated(x, lora.merged(), **kwargs)


def _plans(x, lora, kwargs):
    params, _ = _conv.conv_params(x, lora, **kwargs)
    fns = {"delta": lambda x, l: _conv._merged_kernel_conv(x, l, params)}
    if _conv.conv_plan(x, lora, **kwargs).orientation is not None:
        fns["factored"] = lambda x, l: _conv._factored(x, l, params)
    fns["dispatch"] = quax.quaxify(
        lambda x, l: lax.conv_general_dilated(x, l, **kwargs)
    )
    return fns


def _run_plans(x, lora, kwargs, ref=_dense):
    """Every plan's output and the dense reference `ref(x, lora, kwargs)`, in one
    compiled program (rather than one per eager primitive)."""
    fns = _plans(x, lora, kwargs)

    @eqx.filter_jit
    def run(x, lora):
        return {name: f(x, lora) for name, f in fns.items()}, ref(x, lora, kwargs)

    return run(x, lora)


LAYOUTS = [
    None,
    ("NWC", "OIW", "NWC"),  # channels-last input and output
    ("CNW", "WIO", "WNC"),  # LoRA axis = a spatial axis: delta plan only
    ("NCW", "IOW", "NCW"),  # LoRA axis = the kernel's input features
]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_values(case, getkey):
    x, lora, kwargs = _setup(case, getkey())
    outs, want = _run_plans(x, lora, kwargs)
    for name, got in outs.items():
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert_tree_allclose(got, want, **TOL)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_dimension_numbers(layout, getkey):
    case = CASES[1]
    x, lora, kwargs = _setup(case, getkey(), layout=layout)
    outs, want = _run_plans(x, lora, kwargs)
    orientation = _conv.conv_plan(x, lora, **kwargs).orientation
    assert orientation == {"OIW": "out", "WIO": None, "IOW": "in"}[layout[1]]
    for got in outs.values():
        assert_tree_allclose(got, want, **TOL)


GRAD_CASES = [CASES[i] for i in (1, 3, 4, 6, 8)]


@pytest.mark.parametrize("stop_gradient", [True, False])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients(case, stop_gradient, getkey):
    x, lora, kwargs = _setup(case, getkey(), stop_gradient=stop_gradient)
    shape = jax.eval_shape(lambda x, l: _dense(x, l, kwargs), x, lora).shape
    cot = normal(getkey(), shape, x.dtype)
    fns = _plans(x, lora, kwargs)

    # Jitted, the reference and every plan in one program: one compilation rather
    # than one per eager primitive.
    @eqx.filter_jit
    def grads(lora, x, cot):
        def both(f):
            loss = lambda l, x: jnp.sum(cot * f(x, l))
            return eqx.filter_grad(loss)(lora, x), jax.grad(loss, argnums=1)(lora, x)

        ref = both(lambda x, l: _dense(x, l, kwargs))
        return ref, [both(f) for f in fns.values()]

    (want, want_x), got_all = grads(lora, x, cot)
    for got, got_x in got_all:
        assert_tree_allclose(got, want, **TOL)
        assert_tree_allclose(got_x, want_x, **TOL)
        if stop_gradient:
            assert jnp.all(got.weight == 0)
        else:
            assert jnp.any(got.weight != 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=["dense", "depthwise"])
def test_dtypes(case, dtype, getkey):
    x, lora, kwargs = _setup(case, getkey(), dtype=dtype)
    ref = lambda x, lora, kwargs: _dense(
        x.astype(jnp.float64),
        jax.tree.map(lambda v: v.astype(jnp.float64), lora),
        kwargs,
    )
    outs, want = _run_plans(x, lora, kwargs, ref)
    for got in outs.values():
        assert got.dtype == dtype
        assert_tree_allclose(got.astype(jnp.float64), want, **TOLS[jnp.dtype(dtype)])


def test_jit_vmap_grad(getkey):
    x, lora, kwargs = _setup(CASES[5], getkey(), n=1)
    xs = normal(getkey(), (3, *x.shape), x.dtype)
    conv = lambda l, x: lax.conv_general_dilated(x, l, **kwargs)
    qconv = quax.quaxify(conv)
    loss = lambda l: jnp.sum(jnp.sin(jax.vmap(qconv, (None, 0))(l, xs)))
    ref = lambda l: jnp.sum(jnp.sin(jax.vmap(conv, (None, 0))(l.merged(), xs)))
    # The references jitted, in one program (one compilation rather than one per
    # eager primitive); the eager `vmap` of the rule below stays eager.
    dense, grad_ref = eqx.filter_jit(
        lambda lora: (
            jax.vmap(lambda x: conv(lora.merged(), x))(xs),
            eqx.filter_grad(ref)(lora),
        )
    )(lora)
    assert_tree_allclose(jax.jit(jax.vmap(qconv, (None, 0)))(lora, xs), dense, **TOL)
    assert_tree_allclose(jax.vmap(qconv, (None, 0))(lora, xs), dense, **TOL)
    assert_tree_allclose(
        quax.quaxify(jax.vmap(conv, (None, 0)))(lora, xs), dense, **TOL
    )
    assert_tree_allclose(eqx.filter_jit(eqx.filter_grad(loss))(lora), grad_ref, **TOL)


@pytest.mark.parametrize(
    "make",
    [
        lambda k: eqx.nn.Conv1d(4, 6, 3, stride=2, padding="SAME", key=k),
        lambda k: eqx.nn.Conv2d(4, 4, 3, groups=4, dilation=2, padding=2, key=k),
        lambda k: eqx.nn.Conv3d(2, 4, 2, groups=2, key=k),
        lambda k: eqx.nn.Conv2d(3, 4, 3, padding=1, padding_mode="REFLECT", key=k),
        lambda k: eqx.nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, key=k),
        lambda k: eqx.nn.ConvTranspose2d(
            4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, key=k
        ),
        lambda k: eqx.nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1), key=k),
    ],
)
def test_equinox_layers(make, getkey):
    # The loraified layer's structure, its arrays (weight, bias, `a`, a non-zero `b`)
    # drawn by NumPy: no compilation (see tests/helpers.py). The checks are jitted:
    # one compilation rather than one per eager primitive.
    where = (eqx.nn.Conv, eqx.nn.ConvTranspose)
    build = lambda k: ql.loraify(make(k), rank=2, key=k, where=where)
    lora = random_arrays(eqx.filter_eval_shape(build, getkey()), getkey())
    layer = ql.unloraify(lora)
    x = normal(getkey(), (layer.in_channels,) + (5,) * layer.num_spatial_dims)
    loss = lambda m, x: jnp.sum(quax.quaxify(m)(x) ** 2)
    trainable, frozen = ql.partition(lora)

    @eqx.filter_jit
    def check(trainable, frozen, x):
        lora = eqx.combine(trainable, frozen)
        got = eqx.filter_grad(lambda t: loss(eqx.combine(t, frozen), x))(trainable)
        want = eqx.filter_grad(
            lambda t: jnp.sum(ql.merge(eqx.combine(t, frozen))(x) ** 2)
        )(trainable)
        return quax.quaxify(lora)(x), ql.merge(lora)(x), got, want

    out, ref, got, want = check(trainable, frozen, x)
    assert_tree_allclose(out, ref, **TOLS[jnp.dtype(jnp.float32)])
    assert_tree_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rev_and_conv_transpose(getkey):
    x, lora, kwargs = _setup(CASES[2], getkey())
    flipped = quax.quaxify(lambda l: jnp.flip(l, (0, 2, 3)))(lora)
    assert isinstance(flipped, ql.LoraArray)
    assert_tree_allclose(flipped.merged(), jnp.flip(lora.merged(), (0, 2, 3)), **TOL)
    # A flipped kernel (as a hand-written transposed convolution uses) then a conv.
    f = lambda l, x: lax.conv_general_dilated(x, jnp.flip(l, (2, 3)), **kwargs)
    assert_tree_allclose(quax.quaxify(f)(lora, x), f(lora.merged(), x), **TOL)
    g = lambda l, x: lax.conv_transpose(
        x, l, (2, 2), "SAME", dimension_numbers=("NCHW", "IOHW", "NCHW")
    )
    x = normal(getkey(), (2, 6, 4, 4), jnp.float64)
    assert_tree_allclose(quax.quaxify(g)(lora, x), g(lora.merged(), x), **TOL)


def test_batch_group_count(getkey):
    x = normal(getkey(), (4, 3, 6), jnp.float64)
    w = normal(getkey(), (4, 3, 2), jnp.float64)
    lora = random_lora(w, rank=2, key=getkey())
    kwargs = dict(window_strides=(1,), padding="VALID", batch_group_count=2)
    assert _conv.conv_plan(x, lora, **kwargs).plan == "delta"
    got = quax.quaxify(lambda l: lax.conv_general_dilated(x, l, **kwargs))(lora)
    assert_tree_allclose(got, _dense(x, lora, kwargs), **TOL)


def test_lora_as_input_is_an_error(getkey):
    lora = ql.LoraArray(jnp.ones((1, 3, 8)), rank=2, key=getkey())
    w = jnp.ones((4, 3, 2))
    f = quax.quaxify(lambda x: lax.conv_general_dilated(x, w, (1,), "VALID"))
    with pytest.raises(TypeError, match="`conv_general_dilated`"):
        f(lora)


def _xla_flops(f, *args) -> float:
    return jax.jit(f).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize(
    "case, n, want",
    [
        (  # dense conv over many pixels: the factored extra is r/out of the base
            (
                None,
                2,
                dict(window_strides=(1, 1), padding="SAME"),
                16,
                16,
                (3, 3),
                (8, 8),
            ),
            2,
            "factored",
        ),
        (CASES[6], 8, "delta"),  # depthwise: the factored form costs r × the base
        (  # many groups: the factored extra is about r·G/out of the base
            (
                None,
                2,
                dict(window_strides=(1, 1), padding="SAME", feature_group_count=8),
                16,
                16,
                (3, 3),
                (6, 6),
            ),
            2,
            "delta",
        ),
    ],
    ids=["dense", "depthwise", "grouped"],
)
def test_plan_choice(case, n, want, getkey):
    x, lora, kwargs = _setup(case, getkey(), n=n)
    plan = _conv.conv_plan(x, lora, **kwargs)
    print(plan)
    assert plan.plan == want
    assert plan.orientation == "out"
    assert plan.training[want] == min(plan.training.values())
    # The estimate agrees with XLA's own count of a training step of each plan.
    params, _ = _conv.conv_params(x, lora, **kwargs)
    xla = {}
    forms = (("factored", _conv._factored), ("delta", _conv._merged_kernel_conv))
    for name, f in forms:
        loss = lambda l, x: jnp.sum(f(x, l, params) ** 2)
        xla[name] = _xla_flops(jax.grad(loss, argnums=(0, 1)), lora, x)
    print(xla)
    assert min(xla, key=xla.get) == want
    # The dispatched rule runs the chosen plan.
    jaxpr = jax.make_jaxpr(
        quax.quaxify(lambda l: lax.conv_general_dilated(x, l, **kwargs))
    )(lora)
    # (The base convolution of the factored plan sits inside a `custom_jvp`.)
    convs = str(jaxpr).count("conv_general_dilated[")
    assert convs == (2 if want == "factored" else 1)


def test_stacked_convs(getkey):
    # A stack of convs (`filter_vmap`): vmap with quaxify inside runs the rule per
    # layer; quaxify outside meets `reshape` from conv's batching rule, which folds
    # the stack into the kernel's features (tests/test_reshape.py).
    # The structure of the loraified stack, its arrays (weights, biases, `a`, a
    # non-zero `b`) drawn by NumPy: no compilation (see tests/helpers.py). The checks
    # are jitted: one compilation rather than one per eager primitive.
    def build(key):
        make = lambda k: eqx.nn.Conv2d(3, 4, 3, key=k)
        convs = eqx.filter_vmap(make)(jr.split(key, 2))
        return ql.loraify(convs, rank=2, key=key, where=eqx.nn.Conv)

    lora = random_arrays(eqx.filter_eval_shape(build, getkey()), getkey())
    xs = normal(getkey(), (2, 3, 6, 6))
    assert lora.weight.batch_ndim == 1

    @eqx.filter_jit
    def run(lora, xs):
        inside = eqx.filter_vmap(lambda m, x: quax.quaxify(m)(x))(lora, xs)
        outside = quax.quaxify(eqx.filter_vmap(lambda m, x: m(x)))(lora, xs)
        want = eqx.filter_vmap(lambda m, x: m(x))(ql.merge(lora), xs)
        return inside, outside, want

    inside, outside, want = run(lora, xs)
    assert_tree_allclose(inside, want, **TOLS[jnp.dtype(jnp.float32)])
    assert_tree_allclose(outside, want, **TOLS[jnp.dtype(jnp.float32)])


@st.composite
def _random_conv(draw):
    nd = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    size = tuple(draw(st.integers(3, 6)) for _ in range(nd))
    ints = lambda lo, hi: tuple(draw(st.integers(lo, hi)) for _ in range(nd))
    explicit = tuple(zip(ints(0, 2), ints(0, 2)))
    padding = draw(st.sampled_from(["VALID", "SAME", "SAME_LOWER", explicit]))
    kwargs = dict(
        window_strides=ints(1, 2),
        padding=padding,
        lhs_dilation=ints(1, 2),
        rhs_dilation=ints(1, 2),
        feature_group_count=groups,
    )
    spatial = "HW"[-nd:] if nd > 1 else "W"
    layout = (
        "".join(draw(st.permutations("NC" + spatial))),
        "".join(draw(st.permutations("OI" + spatial))),
        "".join(draw(st.permutations("NC" + spatial))),
    )
    return (None, nd, kwargs, cin, cout, kernel, size), layout


@settings(max_examples=10, deadline=None)
@given(_random_conv())
def test_random_convolutions(case):
    case, layout = case
    x, lora, kwargs = _setup(case, jr.key(len(str(case))), layout=layout, n=1)
    try:
        shape = jax.eval_shape(lambda x, l: _dense(x, l, kwargs), x, lora)  # no run
    except (ValueError, TypeError):
        assume(False)  # e.g. a dilated kernel larger than the padded input
    assume(shape.size > 0)
    outs, want = _run_plans(x, lora, kwargs)
    for got in outs.values():
        assert_tree_allclose(got, want, **TOL)
