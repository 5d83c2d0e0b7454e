"""Property tests: the structural and lookup rules on random shapes, and adapter
files of random model structures.

The rules (`slice`, `dynamic_slice`, `gather`, `transpose`, `rev`, `squeeze`) are
checked against the dense reference — the same primitive applied to
`lora.merged()` — in values and in gradients with respect to `a`, `b` and (DoRA)
the magnitude. The draws are few but cover batch axes, rank, DoRA along either
axis, clamped and out-of-bounds indices, and the fallbacks to a plain result.
"""

import itertools
import os
import tempfile

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import quax
from hypothesis import given, settings

import quaxlora as ql

from .helpers import assert_tree_allclose, device, normal, np_rng, random_arrays


TOL = dict(rtol=1e-5, atol=1e-5)
FEW = settings(max_examples=6, deadline=None)


@st.composite
def _lora_spec(draw, *, batch=(0, 1), core=(2, 3), sizes=(1, 4), ones=False):
    """Shape, batch axes, rank and DoRA axis of a random `LoraArray`."""
    n = draw(st.sampled_from(batch))
    k = draw(st.integers(*core))
    lo = 1 if ones else 2  # size-1 axes only where the test wants them
    shape = tuple(draw(st.integers(lo, sizes[1])) for _ in range(n + k))
    rank = draw(st.integers(1, 3))
    dora = draw(st.booleans())
    dora_axis = draw(st.integers(0, k - 1)) if dora else None
    seed = draw(st.integers(0, 2**16))
    return shape, n, rank, dora_axis, seed


def _make(spec):
    # Drawn by NumPy: no compilation per shape (see tests/helpers.py). The DoRA
    # magnitude is the initial one, `‖w + s·b⊗a‖` along the DoRA axis, moved.
    shape, n, rank, dora_axis, seed = spec
    rng = np_rng(seed)
    batch, out, rest = shape[:n], shape[n], shape[n + 1 :]
    w = rng.standard_normal(shape)
    bound = 1 / np.sqrt(np.prod(rest))
    a = rng.uniform(-bound, bound, (*batch, rank, *rest))
    b = 0.5 * rng.standard_normal((*batch, out, rank))
    kwargs = {}
    if dora_axis is not None:
        ba = np.einsum("...or,...rx->...ox", b, a.reshape(*batch, rank, -1))
        v = w + 2.0 * ba.reshape(shape)  # scaling = alpha / rank = 2
        axes = tuple(i for i in range(n, len(shape)) if i != n + dora_axis)
        m = np.sqrt(np.sum(v**2, axis=axes))
        m = m * (1 + 0.3 * rng.uniform(size=m.shape))
        kwargs = dict(magnitude=device(m, jnp.float32), dora_axis=dora_axis)
    return ql.LoraArray(
        device(w, jnp.float32),
        a=device(a, jnp.float32),
        b=device(b, jnp.float32),
        alpha=2.0 * rank,
        batch_ndim=n,
        **kwargs,
    )


def _trained(lora):
    return (lora.a, lora.b, lora.magnitude)


def _check(f, lora, *, factored=None):
    """`f(lora)` under quaxify against `f(lora.merged())`: values, and gradients of
    a random projection of the output w.r.t. `a`, `b` and the magnitude.
    `factored`: whether the result must still be a `LoraArray`. (One compilation
    per example: compiling dominates these tests.)"""
    rebuild = lambda t: eqx.tree_at(_trained, lora, t, is_leaf=lambda x: x is None)
    kinds = []

    def run(t, dense):
        l = rebuild(t)
        y = f(l.merged()) if dense else quax.quaxify(f)(l)
        kinds.append(type(y))
        return y.merged() if isinstance(y, ql.LoraArray) else y

    @jax.jit
    def both(t, ct):
        values = run(t, False), run(t, True)
        loss = lambda t, dense: jnp.sum(run(t, dense) * ct)
        grads = jax.grad(loss)(t, False), jax.grad(loss)(t, True)
        return values, grads

    shape = jax.eval_shape(lambda: f(lora.merged()))
    ct = normal(1, shape.shape, shape.dtype)
    (got, want), (g_got, g_want) = both(_trained(lora), ct)
    if factored is not None:
        assert (kinds[0] is ql.LoraArray) == factored, kinds[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_tree_allclose(got, want, **TOL)
    assert_tree_allclose(g_got, g_want, **TOL)


@FEW
@given(_lora_spec(), st.data())
def test_slice(spec, data):
    lora = _make(spec)
    starts, limits, strides = [], [], []
    for size in lora.shape:
        s = data.draw(st.integers(0, size - 1))
        starts.append(s)
        limits.append(data.draw(st.integers(s + 1, size)))
        strides.append(data.draw(st.integers(1, 2)))
    f = lambda w: lax.slice(w, starts, limits, strides)
    _check(f, lora, factored=True)


@FEW
@given(_lora_spec(), st.data())
def test_dynamic_slice(spec, data):
    lora = _make(spec)
    sizes = [data.draw(st.integers(1, size)) for size in lora.shape]
    # Starts out of range too: clamped into range, for `a` and `b` alike.
    starts = [data.draw(st.integers(-2, size + 1)) for size in lora.shape]
    f = lambda w: lax.dynamic_slice(w, [jnp.asarray(s) for s in starts], sizes)
    _check(f, lora, factored=True)


@FEW
@given(_lora_spec(batch=(0,), core=(2, 2)), st.data())
def test_gather(spec, data):
    lora = _make(spec)
    axis = data.draw(st.integers(0, 1))
    size = lora.shape[axis]
    ids = data.draw(st.lists(st.integers(-size, size + 2), min_size=1, max_size=4))
    ids = jnp.asarray(ids, jnp.int32)
    mode = data.draw(st.sampled_from(["clip", "fill"]))
    kw = dict(fill_value=-2.0) if mode == "fill" else {}
    _check(lambda w: jnp.take(w, ids, axis=axis, mode=mode, **kw), lora)
    # An embedding lookup under vmap (a batched gather of whole rows).
    rows = jnp.clip(ids, 0, lora.shape[0] - 1)
    _check(lambda w: jax.vmap(lambda i: w[i])(rows), lora)


@st.composite
def _permutation(draw, n, k):
    """A permutation the transpose rule keeps factored: batch axes among
    themselves, then the output axis first (rest axes permuted) or, for a matrix,
    swapped with the input axis."""
    batch = list(draw(st.permutations(range(n))))
    if k == 2 and draw(st.booleans()):
        return (*batch, n + 1, n)
    rest = list(draw(st.permutations(range(n + 1, n + k))))
    return (*batch, n, *rest)


@FEW
@given(_lora_spec(), st.data())
def test_transpose(spec, data):
    lora = _make(spec)
    n, k = lora.batch_ndim, lora.ndim - lora.batch_ndim
    perm = data.draw(_permutation(n, k))
    _check(lambda w: jnp.transpose(w, perm), lora, factored=True)


@FEW
@given(_lora_spec(), st.data())
def test_rev(spec, data):
    lora = _make(spec)
    dims = data.draw(st.lists(st.integers(0, lora.ndim - 1), unique=True, max_size=3))
    _check(lambda w: lax.rev(w, tuple(sorted(dims))), lora, factored=True)


@FEW
@given(_lora_spec(sizes=(1, 3), ones=True), st.data())
def test_squeeze(spec, data):
    lora = _make(spec)
    unit = [i for i, s in enumerate(lora.shape) if s == 1]
    pick = st.lists(st.sampled_from(unit), unique=True) if unit else st.just([])
    dims = tuple(sorted(data.draw(pick)))
    n = lora.batch_ndim
    rest_left = lora.ndim - n - 1 - sum(d > n for d in dims)
    dora_axis_gone = lora.use_dora and n + lora.dora_axis in dims
    stays = n not in dims and rest_left >= 1 and not dora_axis_gone
    _check(lambda w: lax.squeeze(w, dims), lora, factored=stays)


# ------------------------------------------------------------------ adapter files


class _Block(eqx.Module):
    layers: list
    table: dict

    def __call__(self, x):  # not called: the files hold the structure only
        raise NotImplementedError


_LAYERS = {
    "linear": lambda k: eqx.nn.Linear(3, 4, key=k),
    "linear-nobias": lambda k: eqx.nn.Linear(4, 2, use_bias=False, key=k),
    "conv1d": lambda k: eqx.nn.Conv1d(2, 3, 3, key=k),
    "conv2d": lambda k: eqx.nn.Conv2d(2, 4, 2, groups=2, key=k),
    "embedding": lambda k: eqx.nn.Embedding(5, 3, key=k),
    "norm": lambda k: eqx.nn.LayerNorm(3),
}
_TYPES = {
    "linear": eqx.nn.Linear,
    "conv": (eqx.nn.Conv1d, eqx.nn.Conv2d),
    "embedding": eqx.nn.Embedding,
}


@st.composite
def _structure(draw, depth=0):
    """A nest of lists, dicts and `_Block`s of layers, as names."""
    leaf = st.sampled_from(sorted(_LAYERS))
    if depth >= 2:
        return draw(leaf)
    child = leaf | _structure(depth=depth + 1)
    kind = draw(st.sampled_from(["list", "dict", "block"]))
    if kind == "list":
        return ("list", draw(st.lists(child, min_size=1, max_size=3)))
    keys = st.sampled_from(["p", "q", "r"])
    if kind == "dict":
        return ("dict", draw(st.dictionaries(keys, child, min_size=1, max_size=2)))
    return (
        "block",
        draw(st.lists(child, min_size=1, max_size=2)),
        draw(st.dictionaries(keys, child, max_size=2)),
    )


def _build(structure, key):
    if isinstance(structure, str):
        return _LAYERS[structure](key)
    kind, *parts = structure
    if kind == "list":
        return [_build(s, k) for s, k in zip(parts[0], jr.split(key, len(parts[0])))]
    if kind == "dict":
        keys = jr.split(key, len(parts[0]))
        return {n: _build(s, k) for (n, s), k in zip(sorted(parts[0].items()), keys)}
    k1, k2 = jr.split(key)
    return _Block(_build(("list", parts[0]), k1), _build(("dict", parts[1]), k2))


@settings(max_examples=6, deadline=None)
@given(
    _structure(),
    st.lists(st.sampled_from(sorted(_TYPES)), min_size=1, max_size=3, unique=True),
    st.integers(1, 3),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_adapter_file_round_trip(structure, targets, rank, dora, rslora, seed):
    # The structures traced, not run, their arrays drawn by NumPy: no compilation
    # (see tests/helpers.py). The shapes do not depend on the key.
    rng, key = np_rng(seed), jr.key(0)
    base = random_arrays(eqx.filter_eval_shape(_build, structure, key), rng)
    where = tuple(
        itertools.chain.from_iterable(
            t if isinstance(t, tuple) else (t,) for t in (_TYPES[n] for n in targets)
        )
    )
    is_target = lambda x: isinstance(x, where)
    present = any(map(is_target, jtu.tree_leaves(base, is_leaf=is_target)))
    if not present:
        return  # nothing to adapt in this structure (loraify would say so)
    adapt = lambda m: ql.loraify(
        m, rank=rank, key=key, where=where, use_dora=dora, rslora=rslora
    )
    adapters = ql.partition(eqx.filter_eval_shape(adapt, base))[0]
    # Every trainable array random, so a load that drops or mixes them up shows.
    model = ql.with_adapters(base, random_arrays(adapters, rng))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        ql.save_adapters(path, model)
        onto_base = ql.load_adapters(path, base)
        fresh = ql.with_adapters(base, random_arrays(adapters, rng))
        onto_adapters = ql.load_adapters(path, fresh)
    assert eqx.tree_equal(onto_base, model)
    assert eqx.tree_equal(onto_adapters, model)
    # The structure of the base is untouched where nothing was adapted.
    assert jtu.tree_structure(ql.unloraify(onto_base)) == jtu.tree_structure(base)
