"""DoRA: values and gradients against a dense reference of the formula
`m · V / sg(‖V‖)`, `V = w + s·b⊗a`, the norm over every non-batch axis but
`dora_axis` — written here independently of the library."""

import re

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import pytest
import quax
from hypothesis import assume, given, settings, strategies as st

import quaxlora as ql
from quaxlora._dora import dora_norm

from .helpers import assert_tree_allclose
from .test_dot_general import _dimension_numbers


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


TOL = dict(rtol=1e-9, atol=1e-9)


@eqx.filter_jit  # one compile per shape, not one per eager op
def _lora(key, shape, *, rank=3, batch_ndim=0, dora_axis=0, dtype=jnp.float64):
    """A DoRA `LoraArray` with random non-zero `b` and a magnitude away from ‖V‖."""
    k1, k2, k3, k4 = jr.split(key, 4)
    w = jr.normal(k1, shape, dtype)
    lora = ql.LoraArray(
        w,
        rank=rank,
        alpha=2.0 * rank,
        batch_ndim=batch_ndim,
        stop_gradient=False,
        key=k2,
        use_dora=True,
        dora_axis=dora_axis,
    )
    b = 0.5 * jr.normal(k3, lora.b.shape, dtype)
    m = lora.magnitude * (1 + 0.3 * jr.uniform(k4, lora.magnitude.shape, dtype))
    return eqx.tree_at(lambda l: (l.b, l.magnitude), lora, (b, m))


def _v(lora):
    """`w + s·b⊗a`, batched over the leading axes, formed densely."""
    n = lora.batch_ndim
    a = lora.a.reshape(lora.a.shape[: n + 1] + (-1,))
    d = jnp.einsum("...ok,...kr->...or", lora.b, a).reshape(lora.shape)
    return lora.weight + lora.scaling * d


def _norm(lora):
    v = _v(lora)
    n, d = lora.batch_ndim, lora.batch_ndim + lora.dora_axis
    axes = tuple(i for i in range(n, v.ndim) if i != d)
    return jnp.sqrt(jnp.sum(v**2, axis=axes, keepdims=True))


def dense(lora):
    """The dense reference: `m · V / sg(‖V‖)`."""
    v = _v(lora)
    n, d = lora.batch_ndim, lora.batch_ndim + lora.dora_axis
    shape = [1] * v.ndim
    for i in [*range(n), d]:
        shape[i] = v.shape[i]
    m = lora.magnitude.reshape(shape)
    return m * v / lax.stop_gradient(_norm(lora))


@eqx.filter_jit  # one compile per `f` and shapes, not one per eager op
def _values_and_grads(f, lora, *args):
    got = quax.quaxify(f)(lora, *args)
    want = f(dense(lora), *args)
    loss = lambda y: jnp.sum(jnp.sin(y) ** 2)
    g_got = jax.grad(lambda l: loss(quax.quaxify(f)(l, *args)))(lora)
    g_want = jax.grad(lambda l: loss(f(dense(l), *args)))(lora)
    return got, want, g_got, g_want


def _check(f, lora, *args, tol=TOL):
    """`f(W, *args)` with `W` the `LoraArray` and with its dense reference: values,
    and gradients of a non-linear loss with respect to `a`, `b`, `m` and `w`."""
    got, want, g_got, g_want = _values_and_grads(f, lora, *args)
    assert_tree_allclose(got, want, **tol)
    for name in ("a", "b", "magnitude", "weight"):
        assert_tree_allclose(getattr(g_got, name), getattr(g_want, name), **tol)


@st.composite
def _weights(draw):
    nb = draw(st.integers(0, 1))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(nb + draw(st.integers(2, 4))))
    axis = draw(st.integers(0, len(shape) - nb - 1))
    return shape, nb, axis, draw(st.integers(1, 3))


@settings(max_examples=5, deadline=None)
@given(_weights())
def test_factored_norm(case):
    shape, nb, axis, rank = case
    lora = _lora(jr.key(sum(shape)), shape, rank=rank, batch_ndim=nb, dora_axis=axis)
    norm, want_norm, merged, want_merged = _norms(lora)
    assert_tree_allclose(norm, want_norm, **TOL)
    assert_tree_allclose(merged, want_merged, **TOL)


@eqx.filter_jit
def _norms(lora):
    want = _norm(lora).reshape(lora.magnitude.shape)
    return dora_norm(lora), want, lora.merged(), dense(lora)


@eqx.filter_jit  # one compile, not one per eager op
def _starts_at_norm(k1, k2, k3, k4):
    """Pairs `(got, want)`: magnitudes at initialisation and the first outputs."""
    w = jr.normal(k1, (6, 4))
    lora = ql.LoraArray(w, rank=2, key=k2, use_dora=True)
    emb = ql.LoraArray(w, rank=2, key=k3, use_dora=True, dora_axis=1)
    x = jr.normal(k4, (3, 4))
    f = quax.quaxify(lambda w, x: x @ w.T)
    return [
        (lora.magnitude, jnp.linalg.norm(w, axis=1)),
        (emb.magnitude, jnp.linalg.norm(w, axis=0)),
        (f(lora, x), x @ w.T),
        (f(emb, x), x @ w.T),
    ]


def test_magnitude_starts_at_norm(getkey):
    for got, want in _starts_at_norm(getkey(), getkey(), getkey(), getkey()):
        assert_tree_allclose(got, want, **TOL)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(
    "f",
    [
        lambda w, x: x @ w.T,  # a linear layer: the DoRA axis `o` is free
        lambda w, x: (x @ w.T[:, :2]) @ w[:2],  # transposed use: `o` contracted
        lambda w, x: jnp.einsum("oi,ni->on", w, x),
    ],
)
def test_dot_general(getkey, f, axis):
    lora = _lora(getkey(), (5, 4), dora_axis=axis)
    _check(f, lora, jr.normal(getkey(), (3, 4)))


@pytest.mark.parametrize("axis", [0, 1])
@settings(max_examples=3, deadline=None)
@given(_dimension_numbers())
def test_random_dimension_numbers(axis, case):
    wshape, nb, xshape, dn, lhs, rank = case
    assume(axis < len(wshape) - nb)
    key = jr.key(sum(wshape) + 7 * len(xshape))
    lora = _lora(key, wshape, rank=rank, batch_ndim=nb, dora_axis=axis)
    x = jr.normal(jr.fold_in(key, 1), xshape, jnp.float64)
    (lc, rc), (lb, rb) = dn
    wc, wb = (lc, lb) if lhs else (rc, rb)
    # The axes of the scale `m/‖V‖`: the stack axes and the DoRA axis. It rescales
    # the output if they all survive there, else `x` if `x` has them all; a product
    # that sums some and keeps others has no factored form: an error says so.
    sl = [*range(nb), nb + axis]

    def f(w, x):
        return lax.dot_general(w, x, dn) if lhs else lax.dot_general(x, w, dn)

    if not (all(i not in wc for i in sl) or all(i in wc or i in wb for i in sl)):
        with pytest.raises(TypeError, match="stacked DoRA"):
            quax.quaxify(f)(lora, x)
        return
    _check(f, lora, x)


def test_stacked_scan(getkey):
    lora = _lora(getkey(), (3, 4, 4), batch_ndim=1)

    def f(w, x):
        def body(h, wi):
            return jnp.tanh(wi @ h), None

        return lax.scan(body, x, w)[0]

    _check(f, lora, jr.normal(getkey(), (4,)))
    _check(jax.vmap(lambda w, x: w @ x, (0, None)), lora, jr.normal(getkey(), (4,)))


@pytest.mark.parametrize(
    "dn,groups,shape",
    [
        (("NCH", "OIH", "NCH"), 1, (6, 4, 3)),  # per output channel
        (("NCHW", "OIHW", "NCHW"), 2, (6, 2, 3, 3)),  # grouped
        (("NHC", "HIO", "NHC"), 1, (3, 4, 6)),  # the DoRA axis is spatial here
        (("NCH", "IOH", "NCH"), 1, (4, 6, 3)),  # `o` is the input feature
    ],
)
@pytest.mark.parametrize("plan", ["factored", "delta"])
def test_conv(getkey, dn, groups, shape, plan, monkeypatch):
    import quaxlora._rules._conv as conv_rules

    lora = _lora(getkey(), shape, rank=2)
    spatial = (5,) * (len(shape) - 2)
    cin = shape[dn[1].index("I")] * groups
    x = jr.normal(getkey(), (2, cin, *spatial) if dn[0][1] == "C" else (2, 5, cin))
    real = conv_rules._make_plan
    monkeypatch.setattr(conv_rules, "_make_plan", lambda *a: _force(real(*a), plan))

    def f(w, x):
        return lax.conv_general_dilated(
            x,
            w,
            (1,) * len(spatial),
            "SAME",
            dimension_numbers=dn,
            feature_group_count=groups,
        )

    _check(f, lora, x)


def _force(p, plan):
    import dataclasses

    if p.orientation is None:
        return p
    return dataclasses.replace(p, plan=plan)


def test_embedding_lookups_and_tied_head(getkey):
    table = _lora(getkey(), (11, 6), dora_axis=1)  # PEFT: per feature column
    ids = jnp.array([0, 3, 3, 10])

    def f(w, ids):
        rows = jax.vmap(lambda i: w[i])(ids)  # gather
        one = w[ids[1]]  # dynamic_slice + squeeze
        some = w[2:5]  # slice
        logits = rows @ w.T  # tied head: transpose
        return jnp.sum(rows, 0) + one + jnp.ones(3) @ some + logits.sum(1).mean()

    _check(f, table, ids)
    rows = _lora(getkey(), (11, 6), dora_axis=0)  # per row
    _check(f, rows, ids)
    # Columns of the table (gathering along the other axis).
    _check(lambda w, i: jnp.take(w, i, axis=1, mode="clip"), rows, jnp.array([5, 0]))


def test_loraify_model(getkey):
    """Linear, Conv and Embedding in one model, against the dense reference."""

    class Net(eqx.Module):
        emb: eqx.nn.Embedding
        conv: eqx.nn.Conv1d
        fc: eqx.nn.Linear

        def __call__(self, tokens, signal):
            h = jax.vmap(self.emb)(tokens).mean(0) + self.conv(signal).mean(1)
            return self.fc(jnp.tanh(h) + self.emb.weight.T @ jnp.ones(7))

    @eqx.filter_jit  # one compile for building, one for all the comparisons
    def build(k, key):
        net = Net(
            eqx.nn.Embedding(7, 6, key=k[0]),
            eqx.nn.Conv1d(2, 6, 3, key=k[1]),
            eqx.nn.Linear(6, 3, key=k[2]),
        )
        model = ql.loraify(
            net, rank=2, key=key, where=["emb", "conv", "fc"], use_dora=True
        )
        return net, model

    net, model = build(jr.split(getkey(), 3), getkey())
    assert model.emb.weight.dora_axis == 1 and model.fc.weight.dora_axis == 0
    args = (jnp.array([1, 4, 6]), jr.normal(getkey(), (2, 9)))

    @eqx.filter_jit
    def pairs(net, model, key, args):
        """Pairs `(got, want)`: at initialisation, gradients, merged."""
        trainable, frozen = ql.partition(model)
        trainable = jax.tree_util.tree_map(
            lambda x: x + 0.3 * jr.normal(jr.fold_in(key, x.size), x.shape), trainable
        )

        def ref(m):
            to_dense = lambda x: dense(x) if isinstance(x, ql.LoraArray) else x
            is_lora = lambda x: isinstance(x, ql.LoraArray)
            return jax.tree_util.tree_map(to_dense, m, is_leaf=is_lora)(*args)

        loss = lambda y: jnp.sum(jnp.sin(y))
        got = jax.grad(lambda t: loss(quax.quaxify(eqx.combine(t, frozen))(*args)))
        want = jax.grad(lambda t: loss(ref(eqx.combine(t, frozen))))
        trained = eqx.combine(trainable, frozen)
        return [
            (quax.quaxify(model)(*args), net(*args)),
            (got(trainable), want(trainable)),
            (ql.merge(trained)(*args), ref(trained)),
        ]

    for got, want in pairs(net, model, getkey(), args):
        assert_tree_allclose(got, want, **TOL)
    # The magnitude is trained and counted.
    n = sum(x.size for x in (net.emb.weight, net.conv.weight, net.fc.weight))
    count = ql.count_parameters(model)
    mags = 6 + 6 + 3
    assert count.trainable == 2 * (7 + 6) + 2 * (6 + 6) + 2 * (6 + 3) + mags
    assert count.total == count.trainable + n + 6 + 3  # + unadapted biases


def test_save_load_and_errors(getkey, tmp_path):
    @eqx.filter_jit  # one compile, not one per eager op
    def build(k1, k2, k3):
        net = eqx.nn.MLP(4, 3, 8, 1, key=k1)
        model = ql.loraify(net, rank=2, key=k2, use_dora=True)
        model = eqx.tree_at(
            lambda m: m.layers[0].weight.magnitude,
            model,
            model.layers[0].weight.magnitude * 2,
        )
        return net, model, ql.loraify(net, rank=2, key=k3), ql.merge(model)

    net, model, plain, merged = build(getkey(), getkey(), getkey())
    ql.save_adapters(tmp_path / "d.safetensors", model)
    loaded = ql.load_adapters(tmp_path / "d.safetensors", net)
    x = jnp.ones(4)
    run = eqx.filter_jit(lambda m: quax.quaxify(m)(x))  # the same program for all
    assert_tree_allclose(run(loaded), run(model), **TOL)
    assert_tree_allclose(ql.partition(loaded)[0], ql.partition(model)[0], **TOL)
    switched = ql.with_adapters(net, ql.partition(model)[0])
    assert_tree_allclose(run(switched), run(model), **TOL)
    with pytest.raises(ValueError, match="DoRA"):
        ql.load_adapters(tmp_path / "d.safetensors", plain)
    with pytest.raises(ValueError, match="DoRA"):
        ql.combine_adapters([model, model])
    with pytest.raises(ValueError, match="DoRA"):
        ql.unmerge(merged, model)
    with pytest.raises(ValueError, match="magnitude"):
        ql.LoraArray(jnp.ones((3, 2)), rank=1, key=getkey(), magnitude=jnp.ones(2))
    with pytest.raises(ValueError, match="dora_axis"):
        ql.LoraArray(jnp.ones((3, 2)), rank=1, key=getkey(), dora_axis=2)


def _weight_sized(hlo: str, shape: str) -> list[str]:
    """Opcodes of the HLO instructions that produce an array of `shape`, other
    than parameters and the square of one (`‖w‖²`, fused into its reduction)."""
    out = []
    for line in hlo.splitlines():
        m = re.search(
            r"= " + re.escape(shape) + r"\{[0-9,]*\} ([a-z-]+)\((.*?)\)", line
        )
        if m is None or m.group(1) == "parameter":
            continue
        args = [a.strip() for a in m.group(2).split(",")]
        if m.group(1) == "multiply" and len(set(args)) == 1:
            continue
        out.append(m.group(1))
    return out


def _step(model, x):
    # `model` is abstract: its arrays are `jax.ShapeDtypeStruct`s.
    arrays, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    trainable, frozen = eqx.partition(arrays, ql.trainable_spec(model))

    def step(t, f):
        m = lambda t: quax.quaxify(eqx.combine(t, f, static))
        loss = lambda t: jnp.sum(jnp.sin(jax.vmap(m(t))(x)))
        g = jax.grad(loss)(t)
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, t, g)

    return jax.jit(step).lower(trainable, frozen).compile()


def test_no_weight_sized_temporary():
    """XLA's own view of the compiled step: a DoRA training step forms no array of
    a weight's size that the LoRA step does not (no `w + s·b@a`, no `b@a`), and
    needs no more temporary memory beyond a fraction of one weight."""

    def models():  # weights (384, 256), (128, 384)
        net = eqx.nn.MLP(256, 128, 384, 1, key=jr.key(0))
        lora = ql.loraify(net, rank=16, key=jr.key(1))
        return lora, ql.loraify(net, rank=16, key=jr.key(1), use_dora=True)

    # The compiled steps need only shapes and dtypes: abstract models (`eval_shape`)
    # compile nothing to build.
    lora, dora = eqx.filter_eval_shape(models)
    x = jnp.ones((4, 256))  # activations far smaller than a weight
    lora, dora = _step(lora, x), _step(dora, x)
    for shape in ("f32[384,256]", "f32[128,384]"):
        extra = _weight_sized(dora.as_text(), shape)
        for op in _weight_sized(lora.as_text(), shape):
            extra.remove(op)
        assert extra == [], (shape, extra)
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    assert temp(dora) - temp(lora) < 384 * 256 * 4 / 4, (temp(dora), temp(lora))


def test_stacked_embedding_and_conv_in_scan(getkey):
    """Layer stacks (`filter_vmap`) of embeddings and convolutions under `lax.scan`,
    one magnitude per layer: values and gradients against the dense reference."""

    @eqx.filter_jit  # one compile, not one per eager op
    def build(k, key, key2):
        embs = eqx.filter_vmap(lambda k: eqx.nn.Embedding(7, 5, key=k))(k)
        convs = eqx.filter_vmap(lambda k: eqx.nn.Conv1d(2, 2, 3, padding=1, key=k))(k)
        model = ql.loraify(
            (embs, convs),
            rank=2,
            key=key,
            where=[eqx.nn.Embedding, eqx.nn.Conv],
            use_dora=True,
        )
        trainable, frozen = ql.partition(model)
        trainable = jax.tree_util.tree_map(
            lambda x: x + 0.3 * jr.normal(jr.fold_in(key2, x.size), x.shape),
            trainable,
        )
        return trainable, frozen

    trainable, frozen = build(jr.split(getkey(), 3), getkey(), getkey())
    ids = jnp.array([1, 6, 2])

    def run(model):
        def body(h, layers):
            emb, conv = layers
            h = h + jax.vmap(emb)(ids).T[:2, :3].sum(0)
            return jnp.tanh(h + conv(jnp.stack([h, -h]))[0]), None

        return jax.lax.scan(body, jnp.ones(3), model)[0]

    is_lora = lambda x: isinstance(x, ql.LoraArray)
    to_dense = lambda m: jax.tree_util.tree_map(
        lambda x: dense(x) if is_lora(x) else x, m, is_leaf=is_lora
    )
    got = lambda t: jnp.sum(jnp.sin(quax.quaxify(run)(eqx.combine(t, frozen))))
    want = lambda t: jnp.sum(jnp.sin(run(to_dense(eqx.combine(t, frozen)))))
    # Values and gradients, in one compiled program.
    both = eqx.filter_jit(
        lambda t: [(got(t), want(t)), (jax.grad(got)(t), jax.grad(want)(t))]
    )
    for g, w in both(trainable):
        assert_tree_allclose(g, w, **TOL)


@pytest.mark.parametrize("transform", ["checkpoint", "cond", "jit"])
def test_transforms(getkey, transform):
    f = lambda w, x: jnp.tanh(w @ x)
    g = {
        "checkpoint": lambda w, x: jax.checkpoint(f)(w, x),
        "cond": lambda w, x: lax.cond(x[0] > -10, f, lambda w, x: -f(w, x), w, x),
        "jit": lambda w, x: jax.jit(f)(w, x),
    }[transform]
    _check(g, _lora(getkey(), (5, 4)), jr.normal(getkey(), (4,)))
